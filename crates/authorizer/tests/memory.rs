//! Memory that callers cannot blow up: the real authorizer binary, as a process of its own,
//! checked at full speed through CheckKey and a real Envoy with 60 kB paths while PostgreSQL is
//! stopped. Its resident memory (from /proc) stays under base + 64 MiB, no check fails, the
//! dropped call-log lines are counted, and every counted check is written once PostgreSQL is
//! back.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::envoy::*;
use common::process::AuthorizerProcess;
use common::*;
use keyshare_proto::authorizer::v1 as pb;
use keyshare_runtime::testkit::{PrivateCluster, eventually};

/// How far the authorizer's resident memory may grow above what it used before the load.
const CEILING: u64 = 64 << 20;
/// How long PostgreSQL stays stopped under load, at least: longer if the line budget has not
/// been reached yet (a slow machine), up to [`OUTAGE_LIMIT`].
const OUTAGE: Duration = Duration::from_secs(30);
const OUTAGE_LIMIT: Duration = Duration::from_secs(180);
const PATH_BYTES: usize = 60_000;

/// Call-log lines dropped so far.
async fn dropped_lines(authorizer: &AuthorizerProcess) -> f64 {
    authorizer.metric("keyshare_usage_dropped_call_logs_total").await.unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_paths_while_postgres_is_down_keep_memory_bounded() {
    let (mut w, project, key, _, production) = world_on(Store::Cluster(PrivateCluster::start())).await;
    // A disabled key: the attack needs only a known credential, and the gateway answers it
    // itself (403) without an upstream.
    w.set(&format!("{key}/environments/production"), "active", |e| e.active = false).await;
    // A small line budget, so that even a slow machine reaches it within the outage: what is
    // dropped beyond it must be counted, and the checks go on.
    let authorizer = AuthorizerProcess::start(&w, [Setting::UsageBufferBytes(256 << 10)]).await;
    let upstream = echo_upstream().await;
    let (_envoy, port) = start_envoy_at(&project, upstream, &[authorizer.addr.port()]).await;
    let path = format!("/{}", "a".repeat(PATH_BYTES - 1));
    let mut client = pb::authorizer_service_client::AuthorizerServiceClient::new(channel(authorizer.addr).await);
    let check =
        pb::CheckKeyRequest { key: production.clone(), method: "GET".into(), path: path.clone(), ..Default::default() };
    // Warm up both paths, then take the base.
    for _ in 0..20 {
        assert_eq!(client.check_key(check.clone()).await.unwrap().into_inner().outcome, pb::Outcome::Disabled as i32);
        let (status, _, body) = call_path(port, "GET", &path, &[("x-api-key", &production)]).await.unwrap();
        assert_eq!((status, body.contains("OUTCOME_DISABLED")), (403, true), "{status} {body}");
    }
    let base = authorizer.memory("VmRSS");

    let Store::Cluster(cluster) = &w.store else { unreachable!() };
    cluster.stop_server();
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for client_number in 0..12 {
        let (stop, answered, failed) = (stop.clone(), answered.clone(), failed.clone());
        let (mut client, check, path, production) = (client.clone(), check.clone(), path.clone(), production.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ok = if client_number % 2 == 0 {
                    let answer = client.check_key(check.clone()).await;
                    let ok = matches!(answer, Ok(ref a) if a.get_ref().outcome == pb::Outcome::Disabled as i32);
                    if !ok {
                        eprintln!("CheckKey answered {answer:?}");
                    }
                    ok
                } else {
                    let answer = call_path(port, "GET", &path, &[("x-api-key", &production)]).await;
                    let ok = matches!(answer, Some((403, _, ref body)) if body.contains("OUTCOME_DISABLED"));
                    if !ok {
                        eprintln!("Envoy answered {:?}", answer.map(|(status, _, body)| (status, body)));
                    }
                    ok
                };
                answered.fetch_add(1, Ordering::Relaxed);
                failed.fetch_add(u64::from(!ok), Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    let mut peak = base;
    loop {
        peak = peak.max(authorizer.memory("VmRSS"));
        let elapsed = started.elapsed();
        if elapsed >= OUTAGE && dropped_lines(&authorizer).await > 0.0 {
            break;
        }
        assert!(elapsed < OUTAGE_LIMIT, "the line budget was not reached within {OUTAGE_LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outage = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let high_water = authorizer.memory("VmHWM");
    let (answered, failed) = (answered.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let dropped_lines = dropped_lines(&authorizer).await;
    eprintln!(
        "{answered} checks with {PATH_BYTES}-byte paths in {outage:.1?} without PostgreSQL: RSS {} MiB before, peak {} \
         MiB (VmHWM {} MiB); {dropped_lines} call-log lines dropped",
        base >> 20,
        peak >> 20,
        high_water >> 20
    );
    assert_eq!(failed, 0, "{failed} of {answered} checks failed");
    assert!(high_water < base + CEILING, "RSS grew from {} MiB to {} MiB", base >> 20, high_water >> 20);

    // PostgreSQL returns: every check that was counted is written.
    cluster.start_server();
    eventually("usage writes to resume", Duration::from_secs(60), || {
        let authorizer = &authorizer;
        async move { (authorizer.metric("keyshare_usage_buffered_call_logs").await? == 0.0).then_some(()) }
    })
    .await;
    let dropped_records = authorizer.metric("keyshare_usage_dropped_records_total").await.unwrap();
    let dropped_counts = authorizer.metric("keyshare_usage_dropped_counts_total").await.unwrap();
    assert_eq!(dropped_counts, 0.0);
    let key_id = uuid::Uuid::parse_str(key.rsplit('/').next().unwrap()).unwrap();
    let client = w.sql().await;
    let expected = (answered + 40) as i64 - dropped_records as i64;
    eventually("every counted check to be stored", Duration::from_secs(30), || {
        let client = &client;
        async move {
            let stored: i64 = client
                .query_one(
                    "SELECT coalesce(sum(calls), 0)::int8 FROM authorizer.usage_minutes WHERE key_id = $1",
                    &[&key_id],
                )
                .await
                .ok()?
                .get(0);
            (stored == expected).then_some(())
        }
    })
    .await;
}
