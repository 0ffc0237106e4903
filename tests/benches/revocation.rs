//! Time from a change in keyring (deactivate; regenerate without grace; delete) to the first
//! check each authorizer replica rejects, against a plain CheckKey round trip measured in the
//! same run. Every replica follows keyring's feed on its own; a change has reached the fleet
//! when the slowest replica rejects.
//!
//! Run: `scripts/bench revocation`, or `cargo bench -p keyshare-system-tests --bench revocation`
//! (`REVOCATION_BENCH_CHANGES` sets the count, default 200 of each kind;
//! `REVOCATION_BENCH_REPLICAS` the replicas, default 3).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use keyshare_proto::authorizer::v1 as apb;
use keyshare_proto::keyring::v1 as pb;
use keyshare_system_tests::{Kind, authed, channel, percentile, serving};
use tonic::transport::Channel;

type Authorizer = apb::authorizer_service_client::AuthorizerServiceClient<Channel>;

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<44} n={:<4} p50={:>9.3?} p99={:>9.3?} max={:>9.3?}",
        samples.len(),
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples.last().copied().unwrap_or_default()
    );
}

async fn allowed(authorizer: &mut Authorizer, credential: &str) -> bool {
    authorizer
        .check_key(apb::CheckKeyRequest { key: credential.into(), method: "GET".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .allowed
}

/// Polls every replica at once until each answers `want` for `credential`; how long each took
/// from `since`.
async fn until_every_replica(replicas: &[Authorizer], credential: &str, want: bool, since: Instant) -> Vec<Duration> {
    let polls = replicas.iter().cloned().map(|mut replica| async move {
        while allowed(&mut replica, credential).await != want {}
        since.elapsed()
    });
    futures::future::join_all(polls).await
}

/// Per replica and for the slowest one: the samples of one kind of change.
struct Samples {
    per_replica: Vec<Vec<Duration>>,
    fleet: Vec<Duration>,
}

impl Samples {
    fn new(replicas: usize) -> Self {
        Self { per_replica: vec![Vec::new(); replicas], fleet: Vec::new() }
    }

    fn add(&mut self, times: Vec<Duration>) {
        self.fleet.push(times.iter().copied().max().unwrap_or_default());
        for (samples, time) in self.per_replica.iter_mut().zip(times) {
            samples.push(time);
        }
    }

    fn report(self, change: &str) {
        for (replica, samples) in self.per_replica.into_iter().enumerate() {
            report(&format!("{change}, replica {}", replica + 1), samples);
        }
        report(&format!("{change}, every replica (slowest)"), self.fleet);
    }
}

#[tokio::main]
async fn main() {
    let changes: usize = std::env::var("REVOCATION_BENCH_CHANGES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let replica_count: usize =
        std::env::var("REVOCATION_BENCH_REPLICAS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let mut stack = keyshare_system_tests::stack().await;
    let mut addrs = vec![stack.addr(Kind::Authorizer)];
    while addrs.len() < replica_count {
        addrs.push(stack.add(Kind::Authorizer, []).await.addr);
    }
    let token = stack.account("revoke@example.com").await.token;
    let created = stack.key(&token).await;
    let mut keyring = keyshare_system_tests::keyring(&stack).await;
    let key = created.name;
    let env = format!("{key}/environments/production");
    let mut replicas = Vec::new();
    for addr in &addrs {
        serving(*addr, Duration::from_secs(60)).await;
        replicas.push(Authorizer::new(channel(*addr).await));
    }
    // Every replica knows the key.
    let mut credential = created.production;
    tokio::time::timeout(Duration::from_secs(30), until_every_replica(&replicas, &credential, true, Instant::now()))
        .await
        .expect("a replica never loaded the key");

    let mut baseline = Vec::new();
    for _ in 0..changes {
        let start = Instant::now();
        assert!(allowed(&mut replicas[0], &credential).await);
        baseline.push(start.elapsed());
    }

    let toggle = |active: bool| pb::UpdateKeyEnvironmentRequest {
        environment: Some(pb::KeyEnvironment { name: env.clone(), active, ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["active".into()] }),
        etag: String::new(),
    };
    let mut deactivate = Samples::new(replica_count);
    let mut regenerate = Samples::new(replica_count);
    for _ in 0..changes {
        keyring.update_key_environment(authed(&token, toggle(false))).await.unwrap();
        deactivate.add(until_every_replica(&replicas, &credential, false, Instant::now()).await);
        keyring.update_key_environment(authed(&token, toggle(true))).await.unwrap();
        until_every_replica(&replicas, &credential, true, Instant::now()).await;

        let fresh = keyring
            .regenerate_credential(authed(
                &token,
                pb::RegenerateCredentialRequest { name: env.clone(), grace_period: None },
            ))
            .await
            .unwrap()
            .into_inner()
            .credential;
        regenerate.add(until_every_replica(&replicas, &credential, false, Instant::now()).await);
        credential = fresh;
        until_every_replica(&replicas, &credential, true, Instant::now()).await;
    }

    // Delete: each round creates a key in the same project, waits until every replica allows
    // it, deletes it.
    let project = key.split("/keys/").next().unwrap().to_owned();
    let mut delete = Samples::new(replica_count);
    for round in 0..changes {
        let created = keyring
            .create_key(authed(
                &token,
                pb::CreateKeyRequest {
                    parent: project.clone(),
                    key: Some(pb::Key { display_name: format!("doomed {round}"), ..Default::default() }),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let doomed = created.production_credential;
        until_every_replica(&replicas, &doomed, true, Instant::now()).await;
        let name = created.key.unwrap().name;
        keyring.delete_key(authed(&token, pb::DeleteKeyRequest { name, etag: String::new() })).await.unwrap();
        delete.add(until_every_replica(&replicas, &doomed, false, Instant::now()).await);
    }
    println!("change committed (RPC returned) → first rejected check, {replica_count} replicas on one machine:");
    report("baseline: one CheckKey round trip", baseline);
    deactivate.report("deactivate → rejected");
    regenerate.report("regenerate (no grace) → old one rejected");
    delete.report("delete → rejected");
}
