//! Time from sending a change's COMMIT in keyring to its arrival at a WatchKeys watcher, against a bare
//! PostgreSQL NOTIFY round trip measured in the same run on the same database (the floor any
//! database-signalled feed can reach).
//!
//! Run: `cargo bench -p keyshare-system-tests --bench feed_latency` (PostgreSQL from
//! `KEYSHARE_TEST_DATABASE_URL`, default 127.0.0.1:5432). `FEED_BENCH_CHANGES` sets the count.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use keyshare_proto::keyring::v1 as pb;
use keyshare_proto::keyring::v1::watch_keys_response::Event;
use keyshare_system_tests::{authed, percentile};

fn report(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let p50 = percentile(&samples, 50.0);
    println!(
        "{name:<28} n={:<5} p50={:>8.3?} p90={:>8.3?} p99={:>8.3?} max={:>8.3?}",
        samples.len(),
        p50,
        percentile(&samples, 90.0),
        percentile(&samples, 99.0),
        samples.last().copied().unwrap_or_default()
    );
    percentile(&samples, 99.0)
}

#[tokio::main]
async fn main() {
    let changes: usize = std::env::var("FEED_BENCH_CHANGES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let stack = keyshare_system_tests::stack().await;
    let token = stack.account("bench@example.com").await.token;
    let key = stack.key(&token).await.name;
    let mut keyring = keyshare_system_tests::keyring(&stack).await;
    let key_ref = keyshare_keyring::domain::parse_key(&key, "key").unwrap();

    // The watcher: a real gRPC stream, past its snapshot.
    let watcher = stack.watcher_token().await;
    let mut stream =
        keyring.watch_keys(authed(&watcher, pb::WatchKeysRequest { after_sequence: 0 })).await.unwrap().into_inner();
    while let Some(message) = stream.message().await.unwrap() {
        if matches!(message.event, Some(Event::SnapshotEnd(_))) {
            break;
        }
    }

    let pool = keyshare_runtime::db::pool(&stack.db_url(), 2).unwrap();

    // Baseline: NOTIFY committed on one connection, received by a listener on another.
    let (listener, mut connection) = tokio_postgres::connect(&stack.db_url(), tokio_postgres::NoTls).await.unwrap();
    let (notes_tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(_) = message {
                let _ = notes_tx.send(Instant::now());
            }
        }
    });
    listener.batch_execute("LISTEN bench_baseline").await.unwrap();
    let mut baseline = Vec::with_capacity(changes);
    for i in 0..changes {
        let mut client = pool.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        tx.execute("SELECT pg_notify('bench_baseline', $1)", &[&i.to_string()]).await.unwrap();
        let committed = Instant::now();
        tx.commit().await.unwrap();
        let arrived = notes.recv().await.unwrap();
        baseline.push(arrived.saturating_duration_since(committed));
    }

    // The feed: toggle the key's sandbox switch with keyring's own statements and feed entry,
    // one change at a time, and wait for each at the watcher.
    let mut feed = Vec::with_capacity(changes);
    for _ in 0..changes {
        let mut client = pool.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        tx.execute(
            "UPDATE keyring.key_environments SET active = NOT active WHERE key_id = $1 AND environment = 'sandbox'",
            &[&key_ref.key],
        )
        .await
        .unwrap();
        let sequence = keyshare_keyring::feed::record_key(&tx, key_ref, chrono::Utc::now()).await.unwrap();
        let committed = Instant::now();
        tx.commit().await.unwrap();
        loop {
            let message = stream.message().await.unwrap().expect("feed ended");
            if message.sequence == sequence {
                feed.push(Instant::now().saturating_duration_since(committed));
                break;
            }
        }
    }

    println!("COMMIT sent → change received, {changes} sequential changes, one machine:");
    let base_p99 = report("baseline (bare NOTIFY)", baseline);
    let feed_p99 = report("WatchKeys feed", feed);
    println!("feed p99 / baseline p99 = {:.1}×", feed_p99.as_secs_f64() / base_p99.as_secs_f64().max(1e-9));
}
