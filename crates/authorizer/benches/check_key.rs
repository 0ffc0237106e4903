//! CheckKey under load, against a bare tonic server answering a message of the same size (the
//! baseline), both measured in this run with h2load on this machine:
//! - throughput at saturation (ratio to the baseline), the servers driven in turn, twice; also
//!   the same handler on a bare tonic server, which tells the check's cost from the stack's,
//! - p50/p99 latency at a moderate load (one request at a time), from h2load's `--log-file`,
//! - with 1,000 and with 1,000,000 keys in memory (a sandbox and a production credential
//!   each, as keyring issues them), and the memory each key takes.
//!
//! CheckKey runs as in production: every check of a known key goes to the usage writer, which
//! writes counts and call logs to a real PostgreSQL database on this same machine.
//!
//! Run: `cargo bench -p keyshare-authorizer --bench check_key` (needs `h2load`, Debian's
//! `nghttp2-client`; `scripts/bench` installs it). `CHECK_BENCH_KEYS=1000,1000000` sets the sizes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use keyshare_authorizer::check::Checker;
use keyshare_authorizer::index::NewCredential;
use keyshare_authorizer::state::Shared;
use keyshare_authorizer::usage::{self, UsageConfig, UsageMetrics};
use keyshare_proto::authorizer::v1 as pb;
use keyshare_proto::authorizer::v1::authorizer_service_server::{AuthorizerService, AuthorizerServiceServer};
use keyshare_runtime::auth::{KeySource, PublicKeyMaterial, TokenPolicy, TokenVerifier};
use keyshare_runtime::clock::SystemClock;
use keyshare_runtime::config::{CommonConfig, Env};
use keyshare_runtime::credential::{Credential, Environment};
use keyshare_runtime::metrics::Metrics;
use keyshare_runtime::server::{self, ServeOptions};
use keyshare_runtime::testkit::{self, H2loadRun, TestDatabase};
use prost::Message;
use uuid::Uuid;

/// The baseline: answers every call with a fixed response of the real answer's size.
struct Bare(pb::CheckKeyResponse);

#[tonic::async_trait]
impl AuthorizerService for Bare {
    async fn check_key(
        &self,
        _request: tonic::Request<pb::CheckKeyRequest>,
    ) -> Result<tonic::Response<pb::CheckKeyResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.0.clone()))
    }
}

struct NoKeys;

impl KeySource for NoKeys {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Vec<PublicKeyMaterial>, String>> + Send + '_>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

const PROJECT: &str = "0193f7e2-0000-7000-8000-000000000001";

/// Loads `keys` keys (a sandbox and a production credential each) into a fresh index; returns
/// one valid production credential and the memory per key: by resident memory, and by what
/// the index's vectors and tables hold.
fn load(shared: &Shared, keys: usize) -> (String, f64, f64) {
    let project = Uuid::parse_str(PROJECT).unwrap();
    let credential = |environment| NewCredential::unrestricted([0; 32], environment);
    let before = rss_bytes();
    let mut sample = String::new();
    let held = {
        let mut index = shared.index.write().unwrap();
        for n in 0..keys {
            let production = Credential::generate(Environment::Production);
            let sandbox = Credential::generate(Environment::Sandbox);
            let credentials = vec![
                NewCredential { sha256: sandbox.hash(), ..credential(Environment::Sandbox) },
                NewCredential { sha256: production.hash(), ..credential(Environment::Production) },
            ];
            index.upsert_key(Uuid::now_v7(), project, credentials);
            if n == keys / 2 {
                sample = production.expose().to_owned();
            }
        }
        index.key_bytes()
    };
    let per_key = (rss_bytes().saturating_sub(before)) as f64 / keys as f64;
    (sample, per_key, held as f64 / keys as f64)
}

/// The authorizer's CheckKey as it serves: Keyshare's server stack (request id, span, metrics,
/// concurrency limit, authentication, timeout) and usage written to PostgreSQL. Also returns
/// its checker, for [`serve_handler_only`].
async fn serve_real(shared: Arc<Shared>, database_url: &str) -> (u16, Arc<UsageMetrics>, Checker) {
    let env = Env::from_pairs([
        ("DATABASE_URL", "postgres://unused"),
        ("KEYSHARE_LISTEN_ADDR", "127.0.0.1:0"),
        ("KEYSHARE_METRICS_ADDR", "127.0.0.1:0"),
    ]);
    let config = CommonConfig::from_env(&env, "authorizer", 50054).unwrap();
    let bound = server::bind(&config, keyshare_authorizer::GRPC_SERVICE).await.unwrap();
    let port = bound.local_addr().port();
    let verifier =
        TokenVerifier::new(NoKeys, TokenPolicy { issuer: "i".into(), audience: "a".into() }, Arc::new(SystemClock));
    let options = ServeOptions {
        config,
        metrics: Metrics::new("bench"),
        verifier,
        ready_on_start: true,
        untraced_methods: keyshare_authorizer::CHECK_METHODS,
        stack: server::Stack::Checks,
    };
    let pool = keyshare_runtime::db::pool(database_url, 4).unwrap();
    let (recorder, writer) =
        usage::channel(pool, database_url.to_owned(), shared.clone(), Arc::new(SystemClock), UsageConfig::default());
    let usage = writer.metrics();
    let (_stop, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _stop = _stop;
        writer.run(stopping).await
    });
    let checker = Checker::new(shared, Arc::new(SystemClock), recorder);
    let grpc = keyshare_authorizer::grpc::AuthorizerGrpc::new(checker.clone());
    tokio::spawn(bound.serve(
        options,
        |routes| routes.add_service(AuthorizerServiceServer::new(grpc)),
        std::future::pending(),
    ));
    (port, usage, checker)
}

/// The same CheckKey handler and usage recording on a bare tonic server: what the check costs
/// without Keyshare's server stack, to tell the two apart.
async fn serve_handler_only(checker: Checker) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let grpc = keyshare_authorizer::grpc::AuthorizerGrpc::new(checker);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AuthorizerServiceServer::new(grpc))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    port
}

async fn serve_bare(response: pb::CheckKeyResponse) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AuthorizerServiceServer::new(Bare(response)))
            // The same TCP settings as every Keyshare server (Nagle off).
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    port
}

fn h2load(port: u16, body: &std::path::Path, args: &[&str], latencies: bool) -> H2loadRun {
    testkit::h2load(
        &format!("http://127.0.0.1:{port}/keyshare.authorizer.v1.AuthorizerService/CheckKey"),
        body,
        args,
        latencies,
    )
}

fn main() {
    let sizes: Vec<usize> = std::env::var("CHECK_BENCH_KEYS")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 1_000_000]);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = std::env::temp_dir().join(format!("check-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The telemetry a deployment runs with: `info`, JSON logs (no trace export).
    let env = Env::from_pairs([
        ("RUST_LOG", "info,tokio_postgres=warn,refinery_core=warn,deadpool=error"),
        ("KEYSHARE_LOG_FORMAT", "json"),
    ]);
    let _telemetry = keyshare_runtime::telemetry::init("bench", &env).unwrap();
    println!("CheckKey vs a bare tonic server (same message sizes), h2load on one machine");
    let database = runtime.block_on(TestDatabase::create());
    for keys in sizes {
        let shared = Arc::new(Shared::default());
        let loading = std::time::Instant::now();
        let (credential, per_key, held_per_key) = load(&shared, keys);
        let loaded_in = loading.elapsed();
        let request = pb::CheckKeyRequest {
            key: credential,
            project: format!("projects/{PROJECT}"),
            method: "GET".into(),
            path: "/v1/things".into(),
            client_ip: "198.51.100.7".into(),
            environment: pb::Environment::Production as i32,
        };
        let (real_port, expected, usage, checker) = runtime.block_on(async {
            let (port, usage, checker) = serve_real(shared.clone(), &database.url).await;
            let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let answer = pb::authorizer_service_client::AuthorizerServiceClient::new(channel)
                .check_key(request.clone())
                .await
                .unwrap()
                .into_inner();
            assert_eq!(answer.outcome, pb::Outcome::Valid as i32, "the benchmark checks a valid key");
            (port, answer, usage, checker)
        });
        let bare_port = runtime.block_on(serve_bare(expected));
        let handler_port = runtime.block_on(serve_handler_only(checker));
        let body = testkit::grpc_body(&dir, "request.bin", &request.encode_to_vec());
        let saturate = ["-n", "200000", "-c", "4", "-m", "32", "-t", "1"];
        let moderate = ["-n", "20000", "-c", "1", "-m", "1", "-t", "1"];
        // Warm both, then measure each in turn.
        h2load(bare_port, &body, &["-n", "20000", "-c", "4", "-m", "32"], false);
        h2load(real_port, &body, &["-n", "20000", "-c", "4", "-m", "32"], false);
        h2load(handler_port, &body, &["-n", "20000", "-c", "4", "-m", "32"], false);
        // In turn, twice, so that drift on a noisy machine hits all alike.
        let (mut bare_rps, mut real_rps, mut handler_rps) = (0.0, 0.0, 0.0);
        let (mut bare_lat, mut real_lat) = (H2loadRun::default(), H2loadRun::default());
        for _ in 0..2 {
            bare_rps += h2load(bare_port, &body, &saturate, false).requests_per_second / 2.0;
            real_rps += h2load(real_port, &body, &saturate, false).requests_per_second / 2.0;
            handler_rps += h2load(handler_port, &body, &saturate, false).requests_per_second / 2.0;
        }
        for _ in 0..2 {
            bare_lat.latencies_us.extend(h2load(bare_port, &body, &moderate, true).latencies_us);
            real_lat.latencies_us.extend(h2load(real_port, &body, &moderate, true).latencies_us);
        }
        bare_lat.latencies_us.sort_unstable();
        real_lat.latencies_us.sort_unstable();
        // Resident memory grows in pages and allocator arenas: a small index moves it by too
        // little to divide by.
        if keys >= 100_000 {
            println!(
                "{keys:>9} keys: memory {per_key:.0} B/key resident, {held_per_key:.0} B/key held by the index (loaded in {loaded_in:.1?})"
            );
        } else {
            println!(
                "{keys:>9} keys: {held_per_key:.0} B/key held by the index (resident memory moves too little to divide by)"
            );
        }
        println!(
            "  saturation  baseline {bare_rps:>9.0} req/s   CheckKey {real_rps:>9.0} req/s   ratio {:.2}",
            real_rps / bare_rps.max(1.0)
        );
        println!(
            "  saturation  the same handler and usage on a bare tonic server (no Keyshare stack) {handler_rps:>9.0} req/s   ratio {:.2}",
            handler_rps / bare_rps.max(1.0)
        );
        println!(
            "  one at a time  baseline p50 {} µs p99 {} µs   CheckKey p50 {} µs p99 {} µs",
            bare_lat.percentile_us(50.0),
            bare_lat.percentile_us(99.0),
            real_lat.percentile_us(50.0),
            real_lat.percentile_us(99.0)
        );
        std::thread::sleep(Duration::from_millis(1500));
        println!(
            "  usage: {} call logs written, {} records dropped (channel full), {} log lines dropped",
            usage.written_call_logs.get(),
            usage.dropped_records.get(),
            usage.dropped_call_logs.get()
        );
        drop(shared);
        std::thread::sleep(Duration::from_millis(200));
    }
}
