//! The usage API (`keyshare.authorizer.v1.UsageService`) through the real gRPC server, keyring
//! and a real database: series at every granularity with every filter, call logs paged without
//! duplicates or gaps, bad input naming its field, and who may read what (PRODUCT §3).
//!
//! Usage rows are seeded straight into the authorizer's tables, so each test knows exactly what
//! is stored.
#![allow(clippy::unwrap_used)]

mod common;

use chrono::{DateTime, TimeDelta, Utc};
use common::*;
use keyshare_proto::authorizer::v1 as pb;
use keyshare_proto::keyring::v1 as krpb;
use keyshare_runtime::clock::Clock;
use prost_types::Timestamp;
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

use pb::Environment::{Production as PROD, Sandbox as SAND, Unspecified as ANY_ENV};
use pb::Granularity::{Day as DAY, Hour as HOUR, Minute as MINUTE};
use pb::Outcome as O;

/// The ids in `projects/{project}/keys/{key}` or `projects/{project}`.
fn ids(name: &str) -> (Uuid, Option<Uuid>) {
    let parts: Vec<&str> = name.split('/').collect();
    (Uuid::parse_str(parts[1]).unwrap(), parts.get(3).map(|k| Uuid::parse_str(k).unwrap()))
}

fn ts(at: DateTime<Utc>) -> Option<Timestamp> {
    Some(Timestamp { seconds: at.timestamp(), nanos: at.timestamp_subsec_nanos() as i32 })
}

fn from_ts(t: &Option<Timestamp>) -> DateTime<Utc> {
    let t = t.unwrap();
    DateTime::from_timestamp(t.seconds, t.nanos as u32).unwrap()
}

/// Midnight UTC three days before the authorizer's (frozen) now: seeded usage is old enough to
/// stay out of the default hour series, and recent enough to outlive call-log retention.
fn day_zero(w: &World) -> DateTime<Utc> {
    let now = w.frozen.now();
    DateTime::from_timestamp(now.timestamp() - now.timestamp().rem_euclid(86_400), 0).unwrap() - TimeDelta::days(3)
}

/// Creates the authorizer's tables if its usage writer has not yet.
async fn migrated(w: &World) {
    keyshare_authorizer::migrate(&w.db_url).await.unwrap();
}

/// One minute of counts, stored as the usage writer stores it (in `authorizer.usage_minutes`,
/// and added to its hour in `usage_hours` and its day in `usage_days`): minutes after day zero,
/// key name, environment, method, outcome, calls.
type MinuteRow<'a> = (i64, &'a str, pb::Environment, &'a str, O, i64);

async fn seed_minutes(w: &World, zero: DateTime<Utc>, rows: &[MinuteRow<'_>]) {
    migrated(w).await;
    let sql = w.sql().await;
    for (minute, key, environment, method, outcome, calls) in rows {
        let (project, key) = ids(key);
        for (table, column, unit) in
            [("usage_minutes", "minute", "minute"), ("usage_hours", "hour", "hour"), ("usage_days", "day", "day")]
        {
            let statement = format!(
                "INSERT INTO authorizer.{table} AS u ({column}, project_id, key_id, environment, method, outcome, calls)
                 VALUES (date_trunc('{unit}', $1::timestamptz AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (key_id, {column}, environment, method, outcome) DO UPDATE SET calls = u.calls + excluded.calls"
            );
            sql.execute(
                &statement,
                &[
                    &(zero + TimeDelta::minutes(*minute)),
                    &project,
                    &key.unwrap(),
                    &(*environment as i16),
                    method,
                    &(*outcome as i16),
                    calls,
                ],
            )
            .await
            .unwrap();
        }
    }
}

/// One seeded call log, as the API should return it.
#[derive(Clone, Debug, PartialEq)]
struct Logged {
    id: i64,
    at: DateTime<Utc>,
    environment: i32,
    outcome: i32,
}

async fn seed_log(
    sql: &tokio_postgres::Client,
    key: &str,
    at: DateTime<Utc>,
    environment: pb::Environment,
    outcome: O,
    client_ip: Option<std::net::IpAddr>,
) -> Logged {
    // PostgreSQL keeps microseconds.
    let at = DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap();
    let (project, key_id) = ids(key);
    let status: i16 = match outcome {
        O::Valid => 200,
        O::RateLimited | O::QuotaExceeded => 429,
        O::Disabled | O::MethodNotAllowed | O::SourceNotAllowed => 403,
        _ => 401,
    };
    let id: i64 = sql
        .query_one(
            "INSERT INTO authorizer.call_logs
                (time, project_id, key_id, environment, method, path, client_ip, outcome, http_status)
             VALUES ($1, $2, $3, $4, 'GET', '/v1/things', $5, $6, $7) RETURNING id",
            &[&at, &project, &key_id.unwrap(), &(environment as i16), &client_ip, &(outcome as i16), &status],
        )
        .await
        .unwrap()
        .get(0);
    Logged { id, at, environment: environment as i32, outcome: outcome as i32 }
}

/// A point as (minutes after day zero, environment, outcome, calls).
type P = (i64, pb::Environment, O, i64);

fn points(zero: DateTime<Utc>, points: &[pb::UsagePoint]) -> Vec<P> {
    points
        .iter()
        .map(|p| {
            (
                (from_ts(&p.start_time) - zero).num_minutes(),
                pb::Environment::try_from(p.environment).unwrap(),
                O::try_from(p.outcome).unwrap(),
                p.calls,
            )
        })
        .collect()
}

fn totals(totals: &[pb::UsageTotal]) -> Vec<(O, i64)> {
    totals.iter().map(|t| (O::try_from(t.outcome).unwrap(), t.calls)).collect()
}

fn key_request(
    key: &str,
    granularity: pb::Granularity,
    zero: DateTime<Utc>,
    from: i64,
    to: i64,
) -> pb::QueryKeyUsageRequest {
    pb::QueryKeyUsageRequest {
        name: key.into(),
        granularity: granularity as i32,
        start_time: ts(zero + TimeDelta::minutes(from)),
        end_time: ts(zero + TimeDelta::minutes(to)),
        ..Default::default()
    }
}

fn fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

const DAY_MINUTES: i64 = 24 * 60;

#[tokio::test]
async fn key_usage_at_every_granularity_and_filter() {
    let (mut w, project, key, _, _) = world().await;
    let other_key = create_key(&mut w.keyring, &w.token, &project, "K2").await.key.unwrap().name;
    let (_, key_id) = ids(&key);
    // The same key id under a project it does not belong to: never counted for the key.
    let stray = format!("projects/{}/keys/{}", Uuid::new_v4(), key_id.unwrap());
    let zero = day_zero(&w);
    seed_minutes(
        &w,
        zero,
        &[
            (0, &key, SAND, "GET", O::Valid, 5),
            (0, &key, SAND, "POST", O::Valid, 2),
            (0, &key, PROD, "GET", O::RateLimited, 1),
            (1, &key, SAND, "GET", O::Valid, 3),
            (59, &key, PROD, "GET", O::Valid, 4),
            (90, &key, PROD, "DELETE", O::MethodNotAllowed, 6),
            (DAY_MINUTES, &key, SAND, "GET", O::Valid, 10),
            (DAY_MINUTES + 1, &key, SAND, "OTHER", O::Disabled, 7),
            (0, &other_key, SAND, "GET", O::Valid, 100),
            // The same key id under another project (a method of its own, so no rollup row of the
            // real key takes it in).
            (2, &stray, SAND, "PUT", O::Valid, 999),
        ],
    )
    .await;
    let mut usage = w.usage().await;
    let two_days = 2 * DAY_MINUTES;
    let with = |edit: fn(&mut pb::QueryKeyUsageRequest)| {
        let mut request = key_request(&key, DAY, zero, 0, two_days);
        edit(&mut request);
        request
    };
    // (what, request, points, totals)
    type Case<'a> = (&'a str, pb::QueryKeyUsageRequest, Vec<P>, Vec<(O, i64)>);
    let cases: Vec<Case> = vec![
        (
            "minutes",
            key_request(&key, MINUTE, zero, 0, 2),
            vec![(0, SAND, O::Valid, 7), (0, PROD, O::RateLimited, 1), (1, SAND, O::Valid, 3)],
            vec![(O::Valid, 10), (O::RateLimited, 1)],
        ),
        (
            "hours",
            key_request(&key, HOUR, zero, 0, DAY_MINUTES),
            vec![
                (0, SAND, O::Valid, 10),
                (0, PROD, O::Valid, 4),
                (0, PROD, O::RateLimited, 1),
                (60, PROD, O::MethodNotAllowed, 6),
            ],
            vec![(O::Valid, 14), (O::MethodNotAllowed, 6), (O::RateLimited, 1)],
        ),
        (
            "days",
            key_request(&key, DAY, zero, 0, two_days),
            vec![
                (0, SAND, O::Valid, 10),
                (0, PROD, O::Valid, 4),
                (0, PROD, O::MethodNotAllowed, 6),
                (0, PROD, O::RateLimited, 1),
                (DAY_MINUTES, SAND, O::Valid, 10),
                (DAY_MINUTES, SAND, O::Disabled, 7),
            ],
            vec![(O::Valid, 24), (O::Disabled, 7), (O::MethodNotAllowed, 6), (O::RateLimited, 1)],
        ),
        (
            "production only",
            with(|r| r.environment = PROD as i32),
            vec![(0, PROD, O::Valid, 4), (0, PROD, O::MethodNotAllowed, 6), (0, PROD, O::RateLimited, 1)],
            vec![(O::Valid, 4), (O::MethodNotAllowed, 6), (O::RateLimited, 1)],
        ),
        (
            "GET only, asked in lower case",
            with(|r| r.method = "get".into()),
            vec![
                (0, SAND, O::Valid, 8),
                (0, PROD, O::Valid, 4),
                (0, PROD, O::RateLimited, 1),
                (DAY_MINUTES, SAND, O::Valid, 10),
            ],
            vec![(O::Valid, 22), (O::RateLimited, 1)],
        ),
        (
            "other methods",
            with(|r| r.method = "OTHER".into()),
            vec![(DAY_MINUTES, SAND, O::Disabled, 7)],
            vec![(O::Disabled, 7)],
        ),
        (
            "valid only",
            with(|r| r.outcome = O::Valid as i32),
            vec![(0, SAND, O::Valid, 10), (0, PROD, O::Valid, 4), (DAY_MINUTES, SAND, O::Valid, 10)],
            vec![(O::Valid, 24)],
        ),
        (
            "every filter at once",
            with(|r| {
                r.environment = SAND as i32;
                r.method = "POST".into();
                r.outcome = O::Valid as i32;
            }),
            vec![(0, SAND, O::Valid, 2)],
            vec![(O::Valid, 2)],
        ),
        ("a filter nothing matches", with(|r| r.outcome = O::Expired as i32), vec![], vec![]),
        ("a range without calls", key_request(&key, HOUR, zero, -DAY_MINUTES, 0), vec![], vec![]),
    ];
    for (what, request, expected_points, expected_totals) in cases {
        let response = usage.query_key_usage(authed(&w.token, request)).await.unwrap().into_inner();
        assert_eq!(points(zero, &response.points), expected_points, "{what}: points");
        assert_eq!(totals(&response.totals), expected_totals, "{what}: totals");
        let sum: i64 = expected_totals.iter().map(|(_, calls)| calls).sum();
        assert_eq!(response.total_calls, sum, "{what}: total");
        assert!(response.points.iter().all(|p| p.key.is_empty()), "{what}: a key's points name no key");
    }

    // Whole buckets: a range inside two minutes reports both minutes, from their starts.
    let response = usage
        .query_key_usage(authed(
            &w.token,
            pb::QueryKeyUsageRequest {
                name: key.clone(),
                granularity: MINUTE as i32,
                start_time: ts(zero + TimeDelta::seconds(30)),
                end_time: ts(zero + TimeDelta::seconds(70)),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((from_ts(&response.start_time), from_ts(&response.end_time)), (zero, zero + TimeDelta::minutes(2)));
    assert_eq!(response.total_calls, 11);

    // Defaults: unspecified granularity is HOUR over the last day, which holds none of the
    // seeded calls; DAY reaches back 30 days, which holds them all.
    let now = w.frozen.now();
    let response = usage
        .query_key_usage(authed(&w.token, pb::QueryKeyUsageRequest { name: key.clone(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.granularity, HOUR as i32);
    assert!(from_ts(&response.end_time) > now && from_ts(&response.end_time) <= now + TimeDelta::hours(1));
    assert_eq!(from_ts(&response.end_time) - from_ts(&response.start_time), TimeDelta::hours(25));
    assert_eq!(response.total_calls, 0);
    let response = usage
        .query_key_usage(authed(
            &w.token,
            pb::QueryKeyUsageRequest { name: key.clone(), granularity: DAY as i32, ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.total_calls, 38);
}

#[tokio::test]
async fn project_usage_counts_keys_together_or_apart() {
    let (mut w, project, key, _, _) = world().await;
    let other_key = create_key(&mut w.keyring, &w.token, &project, "K2").await.key.unwrap().name;
    let elsewhere = format!("projects/{}/keys/{}", Uuid::new_v4(), Uuid::new_v4());
    let zero = day_zero(&w);
    seed_minutes(
        &w,
        zero,
        &[
            (0, &key, SAND, "GET", O::Valid, 5),
            (61, &key, PROD, "POST", O::RateLimited, 2),
            (0, &other_key, SAND, "GET", O::Valid, 100),
            (60, &other_key, PROD, "GET", O::QuotaExceeded, 20),
            (0, &elsewhere, SAND, "GET", O::Valid, 1000),
        ],
    )
    .await;
    let mut usage = w.usage().await;
    let request = |per_key: bool, granularity: pb::Granularity| pb::QueryProjectUsageRequest {
        name: project.clone(),
        granularity: granularity as i32,
        start_time: ts(zero),
        end_time: ts(zero + TimeDelta::days(1)),
        per_key,
        ..Default::default()
    };

    let together = usage.query_project_usage(authed(&w.token, request(false, HOUR))).await.unwrap().into_inner();
    assert_eq!(
        points(zero, &together.points),
        [(0, SAND, O::Valid, 105), (60, PROD, O::RateLimited, 2), (60, PROD, O::QuotaExceeded, 20)]
    );
    assert!(together.points.iter().all(|p| p.key.is_empty()));
    assert_eq!(totals(&together.totals), [(O::Valid, 105), (O::RateLimited, 2), (O::QuotaExceeded, 20)]);
    assert_eq!(together.total_calls, 127);

    // Apart: ordered by bucket, then key, then environment, then outcome.
    let apart = usage.query_project_usage(authed(&w.token, request(true, HOUR))).await.unwrap().into_inner();
    let mut expected = vec![
        (0, key.clone(), SAND, O::Valid, 5),
        (0, other_key.clone(), SAND, O::Valid, 100),
        (60, key.clone(), PROD, O::RateLimited, 2),
        (60, other_key.clone(), PROD, O::QuotaExceeded, 20),
    ];
    expected.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let got: Vec<_> = apart
        .points
        .iter()
        .zip(points(zero, &apart.points))
        .map(|(p, (minute, environment, outcome, calls))| (minute, p.key.clone(), environment, outcome, calls))
        .collect();
    assert_eq!(got, expected);
    assert_eq!(apart.total_calls, 127);

    // Filters apply to projects too.
    let mut filtered = request(false, DAY);
    filtered.environment = PROD as i32;
    filtered.method = "get".into();
    let filtered = usage.query_project_usage(authed(&w.token, filtered)).await.unwrap().into_inner();
    assert_eq!(points(zero, &filtered.points), [(0, PROD, O::QuotaExceeded, 20)]);
}

#[tokio::test]
async fn call_logs_page_newest_first_without_duplicates_or_gaps() {
    let (mut w, project, key, _, _) = world().await;
    let other_key = create_key(&mut w.keyring, &w.token, &project, "K2").await.key.unwrap().name;
    migrated(&w).await;
    let sql = w.sql().await;
    let base = w.frozen.now() - TimeDelta::hours(2);
    // 23 calls in threes sharing a time (to the microsecond), written out of time order, so ids
    // and times disagree and equal times must be ordered by id.
    let mut seeded = Vec::new();
    for n in 0..23i64 {
        let i = (n * 7) % 23;
        let at = base + TimeDelta::microseconds(1_000_123 * (i / 3));
        let environment = if i % 2 == 0 { SAND } else { PROD };
        let outcome = [O::Valid, O::RateLimited, O::MethodNotAllowed][(i % 3) as usize];
        let ip = match i % 3 {
            0 => Some("198.51.100.7".parse().unwrap()),
            1 => Some("2001:db8::7".parse().unwrap()),
            _ => None,
        };
        seeded.push(seed_log(&sql, &key, at, environment, outcome, ip).await);
    }
    // The other key's calls, and a stray row with this key's id in another project.
    seed_log(&sql, &other_key, base + TimeDelta::seconds(3), SAND, O::Valid, None).await;
    let stray = format!("projects/{}/keys/{}", Uuid::new_v4(), ids(&key).1.unwrap());
    seed_log(&sql, &stray, base + TimeDelta::seconds(4), SAND, O::Valid, None).await;
    let mut newest_first = seeded.clone();
    newest_first.sort_by_key(|log| std::cmp::Reverse((log.at, log.id)));

    let mut usage = w.usage().await;
    let list = |page_size: i32, page_token: String, environment: pb::Environment, outcome: O| pb::ListCallLogsRequest {
        parent: key.clone(),
        page_size,
        page_token,
        environment: environment as i32,
        outcome: outcome as i32,
    };
    let to_logged = |log: &pb::CallLog| Logged {
        id: log.name.rsplit('/').next().unwrap().parse().unwrap(),
        at: from_ts(&log.call_time),
        environment: log.environment,
        outcome: log.outcome,
    };

    for page_size in [1, 4, 7, 23, 50] {
        let (mut all, mut token, mut pages) = (Vec::new(), String::new(), 0);
        loop {
            let page = usage
                .list_call_logs(authed(&w.token, list(page_size, token, ANY_ENV, O::Unspecified)))
                .await
                .unwrap()
                .into_inner();
            assert!(page.call_logs.len() <= page_size as usize);
            all.extend(page.call_logs.iter().map(to_logged));
            pages += 1;
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(all, newest_first, "page size {page_size}");
        assert_eq!(pages, 23usize.div_ceil(page_size as usize), "page size {page_size}: no empty last page");
    }

    // Filters keep the order.
    for (environment, outcome) in [(PROD, O::Unspecified), (ANY_ENV, O::RateLimited), (SAND, O::Valid)] {
        let page = usage
            .list_call_logs(authed(&w.token, list(100, String::new(), environment, outcome)))
            .await
            .unwrap()
            .into_inner();
        let expected: Vec<Logged> = newest_first
            .iter()
            .filter(|l| environment == ANY_ENV || l.environment == environment as i32)
            .filter(|l| outcome == O::Unspecified || l.outcome == outcome as i32)
            .cloned()
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(page.call_logs.iter().map(to_logged).collect::<Vec<_>>(), expected, "{environment:?} {outcome:?}");
    }

    // Every field of an entry.
    let page = usage
        .list_call_logs(authed(&w.token, list(100, String::new(), ANY_ENV, O::Unspecified)))
        .await
        .unwrap()
        .into_inner();
    let log = page.call_logs.iter().find(|l| l.client_ip == "2001:db8::7").unwrap();
    assert_eq!(log.name, format!("{key}/callLogs/{}", to_logged(log).id));
    assert_eq!((log.key.as_str(), log.method.as_str(), log.path.as_str()), (key.as_str(), "GET", "/v1/things"));
    assert_eq!((log.outcome, log.http_status), (O::RateLimited as i32, 429));
    assert!(page.call_logs.iter().any(|l| l.client_ip.is_empty()), "a call without an address");

    // A token belongs to its listing: another key's, or the same key with other filters.
    let token = usage
        .list_call_logs(authed(&w.token, list(2, String::new(), ANY_ENV, O::Unspecified)))
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    let mut elsewhere = list(2, token.clone(), ANY_ENV, O::Unspecified);
    elsewhere.parent = other_key.clone();
    let refused = usage.list_call_logs(authed(&w.token, elsewhere)).await.unwrap_err();
    assert_eq!((refused.code(), fields(&refused)), (Code::InvalidArgument, vec!["page_token".to_owned()]));
    let refused = usage.list_call_logs(authed(&w.token, list(2, token, PROD, O::Unspecified))).await.unwrap_err();
    assert_eq!((refused.code(), fields(&refused)), (Code::InvalidArgument, vec!["page_token".to_owned()]));

    // Calls written while paging are newer than the cursor: later pages neither repeat nor skip.
    let first = usage
        .list_call_logs(authed(&w.token, list(10, String::new(), ANY_ENV, O::Unspecified)))
        .await
        .unwrap()
        .into_inner();
    seed_log(&sql, &key, w.frozen.now(), SAND, O::Valid, None).await;
    seed_log(&sql, &key, newest_first[0].at, SAND, O::Valid, None).await;
    let mut all: Vec<Logged> = first.call_logs.iter().map(to_logged).collect();
    let mut token = first.next_page_token;
    while !token.is_empty() {
        let page = usage
            .list_call_logs(authed(&w.token, list(10, token, ANY_ENV, O::Unspecified)))
            .await
            .unwrap()
            .into_inner();
        all.extend(page.call_logs.iter().map(to_logged));
        token = page.next_page_token;
    }
    assert_eq!(all, newest_first);
}

#[tokio::test]
async fn call_log_page_sizes() {
    let (w, _project, key, _, _) = world().await;
    migrated(&w).await;
    let (project_id, key_id) = ids(&key);
    w.sql()
        .await
        .execute(
            "INSERT INTO authorizer.call_logs
                (time, project_id, key_id, environment, method, path, client_ip, outcome, http_status)
             SELECT now() - n * interval '1 second', $1, $2, 1, 'GET', '/', NULL, 1, 200
             FROM generate_series(1, 1005) AS n",
            &[&project_id, &key_id.unwrap()],
        )
        .await
        .unwrap();
    let mut usage = w.usage().await;
    let list = |page_size: i32, page_token: String| {
        authed(&w.token, pb::ListCallLogsRequest { parent: key.clone(), page_size, page_token, ..Default::default() })
    };
    // (page_size, entries on the first page)
    for (page_size, expected) in [(0, 50), (1, 1), (1000, 1000), (5000, 1000)] {
        let page = usage.list_call_logs(list(page_size, String::new())).await.unwrap().into_inner();
        assert_eq!(page.call_logs.len(), expected, "page_size {page_size}");
        assert!(!page.next_page_token.is_empty());
    }
    let first = usage.list_call_logs(list(1000, String::new())).await.unwrap().into_inner();
    let last = usage.list_call_logs(list(1000, first.next_page_token)).await.unwrap().into_inner();
    assert_eq!((last.call_logs.len(), last.next_page_token.as_str()), (5, ""));
}

#[tokio::test]
async fn bad_input_names_every_field_at_fault() {
    let (w, project, key, _, _) = world().await;
    let mut usage = w.usage().await;
    let zero = day_zero(&w);
    let key_usage = |edit: &dyn Fn(&mut pb::QueryKeyUsageRequest)| {
        let mut request = key_request(&key, HOUR, zero, 0, 60);
        edit(&mut request);
        request
    };
    let key_cases: Vec<(&str, pb::QueryKeyUsageRequest, &[&str])> = vec![
        ("no name", key_usage(&|r| r.name.clear()), &["name"]),
        ("not a key name", key_usage(&|r| r.name = "projects/x/keys/y".into()), &["name"]),
        ("a project name", key_usage(&|r| r.name = project.clone()), &["name"]),
        ("start after end", key_usage(&|r| r.start_time = ts(zero + TimeDelta::hours(2))), &["end_time"]),
        ("start at end", key_usage(&|r| r.end_time = ts(zero)), &["end_time"]),
        (
            "more than 1440 buckets",
            key_usage(&|r| {
                r.granularity = MINUTE as i32;
                r.end_time = ts(zero + TimeDelta::days(1) + TimeDelta::minutes(1));
            }),
            &["start_time"],
        ),
        ("unknown granularity", key_usage(&|r| r.granularity = 9), &["granularity"]),
        ("unknown method", key_usage(&|r| r.method = "FETCH".into()), &["method"]),
        ("unknown environment", key_usage(&|r| r.environment = 7), &["environment"]),
        ("unknown outcome", key_usage(&|r| r.outcome = 42), &["outcome"]),
        ("bad timestamp", key_usage(&|r| r.start_time = Some(Timestamp { seconds: 0, nanos: -1 })), &["start_time"]),
        (
            "everything at once",
            key_usage(&|r| {
                r.name = "keys/1".into();
                r.method = "FETCH".into();
                r.outcome = 42;
                r.end_time = Some(Timestamp { seconds: i64::MAX, nanos: 0 });
            }),
            &["name", "end_time", "method", "outcome"],
        ),
    ];
    for (what, request, expected) in key_cases {
        let status = usage.query_key_usage(authed(&w.token, request)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert_eq!(fields(&status), expected, "{what}");
        let info = status.get_details_error_info().unwrap();
        assert_eq!((info.reason.as_str(), info.domain.as_str()), ("INVALID_ARGUMENT", "authorizer.keyshare.dev"));
    }

    let project_cases: Vec<(&str, pb::QueryProjectUsageRequest, &[&str])> = vec![
        ("a key name", pb::QueryProjectUsageRequest { name: key.clone(), ..Default::default() }, &["name"]),
        (
            "61 days of hours",
            pb::QueryProjectUsageRequest {
                name: project.clone(),
                granularity: HOUR as i32,
                start_time: ts(zero - TimeDelta::days(61)),
                end_time: ts(zero),
                ..Default::default()
            },
            &["start_time"],
        ),
    ];
    for (what, request, expected) in project_cases {
        let status = usage.query_project_usage(authed(&w.token, request)).await.unwrap_err();
        assert_eq!(
            (status.code(), fields(&status)),
            (Code::InvalidArgument, expected.iter().map(|f| f.to_string()).collect()),
            "{what}"
        );
    }

    let list = |parent: &str, page_size: i32, page_token: &str, outcome: i32| pb::ListCallLogsRequest {
        parent: parent.into(),
        page_size,
        page_token: page_token.into(),
        outcome,
        ..Default::default()
    };
    let log_cases: Vec<(&str, pb::ListCallLogsRequest, &[&str])> = vec![
        ("not a key name", list(&project, 0, "", 0), &["parent"]),
        ("negative page size", list(&key, -1, "", 0), &["page_size"]),
        ("garbage token", list(&key, 0, "not-a-token", 0), &["page_token"]),
        ("both", list(&key, -5, "bm90IGEgdG9rZW4", 0), &["page_size", "page_token"]),
        ("unknown outcome", list(&key, 0, "", 99), &["outcome"]),
    ];
    for (what, request, expected) in log_cases {
        let status = usage.list_call_logs(authed(&w.token, request)).await.unwrap_err();
        assert_eq!(
            (status.code(), fields(&status)),
            (Code::InvalidArgument, expected.iter().map(|f| f.to_string()).collect()),
            "{what}"
        );
    }
}

/// Who may read what (PRODUCT §3): a key's usage and call log like the key itself, a project's
/// usage for project and organization owners only.
#[tokio::test]
async fn who_may_read_usage() {
    let (mut w, project, key, _, _) = world().await;
    let zero = day_zero(&w);
    seed_minutes(&w, zero, &[(0, &key, SAND, "GET", O::Valid, 3)]).await;
    seed_log(&w.sql().await, &key, w.frozen.now(), SAND, O::Valid, None).await;

    let (admin_id, admin) = w.account("admin@example.com").await;
    let (contributor_id, contributor) = w.account("contributor@example.com").await;
    let (project_owner_id, project_owner) = w.account("project-owner@example.com").await;
    let (project_member_id, project_member) = w.account("project-member@example.com").await;
    let (org_owner_id, org_owner) = w.account("org-owner@example.com").await;
    let (_, outsider) = w.account("outsider@example.com").await;
    w.add_key_member(&key, &admin_id, krpb::KeyRole::Admin).await;
    w.add_key_member(&key, &contributor_id, krpb::KeyRole::Contributor).await;
    w.add_project_member(&project, &project_owner_id, krpb::ProjectRole::Owner).await;
    w.add_project_member(&project, &project_member_id, krpb::ProjectRole::Member).await;
    w.add_organization_owner(&project, &org_owner_id).await;

    const OK: Code = Code::Ok;
    const NF: Code = Code::NotFound;
    const PD: Code = Code::PermissionDenied;
    const UA: Code = Code::Unauthenticated;
    let callers: [(&str, Option<&str>); 8] = [
        ("key owner", Some(&w.token)),
        ("admin", Some(&admin)),
        ("contributor", Some(&contributor)),
        ("project owner", Some(&project_owner)),
        ("project member", Some(&project_member)),
        ("org owner", Some(&org_owner)),
        ("outsider", Some(&outsider)),
        ("unauthenticated", None),
    ];
    // (RPC, expected code per caller)
    let matrix = [
        ("QueryKeyUsage", [OK, OK, OK, OK, NF, OK, NF, UA]),
        ("ListCallLogs", [OK, OK, OK, OK, NF, OK, NF, UA]),
        // Key roles do not see the project (keyring's GetProject is NOT_FOUND for them);
        // project members see it but not its usage.
        ("QueryProjectUsage", [OK, NF, NF, OK, PD, OK, NF, UA]),
    ];
    let mut usage = w.usage().await;
    let mut failures = Vec::new();
    for (rpc, expected) in matrix {
        for ((caller, token), expected) in callers.iter().zip(expected) {
            let got = read(&mut usage, rpc, *token, &project, &key, zero).await;
            if got != expected {
                failures.push(format!("{rpc} as {caller}: expected {expected:?}, got {got:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The answer for a caller who may not see the key says nothing about whether it exists.
    let missing = format!("{project}/keys/{}", Uuid::new_v4());
    for name in [&key, &missing] {
        let status = usage
            .query_key_usage(authed(&outsider, pb::QueryKeyUsageRequest { name: name.clone(), ..Default::default() }))
            .await
            .unwrap_err();
        assert_eq!((status.code(), status.message()), (Code::NotFound, "key not found"));
    }

    // A project owner naming another project's key under their own project reads nothing.
    let organization = w
        .keyring
        .get_project(authed(&w.token, krpb::GetProjectRequest { name: project.clone() }))
        .await
        .unwrap()
        .into_inner()
        .project
        .unwrap()
        .organization;
    let (elsewhere_id, _) = ids(&w
        .keyring
        .create_project(authed(
            &w.token,
            krpb::CreateProjectRequest {
                parent: organization,
                project: Some(krpb::Project { display_name: "Elsewhere".into(), ..Default::default() }),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .project
        .unwrap()
        .name);
    let foreign = format!("projects/{elsewhere_id}/keys/{}", ids(&key).1.unwrap());
    let response = usage
        .query_key_usage(authed(&w.token, key_request(&foreign, DAY, zero, 0, DAY_MINUTES)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.total_calls, 0);
}

/// Calls one of the usage RPCs as `token`; the code it ends with.
async fn read(
    usage: &mut pb::usage_service_client::UsageServiceClient<tonic::transport::Channel>,
    rpc: &str,
    token: Option<&str>,
    project: &str,
    key: &str,
    zero: DateTime<Utc>,
) -> Code {
    fn request<T>(token: Option<&str>, message: T) -> tonic::Request<T> {
        match token {
            Some(token) => authed(token, message),
            None => tonic::Request::new(message),
        }
    }
    let result = match rpc {
        "QueryKeyUsage" => {
            usage.query_key_usage(request(token, key_request(key, DAY, zero, 0, DAY_MINUTES))).await.map(|r| {
                assert_eq!(r.into_inner().total_calls, 3);
            })
        }
        "ListCallLogs" => usage
            .list_call_logs(request(token, pb::ListCallLogsRequest { parent: key.into(), ..Default::default() }))
            .await
            .map(|r| assert_eq!(r.into_inner().call_logs.len(), 1)),
        "QueryProjectUsage" => usage
            .query_project_usage(request(
                token,
                pb::QueryProjectUsageRequest {
                    name: project.into(),
                    granularity: DAY as i32,
                    start_time: ts(zero),
                    end_time: ts(zero + TimeDelta::days(1)),
                    ..Default::default()
                },
            ))
            .await
            .map(|r| assert_eq!(r.into_inner().total_calls, 3)),
        other => panic!("no such RPC {other}"),
    };
    result.err().map_or(Code::Ok, |status| status.code())
}

/// A deleted key's history stays readable to project and organization owners (PRODUCT §4),
/// and to nobody else: its members lost the key with it.
#[tokio::test]
async fn a_deleted_keys_history_stays_with_project_and_organization_owners() {
    let (mut w, project, key, _, _) = world().await;
    let zero = day_zero(&w);
    seed_minutes(&w, zero, &[(0, &key, SAND, "GET", O::Valid, 3)]).await;
    seed_log(&w.sql().await, &key, w.frozen.now(), SAND, O::Valid, None).await;
    let (admin_id, admin) = w.account("admin@example.com").await;
    let (contributor_id, contributor) = w.account("contributor@example.com").await;
    let (project_owner_id, project_owner) = w.account("project-owner@example.com").await;
    let (org_owner_id, org_owner) = w.account("org-owner@example.com").await;
    w.add_key_member(&key, &admin_id, krpb::KeyRole::Admin).await;
    w.add_key_member(&key, &contributor_id, krpb::KeyRole::Contributor).await;
    w.add_project_member(&project, &project_owner_id, krpb::ProjectRole::Owner).await;
    w.add_organization_owner(&project, &org_owner_id).await;

    let mut usage = w.usage().await;
    assert_eq!(read(&mut usage, "QueryKeyUsage", Some(&contributor), &project, &key, zero).await, Code::Ok);
    w.keyring
        .delete_key(authed(&w.token, krpb::DeleteKeyRequest { name: key.clone(), etag: String::new() }))
        .await
        .unwrap();

    let callers: [(&str, &str, Code); 5] = [
        ("key owner (the project's creator and organization owner)", &w.token, Code::Ok),
        ("project owner", &project_owner, Code::Ok),
        ("org owner", &org_owner, Code::Ok),
        ("former admin", &admin, Code::NotFound),
        ("former contributor", &contributor, Code::NotFound),
    ];
    for (caller, token, expected) in callers {
        for rpc in ["QueryKeyUsage", "ListCallLogs"] {
            let got = read(&mut usage, rpc, Some(token), &project, &key, zero).await;
            assert_eq!(got, expected, "{rpc} as {caller} after the key was deleted");
        }
    }
}

/// The services reflection lists at `addr` (what `grpcurl list` shows), sorted.
async fn listed_services(addr: std::net::SocketAddr) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel(addr).await)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a list of services");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}

/// Two listeners: the check port serves CheckKey and Envoy's ext_authz (for gateways), the
/// management port UsageService (for people with tokens), and neither serves the other's. Both
/// report health and list what they serve in reflection, Envoy's service included, described
/// fully enough for grpcurl.
#[tokio::test]
async fn checks_and_usage_have_a_port_each() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

    let (mut w, _project, key, sandbox, _) = world().await;
    assert_ne!(w.authorizer_addr, w.management_addr);
    for (addr, service) in [
        (w.authorizer_addr, ""),
        (w.authorizer_addr, "keyshare.authorizer.v1.AuthorizerService"),
        (w.authorizer_addr, "envoy.service.auth.v3.Authorization"),
        (w.management_addr, ""),
        (w.management_addr, "keyshare.authorizer.v1.UsageService"),
    ] {
        let status = HealthClient::new(channel(addr).await)
            .check(HealthCheckRequest { service: service.into() })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{addr} {service:?}");
    }
    assert_eq!(
        listed_services(w.authorizer_addr).await,
        [
            "envoy.service.auth.v3.Authorization",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "keyshare.authorizer.v1.AuthorizerService",
        ]
    );
    assert_eq!(
        listed_services(w.management_addr).await,
        ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "keyshare.authorizer.v1.UsageService"]
    );
    // grpcurl runs aside: the services answer on this test's runtime.
    let target = w.authorizer_addr.to_string();
    let described = tokio::task::spawn_blocking(move || {
        std::process::Command::new(keyshare_runtime::testkit::tool("grpcurl"))
            .args(["-plaintext", &target, "describe", "envoy.service.auth.v3.CheckRequest"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(described.status.success(), "{}", String::from_utf8_lossy(&described.stderr));
    assert!(String::from_utf8_lossy(&described.stdout).contains("AttributeContext attributes"));

    // CheckKey answers on the check port only, UsageService on the management port only.
    let answer = w.check(&sandbox, "GET", "198.51.100.7", "", ANY_ENV).await;
    assert!(answer.allowed);
    let mut checks_at_management =
        pb::authorizer_service_client::AuthorizerServiceClient::new(channel(w.management_addr).await);
    let refused = checks_at_management
        .check_key(pb::CheckKeyRequest { key: sandbox.clone(), method: "GET".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented);
    let usage_request = || authed(&w.token, pb::QueryKeyUsageRequest { name: key.clone(), ..Default::default() });
    let mut usage_at_checks = pb::usage_service_client::UsageServiceClient::new(channel(w.authorizer_addr).await);
    assert_eq!(usage_at_checks.query_key_usage(usage_request()).await.unwrap_err().code(), Code::Unimplemented);
    let at_management = w.usage().await.query_key_usage(usage_request()).await;
    assert!(!matches!(at_management, Err(ref status) if status.code() == Code::Unimplemented), "{at_management:?}");
}
