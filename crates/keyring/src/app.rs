//! Keyring's use cases. Each write is one transaction that also records its audit event and,
//! when the authorizer cares, its feed entry.
//!
//! This module holds what the use cases share (the caller's [`Ctx`], the [`Keyring`] itself, the
//! change and result types, permissions, etags); the use cases are grouped by resource in
//! `projects`, `keys` and `members`, with the access checks in `access` and the audit log in
//! `audit`.

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use keyshare_runtime::auth::{Principal, Scope};
use keyshare_runtime::clock::SharedClock;
use keyshare_runtime::crypto::Sealer;
use uuid::Uuid;

use crate::directory::Directory;
use crate::domain::{Key, Permissions};
use crate::error::{Error, Result};
use crate::invitations::InvitationClient;

mod access;
mod audit;
mod keys;
mod members;
mod projects;

/// Who is calling and the request id, for authorisation and the audit log: runtime's one
/// call context.
pub use keyshare_runtime::auth::CallContext as Ctx;

/// What keyring asks of the caller in a call's context.
pub(crate) trait CallerChecks {
    /// The account acting: a person, or an organization's service account.
    fn account(&self) -> Result<Uuid>;
    /// The caller, who must be a person (not a service account of any kind).
    fn person(&self) -> Result<Uuid>;
    /// Internal RPCs answer only the Keyshare service whose scopes name them.
    fn require(&self, scope: Scope) -> Result<()>;
}

impl CallerChecks for Ctx {
    fn account(&self) -> Result<Uuid> {
        match self.caller.principal {
            Principal::Account { id } => Ok(id),
            // Keyshare's own services act only through the internal RPCs their scopes name.
            Principal::ServiceAccount { organization: None, .. } => {
                Err(Error::PermissionDenied("Keyshare's internal clients may call only the RPCs their scopes name"))
            }
            // An organization's service account acts as itself: it sees and does what its project
            // memberships (and the keys it created) allow, like a person.
            Principal::ServiceAccount { id, organization: Some(_), .. } => Ok(id),
        }
    }

    fn person(&self) -> Result<Uuid> {
        match self.caller.principal {
            Principal::Account { id } => Ok(id),
            Principal::ServiceAccount { .. } => Err(Error::PermissionDenied("only people may do this")),
        }
    }

    fn require(&self, scope: Scope) -> Result<()> {
        if self.caller.has_scope(scope) { Ok(()) } else { Err(Error::PermissionDenied(scope.denial())) }
    }
}

/// A change to one environment's settings; `None` leaves a setting as it is.
#[derive(Clone, Debug, Default)]
pub struct EnvironmentChange {
    pub active: Option<bool>,
    pub permissions: Option<Permissions>,
    pub rate_limit: Option<i64>,
    pub daily_quota: Option<i64>,
    pub ip_allowlist: Option<Vec<String>>,
    pub expire_at: Option<Option<DateTime<Utc>>>,
}

/// A change to a project; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct ProjectChange {
    pub display_name: Option<String>,
    pub sandbox_rate_limit: Option<i64>,
    pub sandbox_monthly_quota: Option<i64>,
    pub production_rate_limit: Option<i64>,
    pub production_monthly_quota: Option<i64>,
}

/// A key as created: the key and both plaintext credentials.
pub struct CreatedKey {
    pub key: Key,
    pub sandbox: String,
    pub production: String,
}

pub struct Keyring {
    pool: Pool,
    clock: SharedClock,
    sealer: Sealer,
    directory: Directory,
    invitations: InvitationClient,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("sealer", &self.sealer).finish_non_exhaustive()
    }
}

impl Keyring {
    pub fn new(
        pool: Pool,
        clock: SharedClock,
        sealer: Sealer,
        directory: Directory,
        invitations: InvitationClient,
    ) -> Self {
        Self { pool, clock, sealer, directory, invitations }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }
}

/// Permissions other services may test (TestPermissions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    ProjectsGet,
    ProjectsManage,
    KeysGet,
    KeysManage,
    KeysDelete,
}

impl Permission {
    pub const ALL: [Permission; 5] = [
        Permission::ProjectsGet,
        Permission::ProjectsManage,
        Permission::KeysGet,
        Permission::KeysManage,
        Permission::KeysDelete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::ProjectsGet => "projects.get",
            Permission::ProjectsManage => "projects.manage",
            Permission::KeysGet => "keys.get",
            Permission::KeysManage => "keys.manage",
            Permission::KeysDelete => "keys.delete",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == raw)
    }
}

/// The key's etag: its version, quoted as HTTP etags are.
pub fn etag(version: i64) -> String {
    format!("\"{version}\"")
}

/// Reads an etag back; `None` for an empty one (no precondition).
pub fn parse_etag(raw: &str) -> Result<Option<i64>, keyshare_runtime::error::InvalidInput> {
    let trimmed = raw.trim().trim_matches('"');
    if trimmed.is_empty() {
        return Ok(None);
    }
    trimmed
        .parse()
        .map(Some)
        .map_err(|_| keyshare_runtime::error::InvalidInput::field("etag", "is not an etag of this key"))
}
