//! Following keyring's change feed: a snapshot, then every change, into the index. On a dropped
//! stream it reconnects with backoff and resumes after the last sequence it applied; meanwhile
//! checks go on answering from what the index has.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ipnet::IpNet;
use keyshare_proto::keyring::v1 as pb;
use keyshare_proto::keyring::v1::watch_keys_response::Event;
use keyshare_runtime::client::ServiceToken;
use keyshare_runtime::credential::Environment;
use keyshare_runtime::server::Readiness;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::index::{Index, Limits, Methods, NewCredential};
use crate::state::Shared;

/// How long readiness waits, after the first snapshot, for the quota counts stored in the
/// database; without the database the authorizer serves anyway.
const QUOTA_RESTORE_WAIT: Duration = Duration::from_secs(5);

fn limits(l: Option<pb::ProjectEnvironmentLimits>) -> Limits {
    l.map(|l| Limits { rate_limit: l.rate_limit_per_second, monthly_quota: l.monthly_quota }).unwrap_or_default()
}

/// The UUID of `projects/{project}`.
fn project_id(name: &str) -> Option<Uuid> {
    crate::model::parse_project(name, "project").ok()
}

/// The UUIDs of `projects/{project}/keys/{key}`.
fn key_id(name: &str) -> Option<(Uuid, Uuid)> {
    crate::model::parse_key(name, "key").ok().map(|name| (name.project, name.key))
}

/// Applies one feed event to an index.
pub fn apply(index: &mut Index, event: Event) {
    match event {
        Event::KeyUpserted(state) => {
            let Some((project, key)) = key_id(&state.key) else {
                tracing::warn!(key = %state.key, "feed names a key the authorizer cannot parse; ignored");
                return;
            };
            let credentials = state
                .credentials
                .into_iter()
                .filter_map(|c| {
                    let permissions = c.permissions.unwrap_or_default();
                    Some(NewCredential {
                        sha256: c.sha256.as_slice().try_into().ok()?,
                        environment: Environment::from_number(c.environment)?,
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
                    })
                })
                .collect();
            index.upsert_key(key, project, credentials);
        }
        Event::KeyRemoved(name) => {
            if let Some((_, key)) = key_id(&name) {
                index.remove_key(key);
            }
        }
        Event::ProjectUpserted(state) => {
            if let Some(project) = project_id(&state.project) {
                index.upsert_project(project, limits(state.sandbox), limits(state.production));
            }
        }
        Event::ProjectRemoved(name) => {
            if let Some(project) = project_id(&name) {
                index.remove_project(project);
            }
        }
        Event::SnapshotStart(_) | Event::SnapshotEnd(_) => {}
    }
}

/// Reports SERVING once the stored quota counts are in memory and, with shared limits, the
/// store has answered once (so the replica knows the fleet's limit state), or after a short
/// wait for either: checks must not wait for PostgreSQL or Redis.
fn spawn_ready_after_restore(shared: Arc<Shared>, readiness: Readiness) {
    tokio::spawn(async move {
        let restored = shared.quotas_restored_notify.notified();
        if !shared.quotas_restored.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(QUOTA_RESTORE_WAIT, restored).await;
        }
        let limits = shared.sharing.ready_notify.notified();
        if shared.sharing.enabled() && !shared.sharing.ready.load(Ordering::Acquire) {
            // The sharing task stops waiting by itself after a few seconds.
            limits.await;
        }
        readiness.set(true).await;
    });
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
    shared: &Arc<Shared>,
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
            Event::SnapshotStart(start) => {
                building = Some(Index::with_capacity(usize::try_from(start.estimated_key_count).unwrap_or(0)));
            }
            Event::SnapshotEnd(_) => {
                if let Some(index) = building.take() {
                    let credentials = index.credentials();
                    // Counters carry over, so a fresh snapshot hands out no fresh budget. Calls
                    // charged between the copy and the swap are the only ones not carried.
                    index.carry_counters_from(&shared.index.read().unwrap_or_else(|p| p.into_inner()));
                    *shared.index.write().unwrap_or_else(|p| p.into_inner()) = index;
                    shared.sequence.store(message.sequence, Ordering::Release);
                    tracing::info!(sequence = message.sequence, credentials, "snapshot loaded");
                    if !shared.loaded.swap(true, Ordering::AcqRel) {
                        shared.loaded_notify.notify_one();
                        spawn_ready_after_restore(shared.clone(), readiness.clone());
                    }
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
