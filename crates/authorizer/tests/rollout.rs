//! Rollouts and scale-in with no failed call: two authorizer replicas (real processes) behind
//! the shipped Envoy configuration, with its active gRPC health checks; one is stopped with
//! SIGTERM and started again while calls flow through the gateway.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::envoy::*;
use common::process::AuthorizerProcess;
use common::*;
use keyshare_runtime::testkit::eventually;

/// Calls through the gateway without pause, from a few clients, until stopped: (answered,
/// answers other than 200).
struct GatewayLoad {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl GatewayLoad {
    fn start(port: u16, credential: &str, clients: usize) -> Self {
        let (stop, answered, failed) = (Arc::new(AtomicBool::new(false)), Arc::default(), Arc::default());
        let tasks = (0..clients)
            .map(|_| {
                let (stop, answered, failed): (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>) =
                    (stop.clone(), Arc::clone(&answered), Arc::clone(&failed));
                let credential = credential.to_owned();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let status = call(port, "GET", &[("x-api-key", &credential)]).await.map(|(s, _, _)| s);
                        answered.fetch_add(1, Ordering::Relaxed);
                        if status != Some(200) {
                            failed.fetch_add(1, Ordering::Relaxed);
                            eprintln!("gateway answered {status:?}");
                        }
                    }
                })
            })
            .collect();
        Self { stop, answered, failed, tasks }
    }

    fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        (self.answered.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

/// Waits until the replica has answered more checks than `before`; returns how many it has.
async fn answers_checks(replica: &AuthorizerProcess, before: f64) -> f64 {
    eventually("the replica to answer checks", Duration::from_secs(30), || async move {
        replica.metric("keyshare_checks_total").await.filter(|checks| *checks > before)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_under_load_fails_no_call_at_the_gateway() {
    let (w, project, _key, _, production) = world().await;
    // Envoy checks health each second: 3 s of answering after NOT_SERVING is a wide margin.
    let drain = [Setting::DrainDelay(Duration::from_secs(3))];
    let mut restarted = AuthorizerProcess::start(&w, drain.clone()).await;
    let steady = AuthorizerProcess::start(&w, drain).await;
    let upstream = echo_upstream().await;
    let (_envoy, port) = start_envoy_at(&project, upstream, &[restarted.addr.port(), steady.addr.port()]).await;
    eventually("the gateway to admit the key", Duration::from_secs(30), || {
        let production = production.clone();
        async move { (call(port, "GET", &[("x-api-key", &production)]).await?.0 == 200).then_some(()) }
    })
    .await;

    let load = GatewayLoad::start(port, &production, 4);
    // Both replicas take checks before one of them is stopped.
    answers_checks(&restarted, 0.0).await;
    answers_checks(&steady, 0.0).await;
    let status = restarted.terminate().await;
    assert!(status.success(), "a drained replica exits 0: {status}");
    let during_restart = load.answered();
    restarted.restart().await;
    // Back in the gateway's rotation: the new process answers checks of its own.
    answers_checks(&restarted, 0.0).await;
    let (answered, failed) = load.finish().await;
    assert!(answered > during_restart, "no call went through while the replica was away");
    assert_eq!(failed, 0, "{failed} of {answered} calls through the gateway were not answered 200");
}
