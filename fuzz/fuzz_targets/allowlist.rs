//! IP allowlists: what keyring accepts from a caller and what the authorizer reads back.
//!
//! Properties: no panic; every accepted entry is written as keyring stores it (its `Display`
//! form) and parses back in the authorizer's reading to the same network, so an allowlist never
//! loses an entry (and so never widens) between the two services; an accepted list is sorted and
//! free of duplicates.
#![no_main]

use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let entries: Vec<String> = text.split('\n').map(str::to_owned).collect();
    if let Ok(nets) = keyshare_keyring::domain::allowlist(&entries, "ip_allowlist") {
        assert!(nets.windows(2).all(|pair| pair[0] < pair[1]), "{nets:?}");
        for net in &nets {
            let stored = net.to_string();
            assert_eq!(stored.parse::<IpNet>().ok(), Some(*net), "{stored} does not read back");
        }
    }
});
