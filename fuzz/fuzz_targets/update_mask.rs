//! `update_mask` of every Update RPC.
//!
//! Properties: no panic; the paths an accepted mask yields are all allowed ones.
#![no_main]

use keyshare_runtime::error::update_paths;
use libfuzzer_sys::fuzz_target;

const ALLOWED: &[&str] = &["display_name", "description", "sandbox.rate_limit", "production.active"];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mask = if text.is_empty() {
        None
    } else {
        Some(prost_types::FieldMask { paths: text.split(',').map(str::to_owned).collect() })
    };
    if let Ok(paths) = update_paths(mask, ALLOWED) {
        assert!(paths.iter().all(|path| ALLOWED.contains(&path.as_str())), "{paths:?}");
    }
});
