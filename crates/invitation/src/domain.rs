//! Invitation's domain: targets, roles and which role fits which target, statuses, and the
//! values use cases return.

use chrono::{DateTime, Utc};
use keyshare_runtime::error::InvalidInput;
use uuid::Uuid;

/// What an invitation leads into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Organization(Uuid),
    Project(Uuid),
    Key { project: Uuid, key: Uuid },
}

impl Target {
    pub fn parse(raw: &str, field: &str) -> Result<Self, InvalidInput> {
        use keyshare_runtime::resource::{KeyName, OrganizationName, ProjectName};
        let parsed = if let Ok(org) = raw.parse::<OrganizationName>() {
            Target::Organization(org.0)
        } else if let Ok(project) = raw.parse::<ProjectName>() {
            Target::Project(project.0)
        } else if let Ok(KeyName { project, key }) = raw.parse::<KeyName>() {
            Target::Key { project, key }
        } else {
            return Err(InvalidInput::field(
                field,
                "must look like organizations/{id}, projects/{id} or projects/{id}/keys/{id}",
            ));
        };
        Ok(parsed)
    }

    pub fn name(&self) -> String {
        use keyshare_runtime::resource::{KeyName, OrganizationName, ProjectName};
        match *self {
            Target::Organization(org) => OrganizationName(org).to_string(),
            Target::Project(project) => ProjectName(project).to_string(),
            Target::Key { project, key } => KeyName { project, key }.to_string(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Target::Organization(_) => "organization",
            Target::Project(_) => "project",
            Target::Key { .. } => "key",
        }
    }
}

/// The role an invitation grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    OrganizationOwner,
    OrganizationReader,
    ProjectOwner,
    ProjectMember,
    KeyAdmin,
    KeyContributor,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::OrganizationOwner,
        Role::OrganizationReader,
        Role::ProjectOwner,
        Role::ProjectMember,
        Role::KeyAdmin,
        Role::KeyContributor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::OrganizationOwner => "organization_owner",
            Role::OrganizationReader => "organization_reader",
            Role::ProjectOwner => "project_owner",
            Role::ProjectMember => "project_member",
            Role::KeyAdmin => "key_admin",
            Role::KeyContributor => "key_contributor",
        }
    }

    pub fn from_db(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == raw)
    }

    /// Whether this role can be granted on `target`.
    pub fn fits(self, target: &Target) -> bool {
        matches!(
            (self, target),
            (Role::OrganizationOwner | Role::OrganizationReader, Target::Organization(_))
                | (Role::ProjectOwner | Role::ProjectMember, Target::Project(_))
                | (Role::KeyAdmin | Role::KeyContributor, Target::Key { .. })
        )
    }

    /// What a person reads in the invitation email: the role on `title` (e.g. `the project
    /// "Payments"`), or on an unnamed target of its kind.
    pub fn describe(self, title: Option<&str>) -> String {
        let (role, of, kind) = match self {
            Role::OrganizationOwner => ("an owner", "of", "an organization"),
            Role::OrganizationReader => ("a reader", "of", "an organization"),
            Role::ProjectOwner => ("an owner", "of", "a project"),
            Role::ProjectMember => ("a member", "of", "a project"),
            Role::KeyAdmin => ("an admin", "of", "an API key"),
            Role::KeyContributor => ("a contributor", "on", "an API key"),
        };
        format!("{role} {of} {}", title.unwrap_or(kind))
    }
}

/// Where an invitation stands, as callers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Pending,
    Accepted,
    Expired,
    Revoked,
}

impl Status {
    /// The status of a stored row: a pending invitation past its window is expired.
    pub fn of(stored: &str, expires_at: DateTime<Utc>, now: DateTime<Utc>) -> Self {
        match stored {
            "accepted" => Status::Accepted,
            "revoked" => Status::Revoked,
            _ if expires_at <= now => Status::Expired,
            _ => Status::Pending,
        }
    }
}

/// Whether the latest invitation email left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    Unknown,
    Pending { last_error: Option<String> },
    Delivered,
    Failed { last_error: Option<String> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invitation {
    pub id: Uuid,
    pub target: Target,
    pub email: String,
    pub role: Role,
    pub status: Status,
    pub inviter: Uuid,
    pub created_at: DateTime<Utc>,
    pub sent_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub accepted_at: Option<DateTime<Utc>>,
    pub accepted_by: Option<Uuid>,
    pub delivery: Delivery,
}

/// Why one email of a CreateInvitations call was not invited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotInvited {
    MalformedEmail(String),
    AlreadyMember,
    AlreadyPending(Uuid),
    DuplicateInRequest,
}

pub fn parse_invitation(raw: &str, field: &str) -> Result<Uuid, InvalidInput> {
    raw.strip_prefix("invitations/")
        .and_then(|id| Uuid::parse_str(id).ok().filter(|_| id.len() == 36))
        .ok_or_else(|| InvalidInput::field(field, "must look like invitations/{id}"))
}

/// An acceptance token as it appears in links: 43 base64url characters (32 bytes).
pub fn parse_token(raw: &str, field: &str) -> Result<String, InvalidInput> {
    let token = raw.trim();
    if token.len() != 43 || !token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(InvalidInput::field(field, "is not an invitation token"));
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_fit_their_targets_only() {
        let (org, project, key) = (
            Target::Organization(Uuid::nil()),
            Target::Project(Uuid::nil()),
            Target::Key { project: Uuid::nil(), key: Uuid::nil() },
        );
        let fitting: Vec<(Role, Vec<bool>)> =
            Role::ALL.iter().map(|r| (*r, vec![r.fits(&org), r.fits(&project), r.fits(&key)])).collect();
        for (role, fits) in fitting {
            assert_eq!(fits.iter().filter(|f| **f).count(), 1, "{role:?} fits exactly one kind of target");
        }
        assert!(Role::KeyContributor.fits(&key) && !Role::KeyContributor.fits(&project));
    }

    #[test]
    fn targets_round_trip() {
        for raw in [
            "organizations/0193f7e2-0000-7000-8000-000000000001",
            "projects/0193f7e2-0000-7000-8000-000000000001",
            "projects/0193f7e2-0000-7000-8000-000000000001/keys/0193f7e2-0000-7000-8000-000000000002",
        ] {
            assert_eq!(Target::parse(raw, "parent").unwrap().name(), raw);
        }
        assert!(Target::parse("projects/x/keys/y", "parent").is_err());
    }

    #[test]
    fn expiry_is_derived() {
        let now = Utc::now();
        assert_eq!(Status::of("pending", now, now), Status::Expired);
        assert_eq!(Status::of("pending", now + chrono::Duration::seconds(1), now), Status::Pending);
        assert_eq!(Status::of("accepted", now - chrono::Duration::days(30), now), Status::Accepted);
    }
}
