//! CheckKey as gateways meet it: the real `authorizer` binary (release, its own process, every
//! check counted and logged into PostgreSQL, following keyring's feed), against a bare tonic
//! unary server answering a same-sized message after a HashMap lookup (the baseline), both
//! driven in turn by h2load on this machine, three rounds, median of each:
//!
//! | load | bare tonic | CheckKey | ratio |
//!
//! for saturation (16 connections × 8 streams), one connection × 10 streams (throughput and
//! p99) and one request at a time (p50, p99); and the CPU time each call costs at saturation,
//! from `/proc`: the bare server's process, against the authorizer's plus PostgreSQL's (every
//! check's call log and counts). Then, when valgrind is installed, the instructions the binary
//! executes per check (all its threads: the check, the server stack, the usage writer), counted
//! by callgrind over a fixed number of checks after a warm-up — instruction counts repeat on a
//! noisy machine where times do not.
//!
//! Then Envoy's ext_authz `Check` against CheckKey on the same binary, the authorizer's side of
//! every request behind Envoy: a `CheckRequest` shaped as Envoy sends it with the shipped
//! `deploy/envoy/envoy.yaml` (peers, request time, the headers it lets through, the route's
//! context extensions), throughput at saturation and one at a time, and instructions per call
//! under callgrind.
//!
//! identity and keyring run in this process (they are idle once the key is loaded).
//!
//! Run: `scripts/bench check` (builds the release binary first), or
//! `cargo build --release -p keyshare-authorizer --bin authorizer && cargo bench -p
//! keyshare-system-tests --bench check_binary`. `CHECK_BENCH_ROUNDS` (3) sets the rounds,
//! `CHECK_BENCH_CALLGRIND_CHECKS` (2000, 0 skips) the checks counted under callgrind, and
//! `CHECK_BENCH_CALLGRIND_OUT` a directory that keeps the callgrind dump for
//! `callgrind_annotate --inclusive=yes` (by default it goes with the run's temporary files).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use keyshare_proto::authorizer::v1 as pb;
use keyshare_proto::authorizer::v1::authorizer_service_server::{AuthorizerService, AuthorizerServiceServer};
use keyshare_runtime::testkit::{self, H2loadRun};
use keyshare_system_tests::{Stack, authorizer_binary, channel, serving};
use prost::Message;

/// The baseline: a HashMap lookup of the credential, answering the real answer.
struct Bare(HashMap<String, pb::CheckKeyResponse>);

#[tonic::async_trait]
impl AuthorizerService for Bare {
    async fn check_key(
        &self,
        request: tonic::Request<pb::CheckKeyRequest>,
    ) -> Result<tonic::Response<pb::CheckKeyResponse>, tonic::Status> {
        match self.0.get(&request.get_ref().key) {
            Some(answer) => Ok(tonic::Response::new(answer.clone())),
            None => Err(tonic::Status::not_found("no such key")),
        }
    }
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

const SATURATION: &[&str] = &["-n", "200000", "-c", "16", "-m", "8", "-t", "1"];
const TEN_STREAMS: &[&str] = &["-n", "100000", "-c", "1", "-m", "10", "-t", "1"];
const ONE_AT_A_TIME: &[&str] = &["-n", "20000", "-c", "1", "-m", "1", "-t", "1"];

async fn serve_bare(answers: HashMap<String, pb::CheckKeyResponse>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AuthorizerServiceServer::new(Bare(answers)))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    port
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}/keyshare.authorizer.v1.AuthorizerService/CheckKey")
}

fn ext_authz_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}/envoy.service.auth.v3.Authorization/Check")
}

/// An ext_authz `CheckRequest` as Envoy sends one for `GET /v1/things` carrying `credential` in
/// `x-api-key`, on a route whose context extensions name the project and environment.
fn envoy_check_request(credential: &str, project: &str) -> envoy_types::ext_authz::v3::pb::CheckRequest {
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
    let peer = |ip: &str, port: u32| Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    // The shipped configuration lets through only the headers a check reads (`allowed_headers`).
    let headers = [("x-api-key", credential), ("x-forwarded-for", "198.51.100.7")];
    let http = HttpRequest {
        id: "6f1c1d1e-5a3b-4c2d-9e8f-0a1b2c3d4e5f".into(),
        method: "GET".into(),
        headers: headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        path: "/v1/things".into(),
        host: "api.example.com".into(),
        scheme: "https".into(),
        protocol: "HTTP/2".into(),
        ..Default::default()
    };
    let request = Request {
        time: Some(envoy_types::pb::google::protobuf::Timestamp { seconds: 1_764_633_600, nanos: 123_000_000 }),
        http: Some(http),
    };
    let extensions = [("project", project), ("environment", "production")];
    let attributes = AttributeContext {
        source: Some(peer("198.51.100.7", 50_123)),
        destination: Some(peer("10.0.0.5", 8080)),
        request: Some(request),
        context_extensions: extensions.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..Default::default()
    };
    envoy_types::ext_authz::v3::pb::CheckRequest { attributes: Some(attributes) }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The medians over rounds of one load, for one server.
#[derive(Default)]
struct Rounds {
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    /// CPU time per call of the server's process and of PostgreSQL's, µs.
    server_cpu: Vec<f64>,
    postgres_cpu: Vec<f64>,
}

impl Rounds {
    fn add(&mut self, run: &H2loadRun) {
        self.rps.push(run.requests_per_second);
        self.p50.push(run.percentile_us(50.0) as f64);
        self.p99.push(run.percentile_us(99.0) as f64);
    }

    /// Median throughput, p50 and p99 over the rounds.
    fn medians(&self) -> (f64, f64, f64) {
        (median(self.rps.clone()), median(self.p50.clone()), median(self.p99.clone()))
    }

    /// Median CPU per call over the rounds: the server's process, PostgreSQL.
    fn cpu(&self) -> (f64, f64) {
        (median(self.server_cpu.clone()), median(self.postgres_cpu.clone()))
    }
}

/// CPU time (user and system) used so far by process `pid`, and by every PostgreSQL server
/// process on this machine, in clock ticks, from `/proc`.
fn cpu_ticks(pid: u32) -> (u64, u64) {
    // utime and stime: fields 14 and 15 of /proc/PID/stat, counted after the command's
    // parenthesis (a command may contain spaces).
    let read = |path: std::path::PathBuf| -> Option<(String, u64)> {
        let stat = std::fs::read_to_string(path).ok()?;
        let (head, tail) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_owned();
        let fields: Vec<&str> = tail.split_whitespace().collect();
        Some((comm, fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?))
    };
    let own = read(format!("/proc/{pid}/stat").into()).map_or(0, |(_, ticks)| ticks);
    let postgres = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|entry| read(entry.path().join("stat")))
        .filter(|(comm, _)| comm == "postgres")
        .map(|(_, ticks)| ticks)
        .sum();
    (own, postgres)
}

/// Clock ticks per second of `/proc`'s CPU times.
fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// `rounds` rounds of every load against two targets (URL and request body each), driven in
/// turn so that drift on a noisy machine hits both alike.
///
/// Each target names the process that serves it, whose CPU time per call is counted with
/// PostgreSQL's over the run and the second after it, in which the authorizer's usage writer
/// writes what the run recorded.
async fn in_turn(
    rounds: u64,
    loads: &[(&str, &'static [&'static str])],
    targets: [(String, PathBuf, u32); 2],
) -> Vec<(Rounds, Rounds)> {
    let tick_us = 1e6 / ticks_per_second();
    let mut results: Vec<(Rounds, Rounds)> = loads.iter().map(|_| Default::default()).collect();
    for _ in 0..rounds {
        for ((_, args), (first, second)) in loads.iter().zip(results.iter_mut()) {
            for ((url, body, pid), rounds) in targets.iter().zip([first, second]) {
                let (url, body, args, pid) = (url.clone(), body.clone(), args.to_vec(), *pid);
                let before = cpu_ticks(pid);
                let run = tokio::task::spawn_blocking(move || testkit::h2load(&url, &body, &args, true)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1200)).await;
                let after = cpu_ticks(pid);
                rounds.add(&run);
                let calls = run.latencies_us.len().max(1) as f64;
                rounds.server_cpu.push((after.0 - before.0) as f64 * tick_us / calls);
                rounds.postgres_cpu.push((after.1 - before.1) as f64 * tick_us / calls);
            }
        }
    }
    results
}

#[tokio::main]
async fn main() {
    let rounds = setting("CHECK_BENCH_ROUNDS", 3).max(1);
    let callgrind_checks = setting("CHECK_BENCH_CALLGRIND_CHECKS", 2000);
    let dir = tempfile::tempdir().unwrap();
    let stack = keyshare_system_tests::stack().await;
    let token = stack.account("check-bench@example.com").await.token;
    let created = stack.key(&token).await;
    let key = created.name;
    let project = key.split("/keys/").next().unwrap().to_owned();
    let request = pb::CheckKeyRequest {
        key: created.production.clone(),
        project,
        method: "GET".into(),
        path: "/v1/things".into(),
        client_ip: "198.51.100.7".into(),
        environment: pb::Environment::Production as i32,
    };
    let body = testkit::grpc_body(dir.path(), "check.bin", &request.encode_to_vec());

    let (mut authorizer, port) = authorizer_binary(&stack, &[]);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    serving(addr, Duration::from_secs(60)).await;
    let answer = pb::authorizer_service_client::AuthorizerServiceClient::new(channel(addr).await)
        .check_key(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.outcome, pb::Outcome::Valid as i32, "the benchmark checks a valid key");
    let bare = serve_bare(HashMap::from([(request.key.clone(), answer)])).await;

    println!("CheckKey: the real authorizer binary vs a bare tonic server, h2load, median of {rounds} rounds");
    // Warm both up.
    for port in [bare, port] {
        tokio::task::spawn_blocking({
            let body = body.clone();
            move || testkit::h2load(&url(port), &body, &["-n", "20000", "-c", "4", "-m", "8"], false)
        })
        .await
        .unwrap();
    }
    let loads: [(&str, &[&str]); 3] = [
        ("saturation, 16 connections × 8 streams", SATURATION),
        ("1 connection × 10 streams", TEN_STREAMS),
        ("one at a time", ONE_AT_A_TIME),
    ];
    let (this, real) = (std::process::id(), authorizer.id());
    let results = in_turn(rounds, &loads, [(url(bare), body.clone(), this), (url(port), body.clone(), real)]).await;
    println!("\n| load | bare tonic | CheckKey | ratio |\n|---|---|---|---|");
    for ((what, _), (bare_rounds, real_rounds)) in loads.iter().zip(&results) {
        let ((b, bp50, bp99), (r, rp50, rp99)) = (bare_rounds.medians(), real_rounds.medians());
        println!(
            "| {what} | {:.1}k req/s, p50 {bp50:.0} µs, p99 {bp99:.0} µs | {:.1}k req/s, p50 {rp50:.0} µs, p99 \
             {rp99:.0} µs | {:.2}, p99 {:.2}× |",
            b / 1e3,
            r / 1e3,
            r / b.max(1.0),
            rp99 / bp99.max(1.0)
        );
    }
    println!("targets: saturation ≥ 0.90×; p99 at 1 × 10 streams ≤ 1.3× bare tonic's");
    let (bare_rounds, real_rounds) = &results[0];
    let ((bare_cpu, bare_postgres), (real_cpu, real_postgres)) = (bare_rounds.cpu(), real_rounds.cpu());
    println!(
        "CPU per call at saturation (median of rounds): bare tonic's process {bare_cpu:.2} µs (PostgreSQL \
         {bare_postgres:.2} µs); the authorizer {real_cpu:.2} µs + PostgreSQL {real_postgres:.2} µs (the call log \
         and counts of every call)"
    );

    // Envoy's ext_authz Check against CheckKey, on the same binary.
    let envoy_request = envoy_check_request(&request.key, &request.project);
    let envoy_body = testkit::grpc_body(dir.path(), "ext_authz.bin", &envoy_request.encode_to_vec());
    let answer =
        envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(channel(addr).await)
            .check(envoy_request)
            .await
            .unwrap()
            .into_inner();
    assert_eq!(answer.status.map(|s| s.code), Some(0), "the benchmark's ext_authz check is allowed");
    let envoy_loads: [(&str, &[&str]); 2] =
        [("saturation, 16 connections × 8 streams", SATURATION), ("one at a time", ONE_AT_A_TIME)];
    let envoy_results = in_turn(
        rounds,
        &envoy_loads,
        [(url(port), body.clone(), real), (ext_authz_url(port), envoy_body.clone(), real)],
    )
    .await;
    println!("\n| load, the same binary | CheckKey | ext_authz Check | ratio |\n|---|---|---|---|");
    for ((what, _), (check_rounds, envoy_rounds)) in envoy_loads.iter().zip(&envoy_results) {
        let ((c, cp50, cp99), (e, ep50, ep99)) = (check_rounds.medians(), envoy_rounds.medians());
        println!(
            "| {what} | {:.1}k req/s, p50 {cp50:.0} µs, p99 {cp99:.0} µs | {:.1}k req/s, p50 {ep50:.0} µs, p99 \
             {ep99:.0} µs | {:.2} |",
            c / 1e3,
            e / 1e3,
            e / c.max(1.0),
        );
    }
    let _ = authorizer.kill();
    let _ = authorizer.wait();

    if callgrind_checks > 0 {
        let out = std::env::var_os("CHECK_BENCH_CALLGRIND_OUT").map_or_else(|| dir.path().to_owned(), PathBuf::from);
        for (what, url, body, sub) in [
            ("CheckKey", url as fn(u16) -> String, &body, "check_key"),
            ("ext_authz Check", ext_authz_url, &envoy_body, "ext_authz"),
        ] {
            let out = out.join(sub);
            std::fs::create_dir_all(&out).unwrap();
            match instructions_per_call(&stack, url, body, callgrind_checks, &out).await {
                Some(per_call) => println!(
                    "\ninstructions per {what} (callgrind, the whole binary, {callgrind_checks} calls one at a time): \
                     {per_call:.0}"
                ),
                None => println!("\ninstructions per call: skipped (valgrind is not installed)"),
            }
        }
    }
}

/// Runs the binary under callgrind, warms it up, zeroes the counters, sends `checks` calls of
/// `body` to `url` one at a time, dumps, and divides the instructions by the calls.
async fn instructions_per_call(
    stack: &Stack,
    url: fn(u16) -> String,
    body: &Path,
    checks: u64,
    dir: &Path,
) -> Option<f64> {
    if Command::new("valgrind").arg("--version").output().is_err() {
        return None;
    }
    let out = dir.join("callgrind.out");
    // A kept directory may hold an earlier run's dumps, which the sum below must not count.
    for entry in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        if entry.file_name().to_string_lossy().starts_with("callgrind.out") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let wrapper = vec![
        "valgrind".to_owned(),
        "--tool=callgrind".to_owned(),
        format!("--callgrind-out-file={}", out.display()),
        "--dump-instr=no".to_owned(),
        "--collect-atstart=yes".to_owned(),
    ];
    let (mut child, port) = authorizer_binary(stack, &wrapper);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    serving(addr, Duration::from_secs(300)).await;
    let pid = child.id().to_string();
    let send = |n: u64| {
        let body = body.to_owned();
        tokio::task::spawn_blocking(move || {
            testkit::h2load(&url(port), &body, &["-n", &n.to_string(), "-c", "1", "-m", "1", "-t", "1"], false)
        })
    };
    send(500).await.unwrap();
    let control = |flag: &str| {
        let status = Command::new("callgrind_control").arg(flag).arg(&pid).stdout(Stdio::null()).status();
        assert!(status.is_ok_and(|s| s.success()), "callgrind_control {flag} failed");
    };
    control("-z");
    send(checks).await.unwrap();
    // The writer writes what these checks recorded within its flush interval: let it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    control("-d");
    let _ = child.kill();
    let _ = child.wait();
    // callgrind_control -d writes <out>.<n> files; the totals line of the newest holds the sum.
    let mut dumps: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("callgrind.out.")))
        .collect();
    dumps.sort();
    let mut total = 0u64;
    for dump in &dumps {
        let text = std::fs::read_to_string(dump).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.starts_with("summary:") || l.starts_with("totals:")) {
            total += line.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Some(total as f64 / checks as f64)
}
