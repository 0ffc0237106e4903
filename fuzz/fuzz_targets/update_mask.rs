//! `update_mask` of every Update RPC.
//!
//! Properties: no panic; the paths an accepted mask yields are all allowed ones; without a
//! mask, only the fields the request sets (AIP-134), never the rest.
#![no_main]

use keyshare_runtime::error::update_paths;
use libfuzzer_sys::fuzz_target;

const ALLOWED: &[&str] = &["display_name", "description", "sandbox.rate_limit", "production.active"];

fuzz_target!(|data: &[u8]| {
    let Some((&populated_bits, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    // The fields the request sets, and one the service does not allow.
    let populated: Vec<&str> = ALLOWED
        .iter()
        .chain(&["etag"])
        .enumerate()
        .filter(|(bit, _)| populated_bits & (1 << bit) != 0)
        .map(|(_, path)| *path)
        .collect();
    let mask = if text.is_empty() {
        None
    } else {
        Some(prost_types::FieldMask { paths: text.split(',').map(str::to_owned).collect() })
    };
    let absent = mask.as_ref().is_none_or(|m| m.paths.is_empty());
    if let Ok(paths) = update_paths(mask, ALLOWED, &populated) {
        assert!(paths.iter().all(|path| ALLOWED.contains(&path.as_str())), "{paths:?}");
        if absent {
            assert!(paths.iter().all(|path| populated.contains(&path.as_str())), "{paths:?} beyond {populated:?}");
        }
    }
});
