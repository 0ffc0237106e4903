//! Identity's domain: validated input types and the values use cases return. Plain Rust; the
//! gRPC adapter converts to and from protobuf at the boundary.

use chrono::{DateTime, Utc};
use keyshare_runtime::error::InvalidInput;
use uuid::Uuid;

pub use keyshare_runtime::email::Email;

/// A name shown to people: 1–200 characters, no control characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DisplayName(String);

impl DisplayName {
    pub fn parse(raw: &str, field: &str) -> Result<Self, InvalidInput> {
        let name = raw.trim();
        if name.is_empty() {
            return Err(InvalidInput::field(field, "is required"));
        }
        if name.chars().count() > 200 {
            return Err(InvalidInput::field(field, "must be at most 200 characters"));
        }
        if name.chars().any(char::is_control) {
            return Err(InvalidInput::field(field, "must not contain control characters"));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A new password: at least 12 characters, at most 1024 bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct NewPassword(String);

impl std::fmt::Debug for NewPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NewPassword(..)")
    }
}

impl NewPassword {
    pub const MIN_CHARS: usize = 12;

    pub fn parse(raw: &str, field: &str) -> Result<Self, InvalidInput> {
        if raw.chars().count() < Self::MIN_CHARS {
            return Err(InvalidInput::field(field, "must be at least 12 characters"));
        }
        if raw.len() > 1024 {
            return Err(InvalidInput::field(field, "must be at most 1024 bytes"));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A role in an organization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrgRole {
    Owner,
    Reader,
}

impl OrgRole {
    pub fn as_str(self) -> &'static str {
        match self {
            OrgRole::Owner => "owner",
            OrgRole::Reader => "reader",
        }
    }

    pub fn from_db(value: &str) -> Self {
        if value == "owner" { OrgRole::Owner } else { OrgRole::Reader }
    }
}

/// Parses `{collection}/{uuid}` (AIP-122) and returns the id. Only the canonical UUID form is
/// a name (`runtime::resource`), so each resource has exactly one.
pub fn parse_name(raw: &str, collection: &str, field: &str) -> Result<Uuid, InvalidInput> {
    keyshare_runtime::resource::uuids(raw, &[collection, "*"])
        .map(|ids| ids[0])
        .ok_or_else(|| InvalidInput::field(field, format!("must look like {collection}/{{id}}")))
}

/// Parses `organizations/{org}/{child}/{uuid}` and returns both ids.
pub fn parse_child_name(raw: &str, child: &str, field: &str) -> Result<(Uuid, Uuid), InvalidInput> {
    keyshare_runtime::resource::uuids(raw, &["organizations", "*", child, "*"])
        .map(|ids| (ids[0], ids[1]))
        .ok_or_else(|| InvalidInput::field(field, format!("must look like organizations/{{id}}/{child}/{{id}}")))
}

/// An account as callers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub id: Uuid,
    pub email: String,
    pub display_name: String,
    pub email_verified: bool,
    pub created_at: DateTime<Utc>,
}

/// Tokens issued by login, refresh or a service-account exchange.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenGrant {
    pub access_token: String,
    pub access_expires_at: DateTime<Utc>,
    pub refresh_token: Option<String>,
    pub refresh_expires_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for TokenGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenGrant").field("access_expires_at", &self.access_expires_at).finish_non_exhaustive()
    }
}

/// An organization, with the caller's role in it when the caller is a member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Organization {
    pub id: Uuid,
    pub display_name: String,
    pub created_at: DateTime<Utc>,
    pub caller_role: Option<OrgRole>,
}

/// A membership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub organization_id: Uuid,
    pub account_id: Uuid,
    pub email: String,
    pub display_name: String,
    pub role: OrgRole,
    pub created_at: DateTime<Utc>,
}

/// A service account (never with its secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub id: Uuid,
    pub organization_id: Option<Uuid>,
    pub display_name: String,
    pub client_id: String,
    pub created_at: DateTime<Utc>,
}

/// A page of results and the token for the next one (empty on the last page).
#[derive(Clone, Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_page_token: String,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn names() {
        let id = Uuid::new_v4();
        assert_eq!(parse_name(&format!("accounts/{id}"), "accounts", "name").unwrap(), id);
        for bad in ["accounts/", "accounts/x", "orgs/{id}", &format!("accounts/{id}/x"), &format!("account/{id}")] {
            assert!(parse_name(bad, "accounts", "name").is_err(), "{bad}");
        }
        let (org, member) = (Uuid::new_v4(), Uuid::new_v4());
        let name = format!("organizations/{org}/members/{member}");
        assert_eq!(parse_child_name(&name, "members", "name").unwrap(), (org, member));
        assert!(parse_child_name(&name, "serviceAccounts", "name").is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(raw in "\\PC{0,300}") {
            let _ = DisplayName::parse(&raw, "display_name");
            let _ = NewPassword::parse(&raw, "password");
            let _ = parse_name(&raw, "accounts", "name");
            let _ = parse_child_name(&raw, "members", "name");
        }

        #[test]
        fn display_names_are_bounded(raw in "\\PC{0,400}") {
            if let Ok(name) = DisplayName::parse(&raw, "display_name") {
                prop_assert!(!name.as_str().is_empty() && name.as_str().chars().count() <= 200);
            }
        }
    }
}
