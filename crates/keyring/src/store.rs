//! Every SQL statement keyring runs, except the change feed's (see `feed`). Functions take any
//! client or transaction, so use cases compose them into one transaction per write.

use chrono::{DateTime, Utc};
use keyshare_runtime::db::{DbError, GenericClient, Taken, unless_taken};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::domain::{
    AuditEvent, CredentialInfo, Environment, Key, KeyEnvironment, KeyMember, KeyRef, KeyRole, Permissions, Project,
    ProjectLimits, ProjectMember, ProjectRole,
};

type Result<T> = std::result::Result<T, DbError>;
type Cursor = Option<(DateTime<Utc>, Uuid)>;

// --- Projects ---

const PROJECT_COLUMNS: &str = "id, organization_id, display_name, sandbox_rate_limit, sandbox_monthly_quota,
    production_rate_limit, production_monthly_quota, created_at";

fn project_row(row: &Row) -> Project {
    Project {
        id: row.get(0),
        organization_id: row.get(1),
        display_name: row.get(2),
        sandbox: ProjectLimits { rate_limit: row.get(3), monthly_quota: row.get(4) },
        production: ProjectLimits { rate_limit: row.get(5), monthly_quota: row.get(6) },
        created_at: row.get(7),
        caller_role: None,
    }
}

pub async fn insert_project(c: &impl GenericClient, p: &Project) -> Result<()> {
    c.execute(
        "INSERT INTO keyring.projects (id, organization_id, display_name, sandbox_rate_limit, sandbox_monthly_quota,
            production_rate_limit, production_monthly_quota, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
        &[
            &p.id,
            &p.organization_id,
            &p.display_name,
            &p.sandbox.rate_limit,
            &p.sandbox.monthly_quota,
            &p.production.rate_limit,
            &p.production.monthly_quota,
            &p.created_at,
        ],
    )
    .await?;
    Ok(())
}

pub async fn project(c: &impl GenericClient, id: Uuid) -> Result<Option<Project>> {
    let row = c.query_opt(&format!("SELECT {PROJECT_COLUMNS} FROM keyring.projects WHERE id = $1"), &[&id]).await?;
    Ok(row.as_ref().map(project_row))
}

pub async fn lock_project(c: &impl GenericClient, id: Uuid) -> Result<Option<Project>> {
    let row = c
        .query_opt(&format!("SELECT {PROJECT_COLUMNS} FROM keyring.projects WHERE id = $1 FOR UPDATE"), &[&id])
        .await?;
    Ok(row.as_ref().map(project_row))
}

/// The project, share-locked: concurrent grants to it proceed together, while a deletion or a
/// change of owners (which lock it for update) waits for them, and they for it.
pub async fn share_project(c: &impl GenericClient, id: Uuid) -> Result<Option<Project>> {
    let row =
        c.query_opt(&format!("SELECT {PROJECT_COLUMNS} FROM keyring.projects WHERE id = $1 FOR SHARE"), &[&id]).await?;
    Ok(row.as_ref().map(project_row))
}

/// Projects of an organization; with `member`, only those the account belongs to.
pub async fn projects(
    c: &impl GenericClient,
    org: Uuid,
    member: Option<Uuid>,
    after: Cursor,
    limit: i64,
) -> Result<Vec<(Project, Option<ProjectRole>)>> {
    let (after_at, after_id) = after.unzip();
    let rows = c
        .query(
            "SELECT p.id, p.organization_id, p.display_name, p.sandbox_rate_limit, p.sandbox_monthly_quota,
                    p.production_rate_limit, p.production_monthly_quota, p.created_at, m.role
             FROM keyring.projects p
             LEFT JOIN keyring.project_members m ON m.project_id = p.id AND m.account_id = $2
             WHERE p.organization_id = $1 AND ($5 OR m.role IS NOT NULL)
               AND ($3::timestamptz IS NULL OR (p.created_at, p.id) > ($3, $4))
             ORDER BY p.created_at, p.id LIMIT $6",
            &[&org, &member.unwrap_or_default(), &after_at, &after_id, &member.is_none(), &limit],
        )
        .await?;
    Ok(rows.iter().map(|row| (project_row(row), row.get::<_, Option<&str>>(8).map(ProjectRole::from_db))).collect())
}

pub async fn update_project(c: &impl GenericClient, p: &Project, now: DateTime<Utc>) -> Result<()> {
    c.execute(
        "UPDATE keyring.projects SET display_name = $2, sandbox_rate_limit = $3, sandbox_monthly_quota = $4,
            production_rate_limit = $5, production_monthly_quota = $6, updated_at = $7 WHERE id = $1",
        &[
            &p.id,
            &p.display_name,
            &p.sandbox.rate_limit,
            &p.sandbox.monthly_quota,
            &p.production.rate_limit,
            &p.production.monthly_quota,
            &now,
        ],
    )
    .await?;
    Ok(())
}

pub async fn delete_project(c: &impl GenericClient, id: Uuid) -> Result<()> {
    c.execute("DELETE FROM keyring.projects WHERE id = $1", &[&id]).await?;
    Ok(())
}

pub async fn project_role(c: &impl GenericClient, project: Uuid, account: Uuid) -> Result<Option<ProjectRole>> {
    let row = c
        .query_opt(
            "SELECT role FROM keyring.project_members WHERE project_id = $1 AND account_id = $2",
            &[&project, &account],
        )
        .await?;
    Ok(row.map(|r| ProjectRole::from_db(r.get(0))))
}

fn project_member_row(row: &Row) -> ProjectMember {
    ProjectMember {
        project_id: row.get(0),
        account_id: row.get(1),
        role: ProjectRole::from_db(row.get(2)),
        created_at: row.get(3),
        service_account_org: row.get(4),
    }
}

/// Remembers that `id` is a service account of `org` (before it becomes a member).
pub async fn record_service_account(c: &impl GenericClient, id: Uuid, org: Uuid) -> Result<()> {
    c.execute(
        "INSERT INTO keyring.service_accounts (id, organization_id) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
        &[&id, &org],
    )
    .await?;
    Ok(())
}

pub async fn project_member(c: &impl GenericClient, project: Uuid, account: Uuid) -> Result<Option<ProjectMember>> {
    let row = c
        .query_opt(
            "SELECT m.project_id, m.account_id, m.role, m.created_at, s.organization_id
             FROM keyring.project_members m LEFT JOIN keyring.service_accounts s ON s.id = m.account_id
             WHERE m.project_id = $1 AND m.account_id = $2",
            &[&project, &account],
        )
        .await?;
    Ok(row.as_ref().map(project_member_row))
}

pub async fn project_members(
    c: &impl GenericClient,
    project: Uuid,
    after: Cursor,
    limit: i64,
) -> Result<Vec<ProjectMember>> {
    let (after_at, after_id) = after.unzip();
    let rows = c
        .query(
            "SELECT m.project_id, m.account_id, m.role, m.created_at, s.organization_id
             FROM keyring.project_members m LEFT JOIN keyring.service_accounts s ON s.id = m.account_id
             WHERE m.project_id = $1 AND ($2::timestamptz IS NULL OR (m.created_at, m.account_id) > ($2, $3))
             ORDER BY m.created_at, m.account_id LIMIT $4",
            &[&project, &after_at, &after_id, &limit],
        )
        .await?;
    Ok(rows.iter().map(project_member_row).collect())
}

pub async fn insert_project_member(
    c: &impl GenericClient,
    project: Uuid,
    account: Uuid,
    role: ProjectRole,
    now: DateTime<Utc>,
) -> Result<bool> {
    let inserted = c
        .execute(
            "INSERT INTO keyring.project_members (project_id, account_id, role, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (project_id, account_id) DO NOTHING",
            &[&project, &account, &role.as_str(), &now],
        )
        .await?;
    Ok(inserted == 1)
}

pub async fn set_project_role(c: &impl GenericClient, project: Uuid, account: Uuid, role: ProjectRole) -> Result<()> {
    c.execute(
        "UPDATE keyring.project_members SET role = $3 WHERE project_id = $1 AND account_id = $2",
        &[&project, &account, &role.as_str()],
    )
    .await?;
    Ok(())
}

pub async fn delete_project_member(c: &impl GenericClient, project: Uuid, account: Uuid) -> Result<()> {
    c.execute("DELETE FROM keyring.project_members WHERE project_id = $1 AND account_id = $2", &[&project, &account])
        .await?;
    Ok(())
}

pub async fn count_project_owners(c: &impl GenericClient, project: Uuid) -> Result<i64> {
    let row = c
        .query_one("SELECT count(*) FROM keyring.project_members WHERE project_id = $1 AND role = 'owner'", &[&project])
        .await?;
    Ok(row.get(0))
}

// --- Grants for invitations ---

/// What an invitation granted: (target resource name, account).
pub async fn grant(c: &impl GenericClient, invitation_id: &str) -> Result<Option<(String, Uuid)>> {
    let row = c
        .query_opt("SELECT target, account_id FROM keyring.grants WHERE invitation_id = $1", &[&invitation_id])
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Whether the invitation's grant made the membership it is about (`None`: no such grant).
pub async fn grant_created(c: &impl GenericClient, invitation_id: &str) -> Result<Option<(String, Uuid, bool)>> {
    let row = c
        .query_opt("SELECT target, account_id, created FROM keyring.grants WHERE invitation_id = $1", &[&invitation_id])
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// Records an invitation's grant; `created` says whether it made the membership.
pub async fn insert_grant(
    c: &impl GenericClient,
    invitation_id: &str,
    target: &str,
    account: Uuid,
    role: &str,
    created: bool,
    now: DateTime<Utc>,
) -> Result<()> {
    c.execute(
        "INSERT INTO keyring.grants (invitation_id, target, account_id, role, created, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[&invitation_id, &target, &account, &role, &created, &now],
    )
    .await?;
    Ok(())
}

/// Deletes the account's project memberships in the organization made before `before`:
/// the projects they were in.
pub async fn end_org_project_roles(
    c: &impl GenericClient,
    org: Uuid,
    account: Uuid,
    before: DateTime<Utc>,
) -> Result<Vec<Uuid>> {
    let rows = c
        .query(
            "DELETE FROM keyring.project_members m USING keyring.projects p
             WHERE m.project_id = p.id AND p.organization_id = $1 AND m.account_id = $2 AND m.created_at <= $3
             RETURNING m.project_id",
            &[&org, &account, &before],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Deletes the account's key roles in the organization's projects made before `before`: the
/// keys they were on.
pub async fn end_org_key_roles(
    c: &impl GenericClient,
    org: Uuid,
    account: Uuid,
    before: DateTime<Utc>,
) -> Result<Vec<KeyRef>> {
    let rows = c
        .query(
            "DELETE FROM keyring.key_members m USING keyring.keys k, keyring.projects p
             WHERE m.key_id = k.id AND k.project_id = p.id AND p.organization_id = $1
               AND m.account_id = $2 AND m.created_at <= $3
             RETURNING k.project_id, k.id",
            &[&org, &account, &before],
        )
        .await?;
    Ok(rows.iter().map(|r| KeyRef { project: r.get(0), key: r.get(1) }).collect())
}

// --- Keys ---

pub struct NewKey<'a> {
    pub key: KeyRef,
    pub display_name: &'a str,
    pub description: &'a str,
    pub created_by: Uuid,
    pub request_id: Option<&'a str>,
    pub now: DateTime<Utc>,
}

/// Why a key could not be inserted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyTaken {
    /// Another live key of the project has the name.
    Name,
    /// The creator made a key with this request id already.
    Request,
}

pub async fn insert_key(c: &impl GenericClient, k: &NewKey<'_>) -> Result<std::result::Result<(), KeyTaken>> {
    let inserted = c
        .execute(
            "INSERT INTO keyring.keys (id, project_id, display_name, description, created_by, request_id, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
            &[&k.key.key, &k.key.project, &k.display_name, &k.description, &k.created_by, &k.request_id, &k.now],
        )
        .await;
    match unless_taken(inserted)? {
        Ok(_) => Ok(Ok(())),
        Err(taken) if taken.constraint() == "keys_request" => Ok(Err(KeyTaken::Request)),
        Err(taken) if taken.constraint() == "keys_name_unique" => Ok(Err(KeyTaken::Name)),
        Err(taken) => Err(taken.into_error()),
    }
}

/// The key an earlier CreateKey with this request id made.
pub async fn key_by_request(c: &impl GenericClient, created_by: Uuid, request_id: &str) -> Result<Option<KeyRef>> {
    let row = c
        .query_opt(
            "SELECT project_id, id FROM keyring.keys WHERE created_by = $1 AND request_id = $2 AND deleted_at IS NULL",
            &[&created_by, &request_id],
        )
        .await?;
    Ok(row.map(|r| KeyRef { project: r.get(0), key: r.get(1) }))
}

pub async fn insert_environment(c: &impl GenericClient, key: Uuid, env: Environment, p: Permissions) -> Result<()> {
    c.execute(
        "INSERT INTO keyring.key_environments (key_id, environment, can_create, can_read, can_update, can_delete)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[&key, &env.as_str(), &p.create, &p.read, &p.update, &p.delete],
    )
    .await?;
    Ok(())
}

pub struct NewCredential<'a> {
    pub id: Uuid,
    pub key: Uuid,
    pub environment: Environment,
    pub sha256: &'a [u8],
    pub sealed: &'a [u8],
    pub kek_id: &'a str,
    pub prefix: &'a str,
    pub last_four: &'a str,
    pub now: DateTime<Utc>,
}

pub async fn insert_credential(c: &impl GenericClient, n: &NewCredential<'_>) -> Result<()> {
    c.execute(
        "INSERT INTO keyring.credentials (id, key_id, environment, sha256, sealed, kek_id, prefix, last_four, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[&n.id, &n.key, &n.environment.as_str(), &n.sha256, &n.sealed, &n.kek_id, &n.prefix, &n.last_four, &n.now],
    )
    .await?;
    Ok(())
}

/// A live key's row: name, description, version, times. `None` for unknown, deleted, or in
/// another project.
pub struct KeyRow {
    pub display_name: String,
    pub description: String,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub async fn key_row(c: &impl GenericClient, key: KeyRef, lock: bool) -> Result<Option<KeyRow>> {
    let sql = format!(
        "SELECT display_name, description, version, created_at, updated_at FROM keyring.keys
         WHERE id = $1 AND project_id = $2 AND deleted_at IS NULL{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let row = c.query_opt(&sql, &[&key.key, &key.project]).await?;
    Ok(row.map(|r| KeyRow {
        display_name: r.get(0),
        description: r.get(1),
        version: r.get(2),
        created_at: r.get(3),
        updated_at: r.get(4),
    }))
}

async fn environments(c: &impl GenericClient, key: Uuid, now: DateTime<Utc>) -> Result<Vec<KeyEnvironment>> {
    let rows = c
        .query(
            "SELECT environment, active, can_create, can_read, can_update, can_delete, rate_limit, daily_quota,
                    ip_allowlist, expire_at
             FROM keyring.key_environments WHERE key_id = $1 ORDER BY environment DESC",
            &[&key],
        )
        .await?;
    let credentials = c
        .query(
            "SELECT environment, prefix, last_four, created_at, retired_at FROM keyring.credentials
             WHERE key_id = $1 AND (retired_at IS NULL OR retired_at > $2) ORDER BY created_at DESC",
            &[&key, &now],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let environment = Environment::parse(row.get(0))?;
            let mut env = KeyEnvironment {
                environment,
                active: row.get(1),
                permissions: Permissions {
                    create: row.get(2),
                    read: row.get(3),
                    update: row.get(4),
                    delete: row.get(5),
                },
                rate_limit: row.get(6),
                daily_quota: row.get(7),
                ip_allowlist: row.get(8),
                expire_at: row.get(9),
                credential: None,
                previous: None,
            };
            for cred in credentials.iter().filter(|c| c.get::<_, &str>(0) == environment.as_str()) {
                let info = CredentialInfo { prefix: cred.get(1), last_four: cred.get(2), created_at: cred.get(3) };
                match cred.get::<_, Option<DateTime<Utc>>>(4) {
                    None => env.credential = Some(info),
                    Some(retired) if env.previous.is_none() => env.previous = Some((info, retired)),
                    Some(_) => {}
                }
            }
            Some(env)
        })
        .collect())
}

/// A live key with both environments, as the detail page shows it.
pub async fn load_key(c: &impl GenericClient, key: KeyRef, now: DateTime<Utc>) -> Result<Option<Key>> {
    let Some(row) = key_row(c, key, false).await? else { return Ok(None) };
    let mut envs = environments(c, key.key, now).await?;
    let take = |envs: &mut Vec<KeyEnvironment>, which: Environment| {
        envs.iter().position(|e| e.environment == which).map(|i| envs.swap_remove(i))
    };
    let (Some(sandbox), Some(production)) =
        (take(&mut envs, Environment::Sandbox), take(&mut envs, Environment::Production))
    else {
        return Err(DbError::Config(format!("key {} lacks an environment", key.key)));
    };
    Ok(Some(Key {
        key,
        display_name: row.display_name,
        description: row.description,
        sandbox,
        production,
        version: row.version,
        created_at: row.created_at,
        updated_at: row.updated_at,
        caller_role: None,
        invitations: crate::domain::InvitationSummary::Hidden,
    }))
}

/// Live keys of a project in creation order; with `member`, only keys that account belongs to.
pub async fn project_keys(
    c: &impl GenericClient,
    project: Uuid,
    member: Option<Uuid>,
    after: Cursor,
    limit: i64,
) -> Result<Vec<(KeyRef, Option<KeyRole>, DateTime<Utc>)>> {
    let (after_at, after_id) = after.unzip();
    let rows = c
        .query(
            "SELECT k.id, m.role, k.created_at FROM keyring.keys k
             LEFT JOIN keyring.key_members m ON m.key_id = k.id AND m.account_id = $2
             WHERE k.project_id = $1 AND k.deleted_at IS NULL AND ($5 OR m.role IS NOT NULL)
               AND ($3::timestamptz IS NULL OR (k.created_at, k.id) > ($3, $4))
             ORDER BY k.created_at, k.id LIMIT $6",
            &[&project, &member.unwrap_or_default(), &after_at, &after_id, &member.is_none(), &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (KeyRef { project, key: r.get(0) }, r.get::<_, Option<&str>>(1).map(KeyRole::from_db), r.get(2)))
        .collect())
}

/// Whether the account holds a role on some live key of the project.
pub async fn has_key_role_in(c: &impl GenericClient, project: Uuid, account: Uuid) -> Result<bool> {
    let row = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM keyring.key_members m JOIN keyring.keys k ON k.id = m.key_id
                            WHERE k.project_id = $1 AND k.deleted_at IS NULL AND m.account_id = $2)",
            &[&project, &account],
        )
        .await?;
    Ok(row.get(0))
}

/// Live key ids of a project.
pub async fn live_keys(c: &impl GenericClient, project: Uuid) -> Result<Vec<Uuid>> {
    let rows = c.query("SELECT id FROM keyring.keys WHERE project_id = $1 AND deleted_at IS NULL", &[&project]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Bumps the key's version (its etag) and update time.
pub async fn touch_key(c: &impl GenericClient, key: Uuid, now: DateTime<Utc>) -> Result<()> {
    c.execute("UPDATE keyring.keys SET version = version + 1, updated_at = $2 WHERE id = $1", &[&key, &now]).await?;
    Ok(())
}

/// Renames and redescribes a key; [`Taken`] when another live key of its project has the name.
pub async fn update_key_text(
    c: &impl GenericClient,
    key: Uuid,
    name: &str,
    description: &str,
) -> Result<std::result::Result<(), Taken>> {
    let updated = c
        .execute(
            "UPDATE keyring.keys SET display_name = $2, description = $3 WHERE id = $1",
            &[&key, &name, &description],
        )
        .await;
    Ok(unless_taken(updated)?.map(|_| ()))
}

pub async fn update_environment(c: &impl GenericClient, key: Uuid, env: &KeyEnvironment) -> Result<()> {
    c.execute(
        "UPDATE keyring.key_environments SET active = $3, can_create = $4, can_read = $5, can_update = $6,
            can_delete = $7, rate_limit = $8, daily_quota = $9, ip_allowlist = $10, expire_at = $11
         WHERE key_id = $1 AND environment = $2",
        &[
            &key,
            &env.environment.as_str(),
            &env.active,
            &env.permissions.create,
            &env.permissions.read,
            &env.permissions.update,
            &env.permissions.delete,
            &env.rate_limit,
            &env.daily_quota,
            &env.ip_allowlist,
            &env.expire_at,
        ],
    )
    .await?;
    Ok(())
}

/// The current credential's sealed copy: (credential id, sealed bytes, KEK id).
pub async fn current_sealed(
    c: &impl GenericClient,
    key: Uuid,
    env: Environment,
) -> Result<Option<(Uuid, Vec<u8>, String)>> {
    let row = c
        .query_opt(
            "SELECT id, sealed, kek_id FROM keyring.credentials
             WHERE key_id = $1 AND environment = $2 AND retired_at IS NULL",
            &[&key, &env.as_str()],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// Retires the current credential of an environment at `retire_at` (now: at once), and drops
/// credentials whose grace already ended, so at most one previous credential remains.
pub async fn retire_current(
    c: &impl GenericClient,
    key: Uuid,
    env: Environment,
    now: DateTime<Utc>,
    retire_at: DateTime<Utc>,
) -> Result<()> {
    c.execute(
        "DELETE FROM keyring.credentials WHERE key_id = $1 AND environment = $2 AND retired_at IS NOT NULL",
        &[&key, &env.as_str()],
    )
    .await?;
    c.execute(
        "UPDATE keyring.credentials SET retired_at = $3 WHERE key_id = $1 AND environment = $2 AND retired_at IS NULL",
        &[&key, &env.as_str(), &retire_at],
    )
    .await?;
    if retire_at <= now {
        c.execute(
            "DELETE FROM keyring.credentials WHERE key_id = $1 AND environment = $2 AND retired_at IS NOT NULL",
            &[&key, &env.as_str()],
        )
        .await?;
    }
    Ok(())
}

/// Deletes a key's credentials, settings and members; keeps the row as a tombstone.
pub async fn delete_key(c: &impl GenericClient, key: Uuid, now: DateTime<Utc>) -> Result<()> {
    c.execute("DELETE FROM keyring.credentials WHERE key_id = $1", &[&key]).await?;
    c.execute("DELETE FROM keyring.key_environments WHERE key_id = $1", &[&key]).await?;
    c.execute("DELETE FROM keyring.key_members WHERE key_id = $1", &[&key]).await?;
    c.execute(
        "UPDATE keyring.keys SET deleted_at = $2, version = version + 1, updated_at = $2, request_id = NULL WHERE id = $1",
        &[&key, &now],
    )
    .await?;
    Ok(())
}

// --- Key members ---

pub async fn key_role(c: &impl GenericClient, key: Uuid, account: Uuid) -> Result<Option<KeyRole>> {
    let row = c
        .query_opt("SELECT role FROM keyring.key_members WHERE key_id = $1 AND account_id = $2", &[&key, &account])
        .await?;
    Ok(row.map(|r| KeyRole::from_db(r.get(0))))
}

pub async fn key_member(c: &impl GenericClient, key: KeyRef, account: Uuid) -> Result<Option<KeyMember>> {
    let row = c
        .query_opt(
            "SELECT m.role, m.created_at, s.organization_id
             FROM keyring.key_members m LEFT JOIN keyring.service_accounts s ON s.id = m.account_id
             WHERE m.key_id = $1 AND m.account_id = $2",
            &[&key.key, &account],
        )
        .await?;
    Ok(row.map(|r| KeyMember {
        key,
        account_id: account,
        role: KeyRole::from_db(r.get(0)),
        created_at: r.get(1),
        service_account_org: r.get(2),
    }))
}

pub async fn key_members(c: &impl GenericClient, key: KeyRef, after: Cursor, limit: i64) -> Result<Vec<KeyMember>> {
    let (after_at, after_id) = after.unzip();
    let rows = c
        .query(
            "SELECT m.account_id, m.role, m.created_at, s.organization_id
             FROM keyring.key_members m LEFT JOIN keyring.service_accounts s ON s.id = m.account_id
             WHERE m.key_id = $1 AND ($2::timestamptz IS NULL OR (m.created_at, m.account_id) > ($2, $3))
             ORDER BY m.created_at, m.account_id LIMIT $4",
            &[&key.key, &after_at, &after_id, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| KeyMember {
            key,
            account_id: r.get(0),
            role: KeyRole::from_db(r.get(1)),
            created_at: r.get(2),
            service_account_org: r.get(3),
        })
        .collect())
}

pub async fn insert_key_member(
    c: &impl GenericClient,
    key: Uuid,
    account: Uuid,
    role: KeyRole,
    now: DateTime<Utc>,
) -> Result<bool> {
    let inserted = c
        .execute(
            "INSERT INTO keyring.key_members (key_id, account_id, role, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (key_id, account_id) DO NOTHING",
            &[&key, &account, &role.as_str(), &now],
        )
        .await?;
    Ok(inserted == 1)
}

pub async fn set_key_role(c: &impl GenericClient, key: Uuid, account: Uuid, role: KeyRole) -> Result<()> {
    c.execute(
        "UPDATE keyring.key_members SET role = $3 WHERE key_id = $1 AND account_id = $2",
        &[&key, &account, &role.as_str()],
    )
    .await?;
    Ok(())
}

pub async fn delete_key_member(c: &impl GenericClient, key: Uuid, account: Uuid) -> Result<()> {
    c.execute("DELETE FROM keyring.key_members WHERE key_id = $1 AND account_id = $2", &[&key, &account]).await?;
    Ok(())
}

/// Keys the account is a member of, in the order they joined.
pub async fn shared_keys(
    c: &impl GenericClient,
    account: Uuid,
    after: Cursor,
    limit: i64,
) -> Result<Vec<(KeyRef, KeyRole, DateTime<Utc>)>> {
    let (after_at, after_id) = after.unzip();
    let rows = c
        .query(
            "SELECT k.project_id, k.id, m.role, m.created_at FROM keyring.key_members m
             JOIN keyring.keys k ON k.id = m.key_id AND k.deleted_at IS NULL
             WHERE m.account_id = $1 AND ($2::timestamptz IS NULL OR (m.created_at, m.key_id) > ($2, $3))
             ORDER BY m.created_at, m.key_id LIMIT $4",
            &[&account, &after_at, &after_id, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (KeyRef { project: r.get(0), key: r.get(1) }, KeyRole::from_db(r.get(2)), r.get(3)))
        .collect())
}

// --- Audit ---

pub struct NewAuditEvent<'a> {
    pub project: Uuid,
    pub key: Option<Uuid>,
    pub actor: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub request_id: &'a str,
    pub now: DateTime<Utc>,
}

pub async fn insert_audit(c: &impl GenericClient, e: &NewAuditEvent<'_>) -> Result<()> {
    c.execute(
        "INSERT INTO keyring.audit_events (project_id, key_id, actor, action, target, request_id, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[&e.project, &e.key, &e.actor, &e.action, &e.target, &e.request_id, &e.now],
    )
    .await?;
    Ok(())
}

/// Audit events of a project (or one key of it), newest first, before the event id `before`.
pub async fn audit_events(
    c: &impl GenericClient,
    project: Uuid,
    key: Option<Uuid>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<AuditEvent>> {
    let rows = c
        .query(
            "SELECT id, actor, action, target, request_id, created_at FROM keyring.audit_events
             WHERE project_id = $1 AND ($2::uuid IS NULL OR key_id = $2) AND ($3::bigint IS NULL OR id < $3)
             ORDER BY id DESC LIMIT $4",
            &[&project, &key, &before, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| AuditEvent {
            id: r.get(0),
            actor: r.get(1),
            action: r.get(2),
            target: r.get(3),
            request_id: r.get(4),
            created_at: r.get(5),
        })
        .collect())
}

// --- Calls to other services after commit ---

pub async fn queue_call(c: &impl GenericClient, kind: &str, target: &str) -> Result<()> {
    c.execute("INSERT INTO keyring.pending_calls (kind, target) VALUES ($1, $2)", &[&kind, &target]).await?;
    Ok(())
}

/// Queues a call about one account's membership of `target`.
pub async fn queue_member_call(c: &impl GenericClient, kind: &str, target: &str, account: Uuid) -> Result<()> {
    c.execute(
        "INSERT INTO keyring.pending_calls (kind, target, account_id) VALUES ($1, $2, $3)",
        &[&kind, &target, &account],
    )
    .await?;
    Ok(())
}

/// A call to the invitation service waiting in `pending_calls`.
#[derive(Clone, Debug)]
pub struct PendingCall {
    pub id: i64,
    /// `revoke_invitations` or `end_invitations`.
    pub kind: String,
    pub target: String,
    pub attempts: i32,
    pub account: Option<Uuid>,
}

/// The ids of the calls due now, oldest first, at most 50. Read without locks: each is locked
/// when it runs ([`lock_pending_call`]).
pub async fn due_pending_calls(c: &impl GenericClient) -> Result<Vec<i64>> {
    let rows = c
        .query(
            "SELECT id FROM keyring.pending_calls
             WHERE done_at IS NULL AND next_attempt_at <= now() ORDER BY id LIMIT 50",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Locks a due call for the caller to carry out, in the caller's transaction: the row stays
/// locked while the call runs, so no other runner makes the same call at once. `None` when it
/// is done or waiting for a retry by the time the lock is held, or, with `skip_held`, when
/// another runner holds it (a worker moves on; a change's own run waits for it instead).
pub async fn lock_pending_call(c: &impl GenericClient, id: i64, skip_held: bool) -> Result<Option<PendingCall>> {
    const WAIT: &str = "SELECT id, kind, target, attempts, account_id FROM keyring.pending_calls
         WHERE id = $1 AND done_at IS NULL AND next_attempt_at <= now() FOR UPDATE";
    const SKIP: &str = "SELECT id, kind, target, attempts, account_id FROM keyring.pending_calls
         WHERE id = $1 AND done_at IS NULL AND next_attempt_at <= now() FOR UPDATE SKIP LOCKED";
    let row = c.query_opt(if skip_held { SKIP } else { WAIT }, &[&id]).await?;
    Ok(row.map(|row| PendingCall {
        id: row.get(0),
        kind: row.get(1),
        target: row.get(2),
        attempts: row.get(3),
        account: row.get(4),
    }))
}

/// Marks a call done: carried out, or (with `refused`) refused by the invitation service for good.
pub async fn pending_call_done(c: &impl GenericClient, id: i64, refused: Option<&str>) -> Result<()> {
    c.execute("UPDATE keyring.pending_calls SET done_at = now(), last_error = $2 WHERE id = $1", &[&id, &refused])
        .await?;
    Ok(())
}

/// Records a failed try; the next one is `backoff_secs` away.
pub async fn pending_call_failed(c: &impl GenericClient, id: i64, error: &str, backoff_secs: f64) -> Result<()> {
    c.execute(
        "UPDATE keyring.pending_calls SET attempts = attempts + 1, last_error = $2,
            next_attempt_at = now() + make_interval(secs => $3) WHERE id = $1",
        &[&id, &error, &backoff_secs],
    )
    .await?;
    Ok(())
}
