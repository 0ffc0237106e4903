//! The change feed the authorizer follows: everything it needs to decide a check, as a snapshot
//! and then every change in commit order.
//!
//! A change is recorded by [`record`] inside the transaction that makes it, as the last
//! statement before commit. It takes a transaction-scoped advisory lock before drawing its
//! sequence number, so writers commit in sequence order and a reader that has seen N has seen
//! everything before N. The row holds the full state after the change (not a diff), so applying
//! it twice is harmless. `pg_notify` wakes every stream at once when the transaction commits.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use keyshare_runtime::db::{DbError, GenericClient, advisory_key};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_postgres::types::Json;
use uuid::Uuid;

use crate::domain::{KeyRef, Permissions, ProjectLimits};

const CHANNEL: &str = "keyring_changes";

/// One credential as the authorizer needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialState {
    /// SHA-256 of the credential (hex in the feed's JSON).
    #[serde(with = "const_hex::serde::no_prefix")]
    pub sha256: Vec<u8>,
    /// `sandbox` or `production`.
    pub environment: String,
    pub active: bool,
    pub permissions: Permissions,
    pub rate_limit: i64,
    pub daily_quota: i64,
    pub ip_allowlist: Vec<String>,
    pub expire_at: Option<DateTime<Utc>>,
    /// Set while a regenerated credential is in its grace period.
    pub grace_end: Option<DateTime<Utc>>,
}

/// A key as the authorizer needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    pub project: Uuid,
    pub key: Uuid,
    pub credentials: Vec<CredentialState>,
}

/// A project's limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectState {
    pub project: Uuid,
    pub sandbox: ProjectLimits,
    pub production: ProjectLimits,
}

/// One entry of the feed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeedEvent {
    KeyUpserted(KeyState),
    KeyRemoved { project: Uuid, key: Uuid },
    ProjectUpserted(ProjectState),
    ProjectRemoved { project: Uuid },
}

/// What a watcher receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeedMessage {
    /// `estimated_keys` is about how many keys follow (the table statistics; 0 when unknown).
    SnapshotStart {
        sequence: i64,
        estimated_keys: i64,
    },
    Event {
        sequence: i64,
        event: FeedEvent,
    },
    SnapshotEnd {
        sequence: i64,
    },
}

/// Records `event` in the caller's transaction. Call it last, just before commit: it holds the
/// feed lock until the transaction ends. A trigger on the feed replaces (or removes) the key's
/// row in `feed_keys`, which snapshots read.
pub async fn record(tx: &impl GenericClient, event: &FeedEvent) -> Result<i64, DbError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&advisory_key("keyring.changes")]).await?;
    let seq: i64 = tx.query_one("SELECT nextval('keyring.change_seq')", &[]).await?.get(0);
    tx.execute("INSERT INTO keyring.changes (seq, event) VALUES ($1, $2)", &[&seq, &Json(event)]).await?;
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &seq.to_string()]).await?;
    Ok(seq)
}

/// Records the current state of a key (or its removal, if it no longer exists).
pub async fn record_key(tx: &impl GenericClient, key: KeyRef, now: DateTime<Utc>) -> Result<i64, DbError> {
    let event = match key_state(tx, key, now).await? {
        Some(state) => FeedEvent::KeyUpserted(state),
        None => FeedEvent::KeyRemoved { project: key.project, key: key.key },
    };
    record(tx, &event).await
}

/// Records the current limits of a project.
pub async fn record_project(tx: &impl GenericClient, project: Uuid) -> Result<i64, DbError> {
    let event = match project_state(tx, Some(project)).await?.pop() {
        Some(state) => FeedEvent::ProjectUpserted(state),
        None => FeedEvent::ProjectRemoved { project },
    };
    record(tx, &event).await
}

const CREDENTIAL_STATE_SQL: &str = "
    SELECT k.project_id, c.key_id, c.sha256, c.environment, e.active, e.can_create, e.can_read, e.can_update,
           e.can_delete, e.rate_limit, e.daily_quota, e.ip_allowlist, e.expire_at, c.retired_at
    FROM keyring.credentials c
    JOIN keyring.key_environments e ON e.key_id = c.key_id AND e.environment = c.environment
    JOIN keyring.keys k ON k.id = c.key_id AND k.deleted_at IS NULL
    WHERE (c.retired_at IS NULL OR c.retired_at > $1)";

fn credential_state(row: &tokio_postgres::Row) -> CredentialState {
    CredentialState {
        sha256: row.get(2),
        environment: row.get(3),
        active: row.get(4),
        permissions: Permissions { create: row.get(5), read: row.get(6), update: row.get(7), delete: row.get(8) },
        rate_limit: row.get(9),
        daily_quota: row.get(10),
        ip_allowlist: row.get(11),
        expire_at: row.get(12),
        grace_end: row.get(13),
    }
}

pub async fn key_state(c: &impl GenericClient, key: KeyRef, now: DateTime<Utc>) -> Result<Option<KeyState>, DbError> {
    let live = c
        .query_opt(
            "SELECT 1 FROM keyring.keys WHERE id = $1 AND project_id = $2 AND deleted_at IS NULL",
            &[&key.key, &key.project],
        )
        .await?;
    if live.is_none() {
        return Ok(None);
    }
    let rows = c
        .query(
            &format!("{CREDENTIAL_STATE_SQL} AND c.key_id = $2 ORDER BY c.environment, c.created_at"),
            &[&now, &key.key],
        )
        .await?;
    Ok(Some(KeyState { project: key.project, key: key.key, credentials: rows.iter().map(credential_state).collect() }))
}

async fn project_state(c: &impl GenericClient, project: Option<Uuid>) -> Result<Vec<ProjectState>, DbError> {
    let rows = c
        .query(
            "SELECT id, sandbox_rate_limit, sandbox_monthly_quota, production_rate_limit, production_monthly_quota
             FROM keyring.projects WHERE $1::uuid IS NULL OR id = $1 ORDER BY id",
            &[&project],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ProjectState {
            project: r.get(0),
            sandbox: ProjectLimits { rate_limit: r.get(1), monthly_quota: r.get(2) },
            production: ProjectLimits { rate_limit: r.get(3), monthly_quota: r.get(4) },
        })
        .collect())
}

/// Streams the feed to one watcher: a snapshot when `after` is 0 or no longer retained, then
/// every change after it, until the receiver goes away or the server starts stopping.
pub async fn stream(
    pool: deadpool_postgres::Pool,
    mut wake: watch::Receiver<i64>,
    mut stopping: watch::Receiver<bool>,
    after: i64,
    now: impl Fn() -> DateTime<Utc> + Send + 'static,
    out: mpsc::Sender<Result<FeedMessage, DbError>>,
) {
    let result = async {
        let mut last = after;
        if needs_snapshot(&pool, after).await? {
            last = send_snapshot(&pool, now(), &out).await?;
        }
        loop {
            let client = pool.get().await?;
            let rows = client
                .query("SELECT seq, event FROM keyring.changes WHERE seq > $1 ORDER BY seq LIMIT 500", &[&last])
                .await?;
            drop(client);
            let caught_up = rows.len() < 500;
            for row in rows {
                let sequence: i64 = row.get(0);
                let Json(event): Json<FeedEvent> = row.get(1);
                if out.send(Ok(FeedMessage::Event { sequence, event })).await.is_err() {
                    return Ok(());
                }
                last = sequence;
            }
            if caught_up {
                // Woken by NOTIFY; the timeout covers a listener that is reconnecting.
                // Ending the stream when the server stops lets the shutdown drain promptly; the
                // watcher resumes from its last sequence on another replica.
                tokio::select! {
                    changed = wake.changed() => if changed.is_err() { return Ok(()) },
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = out.closed() => return Ok(()),
                    _ = stopping.wait_for(|stopping| *stopping) => return Ok(()),
                }
            }
        }
    }
    .await;
    if let Err(e) = result {
        let _ = out.send(Err(e)).await;
    }
}

async fn needs_snapshot(pool: &deadpool_postgres::Pool, after: i64) -> Result<bool, DbError> {
    if after <= 0 {
        return Ok(true);
    }
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT (SELECT pruned_through FROM keyring.feed_state), (SELECT coalesce(max(seq), 0) FROM keyring.changes)",
            &[],
        )
        .await?;
    let (pruned_through, newest): (i64, i64) = (row.get(0), row.get(1));
    // Asking for changes that were pruned, or for a future the database never had (it was
    // restored from a backup, say), both need a fresh start.
    Ok(after < pruned_through || after > newest.max(pruned_through))
}

/// Sends a consistent snapshot and returns the sequence it is consistent with.
async fn send_snapshot(
    pool: &deadpool_postgres::Pool,
    now: DateTime<Utc>,
    out: &mpsc::Sender<Result<FeedMessage, DbError>>,
) -> Result<i64, DbError> {
    let mut client = pool.get().await?;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    // Within one repeatable-read snapshot: every change up to this sequence is visible, and
    // none after it (writers commit in sequence order).
    let sequence: i64 = tx.query_one("SELECT coalesce(max(seq), 0) FROM keyring.changes", &[]).await?.get(0);
    let pruned: i64 = tx.query_one("SELECT pruned_through FROM keyring.feed_state", &[]).await?.get(0);
    let sequence = sequence.max(pruned);
    let estimated_keys: i64 = tx
        .query_one("SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = 'keyring.feed_keys'::regclass", &[])
        .await?
        .get(0);
    if out.send(Ok(FeedMessage::SnapshotStart { sequence, estimated_keys })).await.is_err() {
        return Ok(sequence);
    }
    for state in project_state(&tx, None).await? {
        let message = FeedMessage::Event { sequence, event: FeedEvent::ProjectUpserted(state) };
        if out.send(Ok(message)).await.is_err() {
            return Ok(sequence);
        }
    }
    // One row a key, streamed from the server as it is read, so a million keys never sit in
    // memory at once and the first arrive before the scan ends.
    let rows = tx.query_raw("SELECT state FROM keyring.feed_keys", std::iter::empty::<i64>()).await?;
    futures::pin_mut!(rows);
    while let Some(row) = rows.next().await {
        let Json(mut state): Json<KeyState> = row?.try_get(0)?;
        // As `key_state` reads it now: a regenerated credential only while its grace lasts.
        state.credentials.retain(|c| c.grace_end.is_none_or(|end| end > now));
        if out.send(Ok(FeedMessage::Event { sequence, event: FeedEvent::KeyUpserted(state) })).await.is_err() {
            return Ok(sequence);
        }
    }
    tx.commit().await?;
    let _ = out.send(Ok(FeedMessage::SnapshotEnd { sequence })).await;
    Ok(sequence)
}

/// Listens for `NOTIFY keyring_changes` on a dedicated connection and publishes the newest
/// sequence; reconnects with backoff when the connection drops.
pub fn spawn_listener(database_url: String) -> watch::Receiver<i64> {
    let (tx, rx) = watch::channel(0i64);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match listen_once(&database_url, &tx).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "feed listener lost its connection; reconnecting");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
    rx
}

async fn listen_once(database_url: &str, tx: &watch::Sender<i64>) -> Result<(), DbError> {
    let (client, mut connection) = keyshare_runtime::db::connect(database_url).await?;
    let (notify_tx, mut notify_rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    let _ = notify_tx.send(Ok(n.payload().parse::<i64>().unwrap_or(0)));
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = notify_tx.send(Err(e));
                    return;
                }
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    // Wake watchers once after (re)connecting, in case a notification was missed meanwhile.
    tx.send_modify(|seq| *seq += 0);
    let result = loop {
        match notify_rx.recv().await {
            Some(Ok(seq)) => {
                if tx.is_closed() {
                    break Ok(());
                }
                tx.send_modify(|current| *current = (*current).max(seq));
            }
            Some(Err(e)) => break Err(e.into()),
            None => break Ok(()),
        }
    };
    driver.abort();
    result
}

/// Deletes changes older than `keep`, remembering how far it pruned so a watcher that asks for
/// a pruned sequence gets a snapshot instead.
pub async fn prune(c: &impl GenericClient, older_than: DateTime<Utc>) -> Result<u64, DbError> {
    let row = c
        .query_one(
            "WITH gone AS (DELETE FROM keyring.changes WHERE created_at < $1 RETURNING seq)
             SELECT count(*), coalesce(max(seq), 0) FROM gone",
            &[&older_than],
        )
        .await?;
    let (count, through): (i64, i64) = (row.get(0), row.get(1));
    if count > 0 {
        c.execute("UPDATE keyring.feed_state SET pruned_through = GREATEST(pruned_through, $1)", &[&through]).await?;
    }
    Ok(count as u64)
}
