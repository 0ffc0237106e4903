//! Limits across replicas: three authorizers sharing rate limits and quotas through a Redis
//! server of this run's own, behind a real Envoy (the shipped `deploy/envoy/envoy.yaml`, its
//! authorizer cluster given the three replicas, round robin), measured with h2load:
//! - a key's rate limit of 10/s and of 1,000/s, driven at 5× the limit for `FLEET_BENCH_SECS`
//!   (default 20) with the replicas weighted evenly and 90/5/5: admitted calls against the
//!   promise, limit × duration × 1.10 + burst (one limit's worth);
//! - a key's daily and a project's monthly quota of 2,000, driven with 4,000 calls as fast as
//!   the gateway takes them, evenly and 90/5/5: admitted against quota + max(1 %, 5 calls);
//! - CheckKey throughput at saturation on one replica sharing limits (a key with a rate limit
//!   and a daily quota it never reaches, so every check takes both leases) against a replica
//!   of the same process without Redis, driven in turn, twice.
//!
//! Run: `cargo bench -p keyshare-system-tests --bench fleet_limits` (needs `h2load`, Envoy and
//! `redis-server`; `scripts/bench fleet` installs them). Nothing is asserted; the table says
//! whether each run kept the promise.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keyshare_proto::authorizer::v1 as pb;
use keyshare_proto::keyring::v1 as krpb;
use keyshare_runtime::testkit::{
    Envoy, EnvoySite, RedisServer, envoy_config, free_port, http_call, scrape, shipped_envoy_yaml,
};
use keyshare_system_tests::{Kind, Setting, authed};
use prost::Message;

const REPLICAS: usize = 3;

#[tokio::main]
async fn main() {
    let secs: u64 = setting("FLEET_BENCH_SECS", 20);
    let dir = tempfile::tempdir().unwrap();
    let stack = keyshare_system_tests::stack().await;
    let token = stack.account("fleet-bench@example.com").await.token;
    let redis = RedisServer::start();

    // One project behind the gateway, a key per run; a second project for the monthly quota.
    let probe = stack.key(&token).await;
    let mut keyring = keyshare_system_tests::keyring(&stack).await;
    let project = probe.project;
    let probe = probe.production;
    let mut rate_runs = Vec::new();
    for limit in [10, 1_000] {
        for weights in [[1, 1, 1], [90, 5, 5]] {
            let credential = key(&mut keyring, &token, &project, |e| e.rate_limit_per_second = limit).await;
            rate_runs.push((limit, weights, credential));
        }
    }
    let mut daily_runs = Vec::new();
    for weights in [[1, 1, 1], [90, 5, 5]] {
        daily_runs.push((
            weights,
            project.clone(),
            key(&mut keyring, &token, &project, |e| e.daily_quota = 2_000).await,
        ));
    }
    let mut monthly_runs = Vec::new();
    for weights in [[1, 1, 1], [90, 5, 5]] {
        let created = stack.key(&token).await;
        let name = created.name;
        let monthly_project = name.split("/keys/").next().unwrap().to_owned();
        let limits = krpb::ProjectEnvironmentLimits { rate_limit_per_second: 0, monthly_quota: 2_000 };
        let update = krpb::UpdateProjectRequest {
            project: Some(krpb::Project {
                name: monthly_project.clone(),
                production: Some(limits),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["production.monthly_quota".into()] }),
        };
        keyring.update_project(authed(&token, update)).await.unwrap();
        monthly_runs.push((weights, monthly_project, created.production));
    }
    let throughput_key = key(&mut keyring, &token, &project, |e| {
        e.rate_limit_per_second = 1_000_000;
        e.daily_quota = 1_000_000_000;
    })
    .await;

    // The replicas start after every limit is set, so their first snapshot has them all.
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        replicas.push(stack.launch(Kind::Authorizer, [Setting::RedisUrl(redis.url())]).await);
    }
    for replica in &replicas {
        wait_for_metric(replica.metrics_addr, "keyshare_limits_replicas", REPLICAS as f64).await;
    }
    let ports: Vec<u16> = replicas.iter().map(|r| r.addr.port()).collect();
    let upstream = serve_upstream().await;

    println!(
        "{REPLICAS} authorizers sharing limits through Redis behind Envoy (deploy/envoy/envoy.yaml, round robin \
         over the replicas by weight), h2load --h1 on one machine"
    );
    println!(
        "{:<32} {:>7} {:>9} {:>8} {:>9} {:>9} {:>7}  kept",
        "run", "limit", "offered/s", "secs", "admitted", "promise", "ratio"
    );
    for (limit, weights, credential) in &rate_runs {
        let envoy = Gateway::start(&dir, upstream, &ports, *weights, &project, &probe).await;
        let clients = if *limit >= 100 { 10 } else { 1 };
        let rate = 5 * limit / clients;
        let run = h2load(
            envoy.port,
            credential,
            &["-c", &clients.to_string(), "--rps", &rate.to_string(), "-D", &secs.to_string()],
        );
        let promise = *limit as f64 * run.secs * 1.10 + *limit as f64;
        print_row(&format!("rate {limit}/s, {}", spread(*weights)), *limit, &run, promise);
    }
    for (kind, runs) in [("daily quota", &daily_runs), ("monthly quota", &monthly_runs)] {
        for (weights, gateway_project, credential) in runs.iter() {
            let envoy = Gateway::start(&dir, upstream, &ports, *weights, gateway_project, credential).await;
            let run = h2load(envoy.port, credential, &["-c", "8", "--rps", "250", "-n", "4000"]);
            // The probe that found Envoy ready spent one call of the quota.
            let run = Run { ok: run.ok + envoy.probe_calls, ..run };
            let promise = 2_000.0 + (2_000.0 * 0.01f64).max(5.0);
            print_row(&format!("{kind} 2000, {}", spread(*weights)), 2_000, &run, promise);
        }
    }

    // Throughput with shared limits on (replica 1) and off (a replica without Redis).
    let local = stack.launch(Kind::Authorizer, []).await;
    let body = grpc_body(dir.path(), &throughput_key);
    let saturate = ["-c", "4", "-m", "32", "-D", "5"];
    for port in [replicas[0].addr.port(), local.addr.port()] {
        wait_until_valid(port, &body).await;
        grpc_h2load(port, &body, &["-c", "4", "-m", "32", "-n", "20000"]);
    }
    let (mut on, mut off) = (0.0, 0.0);
    for _ in 0..2 {
        on += grpc_h2load(replicas[0].addr.port(), &body, &saturate) / 2.0;
        off += grpc_h2load(local.addr.port(), &body, &saturate) / 2.0;
    }
    println!(
        "CheckKey at saturation (h2load -c 4 -m 32, 5 s, twice each, in turn): shared limits on {on:.0}/s, \
         off {off:.0}/s, ratio {:.3}",
        on / off.max(1.0)
    );
    let fallback: f64 = {
        let mut sum = 0.0;
        for replica in &replicas {
            sum += metric(replica.metrics_addr, "keyshare_limits_fallback_grants_total").await;
        }
        sum
    };
    println!("calls granted by a replica alone (store away) during the runs: {fallback}");
}

fn spread(weights: [u32; 3]) -> String {
    if weights[0] == weights[1] { "even".into() } else { format!("{}/{}/{}", weights[0], weights[1], weights[2]) }
}

fn print_row(name: &str, limit: i64, run: &Run, promise: f64) {
    let offered = run.requests as f64 / run.secs.max(0.001);
    let extra = if run.errors > 0 { format!("  ({} 5xx or unanswered)", run.errors) } else { String::new() };
    println!(
        "{name:<32} {limit:>7} {offered:>9.0} {:>8.2} {:>9} {promise:>9.0} {:>7.3}  {}{extra}",
        run.secs,
        run.ok,
        run.ok as f64 / promise,
        if run.ok as f64 <= promise { "yes" } else { "NO" }
    );
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Creates a key in `project` whose production environment `edit` sets; its production
/// credential.
async fn key(
    keyring: &mut krpb::keyring_service_client::KeyringServiceClient<tonic::transport::Channel>,
    token: &str,
    project: &str,
    edit: impl FnOnce(&mut krpb::KeyEnvironment),
) -> String {
    let request = krpb::CreateKeyRequest {
        parent: project.to_owned(),
        // Key names are unique in a project.
        key: Some(krpb::Key { display_name: format!("fleet bench {}", uuid::Uuid::new_v4()), ..Default::default() }),
        ..Default::default()
    };
    let created = keyring.create_key(authed(token, request)).await.unwrap().into_inner();
    let name = created.key.unwrap().name;
    let mut environment =
        krpb::KeyEnvironment { name: format!("{name}/environments/production"), ..Default::default() };
    edit(&mut environment);
    let mut paths = Vec::new();
    if environment.rate_limit_per_second != 0 {
        paths.push("rate_limit_per_second".to_owned());
    }
    if environment.daily_quota != 0 {
        paths.push("daily_quota".to_owned());
    }
    let request = krpb::UpdateKeyEnvironmentRequest {
        environment: Some(environment),
        update_mask: Some(prost_types::FieldMask { paths }),
        etag: String::new(),
    };
    keyring.update_key_environment(authed(token, request)).await.unwrap();
    created.production_credential
}

async fn metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    scrape(addr)
        .await
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_for_metric(addr: std::net::SocketAddr, name: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(addr, name).await != value {
        assert!(Instant::now() < deadline, "{name} did not reach {value} within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An upstream that answers every HTTP/1.1 request with 200.
async fn serve_upstream() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 8192];
                let mut seen = Vec::new();
                loop {
                    let Ok(n) = stream.read(&mut buffer).await else { return };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buffer[..n]);
                    // Requests carry no body: answer each complete head.
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

/// An Envoy with the shipped configuration, its authorizer cluster the replicas at `ports`
/// weighted by `weights`; killed when dropped.
struct Gateway {
    _envoy: Envoy,
    port: u16,
    /// Calls of `credential` that reached the upstream while waiting for Envoy to be ready.
    probe_calls: u64,
}

impl Gateway {
    async fn start(
        dir: &tempfile::TempDir,
        upstream: u16,
        ports: &[u16],
        weights: [u32; 3],
        project: &str,
        credential: &str,
    ) -> Self {
        let port = free_port();
        let authorizers: Vec<(u16, u32)> = ports.iter().copied().zip(weights).collect();
        let site = EnvoySite { listen: port, admin: free_port(), upstream, authorizers: &authorizers, project };
        let config = envoy_config(&shipped_envoy_yaml(), &site);
        let mut envoy = Envoy::start(&format!("envoy-{port}"), &config, port, dir.path());
        envoy.wait_until("a 200", || async { get(port, credential).await == Some(200) }).await;
        Self { _envoy: envoy, port, probe_calls: 1 }
    }
}

async fn get(port: u16, credential: &str) -> Option<u16> {
    http_call(port, "GET", "/v1/things", &[("x-api-key", credential)]).await.map(|(status, _, _)| status)
}

/// What h2load counted.
#[derive(Debug)]
struct Run {
    requests: u64,
    ok: u64,
    /// Neither 2xx nor a 429: failed requests, 5xx (the gateway could not ask), other 4xx.
    errors: u64,
    secs: f64,
}

/// The number before `suffix` in h2load's line starting with `prefix`.
fn count(text: &str, prefix: &str, suffix: &str) -> u64 {
    let line = text.lines().find(|l| l.starts_with(prefix)).unwrap_or_default();
    line.split(", ")
        .find_map(|part| part.trim().strip_suffix(suffix)?.trim().rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn h2load(port: u16, credential: &str, args: &[&str]) -> Run {
    let out = Command::new("h2load")
        .args(["--h1", "-t", "1", "-H"])
        .arg(format!("x-api-key: {credential}"))
        .args(args)
        .arg(format!("http://127.0.0.1:{port}/v1/things"))
        .output()
        .expect("h2load is installed (scripts/bench installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let secs = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(',').next())
        .and_then(|t| {
            t.strip_suffix("ms")
                .and_then(|ms| ms.parse::<f64>().ok().map(|ms| ms / 1000.0))
                .or_else(|| t.strip_suffix('s')?.parse().ok())
        })
        .unwrap_or(0.0);
    // Every 4xx here is a 429: each run's credential is valid at its gateway.
    let ok = count(&text, "status codes:", "2xx");
    let server = count(&text, "status codes:", "5xx");
    // h2load's "failed" counts every answer outside 2xx/3xx, the 429s too: only what never got
    // an answer (errored, timed out) and 5xx are failures of the gateway.
    let failed = count(&text, "requests:", "errored") + count(&text, "requests:", "timeout");
    let requests = count(&text, "requests:", "done");
    Run { requests, ok, errors: server + failed, secs }
}

fn grpc_body(dir: &Path, credential: &str) -> PathBuf {
    let request = pb::CheckKeyRequest {
        key: credential.into(),
        method: "GET".into(),
        path: "/v1/things".into(),
        ..Default::default()
    };
    let message = request.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let path = dir.join("check.bin");
    std::fs::write(&path, framed).unwrap();
    path
}

/// Waits until a replica answers CheckKey for the throughput key (it has loaded its snapshot).
async fn wait_until_valid(port: u16, body: &Path) {
    let framed = std::fs::read(body).unwrap();
    let request = pb::CheckKeyRequest::decode(&framed[5..]).unwrap();
    let channel = keyshare_system_tests::channel(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await;
    let mut client = pb::authorizer_service_client::AuthorizerServiceClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = client.check_key(request.clone()).await.map(|a| a.into_inner().outcome);
        if answer.as_ref().is_ok_and(|o| *o == pb::Outcome::Valid as i32) {
            return;
        }
        assert!(Instant::now() < deadline, "the replica on {port} did not admit the key within 60 s: {answer:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CheckKey over gRPC with h2load; requests per second.
fn grpc_h2load(port: u16, body: &Path, args: &[&str]) -> f64 {
    let out = Command::new("h2load")
        .args(args)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers", "-d"])
        .arg(body)
        .arg(format!("http://127.0.0.1:{port}/keyshare.authorizer.v1.AuthorizerService/CheckKey"))
        .output()
        .expect("h2load is installed (scripts/bench installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0 failed, 0 errored"), "h2load reported failures:\n{text}");
    text.lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or(0.0)
}
