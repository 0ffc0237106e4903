//! Keyring's domain: validated inputs, roles and what each role may do, and the values use
//! cases return. Plain Rust; the gRPC adapter converts at the boundary.

use chrono::{DateTime, Utc};
use ipnet::IpNet;
pub use keyshare_runtime::credential::Environment;
use keyshare_runtime::error::InvalidInput;
use keyshare_runtime::resource::{AccountName, OrganizationName, ProjectName};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A trimmed, bounded text without control characters.
fn bounded_text(raw: &str, field: &str, min: usize, max: usize) -> Result<String, InvalidInput> {
    let text = raw.trim();
    let chars = text.chars().count();
    if chars < min {
        return Err(InvalidInput::field(field, "is required"));
    }
    if chars > max {
        return Err(InvalidInput::field(field, format!("must be at most {max} characters")));
    }
    if text.chars().any(|c| c.is_control() && c != '\n') {
        return Err(InvalidInput::field(field, "must not contain control characters"));
    }
    Ok(text.to_owned())
}

/// A project's name: 1–200 characters.
pub fn project_name(raw: &str, field: &str) -> Result<String, InvalidInput> {
    bounded_text(raw, field, 1, 200).and_then(|name| {
        if name.contains('\n') { Err(InvalidInput::field(field, "must be one line")) } else { Ok(name) }
    })
}

/// A key's name: 1–100 characters, one line.
pub fn key_name(raw: &str, field: &str) -> Result<String, InvalidInput> {
    bounded_text(raw, field, 1, 100).and_then(|name| {
        if name.contains('\n') { Err(InvalidInput::field(field, "must be one line")) } else { Ok(name) }
    })
}

/// A key's description: at most 500 characters.
pub fn description(raw: &str, field: &str) -> Result<String, InvalidInput> {
    bounded_text(raw, field, 0, 500)
}

/// A limit: zero means none, negative is refused.
pub fn limit(value: i64, field: &str) -> Result<i64, InvalidInput> {
    if value < 0 { Err(InvalidInput::field(field, "must not be negative (0 means no limit)")) } else { Ok(value) }
}

/// An IP allowlist: CIDRs (a bare address means a single host), at most 100, normalised.
pub fn allowlist(raw: &[String], field: &str) -> Result<Vec<IpNet>, InvalidInput> {
    if raw.len() > 100 {
        return Err(InvalidInput::field(field, "must have at most 100 entries"));
    }
    let mut nets = Vec::with_capacity(raw.len());
    let mut errors = InvalidInput::default();
    for (index, entry) in raw.iter().enumerate() {
        let entry = entry.trim();
        let parsed = entry
            .parse::<IpNet>()
            .or_else(|_| entry.parse::<std::net::IpAddr>().map(IpNet::from))
            .map(|net| net.trunc());
        match parsed {
            Ok(net) => nets.push(net),
            Err(_) => errors.0.push(keyshare_runtime::error::FieldViolation::new(
                format!("{field}[{index}]"),
                "is not a CIDR such as 203.0.113.0/24 or 2001:db8::/32",
            )),
        }
    }
    errors.finish()?;
    nets.sort();
    nets.dedup();
    Ok(nets)
}

/// The longest grace period a regenerated credential may keep working.
pub const MAX_GRACE: chrono::Duration = chrono::Duration::hours(24);

/// CRUD permissions of one environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    pub create: bool,
    pub read: bool,
    pub update: bool,
    pub delete: bool,
}

impl Permissions {
    pub const ALL: Permissions = Permissions { create: true, read: true, update: true, delete: true };
}

/// Limits of one environment of a project.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectLimits {
    pub rate_limit: i64,
    pub monthly_quota: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjectRole {
    Owner,
    Member,
}

impl ProjectRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectRole::Owner => "owner",
            ProjectRole::Member => "member",
        }
    }

    pub fn from_db(value: &str) -> Self {
        if value == "owner" { ProjectRole::Owner } else { ProjectRole::Member }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRole {
    Owner,
    Admin,
    Contributor,
}

impl KeyRole {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyRole::Owner => "owner",
            KeyRole::Admin => "admin",
            KeyRole::Contributor => "contributor",
        }
    }

    pub fn from_db(value: &str) -> Self {
        match value {
            "owner" => KeyRole::Owner,
            "admin" => KeyRole::Admin,
            _ => KeyRole::Contributor,
        }
    }
}

/// What a caller is to a key: the roles that decide what they may do with it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyAccess {
    pub key_role: Option<KeyRole>,
    pub project_owner: bool,
    pub org_owner: bool,
}

/// What one may do with a key (PRODUCT §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAction {
    /// See the key, reveal credentials, see statistics.
    See,
    /// Edit name, description and security settings; regenerate; manage sharing.
    Manage,
    /// Delete the key.
    Delete,
}

impl KeyAccess {
    fn manager(&self) -> bool {
        self.project_owner || self.org_owner
    }

    pub fn sees(&self) -> bool {
        self.key_role.is_some() || self.manager()
    }

    pub fn allows(&self, action: KeyAction) -> bool {
        match action {
            KeyAction::See => self.sees(),
            KeyAction::Manage => matches!(self.key_role, Some(KeyRole::Owner | KeyRole::Admin)) || self.manager(),
            KeyAction::Delete => self.key_role == Some(KeyRole::Owner) || self.manager(),
        }
    }

    /// Whether local roles settle `action` without asking identity for the organization role.
    pub fn settled_locally(&self, action: KeyAction) -> bool {
        self.project_owner || self.allows(action)
    }
}

fn bad_name(field: &str, shape: &str) -> InvalidInput {
    InvalidInput::field(field, format!("must look like {shape}"))
}

pub fn parse_org(raw: &str, field: &str) -> Result<Uuid, InvalidInput> {
    OrganizationName::parse(raw, field).map(|name| name.0)
}

pub fn parse_account(raw: &str, field: &str) -> Result<Uuid, InvalidInput> {
    AccountName::parse(raw, field).map(|name| name.0)
}

pub fn parse_project(raw: &str, field: &str) -> Result<Uuid, InvalidInput> {
    ProjectName::parse(raw, field).map(|name| name.0)
}

/// `projects/{project}/keys/{key}`: the name every service spells the same way.
pub use keyshare_runtime::resource::KeyName as KeyRef;

pub fn parse_key(raw: &str, field: &str) -> Result<KeyRef, InvalidInput> {
    KeyRef::parse(raw, field)
}

/// `projects/{project}/keys/{key}/environments/{sandbox|production}`.
pub fn parse_key_environment(raw: &str, field: &str) -> Result<(KeyRef, Environment), InvalidInput> {
    let shape = "projects/{id}/keys/{id}/environments/{sandbox|production}";
    let (key_part, environment) = raw.rsplit_once("/environments/").ok_or_else(|| bad_name(field, shape))?;
    let key = parse_key(key_part, field).map_err(|_| bad_name(field, shape))?;
    let environment = Environment::parse(environment)
        .ok_or_else(|| InvalidInput::field(field, "environment must be sandbox or production"))?;
    Ok((key, environment))
}

pub fn parse_project_member(raw: &str, field: &str) -> Result<(Uuid, Uuid), InvalidInput> {
    keyshare_runtime::resource::uuids(raw, &["projects", "*", "members", "*"])
        .map(|ids| (ids[0], ids[1]))
        .ok_or_else(|| bad_name(field, "projects/{id}/members/{id}"))
}

pub fn parse_key_member(raw: &str, field: &str) -> Result<(KeyRef, Uuid), InvalidInput> {
    keyshare_runtime::resource::uuids(raw, &["projects", "*", "keys", "*", "members", "*"])
        .map(|ids| (KeyRef { project: ids[0], key: ids[1] }, ids[2]))
        .ok_or_else(|| bad_name(field, "projects/{id}/keys/{id}/members/{id}"))
}

pub fn parse_invitation_id(raw: &str, field: &str) -> Result<String, InvalidInput> {
    let id = raw.trim();
    if id.is_empty() || id.len() > 200 {
        return Err(InvalidInput::field(field, "is required, at most 200 characters"));
    }
    Ok(id.to_owned())
}

/// A project as callers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Project {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub display_name: String,
    pub sandbox: ProjectLimits,
    pub production: ProjectLimits,
    pub created_at: DateTime<Utc>,
    pub caller_role: Option<ProjectRole>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectMember {
    pub project_id: Uuid,
    pub account_id: Uuid,
    pub role: ProjectRole,
    pub created_at: DateTime<Utc>,
    /// The organization of a member that is a service account; `None` for a person.
    pub service_account_org: Option<Uuid>,
}

/// What may be shown of a credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialInfo {
    pub prefix: String,
    pub last_four: String,
    pub created_at: DateTime<Utc>,
}

/// One environment of a key, as the detail page shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEnvironment {
    pub environment: Environment,
    pub active: bool,
    pub permissions: Permissions,
    pub rate_limit: i64,
    pub daily_quota: i64,
    pub ip_allowlist: Vec<String>,
    pub expire_at: Option<DateTime<Utc>>,
    pub credential: Option<CredentialInfo>,
    pub previous: Option<(CredentialInfo, DateTime<Utc>)>,
}

/// Invitation counts for the key list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InvitationCounts {
    pub accepted: i32,
    pub pending: i32,
}

/// What the key list shows of a key's invitations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InvitationSummary {
    /// Not shown: the caller may not see the key's sharing settings (PRODUCT §3), or the
    /// answer is not a key list.
    #[default]
    Hidden,
    /// The invitation service could not answer in time.
    Unknown,
    Counts(InvitationCounts),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    pub key: KeyRef,
    pub display_name: String,
    pub description: String,
    pub sandbox: KeyEnvironment,
    pub production: KeyEnvironment,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub caller_role: Option<KeyRole>,
    pub invitations: InvitationSummary,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyMember {
    pub key: KeyRef,
    pub account_id: Uuid,
    pub role: KeyRole,
    pub created_at: DateTime<Utc>,
    /// The organization of a member that is a service account; `None` for a person.
    pub service_account_org: Option<Uuid>,
}

/// How a member is named: `accounts/{id}`, or the service account it is.
pub fn member_name(account: Uuid, service_account_org: Option<Uuid>) -> String {
    match service_account_org {
        Some(org) => format!("organizations/{org}/serviceAccounts/{account}"),
        None => format!("accounts/{account}"),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    pub id: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub request_id: String,
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
    fn allowlists() {
        let nets =
            allowlist(&["10.0.0.1/8".into(), "2001:db8::/32".into(), "192.0.2.7".into()], "ip_allowlist").unwrap();
        let text: Vec<String> = nets.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
        let err = allowlist(&["10.0.0.0/8".into(), "10.0.0.0/33".into(), "nope".into()], "x").unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["x[1]", "x[2]"]);
    }

    #[test]
    fn names() {
        let (p, k) = (Uuid::new_v4(), Uuid::new_v4());
        let key = parse_key(&format!("projects/{p}/keys/{k}"), "name").unwrap();
        assert_eq!(key, KeyRef { project: p, key: k });
        let (key, env) = parse_key_environment(&format!("projects/{p}/keys/{k}/environments/production"), "n").unwrap();
        assert_eq!((key.key, env), (k, Environment::Production));
        let err = parse_key_environment(&format!("projects/{p}/keys/{k}/environments/staging"), "n").unwrap_err();
        assert!(err.0[0].description.contains("sandbox or production"));
        assert!(parse_key(&format!("projects/{p}/keys/{k}/x"), "name").is_err());
        assert!(parse_project(&format!("projects/{}", p.simple()), "name").is_err());
    }

    #[test]
    fn access_matrix_rules() {
        let with = |key_role, project_owner, org_owner| KeyAccess { key_role, project_owner, org_owner };
        let contributor = with(Some(KeyRole::Contributor), false, false);
        assert!(contributor.allows(KeyAction::See) && !contributor.allows(KeyAction::Manage));
        let admin = with(Some(KeyRole::Admin), false, false);
        assert!(admin.allows(KeyAction::Manage) && !admin.allows(KeyAction::Delete));
        assert!(with(None, true, false).allows(KeyAction::Delete));
        assert!(with(None, false, true).allows(KeyAction::Delete));
        assert!(!with(None, false, false).sees());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(raw in "\\PC{0,200}") {
            let _ = parse_key_environment(&raw, "name");
            let _ = parse_key_member(&raw, "name");
            let _ = allowlist(std::slice::from_ref(&raw), "ip_allowlist");
            let _ = key_name(&raw, "display_name");
        }
    }
}
