//! Limits across replicas: three authorizers on one database share a key's rate limit through a
//! Redis server of the test's own, and keep it bounded when that server stops.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use keyshare_proto::authorizer::v1 as pb;
use keyshare_proto::authorizer::v1::authorizer_service_client::AuthorizerServiceClient;
use keyshare_runtime::clock::SystemClock;
use keyshare_runtime::testkit::{RedisServer, eventually};
use tonic::transport::Channel;

const LIMIT: i64 = 10;
/// Calls per second driven at the fleet: 5× the limit.
const LOAD: u64 = 50;

struct Replica {
    client: AuthorizerServiceClient<Channel>,
    metrics: std::net::SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Replica {
    async fn metric(&self, name: &str) -> f64 {
        let text = scrape(self.metrics).await;
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// An authorizer on the world's database and keyring, on the system clock (limits are about
/// real seconds here), sharing limits through `redis`.
async fn replica(w: &World, redis: &str, timeout: Duration) -> Replica {
    let mut config = w.authorizer_config.clone();
    config.shared_limits.redis_url = Some(redis.to_owned());
    config.shared_limits.timeout = timeout;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = keyshare_authorizer::start(config, Arc::new(SystemClock), async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    serving(started.addr).await;
    Replica {
        client: AuthorizerServiceClient::new(channel(started.addr).await),
        metrics: started.metrics_addr,
        _stop: stop,
    }
}

/// Three replicas that each know there are three.
async fn fleet(w: &World, redis: &str, timeout: Duration) -> Vec<Replica> {
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(replica(w, redis, timeout).await);
    }
    for replica in &replicas {
        eventually("every replica to count three replicas", Duration::from_secs(20), || async {
            (replica.metric("keyshare_limits_replicas").await == 3.0).then_some(())
        })
        .await;
    }
    replicas
}

/// What a run at [`LOAD`] calls per second, round robin over the replicas, got.
#[derive(Debug, Default)]
struct Run {
    admitted: u64,
    refused: u64,
    failed: u64,
    /// From the first call to the last answer.
    elapsed: Duration,
}

async fn drive(replicas: &mut [Replica], credential: &str, seconds: u64) -> Run {
    let mut run = Run::default();
    let mut pace = tokio::time::interval(Duration::from_nanos(1_000_000_000 / LOAD));
    let start = Instant::now();
    for call in 0..seconds * LOAD {
        pace.tick().await;
        let n = replicas.len();
        let replica = &mut replicas[call as usize % n];
        let request = pb::CheckKeyRequest {
            key: credential.into(),
            method: "GET".into(),
            path: "/v1/things".into(),
            ..Default::default()
        };
        match replica.client.check_key(request).await {
            Ok(answer) if answer.get_ref().outcome == pb::Outcome::Valid as i32 => run.admitted += 1,
            Ok(answer) => {
                assert_eq!(answer.get_ref().outcome, pb::Outcome::RateLimited as i32, "{:?}", answer.get_ref());
                run.refused += 1;
            }
            Err(_) => run.failed += 1,
        }
    }
    run.elapsed = start.elapsed();
    eprintln!("{run:?}, bound {:.0}", bound(run.elapsed));
    run
}

/// The promise: at most limit × duration × 1.10 + one burst (the limit) across the fleet.
fn bound(elapsed: Duration) -> f64 {
    LIMIT as f64 * elapsed.as_secs_f64() * 1.10 + LIMIT as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_hold_a_key_limit_of_10_per_second_between_them() {
    let redis = RedisServer::start();
    let (mut w, _project, key, _sandbox, production) = world().await;
    w.set(&format!("{key}/environments/production"), "rate_limit_per_second", |e| e.rate_limit_per_second = LIMIT)
        .await;
    // A generous store timeout: on a loaded machine a slow answer must not look like an outage.
    let mut replicas = fleet(&w, &redis.url(), Duration::from_secs(2)).await;

    let run = drive(&mut replicas, &production, 10).await;
    assert_eq!(run.failed, 0, "{run:?}");
    // Each replica alone would admit its own 10/s (about 3 × 10 × 10 = 300 here).
    assert!(
        (run.admitted as f64) <= bound(run.elapsed),
        "admitted {} > {:.0}: {run:?}",
        run.admitted,
        bound(run.elapsed)
    );
    // The limit is used, not merely refused: at least 40 % of it.
    assert!(
        run.admitted as f64 >= 0.4 * LIMIT as f64 * run.elapsed.as_secs_f64(),
        "admitted only {}: {run:?}",
        run.admitted
    );
    for replica in &replicas {
        assert_eq!(replica.metric("keyshare_limits_shared").await, 1.0);
        assert_eq!(replica.metric("keyshare_limits_fallback_grants_total").await, 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_stopped_checks_go_on_each_replica_keeps_its_share_and_rejoins() {
    let mut redis = RedisServer::start();
    let (mut w, _project, key, _sandbox, production) = world().await;
    w.set(&format!("{key}/environments/production"), "rate_limit_per_second", |e| e.rate_limit_per_second = LIMIT)
        .await;
    let mut replicas = fleet(&w, &redis.url(), Duration::from_millis(250)).await;

    let shared = drive(&mut replicas, &production, 3).await;
    assert_eq!(shared.failed, 0, "{shared:?}");
    assert!((shared.admitted as f64) <= bound(shared.elapsed), "{shared:?}");

    redis.stop_server();
    let away = drive(&mut replicas, &production, 5).await;
    assert_eq!(away.failed, 0, "no check fails without Redis: {away:?}");
    assert!(away.admitted > 0, "{away:?}");
    // Each replica admits at most its share, ⌈10 / 3⌉ = 4 a second, once it knows the store
    // is away; in the second it went away, at most the lease it held (≤ the limit) and its own
    // limit of 10. Without sharing, 3 × 10 a second.
    let seconds = away.elapsed.as_secs_f64().ceil() + 1.0;
    let ceiling = 3.0 * 4.0 * seconds + 2.0 * LIMIT as f64;
    assert!((away.admitted as f64) <= ceiling, "admitted {} > {ceiling}: {away:?}", away.admitted);
    for replica in &replicas {
        assert_eq!(replica.metric("keyshare_limits_shared").await, 0.0);
        assert!(replica.metric("keyshare_limits_fallback_grants_total").await > 0.0);
        assert!(replica.metric("keyshare_limits_sync_failures_total").await > 0.0);
    }

    redis.start_server();
    for replica in &replicas {
        eventually("every replica to share limits again", Duration::from_secs(30), || async {
            (replica.metric("keyshare_limits_shared").await == 1.0
                && replica.metric("keyshare_limits_replicas").await == 3.0)
                .then_some(())
        })
        .await;
    }
    let back = drive(&mut replicas, &production, 4).await;
    assert_eq!(back.failed, 0, "{back:?}");
    assert!((back.admitted as f64) <= bound(back.elapsed) + 3.0, "{back:?}");
}

/// Checks `calls` times as fast as answers come, round robin: (admitted, refused for a quota).
async fn drive_flat_out(replicas: &mut [Replica], credential: &str, calls: usize) -> (u64, u64) {
    let (mut admitted, mut refused) = (0, 0);
    for call in 0..calls {
        let n = replicas.len();
        let request = pb::CheckKeyRequest { key: credential.into(), method: "GET".into(), ..Default::default() };
        let answer = replicas[call % n].client.check_key(request).await.expect("a check never fails").into_inner();
        if answer.outcome == pb::Outcome::Valid as i32 {
            admitted += 1;
        } else {
            assert_eq!(answer.outcome, pb::Outcome::QuotaExceeded as i32, "{answer:?}");
            refused += 1;
        }
    }
    (admitted, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_hold_a_daily_and_a_monthly_quota_between_them() {
    const DAILY: i64 = 100;
    const MONTHLY: i64 = 160;
    let redis = RedisServer::start();
    let (mut w, project, key, _sandbox, production) = world().await;
    w.set(&format!("{key}/environments/production"), "daily_quota", |e| e.daily_quota = DAILY).await;
    let token = w.token.clone();
    let update = keyshare_proto::keyring::v1::UpdateProjectRequest {
        project: Some(keyshare_proto::keyring::v1::Project {
            name: project.clone(),
            production: Some(keyshare_proto::keyring::v1::ProjectEnvironmentLimits {
                rate_limit_per_second: 0,
                monthly_quota: MONTHLY,
            }),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["production.monthly_quota".into()] }),
    };
    w.keyring.update_project(authed(&token, update)).await.unwrap();
    let other = create_key(&mut w.keyring, &token, &project, "K2").await.production_credential;
    w.synced().await;
    let mut replicas = fleet(&w, &redis.url(), Duration::from_secs(2)).await;

    // The key's daily quota: overrun by at most 5 calls (1 % of 100 is less).
    let (day, refused) = drive_flat_out(&mut replicas, &production, 3 * DAILY as usize).await;
    eprintln!("daily quota {DAILY}: admitted {day}, refused {refused}");
    assert!(day <= DAILY as u64 + 5, "admitted {day} of a daily quota of {DAILY}");
    assert!(day as f64 >= 0.9 * DAILY as f64, "admitted only {day} of {DAILY}");

    // The project's monthly quota, of which the first key spent `day`: another key of the
    // project gets the rest, and no more than 5 beyond it.
    let (month, refused) = drive_flat_out(&mut replicas, &other, 3 * MONTHLY as usize).await;
    eprintln!("monthly quota {MONTHLY}: admitted {day} + {month}, refused {refused}");
    assert!(day + month <= MONTHLY as u64 + 5, "admitted {} of a monthly quota of {MONTHLY}", day + month);
    assert!((day + month) as f64 >= 0.9 * MONTHLY as f64, "admitted only {} of {MONTHLY}", day + month);
}
