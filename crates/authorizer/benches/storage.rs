//! The usage storage at scale, on a real PostgreSQL database on this machine:
//! - loads 50,000,000 call-log rows over 30 days of 1,000 keys in 10 projects, and 30 days of
//!   per-minute counts for every key (with their hour and day rollups), in bulk with COPY;
//! - times the reads behind the usage API (key usage per day, hour and minute; a key's call log,
//!   first page and 100th page; a project's usage per day), each run on 200 random keys, and
//!   prints p50 and p95 against the 50 ms target;
//! - drives the real usage writer with records at a fixed offered rate and prints what it wrote
//!   per second (target ≥ 100,000);
//! - prints the size on disk per million call logs.
//!
//! The reads are the store's own queries (`stats::store`), which is where the data size shows;
//! the API adds one access check with keyring per call, which does not grow with the data.
//!
//! Run: `scripts/bench storage`, or `cargo bench -p keyshare-authorizer --bench storage`.
//! `STORAGE_BENCH_CALL_LOGS` (default 50000000), `STORAGE_BENCH_KEYS` (1000) and
//! `STORAGE_BENCH_DAYS` (30) set the sizes; `STORAGE_BENCH_WRITE_RATE` (150000) the writer's
//! offered records per second.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use futures::pin_mut;
use keyshare_authorizer::model::{Granularity, KeyName, Outcome};
use keyshare_authorizer::state::Shared;
use keyshare_authorizer::stats::store::{self as stats_store, Scope};
use keyshare_authorizer::stats::{Buckets, Filter, LogFilter};
use keyshare_authorizer::usage::{self, CallRecord, UsageConfig};
use keyshare_runtime::clock::SystemClock;
use keyshare_runtime::credential::Environment;
use keyshare_runtime::testkit::TestDatabase;
use rand::{Rng, SeedableRng};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use uuid::Uuid;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.replace('_', "").parse().ok()).unwrap_or(default)
}

const PROJECTS: usize = 10;
const PAGE: i64 = 50;
const SAMPLES: usize = 200;
const TARGET_MS: f64 = 50.0;

struct Data {
    keys: Vec<KeyName>,
    projects: Vec<Uuid>,
    /// The newest call's time; calls spread evenly back from it over `days`.
    now: DateTime<Utc>,
    days: i64,
}

fn main() {
    let call_logs = setting("STORAGE_BENCH_CALL_LOGS", 50_000_000);
    let key_count = setting("STORAGE_BENCH_KEYS", 1000) as usize;
    let days = setting("STORAGE_BENCH_DAYS", 30) as i64;
    let write_rate = setting("STORAGE_BENCH_WRITE_RATE", 150_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let database = TestDatabase::create().await;
        keyshare_authorizer::migrate(&database.url).await.unwrap();
        let pool = keyshare_runtime::db::pool(&database.url, 4).unwrap();
        let projects: Vec<Uuid> = (0..PROJECTS).map(|_| Uuid::now_v7()).collect();
        let keys: Vec<KeyName> =
            (0..key_count).map(|n| KeyName { project: projects[n % PROJECTS], key: Uuid::now_v7() }).collect();
        let now = Utc::now();
        let data = Data { keys, projects, now, days };

        println!("storage benchmark: {call_logs} call logs, {key_count} keys in {PROJECTS} projects, {days} days");
        let started = Instant::now();
        load_call_logs(&pool, &data, call_logs).await;
        let logs_secs = started.elapsed().as_secs_f64();
        println!(
            "  loaded call logs with COPY in {logs_secs:.0} s ({:.0} rows/s)",
            call_logs as f64 / logs_secs
        );
        let started = Instant::now();
        let minutes = load_counts(&pool, &data).await;
        println!("  loaded {minutes} minute counts (and their hours and days) in {:.0} s", started.elapsed().as_secs_f64());
        {
            let client = pool.get().await.unwrap();
            client.batch_execute("VACUUM ANALYZE authorizer.call_logs, authorizer.usage_minutes, authorizer.usage_hours, authorizer.usage_days").await.unwrap();
            let bytes: i64 = client
                .query_one(
                    "SELECT sum(pg_total_relation_size(inhrelid))::int8 FROM pg_inherits \
                     WHERE inhparent = 'authorizer.call_logs'::regclass",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            println!(
                "  call logs on disk: {:.2} GiB, {:.0} MiB per million (table and indexes)",
                bytes as f64 / f64::from(1 << 30),
                bytes as f64 / (call_logs.max(1) as f64 / 1e6) / f64::from(1 << 20)
            );
        }

        println!("\n| read | p50 | p95 | target p95 |\n|---|---|---|---|");
        reads(&pool, &data).await;

        println!("\nusage writer: offered {write_rate} records/s for 15 s");
        writer_throughput(&database.url, pool.clone(), &data, write_rate).await;
    });
}

/// COPYs `total` call logs, one day at a time, two days at once.
async fn load_call_logs(pool: &deadpool_postgres::Pool, data: &Data, total: u64) {
    let per_day = total / data.days as u64;
    let client = pool.get().await.unwrap();
    let days: Vec<chrono::NaiveDate> = (0..=data.days).map(|n| (data.now - TimeDelta::days(n)).date_naive()).collect();
    client.execute("SELECT authorizer.ensure_call_log_partition(d) FROM unnest($1::date[]) d", &[&days]).await.unwrap();
    drop(client);
    let mut tasks = Vec::new();
    let day_list: Vec<i64> = (0..data.days).collect();
    for lane in day_list.chunks((data.days as usize).div_ceil(2)) {
        let lane = lane.to_vec();
        let pool = pool.clone();
        let keys = data.keys.clone();
        let now = data.now;
        tasks.push(tokio::spawn(async move {
            for day in lane {
                let client = pool.get().await.unwrap();
                let sink = client
                    .copy_in(
                        "COPY authorizer.call_logs (time, project_id, key_id, environment, method, path, client_ip, \
                         outcome, http_status) FROM STDIN BINARY",
                    )
                    .await
                    .unwrap();
                let types = [
                    Type::TIMESTAMPTZ,
                    Type::UUID,
                    Type::UUID,
                    Type::INT2,
                    Type::TEXT,
                    Type::TEXT,
                    Type::INET,
                    Type::INT2,
                    Type::INT2,
                ];
                let writer = BinaryCopyInWriter::new(sink, &types);
                pin_mut!(writer);
                let end = now - TimeDelta::days(day);
                let step = 86_400_000_000 / per_day.max(1) as i64;
                let ip: std::net::IpAddr = "198.51.100.7".parse().unwrap();
                let mut rng = rand::rngs::StdRng::seed_from_u64(day as u64);
                for n in 0..per_day as i64 {
                    let key = keys[rng.gen_range(0..keys.len())];
                    let at = end - TimeDelta::microseconds(n * step);
                    let (outcome, status) = if n % 20 == 0 { (5i16, 429i16) } else { (1, 200) };
                    writer
                        .as_mut()
                        .write(&[&at, &key.project, &key.key, &2i16, &"GET", &"/v1/things", &ip, &outcome, &status])
                        .await
                        .unwrap();
                }
                writer.finish().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Per-minute counts for every key over the days (one row per key-minute), and the same counts
/// rolled up per hour and per day, as the writer keeps them. Returns the minute rows.
async fn load_counts(pool: &deadpool_postgres::Pool, data: &Data) -> i64 {
    let client = pool.get().await.unwrap();
    let end = Granularity::Minute.floor(data.now);
    let start = end - TimeDelta::days(data.days);
    let keys: Vec<Uuid> = data.keys.iter().map(|k| k.key).collect();
    let projects: Vec<Uuid> = data.keys.iter().map(|k| k.project).collect();
    let sink = client
        .copy_in(
            "COPY authorizer.usage_minutes (minute, project_id, key_id, environment, method, outcome, calls) \
             FROM STDIN BINARY",
        )
        .await
        .unwrap();
    let types = [Type::TIMESTAMPTZ, Type::UUID, Type::UUID, Type::INT2, Type::TEXT, Type::INT2, Type::INT8];
    let writer = BinaryCopyInWriter::new(sink, &types);
    pin_mut!(writer);
    let mut rows = 0i64;
    for (key, project) in keys.iter().zip(&projects) {
        let mut minute = start;
        while minute < end {
            writer.as_mut().write(&[&minute, project, key, &2i16, &"GET", &1i16, &7i64]).await.unwrap();
            minute += TimeDelta::minutes(1);
            rows += 1;
        }
    }
    writer.finish().await.unwrap();
    for (table, column, unit) in [("usage_hours", "hour", "hour"), ("usage_days", "day", "day")] {
        client
            .batch_execute(&format!(
                "INSERT INTO authorizer.{table} ({column}, project_id, key_id, environment, method, outcome, calls) \
                 SELECT date_trunc('{unit}', minute AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', project_id, key_id, \
                 environment, method, outcome, sum(calls) FROM authorizer.usage_minutes GROUP BY 1, 2, 3, 4, 5, 6"
            ))
            .await
            .unwrap();
    }
    rows
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1]
}

async fn reads(pool: &deadpool_postgres::Pool, data: &Data) {
    let client = pool.get().await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let end = data.now;
    let series_case = |granularity: Granularity, span: TimeDelta| {
        Buckets::parse(Some(granularity), Some(end - span), Some(end), end).unwrap()
    };
    let cases: [(&str, Granularity, TimeDelta); 3] = [
        ("key usage, 30 days by day", Granularity::Day, TimeDelta::days(data.days.min(30))),
        ("key usage, 7 days by hour", Granularity::Hour, TimeDelta::days(7)),
        ("key usage, 1 day by minute", Granularity::Minute, TimeDelta::days(1) - TimeDelta::minutes(1)),
    ];
    for (what, granularity, span) in cases {
        let buckets = series_case(granularity, span);
        let mut times = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let key = data.keys[rng.gen_range(0..data.keys.len())];
            let started = Instant::now();
            let points = stats_store::series(&client, Scope::Key(key), &buckets, &Filter::default(), false, 30_001)
                .await
                .unwrap();
            times.push(started.elapsed().as_secs_f64() * 1e3);
            assert!(!points.is_empty());
        }
        row(what, &mut times);
    }
    let buckets = series_case(Granularity::Day, TimeDelta::days(data.days.min(30)));
    for (what, per_key) in [("project usage, 30 days by day", false), ("project usage per key, 30 days by day", true)] {
        let mut times = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let project = data.projects[rng.gen_range(0..data.projects.len())];
            let started = Instant::now();
            stats_store::series(&client, Scope::Project(project), &buckets, &Filter::default(), per_key, 30_001)
                .await
                .unwrap();
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
        row(what, &mut times);
    }
    let mut first = Vec::with_capacity(SAMPLES);
    let mut hundredth = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let key = data.keys[rng.gen_range(0..data.keys.len())];
        let started = Instant::now();
        let page = stats_store::call_logs(&client, key, &LogFilter::default(), None, PAGE + 1).await.unwrap();
        first.push(started.elapsed().as_secs_f64() * 1e3);
        assert_eq!(page.len() as i64, PAGE + 1);
        // The cursor a client holds after 99 pages: the 4,950th newest call's time and id.
        let cursor: Option<(DateTime<Utc>, i64)> = client
            .query_opt(
                "SELECT time, id FROM authorizer.call_logs WHERE key_id = $1 AND project_id = $2 \
                 ORDER BY time DESC, id DESC OFFSET $3 LIMIT 1",
                &[&key.key, &key.project, &(99 * PAGE - 1)],
            )
            .await
            .unwrap()
            .map(|row| (row.get(0), row.get(1)));
        let started = Instant::now();
        stats_store::call_logs(&client, key, &LogFilter::default(), cursor, PAGE + 1).await.unwrap();
        hundredth.push(started.elapsed().as_secs_f64() * 1e3);
    }
    row("call log, first page (50)", &mut first);
    row("call log, 100th page (50)", &mut hundredth);
}

fn row(what: &str, times: &mut [f64]) {
    let (p50, p95) = (percentile(times, 0.50), percentile(times, 0.95));
    let verdict = if p95 <= TARGET_MS { "met" } else { "NOT met" };
    println!("| {what} | {p50:.2} ms | {p95:.2} ms | ≤ {TARGET_MS:.0} ms ({verdict}) |");
}

/// Offers records to the real usage writer at `rate` per second from a thread of its own, for
/// 15 s, and prints what reached PostgreSQL per second.
async fn writer_throughput(url: &str, pool: deadpool_postgres::Pool, data: &Data, rate: u64) {
    let shared = Arc::new(Shared::default());
    // Retention off: the writer alone is measured, not the first upkeep deleting the loaded
    // history (which runs in a task of its own in any case).
    let config = UsageConfig {
        flush_interval: Duration::from_millis(250),
        minute_retention_days: 0,
        hour_retention_days: 0,
        ..UsageConfig::default()
    };
    let (recorder, writer) = usage::channel(pool, url.to_owned(), shared, Arc::new(SystemClock), config);
    let metrics = writer.metrics();
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(writer.run(stopping));
    let keys = data.keys.clone();
    let offered = std::thread::spawn(move || {
        let ip: std::net::IpAddr = "198.51.100.7".parse().unwrap();
        let started = Instant::now();
        let mut sent = 0u64;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        while started.elapsed() < Duration::from_secs(15) {
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            while sent < due {
                recorder.record(CallRecord {
                    at_nanos: Utc::now().timestamp_nanos_opt().unwrap_or_default(),
                    key: keys[rng.gen_range(0..keys.len())],
                    environment: Environment::Production,
                    method: "GET",
                    path: String::from("/v1/things"),
                    client_ip: Some(ip),
                    outcome: Outcome::Valid,
                    logged: true,
                });
                sent += 1;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        sent
    });
    let started = Instant::now();
    let offered = tokio::task::spawn_blocking(move || offered.join().unwrap()).await.unwrap();
    let written_in_time = metrics.written_call_logs.get();
    let secs = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    writer.await.unwrap();
    let dropped = metrics.dropped_records.get() + metrics.dropped_call_logs.get();
    println!(
        "  offered {offered} records in {secs:.1} s; written while offered: {written_in_time} ({:.0}/s, target ≥ \
         100000); dropped {dropped}",
        written_in_time as f64 / secs
    );
}
