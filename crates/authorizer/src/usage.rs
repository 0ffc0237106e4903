//! Usage counting and call logs, written without ever slowing a check.
//!
//! A check of a known key hands a [`CallRecord`] to the [`Recorder`]: a `try_send` into a
//! bounded channel, so a check never waits; a full channel drops the record and counts the drop.
//! The [`Writer`] task drains the channel into the current batch: counts per minute × key ×
//! environment × method × outcome, and the call-log lines. Every flush interval it seals the
//! batch and writes sealed batches in order, each in one transaction: the call logs with COPY,
//! the counts and the quota counters as upserts that add to what other replicas wrote. A batch
//! carries an id recorded in the same transaction, so one retried after an unknown outcome is
//! not counted twice. While PostgreSQL is away, batches wait in memory; beyond the buffer limit
//! call-log lines are dropped (and counted) while counts keep adding up.
//!
//! Memory: whatever a caller controls is bounded before it is stored (the path is cut to
//! [`MAX_PATH`](crate::model::MAX_PATH) bytes into an allocation of its own size, the method is one of
//! [`METHOD_LABELS`](crate::model::METHOD_LABELS), the client address a parsed `IpAddr`). Call-log lines in the channel and in
//! the batches are charged, path included, to one byte budget ([`UsageConfig::buffer_bytes`]):
//! beyond it a check's record still carries its count but no call-log line. The channel holds at
//! most [`UsageConfig::channel`] records of fixed size besides, and the counts kept unwritten at
//! most [`UsageConfig::counts_bytes`]; batches that have not been tried yet are merged, so an
//! outage grows the counts only by new minutes, not by flush intervals. Every drop is counted.
//!
//! Quotas: checks charge counters in the index. At start, once the first snapshot is in memory,
//! the writer adds what is stored for today and this month (so counts survive a restart); after
//! each write it moves the counters to the stored totals, which include other replicas' calls.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate};
use deadpool_postgres::Pool;
use keyshare_runtime::clock::SharedClock;
use keyshare_runtime::credential::Environment;
use keyshare_runtime::db::DbError;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::index::slot;
use crate::limits::Period;
use crate::model::{Granularity, KeyName, Outcome, environment_from_number, environment_number};
use crate::state::Shared;

mod store;

/// One check of a known key: its count, and its call-log line unless the budget for lines was
/// used up (then `logged` is false and `path` empty).
#[derive(Clone, Debug)]
pub struct CallRecord {
    /// Unix nanoseconds on the service clock.
    pub at_nanos: i64,
    pub key: KeyName,
    pub environment: Environment,
    /// See [`crate::model::method_label`].
    pub method: &'static str,
    /// Without its query string (which may carry secrets), at most [`MAX_PATH`](crate::model::MAX_PATH) bytes.
    pub path: String,
    pub client_ip: Option<IpAddr>,
    pub outcome: Outcome,
    /// Whether the record carries a call-log line (charged to the line budget).
    pub logged: bool,
}

impl CallRecord {
    /// What the call-log line costs in memory: the record and its path's allocation.
    fn log_bytes(&self) -> usize {
        std::mem::size_of::<CallRecord>() + self.path.capacity()
    }
}

/// What one count entry (a key × environment × minute × method × outcome) costs in a batch's
/// map, with the map's own overhead.
const COUNT_ENTRY_BYTES: usize = std::mem::size_of::<(CountKey, i64)>() * 2;

/// The most records the writer takes from the channel at once.
const RECEIVE_BULK: usize = 1024;

/// How often the writer takes what the checks recorded.
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

/// Call-log partitions are made this many days ahead.
const PARTITIONS_AHEAD: i64 = 3;

/// Settings of the usage writer.
#[derive(Clone, Debug)]
pub struct UsageConfig {
    /// How often batches are written (`KEYSHARE_USAGE_FLUSH_MILLIS`, default 1000).
    pub flush_interval: Duration,
    /// Records the channel from the checks holds (`KEYSHARE_USAGE_CHANNEL`, default 65536).
    /// A record without its line is about a hundred bytes, so this bounds the channel's memory
    /// besides the lines' budget.
    pub channel: usize,
    /// Call-log lines held in memory while they cannot be written (`KEYSHARE_USAGE_BUFFER`,
    /// default 1,000,000); beyond it lines are dropped and counted.
    pub buffer: usize,
    /// Bytes of call-log lines (record and path) held in the channel and the batches
    /// (`KEYSHARE_USAGE_BUFFER_BYTES`, default 32 MiB); beyond it lines are dropped and counted,
    /// and checks are still counted.
    pub buffer_bytes: usize,
    /// Bytes of counts held unwritten (`KEYSHARE_USAGE_COUNTS_BYTES`, default 16 MiB, about
    /// 100,000 key-minutes); beyond it further counts are dropped and counted.
    pub counts_bytes: usize,
    /// Call logs are kept this many days (`KEYSHARE_CALL_LOG_RETENTION_DAYS`, default 30):
    /// a day's partition is dropped whole once every call in it is older.
    pub call_log_retention_days: u32,
    /// Per-minute counts are kept this many days (`KEYSHARE_USAGE_MINUTES_RETENTION_DAYS`,
    /// default 7), per-hour counts this many (`KEYSHARE_USAGE_HOURS_RETENTION_DAYS`, default
    /// 90), per-day counts this many (`KEYSHARE_USAGE_DAYS_RETENTION_DAYS`, default 0: for ever).
    pub minute_retention_days: u32,
    pub hour_retention_days: u32,
    pub day_retention_days: u32,
    /// The share of VALID calls that get a call-log line (`KEYSHARE_CALL_LOG_SAMPLE`, from 0 to
    /// 1, default 1: every one). Rejections are always logged, and counts are always exact.
    pub call_log_sample: f64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_secs(1),
            channel: 65_536,
            buffer: 1_000_000,
            buffer_bytes: 32 << 20,
            counts_bytes: 16 << 20,
            call_log_retention_days: 30,
            minute_retention_days: 7,
            hour_retention_days: 90,
            day_retention_days: 0,
            call_log_sample: 1.0,
        }
    }
}

/// Counters exported as metrics.
#[derive(Debug, Default)]
pub struct UsageMetrics {
    /// Records dropped whole: the channel from the checks was full.
    pub dropped_records: Counter,
    /// Call-log lines dropped because the buffer was full (their counts were kept).
    pub dropped_call_logs: Counter,
    /// Counts dropped because the counts held unwritten reached their limit.
    pub dropped_counts: Counter,
    /// Bytes of call-log lines held (channel and batches), against `buffer_bytes`.
    pub buffered_bytes: Gauge,
    /// Call-log lines written.
    pub written_call_logs: Counter,
    /// Writes that failed (and will be retried).
    pub failed_writes: Counter,
    /// Call-log lines waiting to be written.
    pub buffered_call_logs: Gauge,
    /// VALID calls left out of the call log by sampling (counted all the same).
    pub sampled_out_call_logs: Counter,
}

/// The checks' end of the channel. Cloning is cheap.
#[derive(Clone, Debug)]
pub struct Recorder {
    sender: mpsc::Sender<CallRecord>,
    metrics: Arc<UsageMetrics>,
    budget: Arc<LineBudget>,
    /// A VALID call gets a line when a random `u32` is below this (`u32::MAX`: always).
    sample_below: u32,
}

impl Recorder {
    /// Hands a record to the writer without waiting. A VALID call left out of the sample goes
    /// without its line; otherwise the line is charged to the budget first, and over budget the
    /// record goes without it. A full channel drops the record and counts it.
    pub fn record(&self, mut record: CallRecord) {
        if record.outcome == Outcome::Valid
            && self.sample_below != u32::MAX
            && rand::random::<u32>() >= self.sample_below
        {
            record.logged = false;
            record.path = String::new();
            self.metrics.sampled_out_call_logs.inc();
            self.send(record, 0);
            return;
        }
        let cost = record.log_bytes();
        record.logged = self.budget.try_take(cost);
        if !record.logged {
            record.path = String::new();
            self.metrics.dropped_call_logs.inc();
        }
        self.send(record, cost);
    }

    fn send(&self, record: CallRecord, cost: usize) {
        if let Err(e) = self.sender.try_send(record) {
            if e.into_inner().logged {
                self.budget.give_back(cost);
            }
            self.metrics.dropped_records.inc();
        }
    }
}

/// Bytes of call-log lines held between the checks and the database: taken by the checks,
/// given back by the writer once a line is written.
#[derive(Debug)]
struct LineBudget {
    used: AtomicUsize,
    limit: usize,
}

impl LineBudget {
    fn try_take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&after| after <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Counts are kept per this.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct CountKey {
    /// Unix minute.
    minute: i64,
    key: KeyName,
    environment: Environment,
    method: &'static str,
    outcome: Outcome,
}

#[derive(Debug)]
struct Batch {
    id: Uuid,
    counts: HashMap<CountKey, i64>,
    logs: Vec<CallRecord>,
    /// Bytes its lines hold of the line budget.
    log_bytes: usize,
    /// Whether a write was tried: from then on its id and contents are fixed, so a retry after
    /// an unknown outcome is recognised.
    tried: bool,
}

impl Batch {
    fn new() -> Self {
        Self { id: Uuid::now_v7(), counts: HashMap::new(), logs: Vec::new(), log_bytes: 0, tried: false }
    }

    fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Adds an untried batch's counts and lines to this one.
    fn merge(&mut self, other: Batch) {
        for (count, calls) in other.counts {
            *self.counts.entry(count).or_default() += calls;
        }
        self.logs.extend(other.logs);
        self.log_bytes += other.log_bytes;
    }

    /// Valid calls per key, environment and UTC day.
    fn key_days(&self) -> HashMap<(Uuid, i16, NaiveDate), i64> {
        let mut days = HashMap::new();
        for (count, calls) in self.counts.iter().filter(|(c, _)| c.outcome == Outcome::Valid) {
            *days
                .entry((count.key.key, environment_number(count.environment), minute_date(count.minute)))
                .or_default() += calls;
        }
        days
    }

    /// Valid calls per project, environment and UTC month (its first day).
    fn project_months(&self) -> HashMap<(Uuid, i16, NaiveDate), i64> {
        let mut months = HashMap::new();
        for (count, calls) in self.counts.iter().filter(|(c, _)| c.outcome == Outcome::Valid) {
            let month = month_start(minute_date(count.minute));
            *months.entry((count.key.project, environment_number(count.environment), month)).or_default() += calls;
        }
        months
    }
}

/// The first day of `date`'s month: how monthly quotas are keyed.
fn month_start(date: NaiveDate) -> NaiveDate {
    date.with_day(1).unwrap_or(date)
}

fn minute_date(minute: i64) -> NaiveDate {
    DateTime::from_timestamp(minute * 60, 0).map_or(NaiveDate::MIN, |t| t.date_naive())
}

/// Creates the recorder the checks use and the writer that drains it.
pub fn channel(
    pool: Pool,
    database_url: String,
    shared: Arc<Shared>,
    clock: SharedClock,
    config: UsageConfig,
) -> (Recorder, Writer) {
    let (sender, receiver) = mpsc::channel(config.channel.max(1));
    let metrics = Arc::new(UsageMetrics::default());
    let budget = Arc::new(LineBudget { used: AtomicUsize::new(0), limit: config.buffer_bytes });
    let sample_below = if config.call_log_sample >= 1.0 {
        u32::MAX
    } else {
        // In [0, 1): the share of u32 values below the threshold.
        (config.call_log_sample.max(0.0) * f64::from(u32::MAX)) as u32
    };
    let recorder = Recorder { sender, metrics: metrics.clone(), budget: budget.clone(), sample_below };
    let writer = Writer {
        pool,
        database_url,
        shared,
        clock,
        config,
        metrics,
        budget,
        receiver,
        current: Batch::new(),
        sealed: VecDeque::new(),
        buffered: 0,
        count_entries: 0,
        migrated: false,
        restored: false,
        known_days: HashMap::new(),
        known_months: HashMap::new(),
        failing_since: None,
        last_pruned: None,
        partitions: HashSet::new(),
        upkeep: None,
    };
    (recorder, writer)
}

/// Drains the recorder's channel into batches and writes them. See the module docs.
pub struct Writer {
    pool: Pool,
    database_url: String,
    shared: Arc<Shared>,
    clock: SharedClock,
    config: UsageConfig,
    metrics: Arc<UsageMetrics>,
    budget: Arc<LineBudget>,
    receiver: mpsc::Receiver<CallRecord>,
    current: Batch,
    sealed: VecDeque<Batch>,
    /// Call-log lines in `current` and `sealed`.
    buffered: usize,
    /// Count entries in `current` and `sealed` (an upper bound after merges).
    count_entries: usize,
    migrated: bool,
    restored: bool,
    /// Stored totals as last read, per key, environment and day: what the counters already hold
    /// of the database.
    known_days: HashMap<(Uuid, i16, NaiveDate), i64>,
    known_months: HashMap<(Uuid, i16, NaiveDate), i64>,
    failing_since: Option<std::time::Instant>,
    last_pruned: Option<std::time::Instant>,
    /// Days (yesterday on) whose call-log partition is known to be there.
    partitions: HashSet<NaiveDate>,
    /// The running round of upkeep, if any.
    upkeep: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("buffered", &self.buffered).finish_non_exhaustive()
    }
}

impl Writer {
    pub fn metrics(&self) -> Arc<UsageMetrics> {
        self.metrics.clone()
    }

    /// Runs until `stopping` turns true, then writes what it can within a few seconds.
    pub async fn run(mut self, mut stopping: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.config.flush_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The channel is drained on a tick of its own rather than on every record: a check then
        // never wakes the writer (a wake-up is a cross-thread switch per call under load), and the
        // channel holds far more than arrives between two drains.
        let mut drain = tokio::time::interval(DRAIN_INTERVAL.min(self.config.flush_interval));
        drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut records = Vec::with_capacity(RECEIVE_BULK);
        let shared = self.shared.clone();
        loop {
            tokio::select! {
                // Readiness waits for the stored quota counts: restore them as soon as the
                // first snapshot is in, not at the next flush.
                () = shared.loaded_notify.notified(), if !self.restored => {
                    self.drain(&mut records);
                    self.flush().await;
                }
                _ = drain.tick() => {
                    if !self.drain(&mut records) {
                        break;
                    }
                }
                _ = ticker.tick() => {
                    self.drain(&mut records);
                    self.flush().await;
                }
                _ = stopping.changed() => break,
            }
        }
        while let Ok(record) = self.receiver.try_recv() {
            self.absorb(record);
        }
        if tokio::time::timeout(Duration::from_secs(5), self.flush()).await.is_err() || !self.sealed.is_empty() {
            tracing::warn!(pending_call_logs = self.buffered, "usage not written before shutdown");
        }
    }

    /// Takes every record waiting in the channel; false once every recorder is gone.
    fn drain(&mut self, records: &mut Vec<CallRecord>) -> bool {
        loop {
            match self.receiver.try_recv() {
                Ok(record) => records.push(record),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.absorb_all(records);
                    return false;
                }
            }
            if records.len() == RECEIVE_BULK {
                self.absorb_all(records);
            }
        }
        self.absorb_all(records);
        true
    }

    fn absorb_all(&mut self, records: &mut Vec<CallRecord>) {
        for record in records.drain(..) {
            self.absorb(record);
        }
    }

    fn absorb(&mut self, record: CallRecord) {
        let count = CountKey {
            minute: record.at_nanos.div_euclid(60_000_000_000),
            key: record.key,
            environment: record.environment,
            method: record.method,
            outcome: record.outcome,
        };
        match self.current.counts.get_mut(&count) {
            Some(calls) => *calls += 1,
            None if self.count_entries.saturating_mul(COUNT_ENTRY_BYTES) >= self.config.counts_bytes => {
                self.metrics.dropped_counts.inc();
            }
            None => {
                self.current.counts.insert(count, 1);
                self.count_entries += 1;
            }
        }
        if !record.logged {
            return;
        }
        if self.buffered >= self.config.buffer {
            self.budget.give_back(record.log_bytes());
            self.metrics.dropped_call_logs.inc();
        } else {
            self.current.log_bytes += record.log_bytes();
            self.current.logs.push(record);
            self.buffered += 1;
        }
        if self.current.logs.len() >= 10_000 {
            self.seal();
        }
    }

    /// Moves the current batch to the sealed ones, merged into the last if that one has not
    /// been tried yet (the database is away): batches then grow by new count entries only.
    fn seal(&mut self) {
        if self.current.is_empty() {
            return;
        }
        let current = std::mem::replace(&mut self.current, Batch::new());
        match self.sealed.back_mut() {
            Some(last) if !last.tried => last.merge(current),
            _ => self.sealed.push_back(current),
        }
        self.count_entries = self.sealed.iter().map(|batch| batch.counts.len()).sum();
    }

    /// Seals the current batch and writes every sealed batch in order, stopping at a failure.
    async fn flush(&mut self) {
        self.seal();
        let result = self.write_pending().await;
        self.metrics.buffered_call_logs.set(self.buffered as i64);
        self.metrics.buffered_bytes.set(self.budget.used() as i64);
        match result {
            Ok(()) => {
                if let Some(since) = self.failing_since.take() {
                    tracing::info!(after_secs = since.elapsed().as_secs(), "usage writes resumed");
                }
            }
            Err(e) => {
                self.metrics.failed_writes.inc();
                if self.failing_since.is_none() {
                    self.failing_since = Some(std::time::Instant::now());
                    tracing::warn!(error = %e, pending_call_logs = self.buffered, "usage not written; keeping it in memory");
                }
            }
        }
    }

    async fn write_pending(&mut self) -> Result<(), DbError> {
        if !self.migrated {
            crate::migrate(&self.database_url).await?;
            self.migrated = true;
        }
        if !self.restored && self.shared.loaded.load(Ordering::Acquire) {
            self.restore().await?;
            self.restored = true;
            self.shared.quotas_restored.store(true, Ordering::Release);
            self.shared.quotas_restored_notify.notify_waiters();
        }
        self.prune();
        while let Some(batch) = self.sealed.front_mut() {
            batch.tried = true;
            let mut new_days: Vec<NaiveDate> = batch
                .logs
                .iter()
                .map(|log| DateTime::from_timestamp_nanos(log.at_nanos).date_naive())
                .filter(|day| !self.partitions.contains(day))
                .collect();
            new_days.sort_unstable();
            new_days.dedup();
            let totals = store::write_batch(&self.pool, batch, &new_days, self.clock.now()).await?;
            // Only days upkeep never drops are remembered (retention is at least a day); an
            // older day is made again if it is gone, in the batch's transaction.
            let yesterday = self.clock.now().date_naive() - chrono::TimeDelta::days(1);
            self.partitions.extend(new_days.into_iter().filter(|day| *day >= yesterday));
            if let Some(batch) = self.sealed.pop_front() {
                self.buffered -= batch.logs.len();
                self.budget.give_back(batch.log_bytes);
                self.count_entries = self.count_entries.saturating_sub(batch.counts.len());
                self.metrics.written_call_logs.inc_by(batch.logs.len() as u64);
                if let Some((days, months)) = totals {
                    self.reconcile(&batch, days, months);
                }
            }
        }
        Ok(())
    }

    /// Adds what is stored for today and this month to the counters (a restart, or calls this
    /// replica has not seen).
    async fn restore(&mut self) -> Result<(), DbError> {
        let today = self.clock.now().date_naive();
        let month = month_start(today);
        let client = self.pool.get().await?;
        let days = store::key_days(&client, today).await?;
        let months = store::project_months(&client, month).await?;
        drop(client);
        let index = self.shared.index.read().unwrap_or_else(|p| p.into_inner());
        for (key, environment, used) in days {
            if let (Some(record), Some(env)) = (index.key(key), environment_from_number(environment)) {
                record.daily[slot(env)].add(Period::of_day(today), used);
            }
            self.known_days.insert((key, environment, today), used);
        }
        for (project, environment, used) in months {
            if let (Some(record), Some(env)) = (index.project(project), environment_from_number(environment)) {
                record.monthly[slot(env)].add(Period::of_month(month), used);
            }
            self.known_months.insert((project, environment, month), used);
        }
        tracing::info!(keys = self.known_days.len(), projects = self.known_months.len(), "quota counts restored");
        Ok(())
    }

    /// Moves the counters to the stored totals a write returned: they hold what this replica
    /// charged (written or not) plus what it knew of the database, and the totals add what other
    /// replicas wrote since.
    fn reconcile(
        &mut self,
        batch: &Batch,
        days: Vec<(Uuid, i16, NaiveDate, i64)>,
        months: Vec<(Uuid, i16, NaiveDate, i64)>,
    ) {
        let written_days = batch.key_days();
        let written_months = batch.project_months();
        let index = self.shared.index.read().unwrap_or_else(|p| p.into_inner());
        for (key, environment, day, total) in days {
            let written = written_days.get(&(key, environment, day)).copied().unwrap_or(0);
            let known = self.known_days.insert((key, environment, day), total).unwrap_or(0);
            if let (Some(record), Some(env)) = (index.key(key), environment_from_number(environment)) {
                record.daily[slot(env)].add(Period::of_day(day), total - known - written);
            }
        }
        for (project, environment, month, total) in months {
            let written = written_months.get(&(project, environment, month)).copied().unwrap_or(0);
            let known = self.known_months.insert((project, environment, month), total).unwrap_or(0);
            if let (Some(record), Some(env)) = (index.project(project), environment_from_number(environment)) {
                record.monthly[slot(env)].add(Period::of_month(month), total - known - written);
            }
        }
        drop(index);
        let today = self.clock.now().date_naive();
        let this_month = month_start(today);
        self.known_days.retain(|(_, _, day), _| *day >= today);
        self.known_months.retain(|(_, _, month), _| *month >= this_month);
    }

    /// At most once an hour, in a task of its own (deleting a day of old counts must not hold
    /// up the writes): makes the call-log partitions of the next days, drops those past
    /// retention, deletes counts past their granularity's retention and forgets old batch ids.
    /// Skipped while the previous round is still running.
    fn prune(&mut self) {
        if self.last_pruned.is_some_and(|at| at.elapsed() < Duration::from_secs(3600))
            || self.upkeep.as_ref().is_some_and(|task| !task.is_finished())
        {
            return;
        }
        self.last_pruned = Some(std::time::Instant::now());
        let (pool, clock, config) = (self.pool.clone(), self.clock.clone(), self.config.clone());
        self.upkeep = Some(tokio::spawn(async move {
            if let Err(e) = upkeep(&pool, clock.now(), &config).await {
                tracing::warn!(error = %e, "usage upkeep (partitions, retention) failed; trying again in an hour");
            }
        }));
    }
}

async fn upkeep(pool: &Pool, now: DateTime<chrono::Utc>, config: &UsageConfig) -> Result<(), DbError> {
    let today = now.date_naive();
    let mut client = pool.get().await?;
    let ahead: Vec<NaiveDate> = (-1..=PARTITIONS_AHEAD).map(|n| today + chrono::TimeDelta::days(n)).collect();
    store::ensure_partitions(&client, &ahead).await?;
    // A day's partition goes once its last call is older than the retention.
    let keep_from = today - chrono::TimeDelta::days(i64::from(config.call_log_retention_days));
    let mut dropped = 0;
    for day in store::partitions(&client).await?.into_iter().filter(|day| *day < keep_from) {
        store::drop_partition(&mut client, day).await?;
        dropped += 1;
    }
    if dropped > 0 {
        tracing::info!(partitions = dropped, "dropped call-log partitions past retention");
    }
    for (granularity, retention) in [
        (Granularity::Minute, config.minute_retention_days),
        (Granularity::Hour, config.hour_retention_days),
        (Granularity::Day, config.day_retention_days),
    ] {
        if retention == 0 {
            continue;
        }
        let before = now - chrono::TimeDelta::days(i64::from(retention));
        let deleted = store::delete_counts(&client, granularity, before).await?;
        if deleted > 0 {
            tracing::info!(deleted, table = granularity.table().0, "deleted counts past retention");
        }
    }
    store::forget_batches(&client, now - chrono::TimeDelta::days(1)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_budget_refuses_what_does_not_fit() {
        let budget = LineBudget { used: AtomicUsize::new(0), limit: 100 };
        assert!(budget.try_take(60));
        assert!(!budget.try_take(41));
        assert!(budget.try_take(40));
        budget.give_back(60);
        assert_eq!(budget.used(), 40);
        assert!(budget.try_take(60));
    }
}
