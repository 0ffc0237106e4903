//! Every SQL statement invitation runs.

use chrono::{DateTime, Utc};
use keyshare_runtime::db::{DbError, GenericClient};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::domain::{Delivery, Invitation, Role, Status, Target};
use crate::trace::TraceContext;

type Result<T> = std::result::Result<T, DbError>;

const COLUMNS: &str = "i.id, i.target, i.email, i.role, i.status, i.inviter, i.created_at, i.sent_at, i.expires_at,
    i.accepted_at, i.accepted_by,
    o.delivered_at IS NOT NULL, o.failed_at IS NOT NULL, o.last_error, o.id IS NOT NULL";

/// The newest outbox row about the invitation tells its delivery state.
const FROM: &str = "invitation.invitations i
    LEFT JOIN LATERAL (SELECT id, delivered_at, failed_at, last_error FROM invitation.outbox
                       WHERE topic = 'invitations/' || i.id ORDER BY id DESC LIMIT 1) o ON TRUE";

fn invitation(row: &Row, now: DateTime<Utc>) -> Option<Invitation> {
    let target: String = row.get(1);
    let role: String = row.get(3);
    let status: String = row.get(4);
    let expires_at: DateTime<Utc> = row.get(8);
    let (delivered, failed, last_error, queued): (bool, bool, Option<String>, bool) =
        (row.get(11), row.get(12), row.get(13), row.get(14));
    let delivery = match (queued, delivered, failed) {
        (false, _, _) => Delivery::Unknown,
        (true, true, _) => Delivery::Delivered,
        (true, _, true) => Delivery::Failed { last_error },
        _ => Delivery::Pending { last_error },
    };
    Some(Invitation {
        id: row.get(0),
        target: Target::parse(&target, "target").ok()?,
        email: row.get(2),
        role: Role::from_db(&role)?,
        status: Status::of(&status, expires_at, now),
        inviter: row.get(5),
        created_at: row.get(6),
        sent_at: row.get(7),
        expires_at,
        accepted_at: row.get(9),
        accepted_by: row.get(10),
        delivery,
    })
}

pub struct NewInvitation<'a> {
    pub id: Uuid,
    pub target: &'a Target,
    pub email: &'a str,
    pub email_normalized: &'a str,
    pub role: Role,
    pub inviter: Uuid,
    pub token_hash: &'a [u8],
    pub now: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Inserts a pending invitation; `false` when one is already open for this email and target.
pub async fn insert(c: &impl GenericClient, n: &NewInvitation<'_>) -> Result<bool> {
    let inserted = c
        .execute(
            "INSERT INTO invitation.invitations
                (id, target, email, email_normalized, role, status, inviter, token_hash, created_at, sent_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $8, $8, $9)
             ON CONFLICT (target, email_normalized) WHERE status = 'pending' DO NOTHING",
            &[
                &n.id,
                &n.target.name(),
                &n.email,
                &n.email_normalized,
                &n.role.as_str(),
                &n.inviter,
                &n.token_hash,
                &n.now,
                &n.expires_at,
            ],
        )
        .await?;
    Ok(inserted == 1)
}

/// The open invitation for an email and target.
pub async fn open_invitation(c: &impl GenericClient, target: &Target, email_normalized: &str) -> Result<Option<Uuid>> {
    let row = c
        .query_opt(
            "SELECT id FROM invitation.invitations WHERE target = $1 AND email_normalized = $2 AND status = 'pending'",
            &[&target.name(), &email_normalized],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

pub async fn get(c: &impl GenericClient, id: Uuid, now: DateTime<Utc>) -> Result<Option<Invitation>> {
    let row = c.query_opt(&format!("SELECT {COLUMNS} FROM {FROM} WHERE i.id = $1"), &[&id]).await?;
    Ok(row.and_then(|r| invitation(&r, now)))
}

/// The invitation and its stored status, locked for the rest of the transaction.
pub async fn lock(c: &impl GenericClient, id: Uuid) -> Result<Option<(Target, String, DateTime<Utc>)>> {
    let row = c
        .query_opt("SELECT target, status, expires_at FROM invitation.invitations WHERE id = $1 FOR UPDATE", &[&id])
        .await?;
    Ok(row.and_then(|r| Some((Target::parse(r.get(0), "target").ok()?, r.get(1), r.get(2)))))
}

/// The invitation a current token belongs to, locked.
pub async fn lock_by_token(c: &impl GenericClient, token_hash: &[u8]) -> Result<Option<Uuid>> {
    let row =
        c.query_opt("SELECT id FROM invitation.invitations WHERE token_hash = $1 FOR UPDATE", &[&token_hash]).await?;
    Ok(row.map(|r| r.get(0)))
}

pub async fn by_token(c: &impl GenericClient, token_hash: &[u8], now: DateTime<Utc>) -> Result<Option<Invitation>> {
    let row = c.query_opt(&format!("SELECT {COLUMNS} FROM {FROM} WHERE i.token_hash = $1"), &[&token_hash]).await?;
    Ok(row.and_then(|r| invitation(&r, now)))
}

pub async fn is_superseded(c: &impl GenericClient, token_hash: &[u8]) -> Result<bool> {
    let row = c.query_opt("SELECT 1 FROM invitation.superseded_tokens WHERE token_hash = $1", &[&token_hash]).await?;
    Ok(row.is_some())
}

pub async fn mark_accepted(c: &impl GenericClient, id: Uuid, account: Uuid, now: DateTime<Utc>) -> Result<()> {
    c.execute(
        "UPDATE invitation.invitations SET status = 'accepted', accepted_at = $2, accepted_by = $3 WHERE id = $1",
        &[&id, &now, &account],
    )
    .await?;
    Ok(())
}

pub async fn mark_revoked(c: &impl GenericClient, id: Uuid, now: DateTime<Utc>) -> Result<()> {
    c.execute("UPDATE invitation.invitations SET status = 'revoked', revoked_at = $2 WHERE id = $1", &[&id, &now])
        .await?;
    Ok(())
}

/// Replaces the token and opens a new window; the old token is remembered as superseded.
pub async fn renew(
    c: &impl GenericClient,
    id: Uuid,
    token_hash: &[u8],
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Result<()> {
    c.execute(
        "INSERT INTO invitation.superseded_tokens (token_hash, invitation_id)
         SELECT token_hash, id FROM invitation.invitations WHERE id = $1",
        &[&id],
    )
    .await?;
    c.execute(
        "UPDATE invitation.invitations SET token_hash = $2, sent_at = $3, expires_at = $4 WHERE id = $1",
        &[&id, &token_hash, &now, &expires_at],
    )
    .await?;
    Ok(())
}

/// A target's invitations, newest first, optionally only those whose current status is `status`.
pub async fn list(
    c: &impl GenericClient,
    target: &Target,
    status: Option<Status>,
    now: DateTime<Utc>,
    before: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<Invitation>> {
    let (stored, expired): (Option<&str>, Option<bool>) = match status {
        None => (None, None),
        Some(Status::Pending) => (Some("pending"), Some(false)),
        Some(Status::Expired) => (Some("pending"), Some(true)),
        Some(Status::Accepted) => (Some("accepted"), None),
        Some(Status::Revoked) => (Some("revoked"), None),
    };
    let (before_at, before_id) = before.unzip();
    let rows = c
        .query(
            &format!(
                "SELECT {COLUMNS} FROM {FROM}
                 WHERE i.target = $1 AND ($2::text IS NULL OR i.status = $2)
                   AND ($3::bool IS NULL OR (i.expires_at <= $4) = $3)
                   AND ($5::timestamptz IS NULL OR (i.created_at, i.id) < ($5, $6))
                 ORDER BY i.created_at DESC, i.id DESC LIMIT $7"
            ),
            &[&target.name(), &stored, &expired, &now, &before_at, &before_id, &limit],
        )
        .await?;
    Ok(rows.iter().filter_map(|r| invitation(r, now)).collect())
}

/// Pending, unexpired invitations to an email.
pub async fn pending_for(
    c: &impl GenericClient,
    email_normalized: &str,
    now: DateTime<Utc>,
    before: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<Invitation>> {
    let (before_at, before_id) = before.unzip();
    let rows = c
        .query(
            &format!(
                "SELECT {COLUMNS} FROM {FROM}
                 WHERE i.email_normalized = $1 AND i.status = 'pending' AND i.expires_at > $2
                   AND ($3::timestamptz IS NULL OR (i.created_at, i.id) < ($3, $4))
                 ORDER BY i.created_at DESC, i.id DESC LIMIT $5"
            ),
            &[&email_normalized, &now, &before_at, &before_id, &limit],
        )
        .await?;
    Ok(rows.iter().filter_map(|r| invitation(r, now)).collect())
}

/// (accepted, pending) per target.
pub async fn counts(c: &impl GenericClient, targets: &[String], now: DateTime<Utc>) -> Result<Vec<(String, i64, i64)>> {
    let rows = c
        .query(
            "SELECT target, count(*) FILTER (WHERE status = 'accepted'),
                    count(*) FILTER (WHERE status = 'pending' AND expires_at > $2)
             FROM invitation.invitations WHERE target = ANY($1) GROUP BY target",
            &[&targets, &now],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
}

pub async fn revoke_target(c: &impl GenericClient, target: &str, now: DateTime<Utc>) -> Result<u64> {
    c.execute(
        "UPDATE invitation.invitations SET status = 'revoked', revoked_at = $2 WHERE target = $1 AND status = 'pending'",
        &[&target, &now],
    )
    .await
    .map_err(DbError::from)
}

/// Marks revoked the accepted invitations to `target` that `account` accepted: their
/// membership ended elsewhere.
pub async fn end_accepted(c: &impl GenericClient, target: &str, account: Uuid, now: DateTime<Utc>) -> Result<u64> {
    c.execute(
        "UPDATE invitation.invitations SET status = 'revoked', revoked_at = $3
         WHERE target = $1 AND accepted_by = $2 AND status = 'accepted'",
        &[&target, &account, &now],
    )
    .await
    .map_err(DbError::from)
}

// --- Calls to identity and keyring ---

/// A grant or removal waiting to run.
#[derive(Clone, Debug)]
pub struct QueuedCall {
    pub id: i64,
    /// `grant` or `remove`.
    pub kind: String,
    /// The trace of the request that queued it.
    pub trace: TraceContext,
    /// Failed tries so far.
    pub attempts: i32,
}

pub async fn queue_call(c: &impl GenericClient, invitation: Uuid, kind: &str, trace: &TraceContext) -> Result<()> {
    c.execute(
        "INSERT INTO invitation.calls (invitation_id, kind, traceparent, tracestate) VALUES ($1, $2, $3, $4)",
        &[&invitation, &kind, &trace.traceparent, &trace.tracestate],
    )
    .await?;
    Ok(())
}

/// The undone calls of an invitation in order, locked so one drainer runs them at a time.
pub async fn lock_calls(c: &impl GenericClient, invitation: Uuid) -> Result<Vec<QueuedCall>> {
    let rows = c
        .query(
            "SELECT id, kind, traceparent, tracestate, attempts FROM invitation.calls
             WHERE invitation_id = $1 AND done_at IS NULL ORDER BY id FOR UPDATE",
            &[&invitation],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| QueuedCall {
            id: r.get(0),
            kind: r.get(1),
            trace: TraceContext { traceparent: r.get(2), tracestate: r.get(3) },
            attempts: r.get(4),
        })
        .collect())
}

pub async fn call_done(c: &impl GenericClient, id: i64, error: Option<&str>) -> Result<()> {
    c.execute("UPDATE invitation.calls SET done_at = now(), last_error = $2 WHERE id = $1", &[&id, &error]).await?;
    Ok(())
}

pub async fn call_failed(c: &impl GenericClient, id: i64, error: &str, retry_in_secs: f64) -> Result<()> {
    c.execute(
        "UPDATE invitation.calls SET attempts = attempts + 1, last_error = $2,
            next_attempt_at = now() + make_interval(secs => $3) WHERE id = $1",
        &[&id, &error, &retry_in_secs],
    )
    .await?;
    Ok(())
}

/// Invitations with calls due.
pub async fn due_calls(c: &impl GenericClient) -> Result<Vec<Uuid>> {
    let rows = c
        .query(
            "SELECT DISTINCT invitation_id FROM invitation.calls WHERE done_at IS NULL AND next_attempt_at <= now() LIMIT 100",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Who accepted, and with which role: what a grant or removal needs.
pub async fn grant_facts(c: &impl GenericClient, id: Uuid) -> Result<Option<(Target, Option<Uuid>, Role)>> {
    let row = c.query_opt("SELECT target, accepted_by, role FROM invitation.invitations WHERE id = $1", &[&id]).await?;
    Ok(row.and_then(|r| {
        let target: String = r.get(0);
        let role: String = r.get(2);
        Some((Target::parse(&target, "target").ok()?, r.get(1), Role::from_db(&role)?))
    }))
}
