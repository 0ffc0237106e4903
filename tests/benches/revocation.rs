//! Time from a change in keyring (deactivate; regenerate without grace; delete) to the first
//! check the authorizer rejects, against a plain CheckKey round trip measured in the same run.
//!
//! Run: `cargo bench -p keyshare-system-tests --bench revocation` (`REVOCATION_BENCH_CHANGES`
//! sets the count, default 200 of each kind).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use keyshare_proto::authorizer::v1 as apb;
use keyshare_proto::keyring::v1 as pb;
use keyshare_system_tests::{Stack, authed, percentile};

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<40} n={:<4} p50={:>9.3?} p99={:>9.3?} max={:>9.3?}",
        samples.len(),
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples.last().copied().unwrap_or_default()
    );
}

#[tokio::main]
async fn main() {
    let changes: usize = std::env::var("REVOCATION_BENCH_CHANGES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let stack = Stack::start().await;
    let token = stack.account("revoke@example.com").await;
    let (mut keyring, created) = stack.key(&token).await;
    let key = created.key.unwrap().name;
    let env = format!("{key}/environments/production");
    let mut authorizer =
        apb::authorizer_service_client::AuthorizerServiceClient::new(Stack::channel(stack.authorizer).await);
    let mut check = async |credential: &str| {
        authorizer
            .check_key(apb::CheckKeyRequest { key: credential.into(), method: "GET".into(), ..Default::default() })
            .await
            .unwrap()
            .into_inner()
            .allowed
    };
    // Wait for the authorizer's first snapshot.
    let mut credential = created.production_credential;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check(&credential).await {
        assert!(Instant::now() < deadline, "the authorizer never loaded the key");
    }

    let mut baseline = Vec::new();
    for _ in 0..changes {
        let start = Instant::now();
        assert!(check(&credential).await);
        baseline.push(start.elapsed());
    }

    let toggle = |active: bool| pb::UpdateKeyEnvironmentRequest {
        environment: Some(pb::KeyEnvironment { name: env.clone(), active, ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["active".into()] }),
        etag: String::new(),
    };
    let mut deactivate = Vec::new();
    let mut regenerate = Vec::new();
    for _ in 0..changes {
        keyring.update_key_environment(authed(&token, toggle(false))).await.unwrap();
        let changed = Instant::now();
        while check(&credential).await {}
        deactivate.push(changed.elapsed());
        keyring.update_key_environment(authed(&token, toggle(true))).await.unwrap();
        while !check(&credential).await {}

        let fresh = keyring
            .regenerate_credential(authed(
                &token,
                pb::RegenerateCredentialRequest { name: env.clone(), grace_period: None },
            ))
            .await
            .unwrap()
            .into_inner()
            .credential;
        let changed = Instant::now();
        while check(&credential).await {}
        regenerate.push(changed.elapsed());
        credential = fresh;
        while !check(&credential).await {}
    }

    // Delete: each round creates a key in the same project, waits until it is allowed, deletes it.
    let project = key.split("/keys/").next().unwrap().to_owned();
    let mut delete = Vec::new();
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
        while !check(&doomed).await {}
        let name = created.key.unwrap().name;
        keyring.delete_key(authed(&token, pb::DeleteKeyRequest { name, etag: String::new() })).await.unwrap();
        let changed = Instant::now();
        while check(&doomed).await {}
        delete.push(changed.elapsed());
    }
    println!("change committed (RPC returned) → first rejected check, one machine:");
    report("baseline: one CheckKey round trip", baseline);
    report("deactivate → rejected", deactivate);
    report("regenerate (no grace) → old one rejected", regenerate);
    report("delete → rejected", delete);
}
