//! Quotas, usage counts and call logs through the real gRPC API and a real database: exact
//! counts by outcome, quotas charged all or nothing and rebuilt after a restart, and checks that
//! go on (through CheckKey and a real Envoy) while PostgreSQL is stopped, with the usage written
//! once it is back.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::envoy::*;
use common::*;
use keyshare_proto::authorizer::v1 as pb;
use keyshare_proto::keyring::v1 as krpb;
use keyshare_runtime::clock::Clock;
use keyshare_runtime::testkit::{PrivateCluster, eventually};
use prost_types::FieldMask;

use pb::Environment::{Production as PROD, Unspecified as ANY};
use pb::Outcome as O;

const IP: &str = "198.51.100.7";

/// Waits until the usage stored for `key` adds up to `calls` checks; returns the counts by
/// (environment, method, outcome).
async fn stored_usage(w: &World, key: &str, calls: i64) -> BTreeMap<(i16, String, i16), i64> {
    let key_id = uuid::Uuid::parse_str(key.rsplit('/').next().unwrap()).unwrap();
    let client = w.sql().await;
    eventually("the usage to be written", Duration::from_secs(30), || {
        let client = &client;
        async move {
            let rows = client
                .query(
                    "SELECT environment, method, outcome, sum(calls)::int8 FROM authorizer.usage_minutes \
                     WHERE key_id = $1 GROUP BY 1, 2, 3",
                    &[&key_id],
                )
                .await
                .ok()?;
            let counts: BTreeMap<(i16, String, i16), i64> =
                rows.iter().map(|r| ((r.get(0), r.get(1), r.get(2)), r.get(3))).collect();
            (counts.values().sum::<i64>() == calls).then_some(counts)
        }
    })
    .await
}

#[tokio::test]
async fn every_check_is_counted_and_logged_exactly() {
    let (mut w, _project, key, sandbox, production) = world().await;
    let mut expected: BTreeMap<(i16, String, i16), i64> = BTreeMap::new();
    let mut run = async |w: &mut World, credential: &str, method: &str, gateway: pb::Environment, n: i64| {
        for _ in 0..n {
            let answer = w.check(credential, method, IP, "", gateway).await;
            let environment = if credential.starts_with("ks_live_") { 2 } else { 1 };
            *expected.entry((environment, method.to_ascii_uppercase(), answer.outcome as i16)).or_default() += 1;
        }
    };
    run(&mut w, &production, "GET", ANY, 7).await;
    run(&mut w, &production, "post", ANY, 2).await;
    run(&mut w, &production, "TRACE", ANY, 3).await;
    run(&mut w, &sandbox, "GET", PROD, 4).await;
    run(&mut w, &sandbox, "DELETE", ANY, 1).await;
    // Unknown and malformed credentials belong to no key: counted in metrics only.
    for _ in 0..5 {
        w.check("ks_live_nonsense", "GET", IP, "", ANY).await;
    }
    assert_eq!(
        expected,
        BTreeMap::from([
            ((1, "DELETE".into(), O::Valid as i16), 1),
            ((1, "GET".into(), O::WrongEnvironment as i16), 4),
            ((2, "GET".into(), O::Valid as i16), 7),
            ((2, "POST".into(), O::Valid as i16), 2),
            ((2, "TRACE".into(), O::MethodNotAllowed as i16), 3),
        ])
    );
    assert_eq!(stored_usage(&w, &key, 17).await, expected);

    // One call-log line per check, with what the gateway said of the call.
    let client = w.sql().await;
    let rows = client
        .query(
            "SELECT method, path, host(client_ip), outcome, http_status FROM authorizer.call_logs \
             WHERE key_id = $1::text::uuid",
            &[&key.rsplit('/').next().unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 17);
    for row in &rows {
        let (path, ip, outcome, status): (String, String, i16, i16) = (row.get(1), row.get(2), row.get(3), row.get(4));
        assert_eq!((path.as_str(), ip.as_str()), ("/v1/things", IP));
        let expected_status = if outcome == O::Valid as i16 {
            200
        } else if outcome == O::MethodNotAllowed as i16 {
            403
        } else {
            401
        };
        assert_eq!(status, expected_status);
    }

    // Every check, known key or not, in the outcome counter; and in the RPC metrics, although
    // checks get no span at the default log level.
    assert_eq!(w.metric("keyshare_checks_total").await, Some(22.0));
    let rpc = r#"keyshare_rpc_calls_total{service="authorizer",method="/keyshare.authorizer.v1.AuthorizerService/CheckKey",code="Ok"} 22"#;
    let text = scrape(w.authorizer_metrics).await;
    assert!(text.lines().any(|line| line == rpc), "{rpc} missing from\n{text}");
    assert_eq!(w.metric("keyshare_usage_written_call_logs_total").await, Some(17.0));
    assert_eq!(w.metric("keyshare_usage_dropped_records_total").await, Some(0.0));
}

#[tokio::test]
async fn quotas_charge_all_or_nothing_and_survive_a_restart() {
    let (mut w, project, key, sandbox, production) = world().await;
    let prod_env = format!("{key}/environments/production");
    let token = w.token.clone();
    let project_quota = |quota: i64| krpb::UpdateProjectRequest {
        project: Some(krpb::Project {
            name: project.clone(),
            production: Some(krpb::ProjectEnvironmentLimits { rate_limit_per_second: 0, monthly_quota: quota }),
            ..Default::default()
        }),
        update_mask: Some(FieldMask { paths: vec!["production.monthly_quota".into()] }),
    };
    let now = w.frozen.now().timestamp();
    let to_midnight = (86_400 - now.rem_euclid(86_400)) as i32;

    // A daily key quota of 3: the fourth call is refused until the next UTC day.
    w.set(&prod_env, "daily_quota", |e| e.daily_quota = 3).await;
    for _ in 0..3 {
        assert_eq!(w.check(&production, "GET", IP, "", ANY).await.outcome, O::Valid as i32);
    }
    let refused = w.check(&production, "GET", IP, "", ANY).await;
    assert_eq!(
        (refused.outcome, refused.http_status, refused.retry_after_seconds),
        (O::QuotaExceeded as i32, 429, to_midnight)
    );
    assert_eq!(w.check(&sandbox, "GET", IP, "", ANY).await.outcome, O::Valid as i32, "sandbox has its own");

    // The project's monthly quota of 5 refuses the sixth call, and that refusal does not use up
    // the key's daily quota: raised to 10, the key has exactly 5 left once the project allows.
    w.set(&prod_env, "daily_quota", |e| e.daily_quota = 10).await;
    w.keyring.update_project(authed(&token, project_quota(5))).await.unwrap();
    w.synced().await;
    for _ in 0..2 {
        assert_eq!(w.check(&production, "GET", IP, "", ANY).await.outcome, O::Valid as i32);
    }
    for _ in 0..3 {
        let refused = w.check(&production, "GET", IP, "", ANY).await;
        assert_eq!((refused.outcome, refused.http_status), (O::QuotaExceeded as i32, 429));
        assert!(refused.retry_after_seconds >= to_midnight, "until the month ends");
    }
    w.keyring.update_project(authed(&token, project_quota(100))).await.unwrap();
    // A rate limit that refuses calls does not use up the quota either.
    w.set(&prod_env, "rate_limit_per_second", |e| e.rate_limit_per_second = 2).await;
    let mut valid = 0;
    while valid < 5 {
        match w.check(&production, "GET", IP, "", ANY).await.outcome {
            o if o == O::Valid as i32 => valid += 1,
            o if o == O::RateLimited as i32 => w.frozen.advance(chrono::Duration::seconds(1)),
            o => panic!("unexpected outcome {o}"),
        }
    }
    w.frozen.advance(chrono::Duration::seconds(1));
    assert_eq!(w.check(&production, "GET", IP, "", ANY).await.outcome, O::QuotaExceeded as i32);

    // Restarted with empty memory (a graceful stop writes what it holds), the authorizer
    // rebuilds both counts from stored usage.
    w.restart_authorizer().await;
    let stored: i64 = w
        .sql()
        .await
        .query_one("SELECT used FROM authorizer.key_daily_usage WHERE environment = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 10);
    assert_eq!(w.check(&production, "GET", IP, "", ANY).await.outcome, O::QuotaExceeded as i32, "key quota");
    w.set(&prod_env, "daily_quota", |e| e.daily_quota = 1000).await;
    w.keyring.update_project(authed(&token, project_quota(12))).await.unwrap();
    w.synced().await;
    for _ in 0..2 {
        assert_eq!(w.check(&production, "GET", IP, "", ANY).await.outcome, O::Valid as i32);
        w.frozen.advance(chrono::Duration::seconds(1));
    }
    assert_eq!(w.check(&production, "GET", IP, "", ANY).await.outcome, O::QuotaExceeded as i32, "project quota");
}

#[tokio::test]
async fn checks_go_on_while_postgres_is_down_and_usage_is_written_after() {
    let (mut w, project, key, _, production) = world_on(Store::Cluster(PrivateCluster::start())).await;
    let upstream = echo_upstream().await;
    let (_envoy, port) = start_envoy(&w, &project, upstream).await;

    // Checks through CheckKey and through Envoy, without pause, across the outage.
    let load = Load::start(&w, port, &production, IP);
    let Store::Cluster(cluster) = &w.store else { unreachable!() };
    load.wait_for("checks to run", 20).await;
    cluster.stop_server();
    eventually("a usage write to fail", Duration::from_secs(20), || {
        let w = &w;
        async move { (w.metric("keyshare_usage_failed_writes_total").await? > 0.0).then_some(()) }
    })
    .await;
    load.wait_for("checks to go on during the outage", 200).await;
    cluster.start_server();
    eventually("usage writes to resume", Duration::from_secs(30), || {
        let w = &w;
        async move { (w.metric("keyshare_usage_buffered_call_logs").await? == 0.0).then_some(()) }
    })
    .await;
    let (answered, failures) = load.finish().await;
    assert_eq!(failures, 0, "no check failed and no error reached Envoy");

    // Every check, made before, during and after the outage, is counted once.
    let total = answered as i64;
    let counts = stored_usage(&w, &key, total).await;
    assert_eq!(counts.values().sum::<i64>(), total);
    assert_eq!(w.metric("keyshare_usage_dropped_records_total").await, Some(0.0));
    assert_eq!(w.metric("keyshare_usage_dropped_call_logs_total").await, Some(0.0));

    // keyring is back on its database too, and its changes reach the authorizer again.
    let prod_env = format!("{key}/environments/production");
    eventually("keyring to take changes again", Duration::from_secs(30), || {
        let mut keyring = w.keyring.clone();
        let token = w.token.clone();
        let prod_env = prod_env.clone();
        async move {
            keyring
                .update_key_environment(authed(
                    &token,
                    krpb::UpdateKeyEnvironmentRequest {
                        environment: Some(krpb::KeyEnvironment { name: prod_env, active: false, ..Default::default() }),
                        update_mask: Some(FieldMask { paths: vec!["active".into()] }),
                        etag: String::new(),
                    },
                ))
                .await
                .ok()
        }
    })
    .await;
    w.synced().await;
    assert_eq!(w.check(&production, "GET", IP, "", ANY).await.outcome, O::Disabled as i32);
}

/// The call-log partitions there are, by day.
async fn partition_days(client: &tokio_postgres::Client) -> Vec<chrono::NaiveDate> {
    let rows = client
        .query(
            "SELECT child.relname FROM pg_inherits JOIN pg_class child ON child.oid = pg_inherits.inhrelid \
             WHERE pg_inherits.inhparent = 'authorizer.call_logs'::regclass ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|row| {
            let name: String = row.get(0);
            chrono::NaiveDate::parse_from_str(name.strip_prefix("call_logs_").unwrap(), "%Y%m%d").unwrap()
        })
        .collect()
}

#[tokio::test]
async fn call_logs_live_in_day_partitions_and_retention_drops_whole_days_and_old_counts() {
    let (mut w, _project, key, _sandbox, production) = world().await;
    let key_id = uuid::Uuid::parse_str(key.rsplit('/').next().unwrap()).unwrap();
    for _ in 0..3 {
        w.check(&production, "GET", IP, "", ANY).await;
    }
    stored_usage(&w, &key, 3).await;

    // Partitions are made ahead: yesterday, today and the next three days at least.
    let client = w.sql().await;
    let now = w.frozen.now();
    let today = now.date_naive();
    let days = partition_days(&client).await;
    for ahead in -1..=3 {
        let day = today + chrono::TimeDelta::days(ahead);
        assert!(days.contains(&day), "no call-log partition for {day} in {days:?}");
    }

    // Older history, as a long-running deployment has it: call logs 31 days old (past the
    // 30-day retention) and 29 days old, minute counts 8 days old (past 7), hour counts 91
    // days old (past 90) and day counts 400 days old (kept for ever).
    let at = |days: i64| now - chrono::TimeDelta::days(days);
    for age in [31, 29] {
        client.execute("SELECT authorizer.ensure_call_log_partition($1)", &[&at(age).date_naive()]).await.unwrap();
        client
            .execute(
                "INSERT INTO authorizer.call_logs (time, project_id, key_id, environment, method, path, outcome, \
                 http_status) SELECT $1, project_id, key_id, environment, method, path, outcome, http_status \
                 FROM authorizer.call_logs WHERE key_id = $2 LIMIT 1",
                &[&at(age), &key_id],
            )
            .await
            .unwrap();
    }
    for (table, column, age) in
        [("usage_minutes", "minute", 8), ("usage_hours", "hour", 91), ("usage_days", "day", 400)]
    {
        let sql = format!(
            "INSERT INTO authorizer.{table} ({column}, project_id, key_id, environment, method, outcome, calls) \
             SELECT date_trunc('hour', $1::timestamptz), project_id, key_id, environment, method, outcome, 5 \
             FROM authorizer.usage_minutes WHERE key_id = $2 LIMIT 1"
        );
        client.execute(&sql, &[&at(age), &key_id]).await.unwrap();
    }

    // A new writer tends the partitions and the retention when it starts.
    w.restart_authorizer().await;
    let old = at(31).date_naive();
    eventually("the partition past retention to be dropped", Duration::from_secs(30), || {
        let client = &client;
        async move { (!partition_days(client).await.contains(&old)).then_some(()) }
    })
    .await;
    let days = partition_days(&client).await;
    assert!(days.contains(&at(29).date_naive()), "a partition within retention went: {days:?}");
    let logs_by_age = |since: chrono::DateTime<chrono::Utc>| {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "SELECT count(*) FROM authorizer.call_logs WHERE key_id = $1 AND time >= $2",
                    &[&key_id, &since],
                )
                .await
                .unwrap();
            row.get::<_, i64>(0)
        }
    };
    assert_eq!(logs_by_age(at(1)).await, 3, "today's call logs are kept");
    assert_eq!(logs_by_age(at(30)).await, 4, "the 29-day-old call log is kept");
    assert_eq!(logs_by_age(at(400)).await, 4, "the 31-day-old call log went with its partition");
    let old_counts = |table: &'static str, column: &'static str, age: i64| {
        let client = &client;
        let before = at(age - 1);
        async move {
            let sql = format!("SELECT count(*) FROM authorizer.{table} WHERE key_id = $1 AND {column} < $2");
            client.query_one(&sql, &[&key_id, &before]).await.unwrap().get::<_, i64>(0)
        }
    };
    assert_eq!(old_counts("usage_minutes", "minute", 8).await, 0, "minutes past 7 days are deleted");
    assert_eq!(old_counts("usage_hours", "hour", 91).await, 0, "hours past 90 days are deleted");
    assert_eq!(old_counts("usage_days", "day", 400).await, 1, "days are kept for ever");
}

#[tokio::test]
async fn sampled_call_logs_keep_every_rejection_and_exact_counts() {
    let (mut w, _project, key, _sandbox, production) = world().await;
    w.authorizer_config.usage.call_log_sample = 0.0;
    w.restart_authorizer().await;
    for _ in 0..20 {
        w.check(&production, "GET", IP, "", ANY).await;
    }
    for _ in 0..3 {
        w.check(&production, "TRACE", IP, "", ANY).await;
    }
    let counts = stored_usage(&w, &key, 23).await;
    assert_eq!(
        counts,
        BTreeMap::from([
            ((2, "GET".into(), O::Valid as i16), 20),
            ((2, "TRACE".into(), O::MethodNotAllowed as i16), 3)
        ])
    );

    // Only the rejections have call-log lines.
    let client = w.sql().await;
    let key_id = uuid::Uuid::parse_str(key.rsplit('/').next().unwrap()).unwrap();
    let rows = client.query("SELECT outcome FROM authorizer.call_logs WHERE key_id = $1", &[&key_id]).await.unwrap();
    let outcomes: Vec<i16> = rows.iter().map(|row| row.get(0)).collect();
    assert_eq!(outcomes, vec![O::MethodNotAllowed as i16; 3]);
    assert_eq!(w.metric("keyshare_usage_sampled_out_call_logs_total").await, Some(20.0));

    // Charts at every granularity read their own rollup, and each counts every call.
    let mut usage = w.usage().await;
    for granularity in [pb::Granularity::Minute, pb::Granularity::Hour, pb::Granularity::Day] {
        let response = usage
            .query_key_usage(authed(
                &w.token,
                pb::QueryKeyUsageRequest { name: key.clone(), granularity: granularity as i32, ..Default::default() },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.total_calls, 23, "{granularity:?}");
    }
}
