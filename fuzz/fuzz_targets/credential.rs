//! The credential parser, on the authorizer's hot path for every call.
//!
//! Properties: any input is answered without a panic; whatever is accepted has the credential
//! length and the environment of its prefix; a credential made from the input's first 33 bytes
//! round-trips through the parser with its environment, and changing any one of its characters
//! makes the parser reject it (the checksum catches every single-character change).
#![no_main]

use keyshare_runtime::credential::{self, CREDENTIAL_LEN, Credential, Environment};
use libfuzzer_sys::fuzz_target;

const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(environment) = credential::parse(text)
    {
        assert_eq!(text.len(), CREDENTIAL_LEN);
        assert!(text.starts_with(environment.prefix()));
    }

    if data.len() < 35 {
        return;
    }
    let environment = if data[0] & 1 == 0 { Environment::Sandbox } else { Environment::Production };
    let random: [u8; 32] = data[1..33].try_into().expect("32 bytes");
    let made = Credential::from_random_bytes(environment, random);
    let text = made.expose();
    assert_eq!(credential::parse(text), Ok(environment), "{made:?} does not round-trip");

    let position = usize::from(data[33]) % CREDENTIAL_LEN;
    let mut altered = text.as_bytes().to_vec();
    let replacement = ALPHABET[usize::from(data[34]) % ALPHABET.len()];
    if altered[position] == replacement {
        return;
    }
    altered[position] = replacement;
    let altered = String::from_utf8(altered).expect("ASCII");
    assert!(credential::parse(&altered).is_err(), "a one-character change of {made:?} was accepted");
});
