//! Cold start: time from starting an authorizer replica to SERVING (its first snapshot of
//! keyring's feed in memory), with a fleet's worth of keys, against the same start with one key
//! measured in the same run. The keys are written straight into keyring's tables (a million
//! CreateKey calls would take hours), each with a sandbox and a production credential, as
//! CreateKey leaves them; then the snapshot table is filled by the statement of the migration
//! that introduced it, as an upgraded database has it.
//!
//! Run: `scripts/bench cold-start`, or `cargo bench -p keyshare-system-tests --bench cold_start`
//! (`COLD_START_BENCH_KEYS` sets the count, default 1,000,000).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use keyshare_system_tests::{Kind, Stack, serving};

/// The allocator of the service binaries, whose work this process does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keys inserted per statement.
const CHUNK: i64 = 100_000;

async fn cold_start(stack: &mut Stack) -> Duration {
    let start = Instant::now();
    let addr = stack.add(Kind::Authorizer, []).await.addr;
    serving(addr, Duration::from_secs(1800)).await;
    start.elapsed()
}

#[tokio::main]
async fn main() {
    let keys: i64 = std::env::var("COLD_START_BENCH_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let mut stack = keyshare_system_tests::stack().await;
    let token = stack.account("cold@example.com").await.token;
    let created = stack.key(&token).await;
    let project = created.project.trim_start_matches("projects/").to_owned();
    let baseline = cold_start(&mut stack).await;

    let (client, connection) = tokio_postgres::connect(&stack.db_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let inserting = Instant::now();
    let mut first = 0;
    while first < keys {
        let last = (first + CHUNK).min(keys);
        client
            .batch_execute(&format!(
                "BEGIN;
                 CREATE TEMP TABLE bulk ON COMMIT DROP AS
                   SELECT gen_random_uuid() AS id, n FROM generate_series({first}, {last} - 1) AS n;
                 INSERT INTO keyring.keys (id, project_id, display_name, created_at, updated_at)
                   SELECT id, '{project}', 'bulk ' || n, now(), now() FROM bulk;
                 INSERT INTO keyring.key_environments (key_id, environment, can_create, can_read, can_update, can_delete)
                   SELECT id, environment, true, true, true, true FROM bulk, unnest(ARRAY['sandbox', 'production']) AS environment;
                 INSERT INTO keyring.credentials (id, key_id, environment, sha256, sealed, kek_id, prefix, last_four, created_at)
                   SELECT gen_random_uuid(), id, environment, sha256((id::text || environment)::bytea),
                          '\\x00'::bytea, 'k1', 'ks_', '0000', now()
                   FROM bulk, unnest(ARRAY['sandbox', 'production']) AS environment;
                 COMMIT;"
            ))
            .await
            .unwrap();
        first = last;
    }
    let inserted = inserting.elapsed();
    let filling = Instant::now();
    let migration = include_str!("../../crates/keyring/migrations/V30__feed_keys.sql");
    let backfill = &migration[migration.rfind("INSERT INTO keyring.feed_keys").unwrap()..];
    client.batch_execute(backfill).await.unwrap();
    client
        .batch_execute(
            "ANALYZE keyring.keys; ANALYZE keyring.key_environments; ANALYZE keyring.credentials;
             ANALYZE keyring.feed_keys",
        )
        .await
        .unwrap();
    let filled = filling.elapsed();
    let loaded = cold_start(&mut stack).await;
    println!("authorizer start → SERVING (first snapshot in memory), one machine:");
    println!("{:<44} {:>10.3?}", "baseline: 1 key", baseline);
    println!(
        "{:<44} {:>10.3?}   ({keys} keys written in {inserted:.1?}, the snapshot table filled in {filled:.1?})",
        format!("{keys} keys, {} credentials", 2 * keys + 2),
        loaded
    );
}
