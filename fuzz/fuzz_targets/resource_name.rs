//! Resource names (AIP-122) with UUID segments, as every RPC takes them.
//!
//! Properties: no panic for any name and pattern; an accepted name is exactly the pattern with
//! its UUIDs written in their one canonical form, so one resource has one name.
#![no_main]

use keyshare_runtime::resource;
use libfuzzer_sys::fuzz_target;

const PATTERNS: &[&[&str]] = &[
    &["projects", "*"],
    &["projects", "*", "keys", "*"],
    &["projects", "*", "keys", "*", "members", "*"],
    &["projects", "*", "members", "*"],
    &["organizations", "*"],
    &["organizations", "*", "members", "*"],
    &["organizations", "*", "serviceAccounts", "*"],
    &["accounts", "*"],
    &["invitations", "*"],
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(name) = std::str::from_utf8(rest) else {
        return;
    };
    let pattern = PATTERNS[usize::from(selector) % PATTERNS.len()];
    if let Some(ids) = resource::uuids(name, pattern) {
        let mut ids = ids.iter();
        let canonical: Vec<String> = pattern
            .iter()
            .map(|part| if *part == "*" { ids.next().expect("one id per *").to_string() } else { (*part).to_owned() })
            .collect();
        assert_eq!(canonical.join("/"), name, "accepted a second name for one resource");
    }
});
