//! Email addresses, as sign-up, login, password reset and invitations take them.
//!
//! Properties: no panic; an accepted address is at most 254 bytes, has exactly the one `@` the
//! parser split on, and parses again to itself (parsing is idempotent); its normalised form
//! parses too.
#![no_main]

use keyshare_runtime::email::Email;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(email) = Email::parse(text, "email") {
        assert!(email.as_str().len() <= 254);
        assert_eq!(email.as_str().matches('@').count(), 1);
        assert_eq!(Email::parse(email.as_str(), "email").expect("reparse").as_str(), email.as_str());
        assert!(Email::parse(&email.normalized(), "email").is_ok());
    }
});
