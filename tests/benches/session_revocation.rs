//! Time from a logout to the first call keyring refuses with the logged-out access token,
//! against a plain GetProject round trip with a live token measured in the same run. The
//! logout travels identity's session-revocation feed (trigger, NOTIFY, stream) to keyring's
//! follower. Printed from the Logout call's start and from its answer.
//!
//! Run: `scripts/bench sessions`, or `cargo bench -p keyshare-system-tests --bench
//! session_revocation` (`SESSION_BENCH_LOGOUTS` sets the count, default 100).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use keyshare_proto::identity::v1 as idpb;
use keyshare_proto::keyring::v1 as pb;
use keyshare_system_tests::{Kind, authed, percentile};
use tonic::Code;

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

#[tokio::main]
async fn main() {
    let logouts: usize = std::env::var("SESSION_BENCH_LOGOUTS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let stack = keyshare_system_tests::stack().await;
    let email = "logout@example.com";
    let owner = stack.account(email).await.token;
    let created = stack.key(&owner).await;
    let mut keyring = keyshare_system_tests::keyring(&stack).await;
    let project = created.project;
    let mut identity = idpb::identity_service_client::IdentityServiceClient::new(stack.channel(Kind::Identity).await);
    let get = |token: &str| authed(token, pb::GetProjectRequest { name: project.clone() });

    let mut baseline = Vec::new();
    for _ in 0..logouts {
        let start = Instant::now();
        keyring.get_project(get(&owner)).await.unwrap();
        baseline.push(start.elapsed());
    }

    let (mut refused, mut logout_calls, mut after_answer) = (Vec::new(), Vec::new(), Vec::new());
    let mut polls = 0usize;
    for _ in 0..logouts {
        let grant = identity
            .login(idpb::LoginRequest { email: email.into(), password: keyshare_system_tests::PASSWORD.into() })
            .await
            .unwrap()
            .into_inner()
            .grant
            .unwrap();
        keyring.get_project(get(&grant.access_token)).await.unwrap();
        let start = Instant::now();
        identity.logout(idpb::LogoutRequest { refresh_token: grant.refresh_token }).await.unwrap();
        let answered = Instant::now();
        loop {
            polls += 1;
            match keyring.get_project(get(&grant.access_token)).await {
                Ok(_) => assert!(start.elapsed() < Duration::from_secs(30), "a logout never reached keyring"),
                Err(status) if status.code() == Code::Unauthenticated => break,
                Err(status) => panic!("unexpected answer: {status:?}"),
            }
        }
        refused.push(start.elapsed());
        logout_calls.push(answered - start);
        after_answer.push(answered.elapsed());
    }
    report("GetProject, live token (baseline)", baseline);
    report("Logout call alone", logout_calls);
    report("logout → first refused GetProject", refused);
    report("Logout answered → first refused GetProject", after_answer);
    println!("{polls} GetProject calls polled for {logouts} logouts");
}
