//! Resource names (AIP-122) whose variable segments are UUIDs, as every Keyshare API names its
//! resources: `projects/{project}/keys/{key}`. The typed names ([`OrganizationName`],
//! [`AccountName`], [`ProjectName`], [`KeyName`]) are the one spelling every service parses and
//! prints: `Display` writes the name, `FromStr` and `parse` (which names the request field in
//! its error) read it.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::error::InvalidInput;

/// A name that is not of its resource's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("must look like {shape}")]
pub struct BadName {
    /// The shape expected, e.g. `projects/{id}/keys/{id}`.
    pub shape: &'static str,
}

impl BadName {
    /// The violation of request field `field`.
    pub fn at(self, field: &str) -> InvalidInput {
        InvalidInput::field(field, self.to_string())
    }
}

macro_rules! uuid_name {
    ($(#[$doc:meta])* $name:ident, $collection:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub Uuid);

        impl $name {
            pub const SHAPE: &'static str = concat!($collection, "/{id}");

            /// Reads request field `field`; the violation names it.
            pub fn parse(raw: &str, field: &str) -> Result<Self, InvalidInput> {
                raw.parse::<Self>().map_err(|e| e.at(field))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($collection, "/{}"), self.0)
            }
        }

        impl FromStr for $name {
            type Err = BadName;

            fn from_str(raw: &str) -> Result<Self, BadName> {
                match uuids(raw, &[$collection, "*"]).as_deref() {
                    Some(&[id]) => Ok(Self(id)),
                    _ => Err(BadName { shape: Self::SHAPE }),
                }
            }
        }
    };
}

uuid_name!(
    /// `organizations/{organization}`.
    OrganizationName,
    "organizations"
);
uuid_name!(
    /// `accounts/{account}`.
    AccountName,
    "accounts"
);
uuid_name!(
    /// `projects/{project}`.
    ProjectName,
    "projects"
);

/// `projects/{project}/keys/{key}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyName {
    pub project: Uuid,
    pub key: Uuid,
}

impl KeyName {
    pub const SHAPE: &'static str = "projects/{id}/keys/{id}";

    /// Reads request field `field`; the violation names it.
    pub fn parse(raw: &str, field: &str) -> Result<Self, InvalidInput> {
        raw.parse::<Self>().map_err(|e| e.at(field))
    }

    /// The key's project.
    pub fn project_name(&self) -> ProjectName {
        ProjectName(self.project)
    }

    /// The name as a string (`to_string`, under the name the APIs use).
    pub fn name(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for KeyName {
    /// Assembled in a buffer of its exact length and written at once, not piece by piece
    /// through `write!`: CheckKey names the key in every answer, and `to_string` then makes one
    /// allocation of the right size instead of growing a string four times.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const PROJECTS: &[u8] = b"projects/";
        const KEYS: &[u8] = b"/keys/";
        const UUID: usize = uuid::fmt::Hyphenated::LENGTH;
        let mut buf = [0u8; PROJECTS.len() + UUID + KEYS.len() + UUID];
        let (projects, rest) = buf.split_at_mut(PROJECTS.len());
        projects.copy_from_slice(PROJECTS);
        let (project, rest) = rest.split_at_mut(UUID);
        self.project.hyphenated().encode_lower(project);
        let (keys, key) = rest.split_at_mut(KEYS.len());
        keys.copy_from_slice(KEYS);
        self.key.hyphenated().encode_lower(key);
        // Only ASCII was written.
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl FromStr for KeyName {
    type Err = BadName;

    fn from_str(raw: &str) -> Result<Self, BadName> {
        match uuids(raw, &["projects", "*", "keys", "*"]).as_deref() {
            Some(&[project, key]) => Ok(Self { project, key }),
            _ => Err(BadName { shape: Self::SHAPE }),
        }
    }
}

/// The UUIDs in the `*` positions of `raw`, if it has the shape of `pattern` (such as
/// `["projects", "*", "keys", "*"]`). Only the lowercase hyphenated 36-character form, the one
/// the services write, is accepted, so each resource has exactly one name.
pub fn uuids(raw: &str, pattern: &[&str]) -> Option<Vec<Uuid>> {
    let parts: Vec<&str> = raw.split('/').collect();
    if parts.len() != pattern.len() {
        return None;
    }
    let mut ids = Vec::new();
    for (part, expected) in parts.iter().zip(pattern) {
        if *expected == "*" {
            let canonical = part.len() == 36 && !part.bytes().any(|b| b.is_ascii_uppercase());
            ids.push(Uuid::parse_str(part).ok().filter(|_| canonical)?);
        } else if part != expected {
            return None;
        }
    }
    Some(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_names_print_what_they_parse() {
        let (project, key) = (Uuid::now_v7(), Uuid::now_v7());
        let name = KeyName { project, key };
        assert_eq!(name.to_string(), format!("projects/{project}/keys/{key}"));
        assert_eq!(name.to_string().parse::<KeyName>(), Ok(name));
        assert_eq!(name.project_name().to_string(), format!("projects/{project}"));
        assert_eq!(format!("projects/{project}").parse::<ProjectName>(), Ok(ProjectName(project)));
        assert_eq!(format!("accounts/{key}").parse::<AccountName>(), Ok(AccountName(key)));
        assert_eq!(format!("organizations/{key}").parse::<OrganizationName>(), Ok(OrganizationName(key)));
        assert_eq!("projects/x".parse::<ProjectName>(), Err(BadName { shape: "projects/{id}" }));
        assert!(format!("projects/{project}").parse::<KeyName>().is_err());
        assert!(format!("organizations/{project}").parse::<ProjectName>().is_err());
        let violation = KeyName::parse("keys/x", "parent").unwrap_err();
        assert_eq!(violation.0[0].field, "parent");
    }

    #[test]
    fn names_match_their_pattern_only() {
        let id = "0193f7e2-0000-7000-8000-000000000001";
        let key = "0193f7e2-0000-7000-8000-000000000002";
        let pattern = ["projects", "*", "keys", "*"];
        assert_eq!(
            uuids(&format!("projects/{id}/keys/{key}"), &pattern),
            Some(vec![Uuid::parse_str(id).unwrap(), Uuid::parse_str(key).unwrap()])
        );
        for bad in [
            format!("projects/{id}"),
            format!("projects/{id}/keys/{key}/x"),
            format!("project/{id}/keys/{key}"),
            format!("projects/{}/keys/{key}", id.replace('-', "")),
            format!("projects/{id}/keys/nope"),
            // Found by the resource_name fuzz target: a second name for the same key.
            format!("projects/{}/keys/{key}", id.to_uppercase()),
            format!("projects/{{{id}}}/keys/{key}"),
            String::new(),
        ] {
            assert_eq!(uuids(&bad, &pattern), None, "{bad}");
        }
    }
}
