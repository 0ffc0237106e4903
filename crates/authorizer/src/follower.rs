//! Following keyring's change feed: a snapshot, then every change, into the index. On a dropped
//! stream it reconnects with backoff and resumes after the last sequence it applied; meanwhile
//! checks go on answering from what the index has.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ipnet::IpNet;
use keyshare_proto::keyring::v1 as pb;
use keyshare_proto::keyring::v1::watch_keys_response::Event;
use keyshare_runtime::client::ServiceToken;
use keyshare_runtime::credential::Environment;
use keyshare_runtime::server::Readiness;
use tonic::transport::Channel;

use crate::index::{CredentialEntry, Index, KeyMeta, Limits, Methods, slot};

/// The index and where it stands in the feed.
#[derive(Debug, Default)]
pub struct Shared {
    pub index: RwLock<Index>,
    /// Sequence of the last applied change or complete snapshot.
    pub sequence: AtomicI64,
    pub connected: AtomicBool,
    /// When the feed was lost, while it is lost.
    lost_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Shared {
    fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        let mut lost_at = self.lost_at.lock().unwrap_or_else(|p| p.into_inner());
        match (connected, *lost_at) {
            (true, _) => *lost_at = None,
            (false, None) => *lost_at = Some(std::time::Instant::now()),
            (false, Some(_)) => {}
        }
    }

    /// How long the index has gone without the feed since it was lost; zero while connected
    /// (and before the first connection, while health says NOT_SERVING).
    pub fn stale_for(&self) -> Duration {
        if self.connected.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        self.lost_at.lock().unwrap_or_else(|p| p.into_inner()).map_or(Duration::ZERO, |at| at.elapsed())
    }
}

fn environment(value: i32) -> Option<Environment> {
    match pb::Environment::try_from(value).ok()? {
        pb::Environment::Sandbox => Some(Environment::Sandbox),
        pb::Environment::Production => Some(Environment::Production),
        pb::Environment::Unspecified => None,
    }
}

fn limits(l: Option<pb::ProjectEnvironmentLimits>) -> Limits {
    l.map(|l| Limits { rate_limit: l.rate_limit_per_second, monthly_quota: l.monthly_quota }).unwrap_or_default()
}

/// Applies one feed event to an index.
pub fn apply(index: &mut Index, event: Event) {
    match event {
        Event::KeyUpserted(state) => {
            // The key keeps its rate buckets across changes, except a changed limit starts afresh.
            let previous_limits = index.key_rate_limits(&state.key);
            let meta = index
                .key_meta(&state.key)
                .unwrap_or_else(|| Arc::new(KeyMeta::new(state.key.into(), state.project.into())));
            let entries: Vec<([u8; 32], CredentialEntry)> = state
                .credentials
                .into_iter()
                .filter_map(|c| {
                    let sha256: [u8; 32] = c.sha256.as_slice().try_into().ok()?;
                    let permissions = c.permissions.unwrap_or_default();
                    let entry = CredentialEntry {
                        key: meta.clone(),
                        environment: environment(c.environment)?,
                        active: c.active,
                        methods: Methods::new(
                            permissions.create,
                            permissions.read,
                            permissions.update,
                            permissions.delete,
                        ),
                        rate_limit: c.rate_limit_per_second,
                        daily_quota: c.daily_quota,
                        allowlist: c.ip_allowlist.iter().filter_map(|net| net.parse::<IpNet>().ok()).collect(),
                        expire_at: c.expire_time.map(|t| t.seconds),
                        grace_end: c.grace_end_time.map(|t| t.seconds),
                    };
                    Some((sha256, entry))
                })
                .collect();
            if let Some(previous) = previous_limits {
                let mut current = previous;
                for (_, entry) in entries.iter() {
                    current[slot(entry.environment)] = entry.rate_limit;
                }
                for environment in [Environment::Sandbox, Environment::Production] {
                    if previous[slot(environment)] != current[slot(environment)] {
                        meta.rates[slot(environment)].reset();
                    }
                }
            }
            index.upsert_key(meta, entries);
        }
        Event::KeyRemoved(name) => index.remove_key(&name),
        Event::ProjectUpserted(state) => {
            index.upsert_project(state.project.into(), limits(state.sandbox), limits(state.production))
        }
        Event::ProjectRemoved(name) => index.remove_project(&name),
        Event::SnapshotStart(_) | Event::SnapshotEnd(_) => {}
    }
}

/// Follows the feed until the process ends.
pub fn spawn(keyring: Channel, token: Arc<ServiceToken>, shared: Arc<Shared>, readiness: Readiness) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match follow_once(&keyring, &token, &shared, &readiness).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, sequence = shared.sequence.load(Ordering::Relaxed), "change feed lost; answering from memory")
                }
            }
            shared.set_connected(false);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
}

async fn follow_once(
    keyring: &Channel,
    token: &ServiceToken,
    shared: &Shared,
    readiness: &Readiness,
) -> Result<(), String> {
    let after = shared.sequence.load(Ordering::Acquire);
    let request = token.request(pb::WatchKeysRequest { after_sequence: after }).await.map_err(|e| e.to_string())?;
    let mut stream = pb::keyring_service_client::KeyringServiceClient::new(keyring.clone())
        .watch_keys(request)
        .await
        .map_err(|s| format!("WatchKeys: {:?}", s.code()))?
        .into_inner();
    shared.set_connected(true);
    // A snapshot is built aside and swapped in whole, so checks never see half of one.
    let mut building: Option<Index> = None;
    while let Some(message) = stream.message().await.map_err(|s| format!("WatchKeys stream: {:?}", s.code()))? {
        let Some(event) = message.event else { continue };
        match event {
            Event::SnapshotStart(_) => building = Some(Index::default()),
            Event::SnapshotEnd(_) => {
                if let Some(index) = building.take() {
                    let credentials = index.credentials();
                    *shared.index.write().unwrap_or_else(|p| p.into_inner()) = index;
                    shared.sequence.store(message.sequence, Ordering::Release);
                    tracing::info!(sequence = message.sequence, credentials, "snapshot loaded");
                    readiness.set(true).await;
                }
            }
            event => match building.as_mut() {
                Some(index) => apply(index, event),
                None => {
                    apply(&mut shared.index.write().unwrap_or_else(|p| p.into_inner()), event);
                    shared.sequence.store(message.sequence, Ordering::Release);
                }
            },
        }
    }
    Ok(())
}
