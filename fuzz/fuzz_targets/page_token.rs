//! Page tokens, which every List RPC takes back from its callers.
//!
//! Properties: no panic for any token, size and scope; a token is only ever accepted for the
//! listing it was made for; a token made for a cursor gives that cursor back.
#![no_main]

use keyshare_runtime::page::{self, PageRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let size = i32::from_le_bytes(data[..4].try_into().expect("4 bytes"));
    let Ok(text) = std::str::from_utf8(&data[4..]) else {
        return;
    };
    // A scope is a resource name the service writes: one line.
    let (token, scope) = text.split_once('\n').unwrap_or((text, "projects/p"));
    if scope.contains('\n') {
        return;
    }
    if let Ok(request) = PageRequest::parse(size, token, scope) {
        assert!(request.size <= page::MAX_PAGE_SIZE);
        if let Some(cursor) = &request.after {
            assert!(PageRequest::parse(size, token, &format!("{scope}x")).is_err(), "token accepted for another scope");
            assert!(!cursor.is_empty());
        }
    }
    if !token.is_empty() {
        let made = page::encode(token, scope);
        let parsed = PageRequest::parse(1, &made, scope).expect("a token of this listing");
        assert_eq!(parsed.after.as_deref(), Some(token));
    }
});
