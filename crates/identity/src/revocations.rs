//! The session-revocation feed: which sessions ended while their access tokens may still be
//! valid, for the services that verify tokens on their own.
//!
//! A trigger on `identity.sessions` records every session that ends, in the transaction that
//! ends it, and notifies `identity_session_revocations` at commit. Rows may commit out of
//! sequence order, so a stream does not track the last sequence it sent: it re-reads from the
//! oldest transaction still running at its previous read ([`store::RevocationHorizon`]), which
//! misses nothing and sends a row twice at worst (watchers hold a set: harmless). Only the
//! revocations whose tokens may still be valid are kept and sent.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use keyshare_runtime::auth::CLOCK_SKEW;
use keyshare_runtime::clock::SharedClock;
use keyshare_runtime::db::DbError;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::store::{self, SessionRevocation};

/// The channel the trigger notifies.
pub const CHANNEL: &str = "identity_session_revocations";
/// How often a stream looks for new rows when no notification came (the listener may be
/// reconnecting).
const POLL: Duration = Duration::from_secs(1);
/// How often rows of sessions whose tokens have all expired are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// What a watcher receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevocationMessage {
    /// A session ended; no token it issued is valid after `expire_at` anyway.
    Revoked { revocation: SessionRevocation, expire_at: DateTime<Utc> },
    /// Every session that ended so far has been sent.
    SnapshotEnd,
}

/// The feed as every stream shares it.
#[derive(Clone)]
pub struct Revocations {
    pool: Pool,
    clock: SharedClock,
    /// How long after a session ended a token it issued may still be accepted somewhere.
    window: chrono::Duration,
    wake: watch::Receiver<u64>,
    stopping: watch::Receiver<bool>,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations").field("window", &self.window).finish_non_exhaustive()
    }
}

impl Revocations {
    /// Listens for new revocations on `database_url` and prunes expired ones. `access_token_ttl`
    /// is the lifetime of the tokens identity signs; streams end when `stopping` turns true.
    pub fn start(
        pool: Pool,
        database_url: String,
        clock: SharedClock,
        access_token_ttl: Duration,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        // A token is accepted until its expiry plus the skew; the second skew covers the clocks of
        // the identity replica that signed it and of the service that verifies it disagreeing.
        let window = chrono::Duration::from_std(access_token_ttl + 2 * CLOCK_SKEW).unwrap_or(chrono::Duration::MAX);
        let wake = keyshare_runtime::db::listen(database_url, CHANNEL);
        let revocations = Self { pool, clock, window, wake, stopping };
        revocations.spawn_pruning();
        revocations
    }

    /// Streams the snapshot, its end, then each new revocation into `out`, until the receiver
    /// goes away or the server starts stopping (the watcher reconnects, to another replica).
    pub async fn stream(mut self, out: mpsc::Sender<Result<RevocationMessage, DbError>>) {
        let result = async {
            // Sessions sent already, with the time their tokens expire, so a row read again
            // (see the module comment) is not sent again.
            let mut sent: HashMap<Uuid, DateTime<Utc>> = HashMap::new();
            let mut horizon = None;
            let mut snapshot = true;
            loop {
                let now = self.clock.now();
                let client = self.pool.get().await?;
                let (rows, next) = store::session_revocations(&client, horizon, now - self.window).await?;
                drop(client);
                horizon = Some(next);
                sent.retain(|_, expire_at| *expire_at > now);
                for revocation in rows {
                    let expire_at = revocation.revoked_at + self.window;
                    if sent.insert(revocation.session_id, expire_at).is_some() {
                        continue;
                    }
                    if out.send(Ok(RevocationMessage::Revoked { revocation, expire_at })).await.is_err() {
                        return Ok(());
                    }
                }
                if std::mem::take(&mut snapshot) && out.send(Ok(RevocationMessage::SnapshotEnd)).await.is_err() {
                    return Ok(());
                }
                // Woken by NOTIFY; the poll covers a listener that is reconnecting.
                tokio::select! {
                    changed = self.wake.changed() => if changed.is_err() { return Ok(()) },
                    () = tokio::time::sleep(POLL) => {}
                    () = out.closed() => return Ok(()),
                    _ = self.stopping.wait_for(|stopping| *stopping) => return Ok(()),
                }
            }
        }
        .await;
        if let Err(e) = result {
            let _ = out.send(Err(e)).await;
        }
    }

    /// Deletes revocations whose tokens have all expired, every minute, until the server stops.
    fn spawn_pruning(&self) {
        let (pool, clock, window) = (self.pool.clone(), self.clock.clone(), self.window);
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(PRUNE_EVERY);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stopping.wait_for(|stopping| *stopping) => return,
                }
                let result = async {
                    let client = pool.get().await.map_err(DbError::from)?;
                    store::prune_session_revocations(&client, clock.now() - window).await
                }
                .await;
                match result {
                    Ok(0) => {}
                    Ok(pruned) => tracing::debug!(pruned, "pruned session revocations"),
                    Err(e) => tracing::warn!(error = %e, "pruning session revocations failed"),
                }
            }
        });
    }
}
