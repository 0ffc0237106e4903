//! Email addresses as every service accepts them.

use crate::error::InvalidInput;

/// An email address, trimmed; compared by its lowercase form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str, field: &str) -> Result<Self, InvalidInput> {
        let email = raw.trim();
        let bad = |why: &str| Err(InvalidInput::field(field, why));
        if email.is_empty() {
            return bad("is required");
        }
        if email.len() > 254 {
            return bad("must be at most 254 characters");
        }
        let Some((local, domain)) = email.split_once('@') else {
            return bad("is not an email address");
        };
        let local_ok = !local.is_empty()
            && local.len() <= 64
            && !local.starts_with('.')
            && !local.ends_with('.')
            && !local.contains("..")
            && local.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c));
        let domain_ok = domain.contains('.')
            && domain.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if !local_ok || !domain_ok {
            return bad("is not an email address");
        }
        Ok(Self(email.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The form uniqueness and lookups use.
    pub fn normalized(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn emails() {
        for good in ["a@b.co", "First.Last+tag@Example.COM", "  x@y.io  "] {
            assert!(Email::parse(good, "email").is_ok(), "{good}");
        }
        for bad in ["", "plain", "a@b", "a@@b.co", "a b@c.co", "@b.co", "a@-b.co", "a..b@c.co", "a@b..co"] {
            assert!(Email::parse(bad, "email").is_err(), "{bad}");
        }
        assert_eq!(Email::parse("A@B.Co", "email").unwrap().normalized(), "a@b.co");
    }

    proptest! {
        #[test]
        fn parsing_never_panics(raw in "\\PC{0,300}") {
            let _ = Email::parse(&raw, "email");
        }
    }
}
