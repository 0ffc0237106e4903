//! Sessions that ended, as every service but identity learns of them: identity's
//! `WatchSessionRevocations`, followed by a task of each service, fills a set that
//! [`TokenVerifier`](crate::auth::TokenVerifier) consults, so an access token stops working
//! everywhere within moments of its session ending (logout, password change or reset), not
//! only when it expires.
//!
//! Until the first snapshot has arrived, account tokens are not accepted blindly: their
//! verification waits a few seconds for it, then answers UNAVAILABLE. Once synced, a lost stream
//! changes nothing for callers (while identity is away nobody can log out either); the follower
//! reconnects with backoff and receives the whole window again, so nothing that ended meanwhile
//! is missed. Entries are dropped once every token of their session has expired.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use keyshare_proto::identity::v1 as pb;
use keyshare_proto::identity::v1::watch_session_revocations_response::Event;
use tonic::transport::Channel;
use uuid::Uuid;

use super::AuthError;
use crate::client::ServiceToken;
use crate::clock::SharedClock;
use crate::metrics::Metrics;

/// How long a verification waits for the first snapshot before answering UNAVAILABLE.
const FIRST_SYNC_WAIT: Duration = Duration::from_secs(5);
/// Reconnection backoff: from the first to the longest wait. The longest bounds how late a
/// session that ends just as identity comes back is refused here, so it stays well under the
/// 5 s the product promises.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often entries whose tokens have all expired are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The ended sessions whose tokens may still be presented, and whether the set is complete.
pub struct SessionRevocations {
    /// Session id → when its last token expires (Unix seconds). A std lock, never held across
    /// an await.
    revoked: RwLock<HashMap<Uuid, i64>>,
    /// Whether a snapshot has been received once.
    synced: tokio::sync::watch::Sender<bool>,
    /// Whether the stream is connected right now.
    connected: AtomicBool,
    clock: SharedClock,
}

impl std::fmt::Debug for SessionRevocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRevocations")
            .field("synced", &*self.synced.borrow())
            .field("connected", &self.connected())
            .finish_non_exhaustive()
    }
}

impl SessionRevocations {
    /// An empty set, not synced yet; [`Self::follow`] fills it.
    pub fn new(clock: SharedClock) -> Arc<Self> {
        Arc::new(Self {
            revoked: RwLock::default(),
            synced: tokio::sync::watch::channel(false).0,
            connected: AtomicBool::new(false),
            clock,
        })
    }

    /// Whether tokens of `session` must be refused: it ended, or (before the first snapshot,
    /// after a bounded wait) nobody can tell yet.
    pub async fn check(&self, session: Uuid) -> Result<(), AuthError> {
        self.check_waiting(session, FIRST_SYNC_WAIT).await
    }

    async fn check_waiting(&self, session: Uuid, first_sync_wait: Duration) -> Result<(), AuthError> {
        if !*self.synced.borrow() {
            let mut synced = self.synced.subscribe();
            let waited = tokio::time::timeout(first_sync_wait, synced.wait_for(|synced| *synced)).await;
            if !matches!(waited, Ok(Ok(_))) {
                return Err(AuthError::SessionsUnavailable);
            }
        }
        if self.is_revoked(session) { Err(AuthError::SessionRevoked) } else { Ok(()) }
    }

    /// Whether `session` is known to have ended.
    pub fn is_revoked(&self, session: Uuid) -> bool {
        self.revoked.read().unwrap_or_else(|poisoned| poisoned.into_inner()).contains_key(&session)
    }

    /// Whether the stream from identity is connected now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Whether a first snapshot has been received.
    pub fn synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Exports `keyshare_session_revocations_connected` (0/1).
    pub fn register_metrics(self: &Arc<Self>, metrics: &Metrics) {
        let connected = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        metrics.registry().register(
            "session_revocations_connected",
            "Whether identity's session-revocation feed is connected (0 while refusing only the sessions known to have ended)",
            connected.clone(),
        );
        let sessions = Arc::downgrade(self);
        metrics.on_scrape(move || {
            connected.set(i64::from(sessions.upgrade().is_some_and(|s| s.connected())));
        });
    }

    fn insert(&self, session: Uuid, expire_at: i64) {
        self.revoked.write().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(session, expire_at);
    }

    fn prune(&self) {
        let now = self.clock.now().timestamp();
        self.revoked.write().unwrap_or_else(|poisoned| poisoned.into_inner()).retain(|_, expire_at| *expire_at > now);
    }

    /// Follows identity's `WatchSessionRevocations` with this service's token, reconnecting
    /// with backoff, for as long as the set is in use.
    pub fn follow(self: &Arc<Self>, identity: Channel, token: Arc<ServiceToken>) {
        let sessions = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut backoff = BACKOFF_FIRST;
            loop {
                match follow_once(&sessions, &identity, &token).await {
                    Ok(true) => backoff = BACKOFF_FIRST,
                    Ok(false) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "session revocations lost; tokens keep being checked against what is known")
                    }
                }
                match sessions.upgrade() {
                    Some(sessions) => sessions.connected.store(false, Ordering::Relaxed),
                    None => return,
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        });
        let sessions = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(PRUNE_EVERY);
            loop {
                ticker.tick().await;
                let Some(sessions) = sessions.upgrade() else { return };
                sessions.prune();
            }
        });
    }
}

/// One connection: `Ok(true)` when identity ended the stream, `Ok(false)` when the set is no
/// longer used.
async fn follow_once(
    sessions: &Weak<SessionRevocations>,
    identity: &Channel,
    token: &ServiceToken,
) -> Result<bool, String> {
    let request = token.request(pb::WatchSessionRevocationsRequest {}).await.map_err(|e| e.to_string())?;
    let mut stream = pb::identity_service_client::IdentityServiceClient::new(identity.clone())
        .watch_session_revocations(request)
        .await
        .map_err(|s| format!("WatchSessionRevocations: {:?}", s.code()))?
        .into_inner();
    let mut synced_now = false;
    loop {
        let message = stream.message().await.map_err(|s| format!("WatchSessionRevocations stream: {:?}", s.code()))?;
        let Some(sessions) = sessions.upgrade() else { return Ok(false) };
        let Some(message) = message else { return Ok(true) };
        sessions.connected.store(true, Ordering::Relaxed);
        match message.event {
            Some(Event::Revocation(revocation)) => match Uuid::parse_str(&revocation.session_id) {
                Ok(session) => sessions.insert(session, revocation.expire_time.map_or(i64::MAX, |t| t.seconds)),
                Err(_) => tracing::warn!("identity sent a session revocation without a valid session id; ignored"),
            },
            Some(Event::SnapshotEnd(_)) if !synced_now => {
                synced_now = true;
                sessions.prune();
                if !sessions.synced.send_replace(true) {
                    tracing::info!(
                        revoked = sessions.revoked.read().map_or(0, |r| r.len()),
                        "session revocations synced"
                    );
                }
            }
            Some(Event::SnapshotEnd(_)) | None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock as _, ManualClock};

    #[tokio::test]
    async fn before_the_first_snapshot_tokens_wait_then_are_refused_as_unavailable() {
        let sessions = SessionRevocations::new(ManualClock::new());
        let wait = Duration::from_millis(20);
        assert_eq!(sessions.check_waiting(Uuid::new_v4(), wait).await, Err(AuthError::SessionsUnavailable));
        // A snapshot arriving while a verification waits lets it through.
        let session = Uuid::new_v4();
        let waiting = sessions.check_waiting(session, Duration::from_secs(30));
        let (answer, ()) = tokio::join!(waiting, async {
            sessions.synced.send_replace(true);
        });
        assert_eq!(answer, Ok(()));
    }

    #[tokio::test]
    async fn a_revoked_session_is_refused_until_its_tokens_expire() {
        let clock = ManualClock::new();
        let sessions = SessionRevocations::new(clock.clone());
        let (ended, live) = (Uuid::new_v4(), Uuid::new_v4());
        sessions.insert(ended, clock.now().timestamp() + 60);
        sessions.synced.send_replace(true);
        assert_eq!(sessions.check(ended).await, Err(AuthError::SessionRevoked));
        assert_eq!(sessions.check(live).await, Ok(()));
        clock.advance(chrono::Duration::seconds(61));
        sessions.prune();
        assert!(!sessions.is_revoked(ended));
    }
}
