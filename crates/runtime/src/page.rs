//! Pagination for every List RPC: page size rules and opaque page tokens.
//!
//! A token carries the position after the last item returned and the scope of the listing it
//! belongs to (e.g. the parent), so a token cannot be replayed against another listing.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::InvalidInput;

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

/// Encodes a cursor as an opaque page token for `scope`.
pub fn encode(cursor: &str, scope: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("v1\n{scope}\n{cursor}"))
}

fn decode(token: &str, scope: &str) -> Result<String, ()> {
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| ())?;
    let text = String::from_utf8(bytes).map_err(|_| ())?;
    let mut parts = text.splitn(3, '\n');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("v1"), Some(token_scope), Some(cursor)) if token_scope == scope && !cursor.is_empty() => {
            Ok(cursor.to_owned())
        }
        _ => Err(()),
    }
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
        fn arbitrary_tokens_never_panic(token in "\\PC{0,80}") {
            let _ = PageRequest::parse(10, &token, "scope");
        }
    }
}
