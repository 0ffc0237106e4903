//! Pagination for every List RPC: page size rules and opaque page tokens.
//!
//! A token carries the position after the last item returned and an HMAC-SHA256 tag over that
//! position and the scope of the listing it belongs to (e.g. the parent), under a server key
//! (`KEYSHARE_PAGE_TOKEN_KEY`). So a token cannot be replayed against another listing, and a
//! token nobody was given (a crafted position) is refused before any query runs. Every replica
//! and every service of a deployment shares the key, so a token works on any of them.

use std::sync::RwLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::env::{ConfigError, Env};
use crate::error::InvalidInput;

/// The variable holding the page-token key.
pub const KEY_VAR: &str = "KEYSHARE_PAGE_TOKEN_KEY";

/// The key used when `KEYSHARE_PAGE_TOKEN_KEY` is unset: the same in every service, so a
/// development install works as is. A production install sets its own (tokens made with this
/// one can be forged by anyone who reads this file).
const DEV_KEY: &[u8] = b"keyshare development page-token key; set KEYSHARE_PAGE_TOKEN_KEY";

/// Bytes of the tag a token carries (128 bits of HMAC-SHA256).
const TAG_LEN: usize = 16;

/// The server key page tokens are authenticated with.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenKey(Vec<u8>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0 == DEV_KEY { "TokenKey(development)" } else { "TokenKey(..)" })
    }
}

impl TokenKey {
    /// Reads `KEYSHARE_PAGE_TOKEN_KEY` (at least 32 characters), or the development key.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        match env.get(KEY_VAR) {
            None => Ok(Self::development()),
            Some(key) if key.len() >= 32 => Ok(Self(key.into_bytes())),
            Some(_) => Err(ConfigError::new(KEY_VAR, "must be at least 32 characters")),
        }
    }

    pub fn development() -> Self {
        Self(DEV_KEY.to_vec())
    }
}

static KEY: RwLock<Option<TokenKey>> = RwLock::new(None);

/// Makes `key` the one this process signs and checks page tokens with. Services call it at
/// start; until then the development key applies.
pub fn use_key(key: &TokenKey) {
    if let Ok(mut current) = KEY.write() {
        *current = Some(key.clone());
    }
}

fn tag(scope: &str, cursor: &str) -> [u8; TAG_LEN] {
    let key = KEY.read().ok().and_then(|k| k.clone()).unwrap_or_else(TokenKey::development);
    // HMAC takes keys of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key.0).unwrap_or_else(|_| unreachable!());
    for part in ["v2", scope, cursor] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part.as_bytes());
    }
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&mac.finalize().into_bytes()[..TAG_LEN]);
    tag
}

/// Results per page when the caller does not say.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page served; larger requests are clamped (AIP-158).
pub const MAX_PAGE_SIZE: usize = 1000;

/// A validated page request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// How many items to return.
    pub size: usize,
    /// The cursor after which to continue, `None` for the first page.
    pub after: Option<String>,
}

impl PageRequest {
    /// Validates `page_size` and `page_token` for a listing identified by `scope`.
    pub fn parse(page_size: i32, page_token: &str, scope: &str) -> Result<Self, InvalidInput> {
        let mut errors = InvalidInput::default();
        let size = match page_size {
            n if n < 0 => {
                errors.0.push(crate::error::FieldViolation::new("page_size", "must not be negative"));
                0
            }
            0 => DEFAULT_PAGE_SIZE,
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let after = if page_token.is_empty() {
            None
        } else {
            errors.check(
                decode(page_token, scope)
                    .map_err(|_| InvalidInput::field("page_token", "is not a page token of this listing")),
            )
        };
        errors.finish()?;
        Ok(Self { size, after })
    }
}

/// Encodes a cursor as an opaque page token for `scope`: the tag, then the cursor.
pub fn encode(cursor: &str, scope: &str) -> String {
    let mut bytes = tag(scope, cursor).to_vec();
    bytes.extend_from_slice(cursor.as_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

fn decode(token: &str, scope: &str) -> Result<String, ()> {
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| ())?;
    if bytes.len() <= TAG_LEN {
        return Err(());
    }
    let (presented, cursor) = bytes.split_at(TAG_LEN);
    let cursor = std::str::from_utf8(cursor).map_err(|_| ())?;
    if crate::crypto::constant_time_eq(presented, &tag(scope, cursor)) { Ok(cursor.to_owned()) } else { Err(()) }
}

/// Builds the next page token: `Some` only when a full page was returned and there is more.
/// Callers fetch `size + 1` rows to know whether more exist.
pub fn next_token<T>(items: &mut Vec<T>, size: usize, scope: &str, cursor: impl Fn(&T) -> String) -> String {
    if items.len() > size {
        items.truncate(size);
        items.last().map(|last| encode(&cursor(last), scope)).unwrap_or_default()
    } else {
        String::new()
    }
}

/// Cursor for listings ordered by (creation time, id).
pub fn time_id_cursor(at: chrono::DateTime<chrono::Utc>, id: uuid::Uuid) -> String {
    format!("{}_{}", at.timestamp_micros(), id)
}

/// Reads a [`time_id_cursor`].
pub fn parse_time_id_cursor(cursor: &str) -> Result<(chrono::DateTime<chrono::Utc>, uuid::Uuid), InvalidInput> {
    let bad = || InvalidInput::field("page_token", "is not a page token of this listing");
    let (micros, id) = cursor.split_once('_').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let at = chrono::DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
    Ok((at, uuid::Uuid::parse_str(id).map_err(|_| bad())?))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(PageRequest::parse(0, "", "s").unwrap().size, DEFAULT_PAGE_SIZE);
        assert_eq!(PageRequest::parse(5000, "", "s").unwrap().size, MAX_PAGE_SIZE);
        let err = PageRequest::parse(-1, "garbage", "s").unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["page_size", "page_token"]);
    }

    proptest! {
        #[test]
        fn tokens_round_trip_only_in_their_scope(cursor in "[ -~]{1,64}", scope in "[a-z/]{1,20}") {
            let token = encode(&cursor, &scope);
            let page = PageRequest::parse(10, &token, &scope).unwrap();
            prop_assert_eq!(page.after, Some(cursor));
            let other_scope = format!("{scope}x");
            prop_assert!(PageRequest::parse(10, &token, &other_scope).is_err());
        }

        #[test]
        fn tampered_tokens_are_refused(cursor in "[ -~]{1,64}", flip in 0usize..80, bit in 0u8..8) {
            let token = encode(&cursor, "scope");
            let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
            let at = flip % bytes.len();
            bytes[at] ^= 1 << bit;
            let tampered = URL_SAFE_NO_PAD.encode(bytes);
            prop_assert!(PageRequest::parse(10, &tampered, "scope").is_err());
        }

        #[test]
        fn arbitrary_tokens_never_panic(token in "\\PC{0,80}") {
            let _ = PageRequest::parse(10, &token, "scope");
        }
    }
}
