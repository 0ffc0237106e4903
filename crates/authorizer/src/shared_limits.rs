//! Rate limits and quotas that hold across replicas, shared through Redis without a network
//! round trip on the check path.
//!
//! Every limited bucket (a key's or a project's rate limit, a key's daily and a project's
//! monthly quota) holds a [`Lease`]: calls of the current window (a second, a UTC day, a UTC
//! month) that this replica may spend. A check only counts a lease down. This task, every sync
//! interval, looks after the buckets checks have used:
//! - it reserves calls in the store with one `INCRBY` per bucket and window (pipelined), which
//!   returns the fleet's total: what was reserved before it is all that can be granted, so the
//!   leases of all replicas together never exceed the limit. A lease is sized by the calls this
//!   replica spent in the last interval (at most the limit divided by the live replicas), and a
//!   rate bucket in use gets the next second's lease shortly before that second starts;
//! - a window nobody has leased here yet (a key's first call, or a new second the task had not
//!   prepared) opens with one call granted without asking, which the task then reserves;
//! - it keeps this replica in a heartbeat set and reads how many replicas are alive.
//!
//! When the store is down or slow, checks neither wait nor fail: windows open with this
//! replica's share of the limit (the limit divided by the replicas it last knew of), and a quota
//! gets its share of what the fleet had left; what is granted so is counted
//! (`keyshare_limits_fallback_grants_total`) and reserved in the store once it answers again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keyshare_runtime::clock::SharedClock;
use keyshare_runtime::config::ConfigError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;

use crate::index::Index;
use crate::limits::{Bucket, Lease, Period};
use crate::state::Shared;

/// How long a new replica waits for the store before it reports SERVING with the fallback.
const READY_WAIT: Duration = Duration::from_secs(5);
/// A replica that has not renewed its heartbeat for this long is no longer counted.
const HEARTBEAT_TTL_MILLIS: i64 = 5_000;
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
/// Buckets unused for this long are forgotten (a quota's unspent lease is handed back).
const IDLE: Duration = Duration::from_secs(3);
/// Buckets the checks can hand to the task between two syncs before hints are lost.
const OPENED_CHANNEL: usize = 65_536;

/// Settings of the shared limits.
#[derive(Clone, Debug)]
pub struct SharedLimitsConfig {
    /// `KEYSHARE_REDIS_URL` (`redis://`, `rediss://`, `unix://`); none: limits are per replica.
    pub redis_url: Option<String>,
    /// Prefix of every key written (`KEYSHARE_REDIS_PREFIX`, default `keyshare`).
    pub prefix: String,
    /// How often leases are synced (`KEYSHARE_LIMITS_SYNC_MILLIS`, default 20).
    pub sync_interval: Duration,
    /// How long a sync waits for the store before falling back (`KEYSHARE_REDIS_TIMEOUT_MILLIS`,
    /// default 250).
    pub timeout: Duration,
}

impl Default for SharedLimitsConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            prefix: "keyshare".into(),
            sync_interval: Duration::from_millis(20),
            timeout: Duration::from_millis(250),
        }
    }
}

/// Starts sharing limits if a store is configured; otherwise limits stay per replica and this
/// does nothing.
pub fn spawn(config: SharedLimitsConfig, shared: Arc<Shared>, clock: SharedClock) -> Result<(), ConfigError> {
    let Some(url) = config.redis_url.clone() else {
        return Ok(());
    };
    let client = redis::Client::open(url.as_str())
        .map_err(|e| ConfigError::new("KEYSHARE_REDIS_URL", format!("not a Redis address: {:?}", e.kind())))?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.timeout))
        .set_response_timeout(Some(config.timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    let redis = ConnectionManager::new_lazy_with_config(client, manager_config)
        .map_err(|e| ConfigError::new("KEYSHARE_REDIS_URL", format!("unusable: {:?}", e.kind())))?;
    let (sender, receiver) = mpsc::channel(OPENED_CHANNEL);
    shared.sharing.enable(sender);
    let ready = shared.clone();
    tokio::spawn(async move {
        let notified = ready.sharing.ready_notify.notified();
        if !ready.sharing.ready.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(READY_WAIT, notified).await;
        }
        ready.sharing.ready.store(true, Ordering::Release);
        ready.sharing.ready_notify.notify_waiters();
    });
    let engine = Engine {
        shared,
        clock,
        redis,
        replica: uuid::Uuid::new_v4().to_string(),
        config,
        receiver,
        tracks: HashMap::new(),
        last_heartbeat: None,
    };
    tokio::spawn(engine.run());
    Ok(())
}

/// What the task knows of one bucket.
#[derive(Debug, Default)]
struct Track {
    /// The window the lease holds, once a check has opened one.
    window: Option<u32>,
    /// Calls granted to this replica for the window (opened, leased, fallback).
    granted: u64,
    /// Calls of `granted` spent, as of the last sync.
    used: u64,
    /// Calls to add to the store's count (granted without asking; negative: handed back).
    unpushed: i64,
    /// The fleet's total for the window at the last answer.
    total: i64,
    /// Calls granted here alone, as this replica's share, while the store was away.
    fallback: u64,
    /// The next window's lease, reserved ahead.
    next: Option<(u32, u64)>,
    last_used: Option<Instant>,
}

/// One request to the store.
#[derive(Debug)]
struct Op {
    bucket: Bucket,
    window: u32,
    /// Calls counted without asking (or handed back, negative).
    push: i64,
    /// Calls asked for.
    ask: u64,
    /// For the next window.
    ahead: bool,
}

struct Engine {
    shared: Arc<Shared>,
    clock: SharedClock,
    redis: ConnectionManager,
    replica: String,
    config: SharedLimitsConfig,
    receiver: mpsc::Receiver<Bucket>,
    tracks: HashMap<Bucket, Track>,
    last_heartbeat: Option<Instant>,
}

/// A bucket's lease, limit, current window and whether it is a rate (per-second) bucket.
fn resolve<'a>(index: &'a Index, bucket: &Bucket, now: i64) -> Option<(&'a Lease, i64, u32, bool)> {
    let second = now.div_euclid(1_000_000_000).clamp(0, i64::from(u32::MAX));
    let seconds = now.div_euclid(1_000_000_000);
    Some(match *bucket {
        Bucket::KeyRate(id, env) => {
            // A key without limits of its own has no lease: nothing to share.
            let limits = index.key(id)?.limits()?;
            let env = usize::from(env).min(1);
            (&limits.rates[env].lease, i64::from(limits.rate_limit[env]), second as u32, true)
        }
        Bucket::ProjectRate(id, env) => {
            let record = index.project(id)?;
            let env = usize::from(env).min(1);
            (&record.rates[env].lease, record.limits[env].rate_limit, second as u32, true)
        }
        Bucket::KeyDay(id, env) => {
            let limits = index.key(id)?.limits()?;
            let env = usize::from(env).min(1);
            (&limits.daily_leases[env], i64::from(limits.daily_quota[env]), Period::day(seconds).number(), false)
        }
        Bucket::ProjectMonth(id, env) => {
            let record = index.project(id)?;
            let env = usize::from(env).min(1);
            (&record.monthly_leases[env], record.limits[env].monthly_quota, Period::month(seconds).number(), false)
        }
    })
}

impl Engine {
    fn key(&self, bucket: &Bucket, window: u32) -> String {
        let (kind, id, env) = match bucket {
            Bucket::KeyRate(id, env) => ("kr", id, env),
            Bucket::ProjectRate(id, env) => ("pr", id, env),
            Bucket::KeyDay(id, env) => ("kd", id, env),
            Bucket::ProjectMonth(id, env) => ("pm", id, env),
        };
        format!("{}:limits:{kind}:{id}:{env}:{window}", self.config.prefix)
    }

    async fn run(mut self) {
        let mut ticker = tokio::time::interval(self.config.sync_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.sync().await;
        }
    }

    /// One sync: what the checks used, what to reserve, and the answers put into the leases.
    async fn sync(&mut self) {
        while let Ok(bucket) = self.receiver.try_recv() {
            self.tracks.entry(bucket).or_default();
        }
        let now = self.clock.now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        let into_second = now.rem_euclid(1_000_000_000);
        // Rate buckets in use get the next second's lease during the last fifth of this one.
        let prefetch_from = 800_000_000;
        let sharing = &self.shared.sharing;
        let connected = sharing.connected();
        let mut ops = Vec::new();
        {
            let index = self.shared.index.read().unwrap_or_else(|p| p.into_inner());
            self.tracks.retain(|bucket, track| {
                let Some((lease, limit, window, rate)) = resolve(&index, bucket, now) else { return false };
                if limit <= 0 {
                    return false;
                }
                let state = lease.observe(window);
                if !state.current {
                    // Nothing spent in this window yet.
                    return track.last_used.is_some_and(|at| at.elapsed() < IDLE) || track.window.is_none();
                }
                if track.window != Some(window) {
                    let ahead = track.next.filter(|(w, _)| *w == window).map_or(0, |(_, calls)| calls);
                    *track = Track {
                        window: Some(window),
                        granted: if state.opened > 0 { state.opened } else { ahead },
                        unpushed: state.opened as i64,
                        fallback: if connected { 0 } else { state.opened },
                        last_used: track.last_used,
                        ..Track::default()
                    };
                    if state.opened > 0 && ahead > 0 && lease.add(window, ahead) {
                        // Reserved ahead but opened without it: it is still this replica's.
                        track.granted += ahead;
                    }
                }
                let used = track.granted.saturating_sub(state.left);
                let spent = used.saturating_sub(track.used);
                track.used = used;
                if spent > 0 || state.wanted {
                    track.last_used = Some(Instant::now());
                }
                // Enough for the next intervals at the pace of the last one, and while the fleet
                // is far from the limit a quarter of this replica's share of what is left, so a
                // burst far below the limit is never refused for want of a lease.
                let share = sharing.share(limit).max(1);
                let left_share = sharing.share((limit - track.total).max(0));
                let want = (2 * spent).max(left_share / 4).clamp(1, share);
                let ask =
                    if state.wanted || (spent > 0 && state.left < want) { want - state.left.min(want) } else { 0 };
                if ask > 0 || track.unpushed != 0 {
                    ops.push(Op { bucket: *bucket, window, push: track.unpushed, ask, ahead: false });
                }
                let next = window.wrapping_add(1);
                if rate
                    && into_second >= prefetch_from
                    && (track.used > 0 || state.wanted)
                    && track.next.is_none_or(|(w, _)| w != next)
                {
                    let ask = if state.wanted { share } else { track.used.clamp(1, share) };
                    ops.push(Op { bucket: *bucket, window: next, push: 0, ask, ahead: true });
                }
                let idle = track.last_used.is_none_or(|at| at.elapsed() >= IDLE);
                if idle && !rate {
                    // A quota nobody here uses: hand its lease back and let the next call open it.
                    let left = lease.close();
                    if left > 0 {
                        ops.push(Op { bucket: *bucket, window, push: -(left as i64), ask: 0, ahead: false });
                    }
                    return false;
                }
                !idle
            });
        }
        let heartbeat = self.last_heartbeat.is_none_or(|at| at.elapsed() >= HEARTBEAT_EVERY);
        if ops.is_empty() && !heartbeat && connected {
            return;
        }
        let mut pipe = redis::pipe();
        for op in &ops {
            let key = self.key(&op.bucket, op.window);
            let ttl: i64 = match op.bucket {
                Bucket::KeyRate(..) | Bucket::ProjectRate(..) => 10,
                Bucket::KeyDay(..) => 3 * 86_400,
                Bucket::ProjectMonth(..) => 40 * 86_400,
            };
            pipe.cmd("INCRBY").arg(&key).arg(op.push + op.ask as i64);
            pipe.cmd("EXPIRE").arg(&key).arg(ttl).ignore();
        }
        let replicas_key = format!("{}:limits:replicas", self.config.prefix);
        let wall = chrono::Utc::now().timestamp_millis();
        pipe.cmd("ZADD").arg(&replicas_key).arg(wall).arg(&self.replica).ignore();
        pipe.cmd("ZREMRANGEBYSCORE").arg(&replicas_key).arg("-inf").arg(wall - HEARTBEAT_TTL_MILLIS).ignore();
        pipe.cmd("PEXPIRE").arg(&replicas_key).arg(10 * HEARTBEAT_TTL_MILLIS).ignore();
        pipe.cmd("ZCARD").arg(&replicas_key);
        let answer: Result<Result<Vec<i64>, _>, _> =
            tokio::time::timeout(self.config.timeout, pipe.query_async::<Vec<i64>>(&mut self.redis)).await;
        match answer {
            Ok(Ok(totals)) if totals.len() == ops.len() + 1 => {
                self.last_heartbeat = Some(Instant::now());
                let shared = self.shared.clone();
                let sharing = &shared.sharing;
                sharing.set_replicas(u32::try_from(totals[ops.len()]).unwrap_or(u32::MAX));
                if !sharing.connected() {
                    tracing::info!(replicas = sharing.replicas(), "shared limits store answering; leases shared again");
                }
                sharing.set_connected(true);
                self.apply(&ops, &totals, now);
                if !sharing.ready.swap(true, Ordering::AcqRel) {
                    sharing.ready_notify.notify_waiters();
                }
            }
            answer => {
                let shared = self.shared.clone();
                let sharing = &shared.sharing;
                sharing.sync_failures.fetch_add(1, Ordering::Relaxed);
                if sharing.connected() || self.last_heartbeat.is_none() {
                    let error = match answer {
                        Ok(Err(e)) => format!("{:?}", e.kind()),
                        Ok(Ok(_)) => "unexpected answer".to_owned(),
                        Err(_) => "timed out".to_owned(),
                    };
                    tracing::warn!(%error, replicas = sharing.replicas(), "shared limits store away; each replica keeps its share");
                    // Not again until it has answered.
                    self.last_heartbeat = Some(Instant::now());
                }
                sharing.set_connected(false);
                self.fall_back(&ops, now);
            }
        }
    }

    /// Puts the store's answers into the leases.
    fn apply(&mut self, ops: &[Op], totals: &[i64], now: i64) {
        let index = self.shared.index.read().unwrap_or_else(|p| p.into_inner());
        for (op, &total) in ops.iter().zip(totals) {
            let Some(track) = self.tracks.get_mut(&op.bucket) else {
                continue;
            };
            let Some((lease, limit, _, _)) = resolve(&index, &op.bucket, now) else { continue };
            let before = total - op.ask as i64;
            let granted = (limit - before).clamp(0, op.ask as i64) as u64;
            if op.ahead {
                lease.set_next(op.window, granted);
                track.next = Some((op.window, granted));
            } else if track.window == Some(op.window) {
                track.unpushed -= op.push;
                track.total = total;
                if granted > 0 && lease.add(op.window, granted) {
                    track.granted += granted;
                }
            }
        }
    }

    /// Without the store: each bucket gets at most this replica's share of what the fleet had
    /// left at the last answer, counted to be reserved once the store answers again.
    fn fall_back(&mut self, ops: &[Op], now: i64) {
        let sharing = &self.shared.sharing;
        let index = self.shared.index.read().unwrap_or_else(|p| p.into_inner());
        for op in ops.iter().filter(|op| !op.ahead && op.ask > 0) {
            let Some(track) = self.tracks.get_mut(&op.bucket) else { continue };
            let Some((lease, limit, _, _)) = resolve(&index, &op.bucket, now) else { continue };
            if track.window != Some(op.window) {
                continue;
            }
            let allowance = sharing.share((limit - track.total).max(0)).saturating_sub(track.fallback);
            let granted = op.ask.min(allowance);
            if granted > 0 && lease.add(op.window, granted) {
                track.granted += granted;
                track.fallback += granted;
                track.unpushed += granted as i64;
                sharing.fallback_grants.fetch_add(granted, Ordering::Relaxed);
            }
        }
    }
}
