//! The change feed under concurrent writers and a watcher that drops its stream at random
//! points: at the end the watcher's state equals the database's, and it saw every change.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use keyshare_proto::keyring::v1 as pb;
use keyshare_proto::keyring::v1::watch_keys_response::Event;
use keyshare_runtime::testkit::eventually;
use prost_types::FieldMask;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What a watcher knows: keys and projects by name, and where it is in the feed.
#[derive(Clone, Debug, Default, PartialEq)]
struct Mirror {
    keys: BTreeMap<String, pb::KeyState>,
    projects: BTreeMap<String, pb::ProjectState>,
}

#[derive(Default)]
struct Watcher {
    mirror: Mirror,
    /// Sequence of the last complete snapshot or applied change.
    last: i64,
    /// Change sequences applied outside snapshots.
    seen: Vec<i64>,
    first_snapshot: Option<i64>,
    reconnects: usize,
}

fn apply(mirror: &mut Mirror, event: Event) {
    match event {
        Event::KeyUpserted(state) => {
            mirror.keys.insert(state.key.clone(), state);
        }
        Event::KeyRemoved(name) => {
            mirror.keys.remove(&name);
        }
        Event::ProjectUpserted(state) => {
            mirror.projects.insert(state.project.clone(), state);
        }
        Event::ProjectRemoved(name) => {
            mirror.projects.remove(&name);
            mirror.keys.retain(|_, k| k.project != name);
        }
        Event::SnapshotStart(_) | Event::SnapshotEnd(_) => {}
    }
}

/// Follows the feed until `stop`, dropping the stream at random points and resuming.
async fn watch(
    mut keyring: Keyring,
    token: String,
    watcher: Arc<Mutex<Watcher>>,
    stop: Arc<tokio::sync::Notify>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    loop {
        let after = watcher.lock().unwrap().last;
        let mut stream = keyring
            .watch_keys(authed(&token, pb::WatchKeysRequest { after_sequence: after }))
            .await
            .unwrap()
            .into_inner();
        // A snapshot is applied only once complete: until then it builds aside.
        let mut pending: Option<Mirror> = None;
        let drop_after = rng.gen_range(1..60usize);
        let mut received = 0;
        loop {
            let message = tokio::select! {
                message = stream.message() => message.unwrap(),
                () = stop.notified() => return,
            };
            let Some(message) = message else { break };
            let event = message.event.unwrap();
            let mut w = watcher.lock().unwrap();
            match event {
                Event::SnapshotStart(_) => pending = Some(Mirror::default()),
                Event::SnapshotEnd(_) => {
                    w.mirror = pending.take().unwrap();
                    w.last = message.sequence;
                    w.first_snapshot.get_or_insert(message.sequence);
                }
                event if pending.is_some() => apply(pending.as_mut().unwrap(), event),
                event => {
                    assert!(
                        message.sequence > w.last,
                        "sequence went backwards: {} after {}",
                        message.sequence,
                        w.last
                    );
                    apply(&mut w.mirror, event);
                    w.last = message.sequence;
                    w.seen.push(message.sequence);
                }
            }
            received += 1;
            if received >= drop_after {
                w.reconnects += 1;
                break;
            }
        }
    }
}

/// The database's state, as a fresh snapshot shows it.
async fn snapshot(keyring: &mut Keyring, token: &str) -> (Mirror, i64) {
    let mut stream =
        keyring.watch_keys(authed(token, pb::WatchKeysRequest { after_sequence: 0 })).await.unwrap().into_inner();
    let mut mirror = Mirror::default();
    while let Some(message) = stream.message().await.unwrap() {
        match message.event.unwrap() {
            Event::SnapshotEnd(_) => return (mirror, message.sequence),
            event => apply(&mut mirror, event),
        }
    }
    panic!("snapshot ended early");
}

async fn random_change(
    rng: &mut StdRng,
    keyring: &mut Keyring,
    token: &str,
    project: &str,
    keys: &mut Vec<String>,
    writer: usize,
    n: usize,
) {
    let env = |key: &str, rng: &mut StdRng| {
        format!("{key}/environments/{}", if rng.gen_bool(0.5) { "sandbox" } else { "production" })
    };
    let choice = if keys.is_empty() { 0 } else { rng.gen_range(0..8) };
    match choice {
        0 | 1 => {
            let key = create_key(keyring, token, project, &format!("w{writer}-{n}")).await.key.unwrap().name;
            keys.push(key);
        }
        2 | 3 => {
            let key = keys[rng.gen_range(0..keys.len())].clone();
            let (mask, environment) = match rng.gen_range(0..4) {
                0 => ("active", pb::KeyEnvironment { active: rng.gen_bool(0.5), ..Default::default() }),
                1 => (
                    "permissions",
                    pb::KeyEnvironment {
                        permissions: Some(pb::Permissions {
                            create: rng.gen_bool(0.5),
                            read: rng.gen_bool(0.5),
                            update: rng.gen_bool(0.5),
                            delete: rng.gen_bool(0.5),
                        }),
                        ..Default::default()
                    },
                ),
                2 => (
                    "rate_limit_per_second",
                    pb::KeyEnvironment { rate_limit_per_second: rng.gen_range(0..1000), ..Default::default() },
                ),
                _ => (
                    "ip_allowlist",
                    pb::KeyEnvironment {
                        ip_allowlist: vec![format!("10.{}.0.0/16", rng.gen_range(0..255))],
                        ..Default::default()
                    },
                ),
            };
            let environment = pb::KeyEnvironment { name: env(&key, rng), ..environment };
            keyring
                .update_key_environment(authed(
                    token,
                    pb::UpdateKeyEnvironmentRequest {
                        environment: Some(environment),
                        update_mask: Some(FieldMask { paths: vec![mask.into()] }),
                        etag: String::new(),
                    },
                ))
                .await
                .unwrap();
        }
        4 | 5 => {
            let key = keys[rng.gen_range(0..keys.len())].clone();
            let grace =
                rng.gen_bool(0.5).then(|| prost_types::Duration { seconds: rng.gen_range(1..86_400), nanos: 0 });
            keyring
                .regenerate_credential(authed(
                    token,
                    pb::RegenerateCredentialRequest { name: env(&key, rng), grace_period: grace },
                ))
                .await
                .unwrap();
        }
        6 => {
            let key = keys.swap_remove(rng.gen_range(0..keys.len()));
            keyring.delete_key(authed(token, pb::DeleteKeyRequest { name: key, etag: String::new() })).await.unwrap();
        }
        _ => {
            keyring
                .update_project(authed(
                    token,
                    pb::UpdateProjectRequest {
                        project: Some(pb::Project {
                            name: project.into(),
                            production: Some(pb::ProjectEnvironmentLimits {
                                rate_limit_per_second: rng.gen_range(0..10_000),
                                monthly_quota: rng.gen_range(0..1_000_000),
                            }),
                            ..Default::default()
                        }),
                        update_mask: Some(FieldMask { paths: vec!["production".into()] }),
                    },
                ))
                .await
                .unwrap();
        }
    }
}

#[tokio::test]
async fn watcher_converges_with_concurrent_writers_and_random_reconnects() {
    let seed: u64 =
        std::env::var("FEED_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    println!("FEED_TEST_SEED={seed}");
    let h = Harness::start().await;
    let (_, owner) = h.account("feed@example.com").await;
    let org = h.organization(&owner, "Feed").await;
    let mut keyring = h.keyring().await;
    let internal = h.feed_token().await;
    let projects = [
        create_project(&mut keyring, &owner, &org, "Feed A").await.name,
        create_project(&mut keyring, &owner, &org, "Feed B").await.name,
    ];

    let watcher = Arc::new(Mutex::new(Watcher::default()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let watch_task = tokio::spawn(watch(h.keyring().await, internal.clone(), watcher.clone(), stop.clone(), seed));

    const WRITERS: usize = 4;
    const CHANGES: usize = 1000;
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let mut keyring = h.keyring().await;
        let owner = owner.clone();
        let project = projects[writer % 2].clone();
        writers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(writer as u64 + 1));
            let mut keys = Vec::new();
            for n in 0..CHANGES / WRITERS {
                random_change(&mut rng, &mut keyring, &owner, &project, &mut keys, writer, n).await;
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }

    let (expected, newest) = snapshot(&mut keyring, &internal).await;
    eventually("the watcher to catch up", Duration::from_secs(60), || {
        let caught_up = watcher.lock().unwrap().last >= newest;
        async move { caught_up.then_some(()) }
    })
    .await;
    stop.notify_waiters();
    let _ = watch_task.await;

    let (mirror, seen, first, reconnects) = {
        let w = watcher.lock().unwrap();
        (w.mirror.clone(), w.seen.clone(), w.first_snapshot.unwrap(), w.reconnects)
    };
    assert!(reconnects >= 5, "the watcher should have dropped its stream several times ({reconnects})");
    assert!(expected.keys.len() > 10, "the writers should have left keys behind");
    assert_eq!(mirror, expected, "watcher state differs from the database");

    // Change for change: every change committed after the first snapshot was applied once, in order.
    let (client, connection) = tokio_postgres::connect(&h.db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let committed: Vec<i64> = client
        .query("SELECT seq FROM keyring.changes WHERE seq > $1 ORDER BY seq", &[&first])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(committed.len() >= CHANGES - 10, "about {CHANGES} changes were made ({})", committed.len());
    assert_eq!(seen, committed);
}

#[tokio::test]
async fn a_pruned_sequence_gets_a_fresh_snapshot() {
    let h = Harness::start().await;
    let (_, owner) = h.account("prune@example.com").await;
    let org = h.organization(&owner, "Prune").await;
    let mut keyring = h.keyring().await;
    let internal = h.feed_token().await;
    let project = create_project(&mut keyring, &owner, &org, "Prune").await.name;
    create_key(&mut keyring, &owner, &project, "one").await;
    create_key(&mut keyring, &owner, &project, "two").await;

    // Resuming from a retained sequence gets only what follows.
    let mut stream =
        keyring.watch_keys(authed(&internal, pb::WatchKeysRequest { after_sequence: 1 })).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(Event::KeyUpserted(_))), "{first:?}");
    drop(stream);

    let pool = keyshare_runtime::db::pool(&h.db.url, 1).unwrap();
    let client = pool.get().await.unwrap();
    let pruned = keyshare_keyring::feed::prune(&client, chrono::Utc::now() + chrono::Duration::hours(1)).await.unwrap();
    assert!(pruned >= 3);
    let mut stream =
        keyring.watch_keys(authed(&internal, pb::WatchKeysRequest { after_sequence: 1 })).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(Event::SnapshotStart(_))), "{first:?}");
    let mut keys = 0;
    while let Some(message) = stream.message().await.unwrap() {
        match message.event.unwrap() {
            Event::KeyUpserted(_) => keys += 1,
            Event::SnapshotEnd(_) => break,
            _ => {}
        }
    }
    assert_eq!(keys, 2);
}

/// The last statement of the migration that made `feed_keys`: the one that fills it from the
/// key tables.
fn feed_keys_backfill() -> &'static str {
    let migration = include_str!("../migrations/V30__feed_keys.sql");
    &migration[migration.rfind("INSERT INTO keyring.feed_keys").unwrap()..]
}

/// Snapshots are read from `feed_keys`, which each change rewrites. After a run of random
/// changes (new keys, environment updates, regenerations with and without grace, deletions),
/// the snapshot equals one rebuilt from the key tables by the backfill migration's statement:
/// the table was kept by every write, and the migration writes what the feed writes.
#[tokio::test]
async fn the_snapshot_table_agrees_with_the_key_tables() {
    let h = Harness::start().await;
    let (_, owner) = h.account("table@example.com").await;
    let org = h.organization(&owner, "Table").await;
    let mut keyring = h.keyring().await;
    let internal = h.feed_token().await;
    let project = create_project(&mut keyring, &owner, &org, "Table").await.name;
    let mut rng = StdRng::seed_from_u64(7);
    let mut keys = Vec::new();
    for n in 0..200 {
        random_change(&mut rng, &mut keyring, &owner, &project, &mut keys, 0, n).await;
    }
    let (kept, _) = snapshot(&mut keyring, &internal).await;
    assert!(kept.keys.len() > 10, "the changes should have left keys behind ({})", kept.keys.len());
    assert_eq!(kept.keys.len(), keys.len());
    assert!(
        kept.keys.values().any(|k| k.credentials.iter().any(|c| c.grace_end_time.is_some())),
        "some regenerated credential should be in its grace period"
    );

    let (client, connection) = tokio_postgres::connect(&h.db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute("DELETE FROM keyring.feed_keys").await.unwrap();
    assert!(snapshot(&mut keyring, &internal).await.0.keys.is_empty());
    client.batch_execute(feed_keys_backfill()).await.unwrap();
    let (rebuilt, _) = snapshot(&mut keyring, &internal).await;
    assert_eq!(rebuilt, kept, "the backfill and the feed disagree");

    // A writer that knows nothing of the table (a replica of the release before it, during a
    // rolling upgrade) only inserts into the feed; the table follows all the same.
    let gone = kept.keys.keys().next().unwrap().clone();
    let name: keyshare_runtime::resource::KeyName = gone.parse().unwrap();
    client
        .execute(
            "INSERT INTO keyring.changes (seq, event) VALUES (nextval('keyring.change_seq'), $1)",
            &[&serde_json::json!({ "KeyRemoved": { "project": name.project, "key": name.key } })],
        )
        .await
        .unwrap();
    let (after, _) = snapshot(&mut keyring, &internal).await;
    assert_eq!(after.keys.len(), kept.keys.len() - 1);
    assert!(!after.keys.contains_key(&gone), "a removal recorded by another writer left the key in snapshots");
}
