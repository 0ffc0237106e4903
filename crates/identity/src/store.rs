//! Every SQL statement identity runs. Functions take any client or transaction, so use cases
//! compose them into one transaction per write.

use chrono::{DateTime, Utc};
use keyshare_runtime::auth::{PublicKeyMaterial, Scope, Scopes};
use keyshare_runtime::crypto::Sealed;
use keyshare_runtime::db::{DbError, GenericClient, Taken, advisory_key, unless_taken};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::domain::{Account, Member, OrgRole, Organization, ServiceAccount};

type Result<T> = std::result::Result<T, DbError>;

const ACCOUNT_COLUMNS: &str = "id, email, display_name, email_verified_at IS NOT NULL, created_at";

fn account(row: &Row) -> Account {
    Account {
        id: row.get(0),
        email: row.get(1),
        display_name: row.get(2),
        email_verified: row.get(3),
        created_at: row.get(4),
    }
}

/// An account with what login needs.
pub struct Credentials {
    pub account: Account,
    pub password_hash: String,
}

pub async fn insert_account(
    c: &impl GenericClient,
    id: Uuid,
    email: &str,
    email_normalized: &str,
    display_name: &str,
    password_hash: &str,
    now: DateTime<Utc>,
) -> Result<std::result::Result<Account, Taken>> {
    let row = c
        .query_one(
            &format!(
                "INSERT INTO identity.accounts (id, email, email_normalized, display_name, password_hash, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING {ACCOUNT_COLUMNS}"
            ),
            &[&id, &email, &email_normalized, &display_name, &password_hash, &now],
        )
        .await;
    Ok(unless_taken(row)?.map(|row| account(&row)))
}

pub async fn account_by_id(c: &impl GenericClient, id: Uuid) -> Result<Option<Account>> {
    let row = c.query_opt(&format!("SELECT {ACCOUNT_COLUMNS} FROM identity.accounts WHERE id = $1"), &[&id]).await?;
    Ok(row.as_ref().map(account))
}

pub async fn credentials_by_email(c: &impl GenericClient, email_normalized: &str) -> Result<Option<Credentials>> {
    let row = c
        .query_opt(
            &format!("SELECT {ACCOUNT_COLUMNS}, password_hash FROM identity.accounts WHERE email_normalized = $1"),
            &[&email_normalized],
        )
        .await?;
    Ok(row.map(|row| Credentials { account: account(&row), password_hash: row.get(5) }))
}

pub async fn password_hash(c: &impl GenericClient, id: Uuid) -> Result<Option<String>> {
    let row = c.query_opt("SELECT password_hash FROM identity.accounts WHERE id = $1", &[&id]).await?;
    Ok(row.map(|r| r.get(0)))
}

pub async fn set_password_hash(c: &impl GenericClient, id: Uuid, hash: &str, now: DateTime<Utc>) -> Result<()> {
    c.execute("UPDATE identity.accounts SET password_hash = $2, updated_at = $3 WHERE id = $1", &[&id, &hash, &now])
        .await?;
    Ok(())
}

pub async fn set_display_name(
    c: &impl GenericClient,
    id: Uuid,
    name: &str,
    now: DateTime<Utc>,
) -> Result<Option<Account>> {
    let row = c
        .query_opt(
            &format!(
                "UPDATE identity.accounts SET display_name = $2, updated_at = $3 WHERE id = $1 RETURNING {ACCOUNT_COLUMNS}"
            ),
            &[&id, &name, &now],
        )
        .await?;
    Ok(row.as_ref().map(account))
}

pub async fn verified_account_by_email(c: &impl GenericClient, email_normalized: &str) -> Result<Option<Account>> {
    let row = c
        .query_opt(
            &format!(
                "SELECT {ACCOUNT_COLUMNS} FROM identity.accounts
                 WHERE email_normalized = $1 AND email_verified_at IS NOT NULL"
            ),
            &[&email_normalized],
        )
        .await?;
    Ok(row.as_ref().map(account))
}

pub async fn insert_verification(
    c: &impl GenericClient,
    token_hash: &[u8],
    account_id: Uuid,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Result<()> {
    c.execute(
        "INSERT INTO identity.email_verifications (token_hash, account_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
        &[&token_hash, &account_id, &now, &expires_at],
    )
    .await?;
    Ok(())
}

/// A verification token row, locked for the rest of the transaction.
pub struct Verification {
    pub account_id: Uuid,
    pub expires_at: DateTime<Utc>,
    pub used: bool,
}

pub async fn lock_verification(c: &impl GenericClient, token_hash: &[u8]) -> Result<Option<Verification>> {
    let row = c
        .query_opt(
            "SELECT account_id, expires_at, used_at IS NOT NULL FROM identity.email_verifications
             WHERE token_hash = $1 FOR UPDATE",
            &[&token_hash],
        )
        .await?;
    Ok(row.map(|r| Verification { account_id: r.get(0), expires_at: r.get(1), used: r.get(2) }))
}

pub async fn use_verification(
    c: &impl GenericClient,
    token_hash: &[u8],
    account_id: Uuid,
    now: DateTime<Utc>,
) -> Result<()> {
    c.execute("UPDATE identity.email_verifications SET used_at = $2 WHERE token_hash = $1", &[&token_hash, &now])
        .await?;
    c.execute(
        "UPDATE identity.accounts SET email_verified_at = COALESCE(email_verified_at, $2), updated_at = $2 WHERE id = $1",
        &[&account_id, &now],
    )
    .await?;
    Ok(())
}

// --- Throttles ---

/// What a throttle bucket counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucket {
    /// Login attempts per email.
    LoginEmail,
    /// Login attempts per client address.
    LoginAddress,
    /// Account mails (verification, reset) per address.
    MailAddress,
}

impl Bucket {
    fn as_str(self) -> &'static str {
        match self {
            Bucket::LoginEmail => "login-email",
            Bucket::LoginAddress => "login-address",
            Bucket::MailAddress => "mail-address",
        }
    }
}

/// How a bucket counts: at most `max_hits` within `window`, then locked for `lockout`, or
/// until the window ends when `lockout` is `None`.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub max_hits: i32,
    pub window: chrono::Duration,
    pub lockout: Option<chrono::Duration>,
}

/// Counts one hit on `subject` in one atomic statement (the row lock orders concurrent hits),
/// and answers until when the subject is locked out if this hit is refused. A refused hit is
/// not counted; a lockout that has ended starts a fresh window.
pub async fn throttle_hit(
    c: &impl GenericClient,
    bucket: Bucket,
    subject: &str,
    now: DateTime<Utc>,
    limit: Limit,
) -> Result<Option<DateTime<Utc>>> {
    let row = c
        .query_one(
            "INSERT INTO identity.throttles AS t (bucket, subject, hits, window_started_at)
             VALUES ($1, $2, 1, $3)
             ON CONFLICT (bucket, subject) DO UPDATE SET
                hits = CASE
                    WHEN t.locked_until > $3 THEN t.hits
                    WHEN t.locked_until IS NOT NULL OR t.window_started_at <= $3 - make_interval(secs => $4) THEN 1
                    ELSE t.hits + 1 END,
                window_started_at = CASE
                    WHEN t.locked_until > $3 THEN t.window_started_at
                    WHEN t.locked_until IS NOT NULL OR t.window_started_at <= $3 - make_interval(secs => $4) THEN $3
                    ELSE t.window_started_at END,
                locked_until = CASE
                    WHEN t.locked_until > $3 THEN t.locked_until
                    WHEN t.locked_until IS NOT NULL OR t.window_started_at <= $3 - make_interval(secs => $4) THEN NULL
                    WHEN t.hits + 1 > $5 THEN
                        COALESCE($3 + make_interval(secs => $6), t.window_started_at + make_interval(secs => $4))
                    ELSE NULL END
             RETURNING locked_until",
            &[&bucket.as_str(), &subject, &now, &seconds(limit.window), &limit.max_hits, &limit.lockout.map(seconds)],
        )
        .await?;
    let locked_until: Option<DateTime<Utc>> = row.get(0);
    // Concurrent hits each bring their own `now`, and the row may hold a window another one
    // started a moment later: seen from this hit, a lockout never lasts longer than it is set
    // to (the lockout, or else the window).
    let longest = limit.lockout.unwrap_or(limit.window);
    Ok(locked_until.filter(|until| *until > now).map(|until| until.min(now + longest)))
}

fn seconds(d: chrono::Duration) -> f64 {
    d.num_milliseconds() as f64 / 1000.0
}

/// Forgets every hit on `subject` (a successful login clears its email's count).
pub async fn throttle_clear(c: &impl GenericClient, bucket: Bucket, subject: &str) -> Result<()> {
    c.execute("DELETE FROM identity.throttles WHERE bucket = $1 AND subject = $2", &[&bucket.as_str(), &subject])
        .await?;
    Ok(())
}

/// Takes back one hit on `subject`, unless it is locked out (a successful login from an address
/// does not count against it; its failures still do).
pub async fn throttle_refund(c: &impl GenericClient, bucket: Bucket, subject: &str) -> Result<()> {
    c.execute(
        "UPDATE identity.throttles SET hits = GREATEST(hits - 1, 0)
         WHERE bucket = $1 AND subject = $2 AND locked_until IS NULL",
        &[&bucket.as_str(), &subject],
    )
    .await?;
    Ok(())
}

// --- Replacing pending accounts, password resets ---

/// The account with this email, locked for the rest of the transaction.
pub async fn lock_account_by_email(c: &impl GenericClient, email_normalized: &str) -> Result<Option<Account>> {
    let row = c
        .query_opt(
            &format!("SELECT {ACCOUNT_COLUMNS} FROM identity.accounts WHERE email_normalized = $1 FOR UPDATE"),
            &[&email_normalized],
        )
        .await?;
    Ok(row.as_ref().map(account))
}

/// Deletes an account that was never verified, with its tokens and sessions.
pub async fn delete_unverified_account(c: &impl GenericClient, id: Uuid) -> Result<bool> {
    let n = c.execute("DELETE FROM identity.accounts WHERE id = $1 AND email_verified_at IS NULL", &[&id]).await?;
    Ok(n == 1)
}

/// Spends every unused email verification token of the account.
pub async fn spend_verifications(c: &impl GenericClient, account_id: Uuid, now: DateTime<Utc>) -> Result<()> {
    c.execute(
        "UPDATE identity.email_verifications SET used_at = $2 WHERE account_id = $1 AND used_at IS NULL",
        &[&account_id, &now],
    )
    .await?;
    Ok(())
}

/// Spends every unused password reset token of the account.
pub async fn spend_password_resets(c: &impl GenericClient, account_id: Uuid, now: DateTime<Utc>) -> Result<()> {
    c.execute(
        "UPDATE identity.password_resets SET used_at = $2 WHERE account_id = $1 AND used_at IS NULL",
        &[&account_id, &now],
    )
    .await?;
    Ok(())
}

pub async fn insert_password_reset(
    c: &impl GenericClient,
    token_hash: &[u8],
    account_id: Uuid,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Result<()> {
    c.execute(
        "INSERT INTO identity.password_resets (token_hash, account_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
        &[&token_hash, &account_id, &now, &expires_at],
    )
    .await?;
    Ok(())
}

/// A password reset token, locked for the rest of the transaction when `lock`.
pub async fn password_reset(c: &impl GenericClient, token_hash: &[u8], lock: bool) -> Result<Option<Verification>> {
    let sql = format!(
        "SELECT account_id, expires_at, used_at IS NOT NULL FROM identity.password_resets WHERE token_hash = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let row = c.query_opt(&sql, &[&token_hash]).await?;
    Ok(row.map(|r| Verification { account_id: r.get(0), expires_at: r.get(1), used: r.get(2) }))
}

/// Marks the account's email verified (if it was not) and returns it.
pub async fn mark_email_verified(c: &impl GenericClient, id: Uuid, now: DateTime<Utc>) -> Result<Option<Account>> {
    let row = c
        .query_opt(
            &format!(
                "UPDATE identity.accounts SET email_verified_at = COALESCE(email_verified_at, $2), updated_at = $2
                 WHERE id = $1 RETURNING {ACCOUNT_COLUMNS}"
            ),
            &[&id, &now],
        )
        .await?;
    Ok(row.as_ref().map(account))
}

// --- Sessions and refresh tokens ---

pub async fn insert_session(c: &impl GenericClient, id: Uuid, account_id: Uuid, now: DateTime<Utc>) -> Result<()> {
    c.execute(
        "INSERT INTO identity.sessions (id, account_id, created_at) VALUES ($1, $2, $3)",
        &[&id, &account_id, &now],
    )
    .await?;
    Ok(())
}

pub async fn insert_refresh_token(
    c: &impl GenericClient,
    token_hash: &[u8],
    session_id: Uuid,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Result<()> {
    c.execute(
        "INSERT INTO identity.refresh_tokens (token_hash, session_id, issued_at, expires_at) VALUES ($1, $2, $3, $4)",
        &[&token_hash, &session_id, &now, &expires_at],
    )
    .await?;
    Ok(())
}

/// A refresh token and its session, locked for the rest of the transaction.
pub struct RefreshToken {
    pub session_id: Uuid,
    pub account_id: Uuid,
    pub expires_at: DateTime<Utc>,
    pub used: bool,
    pub session_revoked: bool,
}

pub async fn lock_refresh_token(c: &impl GenericClient, token_hash: &[u8]) -> Result<Option<RefreshToken>> {
    let row = c
        .query_opt(
            "SELECT r.session_id, s.account_id, r.expires_at, r.used_at IS NOT NULL, s.revoked_at IS NOT NULL
             FROM identity.refresh_tokens r JOIN identity.sessions s ON s.id = r.session_id
             WHERE r.token_hash = $1 FOR UPDATE OF r, s",
            &[&token_hash],
        )
        .await?;
    Ok(row.map(|r| RefreshToken {
        session_id: r.get(0),
        account_id: r.get(1),
        expires_at: r.get(2),
        used: r.get(3),
        session_revoked: r.get(4),
    }))
}

pub async fn use_refresh_token(c: &impl GenericClient, token_hash: &[u8], now: DateTime<Utc>) -> Result<()> {
    c.execute("UPDATE identity.refresh_tokens SET used_at = $2 WHERE token_hash = $1", &[&token_hash, &now]).await?;
    Ok(())
}

pub async fn revoke_session(c: &impl GenericClient, id: Uuid, now: DateTime<Utc>, reason: &str) -> Result<()> {
    c.execute(
        "UPDATE identity.sessions SET revoked_at = COALESCE(revoked_at, $2), revoked_reason = COALESCE(revoked_reason, $3)
         WHERE id = $1",
        &[&id, &now, &reason],
    )
    .await?;
    Ok(())
}

/// Ends every live session of the account; returns how many ended.
pub async fn revoke_all_sessions(
    c: &impl GenericClient,
    account_id: Uuid,
    now: DateTime<Utc>,
    reason: &str,
) -> Result<u64> {
    c.execute(
        "UPDATE identity.sessions SET revoked_at = $2, revoked_reason = $3
         WHERE account_id = $1 AND revoked_at IS NULL",
        &[&account_id, &now, &reason],
    )
    .await
    .map_err(DbError::from)
}

/// Ends every live session of the account except `keep`; returns how many ended.
pub async fn revoke_other_sessions(
    c: &impl GenericClient,
    account_id: Uuid,
    keep: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<u64> {
    c.execute(
        "UPDATE identity.sessions SET revoked_at = $3, revoked_reason = 'password changed'
         WHERE account_id = $1 AND revoked_at IS NULL AND id IS DISTINCT FROM $2",
        &[&account_id, &keep, &now],
    )
    .await
    .map_err(DbError::from)
}

pub async fn session_is_live(c: &impl GenericClient, id: Uuid) -> Result<bool> {
    let row = c.query_opt("SELECT revoked_at IS NULL FROM identity.sessions WHERE id = $1", &[&id]).await?;
    Ok(row.is_some_and(|r| r.get(0)))
}

// --- Session revocations (written by a trigger on identity.sessions) ---

/// A session that ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRevocation {
    pub session_id: Uuid,
    pub account_id: Uuid,
    pub revoked_at: DateTime<Utc>,
}

/// Where a reader of session revocations stands: the oldest transaction still running at its
/// last read. Every row it has not seen yet was written by this transaction or a later one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevocationHorizon(i64);

/// Sessions that ended after `revoked_after`: all of them without `since`, else those written
/// at or after that horizon (rows seen before may come again). Returns the horizon to read from
/// next. One statement, so the rows and the horizon come from one snapshot.
pub async fn session_revocations(
    c: &impl GenericClient,
    since: Option<RevocationHorizon>,
    revoked_after: DateTime<Utc>,
) -> Result<(Vec<SessionRevocation>, RevocationHorizon)> {
    let since = since.map(|RevocationHorizon(xid)| xid);
    let rows = c
        .query(
            "WITH horizon AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin)
             SELECT h.xmin, r.session_id, r.account_id, r.revoked_at
             FROM horizon h LEFT JOIN identity.session_revocations r
               ON r.revoked_at > $2 AND ($1::bigint IS NULL OR r.written_by >= $1::bigint::text::xid8)
             ORDER BY r.seq",
            &[&since, &revoked_after],
        )
        .await?;
    let horizon = RevocationHorizon(rows.first().map_or(0, |r| r.get(0)));
    let revocations = rows
        .iter()
        .filter_map(|r| {
            Some(SessionRevocation {
                session_id: r.get::<_, Option<Uuid>>(1)?,
                account_id: r.get(2),
                revoked_at: r.get(3),
            })
        })
        .collect();
    Ok((revocations, horizon))
}

/// Deletes revocations of sessions that ended before `before` (all their tokens have expired).
pub async fn prune_session_revocations(c: &impl GenericClient, before: DateTime<Utc>) -> Result<u64> {
    c.execute("DELETE FROM identity.session_revocations WHERE revoked_at < $1", &[&before]).await.map_err(DbError::from)
}

// --- Organizations ---

pub async fn insert_organization(
    c: &impl GenericClient,
    id: Uuid,
    display_name: &str,
    creator: Uuid,
    now: DateTime<Utc>,
) -> Result<()> {
    c.execute(
        "INSERT INTO identity.organizations (id, display_name, created_by, created_at) VALUES ($1, $2, $3, $4)",
        &[&id, &display_name, &creator, &now],
    )
    .await?;
    Ok(())
}

pub async fn organization(c: &impl GenericClient, id: Uuid) -> Result<Option<Organization>> {
    let row =
        c.query_opt("SELECT id, display_name, created_at FROM identity.organizations WHERE id = $1", &[&id]).await?;
    Ok(row.map(|r| Organization { id: r.get(0), display_name: r.get(1), created_at: r.get(2), caller_role: None }))
}

/// Locks the organization row: membership changes of one organization run one at a time, so
/// "at least one owner" cannot be broken by two concurrent demotions.
pub async fn lock_organization(c: &impl GenericClient, id: Uuid) -> Result<bool> {
    Ok(c.query_opt("SELECT 1 FROM identity.organizations WHERE id = $1 FOR UPDATE", &[&id]).await?.is_some())
}

/// Organizations of an account, ordered by membership time then id, after a cursor.
pub async fn organizations_of(
    c: &impl GenericClient,
    account_id: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<(Organization, DateTime<Utc>)>> {
    let (after_at, after_id) = after.unzip();
    let rows = c
        .query(
            "SELECT o.id, o.display_name, o.created_at, m.role, m.created_at
             FROM identity.organization_members m JOIN identity.organizations o ON o.id = m.organization_id
             WHERE m.account_id = $1 AND ($2::timestamptz IS NULL OR (m.created_at, o.id) > ($2, $3))
             ORDER BY m.created_at, o.id LIMIT $4",
            &[&account_id, &after_at, &after_id, &limit],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let role: String = r.get(3);
            let org = Organization {
                id: r.get(0),
                display_name: r.get(1),
                created_at: r.get(2),
                caller_role: Some(OrgRole::from_db(&role)),
            };
            (org, r.get(4))
        })
        .collect())
}

const MEMBER_COLUMNS: &str = "m.organization_id, m.account_id, a.email, a.display_name, m.role, m.created_at";

fn member_row(row: &Row) -> Member {
    let role: String = row.get(4);
    Member {
        organization_id: row.get(0),
        account_id: row.get(1),
        email: row.get(2),
        display_name: row.get(3),
        role: OrgRole::from_db(&role),
        created_at: row.get(5),
    }
}

pub async fn member_role(c: &impl GenericClient, org: Uuid, account: Uuid) -> Result<Option<OrgRole>> {
    let row = c
        .query_opt(
            "SELECT role FROM identity.organization_members WHERE organization_id = $1 AND account_id = $2",
            &[&org, &account],
        )
        .await?;
    Ok(row.map(|r| OrgRole::from_db(r.get::<_, &str>(0))))
}

pub async fn member(c: &impl GenericClient, org: Uuid, account: Uuid) -> Result<Option<Member>> {
    let row = c
        .query_opt(
            &format!(
                "SELECT {MEMBER_COLUMNS} FROM identity.organization_members m
                 JOIN identity.accounts a ON a.id = m.account_id
                 WHERE m.organization_id = $1 AND m.account_id = $2"
            ),
            &[&org, &account],
        )
        .await?;
    Ok(row.as_ref().map(member_row))
}

pub async fn members(
    c: &impl GenericClient,
    org: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<Member>> {
    let (after_at, after_id) = after.unzip();
    let rows = c
        .query(
            &format!(
                "SELECT {MEMBER_COLUMNS} FROM identity.organization_members m
                 JOIN identity.accounts a ON a.id = m.account_id
                 WHERE m.organization_id = $1 AND ($2::timestamptz IS NULL OR (m.created_at, m.account_id) > ($2, $3))
                 ORDER BY m.created_at, m.account_id LIMIT $4"
            ),
            &[&org, &after_at, &after_id, &limit],
        )
        .await?;
    Ok(rows.iter().map(member_row).collect())
}

/// Adds a membership. Returns false when the account was already a member (the existing
/// membership is kept).
pub async fn insert_member(
    c: &impl GenericClient,
    org: Uuid,
    account: Uuid,
    role: OrgRole,
    now: DateTime<Utc>,
) -> Result<bool> {
    let inserted = c
        .execute(
            "INSERT INTO identity.organization_members (organization_id, account_id, role, created_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT (organization_id, account_id) DO NOTHING",
            &[&org, &account, &role.as_str(), &now],
        )
        .await?;
    Ok(inserted == 1)
}

/// Records that an invitation granted a membership.
pub async fn insert_grant(
    c: &impl GenericClient,
    invitation_id: &str,
    org: Uuid,
    account: Uuid,
    role: OrgRole,
    created: bool,
    now: DateTime<Utc>,
) -> Result<()> {
    c.execute(
        "INSERT INTO identity.organization_grants (invitation_id, organization_id, account_id, role, created, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[&invitation_id, &org, &account, &role.as_str(), &created, &now],
    )
    .await?;
    Ok(())
}

/// What an invitation granted and whether it made the membership: (org, account, created).
pub async fn grant_created(c: &impl GenericClient, invitation_id: &str) -> Result<Option<(Uuid, Uuid, bool)>> {
    let row = c
        .query_opt(
            "SELECT organization_id, account_id, created FROM identity.organization_grants WHERE invitation_id = $1",
            &[&invitation_id],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
}

// --- What keyring must hear of ---

/// A removal from an organization keyring has not confirmed yet.
#[derive(Clone, Debug)]
pub struct KeyringCall {
    pub id: i64,
    pub org: Uuid,
    pub account: Uuid,
    pub removed_at: DateTime<Utc>,
    pub attempts: i32,
}

pub async fn queue_keyring_call(
    c: &impl GenericClient,
    org: Uuid,
    account: Uuid,
    removed_at: DateTime<Utc>,
) -> Result<()> {
    c.execute(
        "INSERT INTO identity.keyring_calls (organization_id, account_id, removed_at) VALUES ($1, $2, $3)",
        &[&org, &account, &removed_at],
    )
    .await?;
    Ok(())
}

/// The ids of the calls due now, oldest first, at most 50. Read without locks: each is locked
/// when it runs ([`lock_keyring_call`]).
pub async fn due_keyring_calls(c: &impl GenericClient) -> Result<Vec<i64>> {
    let rows = c
        .query(
            "SELECT id FROM identity.keyring_calls
             WHERE done_at IS NULL AND next_attempt_at <= now() ORDER BY id LIMIT 50",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Locks a due call for the caller to make, in the caller's transaction: the row stays locked
/// while the call runs, so no other runner makes it at once. `None` when it is done or waiting
/// for a retry by the time the lock is held, or, with `skip_held`, when another runner holds it.
pub async fn lock_keyring_call(c: &impl GenericClient, id: i64, skip_held: bool) -> Result<Option<KeyringCall>> {
    const WAIT: &str = "SELECT id, organization_id, account_id, removed_at, attempts FROM identity.keyring_calls
         WHERE id = $1 AND done_at IS NULL AND next_attempt_at <= now() FOR UPDATE";
    const SKIP: &str = "SELECT id, organization_id, account_id, removed_at, attempts FROM identity.keyring_calls
         WHERE id = $1 AND done_at IS NULL AND next_attempt_at <= now() FOR UPDATE SKIP LOCKED";
    let row = c.query_opt(if skip_held { SKIP } else { WAIT }, &[&id]).await?;
    Ok(row.map(|r| KeyringCall {
        id: r.get(0),
        org: r.get(1),
        account: r.get(2),
        removed_at: r.get(3),
        attempts: r.get(4),
    }))
}

/// Marks a call done: carried out, or (with `refused`) refused by keyring for good.
pub async fn keyring_call_done(c: &impl GenericClient, id: i64, refused: Option<&str>) -> Result<()> {
    c.execute("UPDATE identity.keyring_calls SET done_at = now(), last_error = $2 WHERE id = $1", &[&id, &refused])
        .await?;
    Ok(())
}

pub async fn keyring_call_failed(c: &impl GenericClient, id: i64, error: &str, retry_in_secs: f64) -> Result<()> {
    c.execute(
        "UPDATE identity.keyring_calls SET attempts = attempts + 1, last_error = $2,
            next_attempt_at = now() + make_interval(secs => $3) WHERE id = $1",
        &[&id, &error, &retry_in_secs],
    )
    .await?;
    Ok(())
}

/// What an invitation granted, if anything: (organization, account).
pub async fn grant_of_invitation(c: &impl GenericClient, invitation_id: &str) -> Result<Option<(Uuid, Uuid)>> {
    let row = c
        .query_opt(
            "SELECT organization_id, account_id FROM identity.organization_grants WHERE invitation_id = $1",
            &[&invitation_id],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

pub async fn count_owners(c: &impl GenericClient, org: Uuid) -> Result<i64> {
    let row = c
        .query_one(
            "SELECT count(*) FROM identity.organization_members WHERE organization_id = $1 AND role = 'owner'",
            &[&org],
        )
        .await?;
    Ok(row.get(0))
}

pub async fn set_member_role(c: &impl GenericClient, org: Uuid, account: Uuid, role: OrgRole) -> Result<()> {
    c.execute(
        "UPDATE identity.organization_members SET role = $3 WHERE organization_id = $1 AND account_id = $2",
        &[&org, &account, &role.as_str()],
    )
    .await?;
    Ok(())
}

pub async fn delete_member(c: &impl GenericClient, org: Uuid, account: Uuid) -> Result<()> {
    c.execute(
        "DELETE FROM identity.organization_members WHERE organization_id = $1 AND account_id = $2",
        &[&org, &account],
    )
    .await?;
    Ok(())
}

// --- Service accounts ---

const SA_COLUMNS: &str = "id, organization_id, display_name, client_id, created_at";

fn service_account(row: &Row) -> ServiceAccount {
    ServiceAccount {
        id: row.get(0),
        organization_id: row.get(1),
        display_name: row.get(2),
        client_id: row.get(3),
        created_at: row.get(4),
    }
}

pub async fn insert_service_account(
    c: &impl GenericClient,
    id: Uuid,
    org: Uuid,
    display_name: &str,
    client_id: &str,
    secret_hash: &[u8],
    now: DateTime<Utc>,
) -> Result<ServiceAccount> {
    let row = c
        .query_one(
            &format!(
                "INSERT INTO identity.service_accounts (id, organization_id, display_name, client_id, secret_hash, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING {SA_COLUMNS}"
            ),
            &[&id, &org, &display_name, &client_id, &secret_hash, &now],
        )
        .await?;
    Ok(service_account(&row))
}

/// Creates or updates one of Keyshare's own service accounts (client id = service name).
pub async fn upsert_internal_client(
    c: &impl GenericClient,
    client_id: &str,
    secret_hash: &[u8],
    scopes: Scopes,
    now: DateTime<Utc>,
) -> Result<()> {
    let scopes: Vec<&str> = scopes.iter().map(Scope::as_str).collect();
    c.execute(
        "INSERT INTO identity.service_accounts AS s (id, organization_id, display_name, client_id, secret_hash, internal, scopes, created_at)
         VALUES ($1, NULL, $2, $2, $3, TRUE, $4, $5)
         ON CONFLICT (client_id) DO UPDATE SET secret_hash = EXCLUDED.secret_hash, scopes = EXCLUDED.scopes, deleted_at = NULL
         WHERE s.internal",
        &[&Uuid::now_v7(), &client_id, &secret_hash, &scopes, &now],
    )
    .await?;
    Ok(())
}

/// A live service account by client id, with its secret hash and its scopes (only Keyshare's
/// own services have any).
pub async fn service_account_by_client_id(
    c: &impl GenericClient,
    client_id: &str,
) -> Result<Option<(ServiceAccount, Vec<u8>, Scopes)>> {
    let row = c
        .query_opt(
            &format!(
                "SELECT {SA_COLUMNS}, secret_hash, CASE WHEN internal THEN scopes ELSE '{{}}' END
                 FROM identity.service_accounts WHERE client_id = $1 AND deleted_at IS NULL"
            ),
            &[&client_id],
        )
        .await?;
    Ok(row.map(|r| {
        let scopes: Vec<String> = r.get(6);
        (service_account(&r), r.get(5), scopes.iter().filter_map(|s| Scope::parse(s)).collect())
    }))
}

pub async fn service_account_is_live(c: &impl GenericClient, id: Uuid) -> Result<bool> {
    let row = c.query_opt("SELECT deleted_at IS NULL FROM identity.service_accounts WHERE id = $1", &[&id]).await?;
    Ok(row.is_some_and(|r| r.get(0)))
}

pub async fn service_accounts(
    c: &impl GenericClient,
    org: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<ServiceAccount>> {
    let (after_at, after_id) = after.unzip();
    let rows = c
        .query(
            &format!(
                "SELECT {SA_COLUMNS} FROM identity.service_accounts
                 WHERE organization_id = $1 AND deleted_at IS NULL
                   AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
                 ORDER BY created_at, id LIMIT $4"
            ),
            &[&org, &after_at, &after_id, &limit],
        )
        .await?;
    Ok(rows.iter().map(service_account).collect())
}

/// One of an organization's live service accounts.
pub async fn live_service_account(c: &impl GenericClient, org: Uuid, id: Uuid) -> Result<Option<ServiceAccount>> {
    let row = c
        .query_opt(
            &format!(
                "SELECT {SA_COLUMNS} FROM identity.service_accounts
                 WHERE organization_id = $1 AND id = $2 AND deleted_at IS NULL"
            ),
            &[&org, &id],
        )
        .await?;
    Ok(row.as_ref().map(service_account))
}

pub async fn delete_service_account(c: &impl GenericClient, org: Uuid, id: Uuid, now: DateTime<Utc>) -> Result<bool> {
    let n = c
        .execute(
            "UPDATE identity.service_accounts SET deleted_at = $3
             WHERE organization_id = $1 AND id = $2 AND deleted_at IS NULL",
            &[&org, &id, &now],
        )
        .await?;
    Ok(n == 1)
}

// Signing keys.

/// Serialises changes to the signing keys (the first key, a rotation) across replicas, until
/// the transaction ends.
pub async fn lock_signing_keys(c: &impl GenericClient) -> Result<()> {
    c.execute("SELECT pg_advisory_xact_lock($1)", &[&advisory_key("identity.signing_keys")]).await?;
    Ok(())
}

/// Whether a key signs new tokens.
pub async fn has_signing_key(c: &impl GenericClient) -> Result<bool> {
    Ok(c.query_opt("SELECT 1 FROM identity.signing_keys WHERE retire_at IS NULL", &[]).await?.is_some())
}

/// The key that signs new tokens: its kid and its sealed private key.
pub async fn signing_key(c: &impl GenericClient) -> Result<Option<(String, Sealed)>> {
    let row = c
        .query_opt("SELECT kid, private_key_sealed, kek_id FROM identity.signing_keys WHERE retire_at IS NULL", &[])
        .await?;
    Ok(row.map(|row| (row.get(0), Sealed { key_id: row.get(2), blob: row.get(1) })))
}

/// Retires the signing key at `retire_at` (it verifies until then).
pub async fn retire_signing_key(c: &impl GenericClient, retire_at: DateTime<Utc>) -> Result<()> {
    c.execute("UPDATE identity.signing_keys SET retire_at = $1 WHERE retire_at IS NULL", &[&retire_at]).await?;
    Ok(())
}

/// Forgets the keys whose tokens can no longer be valid.
pub async fn delete_retired_signing_keys(c: &impl GenericClient, now: DateTime<Utc>) -> Result<()> {
    c.execute("DELETE FROM identity.signing_keys WHERE retire_at < $1", &[&now]).await?;
    Ok(())
}

pub async fn insert_signing_key(
    c: &impl GenericClient,
    kid: &str,
    public_key: &[u8; 32],
    sealed: &Sealed,
    now: DateTime<Utc>,
) -> Result<()> {
    c.execute(
        "INSERT INTO identity.signing_keys (kid, public_key, private_key_sealed, kek_id, created_at)
         VALUES ($1, $2, $3, $4, $5)",
        &[&kid, &public_key.as_slice(), &sealed.blob, &sealed.key_id, &now],
    )
    .await?;
    Ok(())
}

/// Every key whose tokens may still be valid, the signer first.
pub async fn public_keys(client: &impl GenericClient, now: DateTime<Utc>) -> Result<Vec<PublicKeyMaterial>> {
    let rows = client
        .query(
            "SELECT kid, public_key, retire_at FROM identity.signing_keys
             WHERE retire_at IS NULL OR retire_at > $1
             ORDER BY retire_at DESC NULLS FIRST, kid",
            &[&now],
        )
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let public: Vec<u8> = row.get(1);
            Some(PublicKeyMaterial { kid: row.get(0), public_key: public.try_into().ok()?, retire_at: row.get(2) })
        })
        .collect())
}
