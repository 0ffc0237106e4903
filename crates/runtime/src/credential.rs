//! API-key credentials: `ks_test_` or `ks_live_`, 43 base62 characters of randomness, and a
//! 6-character base62 CRC32 of everything before it.
//!
//! The checksum lets an authorizer reject a mistyped or made-up credential before any lookup, and
//! lets secret scanners recognise a leaked key with few false positives. It is not a MAC: anyone
//! can compute it, so a credential with a valid checksum still has to be looked up by its hash.
//! Likewise the prefix is for people and scanners; authorization uses the environment stored
//! server-side, never the one a presented credential claims.

use rand::RngCore;
use rand::rngs::OsRng;

use crate::crypto::sha256;

/// The environment a credential belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Environment {
    Sandbox,
    Production,
}

impl Environment {
    /// The number both wire enums (`keyshare.keyring.v1.Environment` and
    /// `keyshare.authorizer.v1.Environment`) and the authorizer's usage tables give this
    /// environment. 0 is neither: unspecified.
    pub const fn number(self) -> i32 {
        match self {
            Self::Sandbox => 1,
            Self::Production => 2,
        }
    }

    /// The environment `number` names; `None` for 0 (unspecified) and for a number no version
    /// writes.
    pub const fn from_number(number: i32) -> Option<Self> {
        match number {
            1 => Some(Self::Sandbox),
            2 => Some(Self::Production),
            _ => None,
        }
    }

    /// The prefix of this environment's credentials.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Sandbox => SANDBOX_PREFIX,
            Self::Production => PRODUCTION_PREFIX,
        }
    }

    /// The name used in configuration, storage and APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sandbox => "sandbox",
            Self::Production => "production",
        }
    }

    /// The inverse of [`Environment::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sandbox" => Some(Self::Sandbox),
            "production" => Some(Self::Production),
            _ => None,
        }
    }
}

const SANDBOX_PREFIX: &str = "ks_test_";
const PRODUCTION_PREFIX: &str = "ks_live_";
/// Both prefixes have this length, so the position of body and checksum does not depend on it.
const PREFIX_LEN: usize = 8;
/// 62^43 > 2^256 > 62^42: the smallest fixed width that holds every 32-byte value.
const BODY_LEN: usize = 43;
/// 62^6 > 2^32 > 62^5.
const CHECKSUM_LEN: usize = 6;
const RANDOM_BYTES: usize = 32;
/// Where the checksum starts; it covers everything before.
const CHECKSUMMED_LEN: usize = PREFIX_LEN + BODY_LEN;

/// The length in bytes of every credential.
pub const CREDENTIAL_LEN: usize = PREFIX_LEN + BODY_LEN + CHECKSUM_LEN;

/// Digits, then uppercase, then lowercase: base62 digit `d` is `ALPHABET[d]`.
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A freshly generated credential. The plaintext exists only until it has been returned to its
/// owner once; what is stored is [`Credential::hash`] and [`Credential::hint`].
pub struct Credential {
    value: String,
    environment: Environment,
}

/// Shows only what [`CredentialHint`] shows, so that logging a credential by accident leaks
/// nothing of its random part.
impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hint = self.hint();
        write!(f, "Credential({}…{})", hint.prefix, hint.last_four)
    }
}

impl Credential {
    /// A new credential for `environment`, 256 bits from the operating system's CSPRNG.
    pub fn generate(environment: Environment) -> Self {
        let mut bytes = [0u8; RANDOM_BYTES];
        OsRng.fill_bytes(&mut bytes);
        Self::from_random_bytes(environment, bytes)
    }

    /// The credential whose random part is `bytes`; separate from [`Credential::generate`] so
    /// that the encoding can be tested against fixed vectors and fuzzed. Real credentials come
    /// only from [`Credential::generate`].
    pub fn from_random_bytes(environment: Environment, bytes: [u8; RANDOM_BYTES]) -> Self {
        let mut value = String::with_capacity(CREDENTIAL_LEN);
        value.push_str(environment.prefix());
        push_ascii(&mut value, &encode_body(bytes));
        let checksum = crc32(value.as_bytes());
        push_ascii(&mut value, &encode_checksum(checksum));
        Self { value, environment }
    }

    /// The full plaintext, for the one response that hands it to its owner.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// The environment this credential was generated for.
    pub fn environment(&self) -> Environment {
        self.environment
    }

    /// The prefix and the last four characters, safe to store and to show in listings.
    pub fn hint(&self) -> CredentialHint {
        CredentialHint { prefix: self.environment.prefix(), last_four: self.value[CREDENTIAL_LEN - 4..].to_owned() }
    }

    /// SHA-256 of the full string, the form in which the credential is stored and looked up.
    pub fn hash(&self) -> [u8; 32] {
        sha256(self.value.as_bytes())
    }
}

/// What may be shown of a credential: its prefix and its last four characters. The last four are
/// checksum characters, so they say nothing directly about the random part, and 24 bits of a CRC
/// leave more than 2^230 candidates for the 256 random bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialHint {
    pub prefix: &'static str,
    pub last_four: String,
}

/// Why a presented credential is malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MalformedCredential {
    #[error("credential must be exactly {CREDENTIAL_LEN} characters long")]
    Length,
    #[error("credential must start with {SANDBOX_PREFIX} or {PRODUCTION_PREFIX}")]
    Prefix,
    #[error("credential may contain only ASCII letters and digits after its prefix")]
    Alphabet,
    #[error("credential checksum does not match: it was mistyped, truncated or altered")]
    Checksum,
}

/// Checks format and checksum of a presented credential and returns the environment its prefix
/// names (a claim, not something to authorize on).
///
/// This runs on the authorizer's hot path for every request, so it allocates nothing, looks
/// nothing up, and does the cheap checks (length, prefix) first. It works on bytes throughout,
/// so input with multi-byte characters is rejected rather than sliced mid-character. Nothing here
/// compares against a secret, so early exits leak nothing.
///
/// The body is not checked to be below 2^256: a body no generated credential has is caught by the
/// lookup like any other unknown credential.
pub fn parse(presented: &str) -> Result<Environment, MalformedCredential> {
    let bytes = presented.as_bytes();
    if bytes.len() != CREDENTIAL_LEN {
        return Err(MalformedCredential::Length);
    }
    let (prefix, rest) = bytes.split_at(PREFIX_LEN);
    let environment = if prefix == SANDBOX_PREFIX.as_bytes() {
        Environment::Sandbox
    } else if prefix == PRODUCTION_PREFIX.as_bytes() {
        Environment::Production
    } else {
        return Err(MalformedCredential::Prefix);
    };
    if !rest.iter().all(|&b| digit_value(b).is_some()) {
        return Err(MalformedCredential::Alphabet);
    }
    let (checksummed, checksum) = bytes.split_at(CHECKSUMMED_LEN);
    match decode_checksum(checksum) {
        Some(stored) if stored == crc32(checksummed) => Ok(environment),
        _ => Err(MalformedCredential::Checksum),
    }
}

/// SHA-256 of a presented credential (after [`parse`] accepted it), to look it up by.
pub fn hash_presented(presented: &str) -> [u8; 32] {
    sha256(presented.as_bytes())
}

/// Appends base62 digits, which are ASCII by construction.
fn push_ascii(out: &mut String, digits: &[u8]) {
    out.extend(digits.iter().map(|&b| char::from(b)));
}

/// The value of base62 digit `b`, or `None` if `b` is not one.
fn digit_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'Z' => Some(b - b'A' + 10),
        b'a'..=b'z' => Some(b - b'a' + 36),
        _ => None,
    }
}

/// `bytes` as a big-endian unsigned integer in base62, left-padded with '0' to 43 digits.
/// Repeated short division of the 256-bit number by 62: each pass yields the next least
/// significant digit, and once the number is zero the remaining digits are the padding.
fn encode_body(mut bytes: [u8; RANDOM_BYTES]) -> [u8; BODY_LEN] {
    let mut digits = [b'0'; BODY_LEN];
    for digit in digits.iter_mut().rev() {
        let mut remainder = 0u32;
        for byte in bytes.iter_mut() {
            let accumulator = (remainder << 8) | u32::from(*byte);
            // accumulator < 62 * 256, so the quotient fits in a byte.
            *byte = (accumulator / 62) as u8;
            remainder = accumulator % 62;
        }
        *digit = ALPHABET[remainder as usize];
    }
    digits
}

/// `checksum` in base62, left-padded with '0' to 6 digits.
fn encode_checksum(checksum: u32) -> [u8; CHECKSUM_LEN] {
    let mut digits = [b'0'; CHECKSUM_LEN];
    let mut rest = checksum;
    for digit in digits.iter_mut().rev() {
        *digit = ALPHABET[(rest % 62) as usize];
        rest /= 62;
    }
    digits
}

/// The checksum that 6 base62 digits encode, or `None` if they are not digits or encode more
/// than 32 bits (6 digits reach up to 62^6 - 1, about 2^35.7).
fn decode_checksum(digits: &[u8]) -> Option<u32> {
    let mut value = 0u64;
    for &b in digits {
        value = value * 62 + u64::from(digit_value(b)?);
    }
    u32::try_from(value).ok()
}

/// CRC-32 (IEEE 802.3, as in zlib and PNG): reflected polynomial 0xEDB88320, initial value and
/// final XOR 0xFFFFFFFF. It detects every burst error of up to 32 bits, so every single-character
/// substitution in a credential.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32_TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The byte-at-a-time lookup table for [`crc32`], computed at compile time.
const CRC32_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The inverse of [`encode_body`], or `None` if the digits encode 2^256 or more.
    fn decode_body(digits: &[u8]) -> Option<[u8; RANDOM_BYTES]> {
        let mut bytes = [0u8; RANDOM_BYTES];
        for &d in digits {
            let mut carry = u32::from(digit_value(d)?);
            for byte in bytes.iter_mut().rev() {
                let accumulator = u32::from(*byte) * 62 + carry;
                *byte = (accumulator & 0xFF) as u8;
                carry = accumulator >> 8;
            }
            if carry != 0 {
                return None;
            }
        }
        Some(bytes)
    }

    fn environment() -> impl Strategy<Value = Environment> {
        prop_oneof![Just(Environment::Sandbox), Just(Environment::Production)]
    }

    /// Every printable ASCII character.
    fn printable() -> impl Iterator<Item = char> {
        (0x20u8..=0x7E).map(char::from)
    }

    // Expected values computed independently with Python's `zlib.crc32` and integer arithmetic.
    const ALL_ZEROS_SANDBOX: &str = "ks_test_000000000000000000000000000000000000000000020NsMy";
    const COUNTING_PRODUCTION: &str = "ks_live_003aUlTJC7tjlCTQj2uNU3MFagCXG9LRKRcwGkBIDlf1eBOAS";
    const ALL_ONES_PRODUCTION: &str = "ks_live_yhjskwdA6OZ1AL1YmHWZWm8LLG7HjnuCA2j5rOw8Xp145jpQ0";
    const ALL_ONES_SANDBOX: &str = "ks_test_yhjskwdA6OZ1AL1YmHWZWm8LLG7HjnuCA2j5rOw8Xp13cpORk";

    fn counting_bytes() -> [u8; 32] {
        std::array::from_fn(|i| i as u8)
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn known_vectors() {
        let zeros = Credential::from_random_bytes(Environment::Sandbox, [0; 32]);
        assert_eq!(zeros.expose(), ALL_ZEROS_SANDBOX);
        assert_eq!(&zeros.expose()[8..51], "0".repeat(43));
        let checksum = encode_checksum(crc32(&zeros.expose().as_bytes()[..51]));
        assert_eq!(&zeros.expose().as_bytes()[51..], checksum);

        let counting = Credential::from_random_bytes(Environment::Production, counting_bytes());
        assert_eq!(counting.expose(), COUNTING_PRODUCTION);

        let ones = Credential::from_random_bytes(Environment::Production, [0xFF; 32]);
        assert_eq!(ones.expose(), ALL_ONES_PRODUCTION);
        let ones = Credential::from_random_bytes(Environment::Sandbox, [0xFF; 32]);
        assert_eq!(ones.expose(), ALL_ONES_SANDBOX);

        for (vector, environment) in [
            (ALL_ZEROS_SANDBOX, Environment::Sandbox),
            (COUNTING_PRODUCTION, Environment::Production),
            (ALL_ONES_PRODUCTION, Environment::Production),
            (ALL_ONES_SANDBOX, Environment::Sandbox),
        ] {
            assert_eq!(parse(vector), Ok(environment), "{vector}");
        }
    }

    #[test]
    fn body_decodes_back_to_its_bytes() {
        for bytes in [[0; 32], [0xFF; 32], counting_bytes()] {
            let body = encode_body(bytes);
            assert_eq!(body.len(), 43);
            assert_eq!(decode_body(&body), Some(bytes));
        }
        // The largest body is the encoding of 2^256 - 1; one more does not fit in 32 bytes.
        let mut above = encode_body([0xFF; 32]);
        let last = above[42];
        above[42] = ALPHABET[usize::from(digit_value(last).unwrap()) + 1];
        assert_eq!(decode_body(&above), None);
    }

    #[test]
    fn checksum_encoding_covers_the_u32_range() {
        for value in [0, 1, 61, 62, 0xCBF4_3926, u32::MAX] {
            let digits = encode_checksum(value);
            assert_eq!(decode_checksum(&digits), Some(value));
        }
        assert_eq!(&encode_checksum(0), b"000000");
        assert_eq!(&encode_checksum(61), b"00000z");
        // u32::MAX is "4gfFC3"; anything above is not a checksum.
        assert_eq!(&encode_checksum(u32::MAX), b"4gfFC3");
        assert_eq!(decode_checksum(b"4gfFC4"), None);
        assert_eq!(decode_checksum(b"zzzzzz"), None);
        assert_eq!(decode_checksum(b"00000-"), None);
    }

    #[test]
    fn generated_credentials_have_the_documented_shape() {
        for environment in [Environment::Sandbox, Environment::Production] {
            let credential = Credential::generate(environment);
            let value = credential.expose();
            assert_eq!(value.len(), CREDENTIAL_LEN);
            assert_eq!(CREDENTIAL_LEN, 57);
            assert!(value.starts_with(environment.prefix()));
            assert!(value[8..].bytes().all(|b| b.is_ascii_alphanumeric()));
            assert_eq!(credential.environment(), environment);
            assert_eq!(parse(value), Ok(environment));
            assert_eq!(credential.hash(), hash_presented(value));
            assert_eq!(credential.hash(), sha256(value.as_bytes()));
        }
        let a = Credential::generate(Environment::Production);
        let b = Credential::generate(Environment::Production);
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    fn environment_names_and_prefixes() {
        assert_eq!(Environment::Sandbox.prefix(), "ks_test_");
        assert_eq!(Environment::Production.prefix(), "ks_live_");
        for environment in [Environment::Sandbox, Environment::Production] {
            assert_eq!(Environment::parse(environment.as_str()), Some(environment));
        }
        assert_eq!(Environment::Sandbox.as_str(), "sandbox");
        assert_eq!(Environment::Production.as_str(), "production");
        assert_eq!(Environment::parse("live"), None);
        assert_eq!(Environment::parse("Production"), None);
    }

    #[test]
    fn hint_shows_prefix_and_last_four() {
        let credential = Credential::from_random_bytes(Environment::Production, counting_bytes());
        assert_eq!(credential.hint(), CredentialHint { prefix: "ks_live_", last_four: "BOAS".into() });
    }

    #[test]
    fn debug_does_not_show_the_body() {
        let credential = Credential::generate(Environment::Sandbox);
        let debug = format!("{credential:?}");
        let value = credential.expose();
        assert_eq!(debug, format!("Credential(ks_test_…{})", &value[53..]));
        assert!(!debug.contains(&value[8..51]));
        for window in value.as_bytes()[8..51].windows(8) {
            assert!(!debug.as_bytes().windows(8).any(|w| w == window));
        }
    }

    #[test]
    fn malformed_credentials_are_classified() {
        let valid = COUNTING_PRODUCTION;
        assert_eq!(parse(""), Err(MalformedCredential::Length));
        assert_eq!(parse(&valid[..56]), Err(MalformedCredential::Length));
        assert_eq!(parse(&format!("{valid}A")), Err(MalformedCredential::Length));
        assert_eq!(parse(&valid.replacen("ks_live_", "ks_prod_", 1)), Err(MalformedCredential::Prefix));
        assert_eq!(parse(&valid.replacen("ks_live_", "KS_LIVE_", 1)), Err(MalformedCredential::Prefix));
        // The environment is part of what the checksum covers.
        assert_eq!(parse(&valid.replacen("ks_live_", "ks_test_", 1)), Err(MalformedCredential::Checksum));
        let mut dashed = valid.to_owned();
        dashed.replace_range(20..21, "-");
        assert_eq!(parse(&dashed), Err(MalformedCredential::Alphabet));
        // 57 bytes, but a two-byte character straddles the body; must not panic on slicing.
        let accented = format!("{}é{}", &valid[..30], &valid[32..]);
        assert_eq!(accented.len(), 57);
        assert_eq!(parse(&accented), Err(MalformedCredential::Alphabet));
        let accented_prefix = format!("ks_lié_{}", &valid[8..]);
        assert_eq!(accented_prefix.len(), 57);
        assert_eq!(parse(&accented_prefix), Err(MalformedCredential::Prefix));
        // A checksum above u32::MAX is rejected even though it is valid base62.
        let over = format!("{}zzzzzz", &valid[..51]);
        assert_eq!(parse(&over), Err(MalformedCredential::Checksum));
    }

    /// Exhaustive over positions and printable replacements for fixed credentials: CRC32 detects
    /// every burst of up to 32 bits, so no single substitution may slip through.
    #[test]
    fn every_single_substitution_is_rejected() {
        for vector in [ALL_ZEROS_SANDBOX, COUNTING_PRODUCTION, ALL_ONES_PRODUCTION, ALL_ONES_SANDBOX] {
            for index in 0..CREDENTIAL_LEN {
                for replacement in printable() {
                    if vector.as_bytes()[index] == replacement as u8 {
                        continue;
                    }
                    let mut altered = vector.to_owned();
                    altered.replace_range(index..=index, replacement.encode_utf8(&mut [0; 4]));
                    assert!(parse(&altered).is_err(), "{altered} was accepted");
                }
            }
        }
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(MalformedCredential::Length.to_string(), "credential must be exactly 57 characters long");
        assert_eq!(MalformedCredential::Prefix.to_string(), "credential must start with ks_test_ or ks_live_");
    }

    proptest! {
        #[test]
        fn every_credential_parses_to_its_environment(bytes in any::<[u8; 32]>(), environment in environment()) {
            let credential = Credential::from_random_bytes(environment, bytes);
            let value = credential.expose();
            prop_assert_eq!(value.len(), CREDENTIAL_LEN);
            prop_assert_eq!(parse(value), Ok(environment));
            prop_assert_eq!(decode_body(&value.as_bytes()[8..51]), Some(bytes));
            prop_assert_eq!(credential.hint().last_four, &value[53..]);
        }

        #[test]
        fn single_substitutions_are_rejected(
            bytes in any::<[u8; 32]>(),
            environment in environment(),
            index in 0..CREDENTIAL_LEN,
            replacement in any::<char>(),
        ) {
            let credential = Credential::from_random_bytes(environment, bytes);
            let original = credential.expose();
            prop_assume!(char::from(original.as_bytes()[index]) != replacement);
            let mut altered = original.to_owned();
            altered.replace_range(index..=index, replacement.encode_utf8(&mut [0; 4]));
            prop_assert!(parse(&altered).is_err(), "{} was accepted", altered);
            for printable in printable().filter(|&c| c as u8 != original.as_bytes()[index]) {
                let mut altered = original.to_owned();
                altered.replace_range(index..=index, printable.encode_utf8(&mut [0; 4]));
                prop_assert!(parse(&altered).is_err(), "{} was accepted", altered);
            }
        }

        #[test]
        fn truncated_or_extended_credentials_are_rejected(
            bytes in any::<[u8; 32]>(),
            environment in environment(),
            length in 0..CREDENTIAL_LEN,
            extra in any::<char>(),
        ) {
            let credential = Credential::from_random_bytes(environment, bytes);
            let value = credential.expose();
            prop_assert_eq!(parse(&value[..length]), Err(MalformedCredential::Length));
            prop_assert_eq!(parse(&format!("{value}{extra}")), Err(MalformedCredential::Length));
            prop_assert_eq!(parse(&format!("{extra}{value}")), Err(MalformedCredential::Length));
        }

        #[test]
        fn arbitrary_input_never_panics(input in any::<String>()) {
            let _ = parse(&input);
        }

        #[test]
        fn arbitrary_input_of_the_right_length_never_panics(
            input in "(ks_(test|live)_)?[0-9A-Za-z]{0,49}(\\PC{0,3})[0-9A-Za-z]{0,49}",
        ) {
            // Pad or cut (at a character boundary) to 57 bytes where possible, so most cases get
            // past the length check.
            let mut input = input;
            while input.len() < CREDENTIAL_LEN {
                input.push('0');
            }
            while input.len() > CREDENTIAL_LEN {
                input.pop();
            }
            let result = parse(&input);
            if input.len() == CREDENTIAL_LEN && !input.is_ascii() {
                prop_assert!(matches!(result, Err(MalformedCredential::Prefix | MalformedCredential::Alphabet)));
            }
        }
    }
}
