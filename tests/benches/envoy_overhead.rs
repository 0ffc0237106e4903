//! What Envoy's ext_authz filter costs when it asks Keyshare's authorizer about every request:
//! the shipped `deploy/envoy/envoy.yaml` against the same configuration with the filter taken
//! out, both in front of the same upstream, measured in this run with h2load on this machine.
//! A third Envoy runs the shipped configuration against an allow-all ext_authz server (a bare
//! tonic server answering every check with the same allowed response and no work at all): the
//! floor that Envoy's filter, its gRPC client and one more hop cost with any authorization
//! server, so the difference to it is the authorizer's own share.
//! - p50/p99 at a moderate fixed rate, from h2load's `--log-file`, the Envoys driven in turn
//!   (round after round) so that drift on a noisy machine hits all alike,
//! - throughput at saturation, each Envoy on its own, in turn, the median of the rounds.
//!
//! The authorizer is the release binary as a deployment runs it (its own process, every check
//! counted and logged into PostgreSQL); identity and keyring run in this process, idle once the
//! key is loaded; the upstream is a small in-process hyper server answering 200 with a short
//! body. Every request carries a valid production credential, so every answer must be a 200:
//! other statuses are counted and printed, and fail the run once the numbers are out. Nothing
//! else is asserted.
//!
//! Run: `scripts/bench envoy` (builds the release binary and installs h2load and Envoy), or
//! `cargo build --release -p keyshare-authorizer --bin authorizer && cargo bench -p
//! keyshare-system-tests --bench envoy_overhead`. `ENVOY_BENCH_REQUESTS` sets the requests per
//! measured run (default 6000), `ENVOY_BENCH_RPS` the total rate of the moderate load (default
//! 800 req/s over 4 connections), `ENVOY_BENCH_ROUNDS` the rounds (default 2),
//! `ENVOY_BENCH_SATURATE_SECS` the length of each saturation run (default 4, 0 skips them).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::Path;
use std::time::Duration;

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse};
use envoy_types::ext_authz::v3::{CheckResponseExt, OkHttpResponseBuilder};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use keyshare_runtime::testkit::{Envoy, EnvoySite, envoy_config, free_port, http_call, shipped_envoy_yaml};
use keyshare_system_tests::{Kind, Setting, Stack, authorizer_binary, percentile, serve_authorization, serving};

/// Connections of the moderate load; each sends at `rate / CLIENTS` requests per second.
const CLIENTS: u32 = 4;
/// Connections of the saturation runs.
const SATURATION_CLIENTS: u32 = 16;
/// What the upstream answers: about the size of a small JSON API response.
const UPSTREAM_BODY: &[u8] = br#"{"things":[{"id":"thing-1","name":"first"},{"id":"thing-2","name":"second"}]}"#;

#[tokio::main]
async fn main() {
    let requests: u32 = setting("ENVOY_BENCH_REQUESTS", 6000);
    let rate: u32 = setting("ENVOY_BENCH_RPS", 800).max(CLIENTS);
    let rounds: u32 = setting("ENVOY_BENCH_ROUNDS", 2).max(1);
    let saturate_secs: u32 = setting("ENVOY_BENCH_SATURATE_SECS", 4);
    let dir = tempfile::tempdir().unwrap();

    let stack = Stack::builder().keyring().with(Kind::Identity, Setting::RequireVerifiedEmail(false)).start().await;
    let token = stack.account("envoy-bench@example.com").await.token;
    let created = stack.key(&token).await;
    let key = created.name;
    let project = key.split("/keys/").next().unwrap().to_owned();
    let credential = created.production;
    let upstream = serve_upstream().await;
    let (mut authorizer, authorizer_port) = authorizer_binary(&stack, &[]);
    serving(([127, 0, 0, 1], authorizer_port).into(), Duration::from_secs(60)).await;
    let allow_all = serve_allow_all(key.clone()).await;

    let shipped = shipped_envoy_yaml();
    let config = |listen, authorizer: u16| {
        let site =
            EnvoySite { listen, admin: free_port(), upstream, authorizers: &[(authorizer, 1)], project: &project };
        envoy_config(&shipped, &site)
    };
    let ports = [free_port(), free_port(), free_port()];
    let mut envoys = [
        Envoy::start("without-ext-authz", &without_ext_authz(&config(ports[0], authorizer_port)), ports[0], dir.path()),
        Envoy::start("allow-all-ext-authz", &config(ports[1], allow_all), ports[1], dir.path()),
        Envoy::start("keyshare-ext-authz", &config(ports[2], authorizer_port), ports[2], dir.path()),
    ];
    // The first 200 through the filter also means the authorizer has the key in memory.
    for envoy in &mut envoys {
        let port = envoy.port;
        envoy.wait_until("a 200", || async { get(port, &credential).await == Some(200) }).await;
    }

    let per_client = rate / CLIENTS;
    println!(
        "Envoy (deploy/envoy/envoy.yaml) without ext_authz, with an allow-all ext_authz server, and with Keyshare's \
         authorizer (the release binary); same upstream, h2load --h1 on one machine"
    );
    println!(
        "moderate load: {CLIENTS} connections × {per_client} req/s = {} req/s, {requests} requests per run, {rounds} \
         rounds",
        per_client * CLIENTS
    );
    let moderate = ["-c".to_owned(), CLIENTS.to_string(), "--rps".to_owned(), per_client.to_string()];
    let warm_up = [&moderate[..], &["-n".to_owned(), (requests / 5).max(CLIENTS).to_string()]].concat();
    let measured = [&moderate[..], &["-n".to_owned(), requests.to_string()]].concat();
    for envoy in &envoys {
        h2load(envoy.port, &credential, &warm_up, None).await;
    }

    let mut failures = Failures::default();
    let mut all: [Vec<u64>; 3] = Default::default();
    for round in 1..=rounds {
        for (envoy, all) in envoys.iter().zip(all.iter_mut()) {
            let log = dir.path().join(format!("{}-{round}.log", envoy.name));
            let run = h2load(envoy.port, &credential, &measured, Some(&log)).await;
            let (latencies, statuses) = read_log(&log);
            let missing = u64::from(requests).saturating_sub(latencies.len() as u64);
            report(&format!("run {round} {}", envoy.name), &latencies, &statuses, missing);
            failures.add(&format!("run {round} {}", envoy.name), &statuses, missing, &run);
            all.extend(latencies);
        }
    }
    println!("all runs:");
    let mut medians = Vec::new();
    for (envoy, all) in envoys.iter().zip(all.iter_mut()) {
        all.sort_unstable();
        medians.push(report(&format!("  {}", envoy.name), all, &BTreeMap::new(), 0));
    }
    let (alone_p50, alone_p99) = medians[0];
    for ((p50, p99), name) in medians[1..].iter().zip(["an allow-all ext_authz server", "Keyshare's authorizer"]) {
        println!(
            "added over Envoy alone by {name}: p50 {:+} µs, p99 {:+} µs",
            *p50 as i64 - alone_p50 as i64,
            *p99 as i64 - alone_p99 as i64
        );
    }
    let ((floor_p50, floor_p99), (keyshare_p50, keyshare_p99)) = (medians[1], medians[2]);
    println!(
        "Keyshare's authorizer over the allow-all server: p50 {:+} µs, p99 {:+} µs",
        keyshare_p50 as i64 - floor_p50 as i64,
        keyshare_p99 as i64 - floor_p99 as i64
    );
    println!("targets for Keyshare's authorizer over Envoy alone: p50 ≤ +300 µs, p99 ≤ +800 µs");

    if saturate_secs > 0 {
        let saturate = [
            "-c".to_owned(),
            SATURATION_CLIENTS.to_string(),
            "-D".to_owned(),
            saturate_secs.to_string(),
            "--warm-up-time".to_owned(),
            "1".to_owned(),
        ];
        // Rounds in turn, as above; the median of each Envoy's rounds.
        let mut rounds_rps: [Vec<f64>; 3] = Default::default();
        for round in 1..=rounds {
            for (envoy, rps) in envoys.iter().zip(rounds_rps.iter_mut()) {
                let run = h2load(envoy.port, &credential, &saturate, None).await;
                failures.add(&format!("saturation {round} {}", envoy.name), &BTreeMap::new(), 0, &run);
                rps.push(run.rps);
            }
        }
        let throughput = rounds_rps.map(|mut rps| {
            rps.sort_by(f64::total_cmp);
            rps[rps.len() / 2]
        });
        let alone = throughput[0].max(1.0);
        println!(
            "saturation ({SATURATION_CLIENTS} connections, {saturate_secs} s each, median of {rounds}): without {:.0} \
             req/s; allow-all ext_authz {:.0} req/s, ratio {:.2}; Keyshare {:.0} req/s, ratio {:.2} (target ≥ 0.50)",
            throughput[0],
            throughput[1],
            throughput[1] / alone,
            throughput[2],
            throughput[2] / alone,
        );
    }

    drop(envoys);
    let _ = authorizer.kill();
    let _ = authorizer.wait();
    if !failures.0.is_empty() {
        eprintln!("requests that did not get a 200:");
        for failure in &failures.0 {
            eprintln!("{failure}");
        }
        std::process::exit(1);
    }
}

/// An ext_authz server that allows every request with the answer Keyshare gives a valid key
/// (the key's name and environment added, the credential header removed) and does nothing
/// else; it answers Envoy's health checks SERVING. Returns its port.
async fn serve_allow_all(key: String) -> u16 {
    struct AllowAll(String);

    #[tonic::async_trait]
    impl Authorization for AllowAll {
        async fn check(
            &self,
            _request: tonic::Request<CheckRequest>,
        ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
            let mut ok = OkHttpResponseBuilder::new();
            ok.add_header("x-keyshare-key", self.0.clone(), None, false);
            ok.add_header("x-keyshare-environment", "production", None, false);
            ok.remove_header("x-api-key");
            let mut response = CheckResponse::new();
            response.set_status(tonic::Status::ok("")).set_http_response(ok.build());
            Ok(tonic::Response::new(response))
        }
    }

    serve_authorization(AllowAll(key)).await
}

fn setting(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// An HTTP/1.1 upstream that answers every request with 200 and `UPSTREAM_BODY`.
async fn serve_upstream() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|_request: hyper::Request<Incoming>| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(UPSTREAM_BODY))))
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    port
}

/// The same configuration without the ext_authz filter: its entry in `http_filters` and the
/// route's `typed_per_filter_config` go (each with the lines indented under it); the rest,
/// including the authorizer's cluster, stays as it is.
fn without_ext_authz(config: &str) -> String {
    let mut kept = Vec::new();
    let mut skipping_below: Option<usize> = None;
    for line in config.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(depth) = skipping_below {
            if line.trim().is_empty() || indent > depth {
                continue;
            }
            skipping_below = None;
        }
        let trimmed = line.trim_start();
        if trimmed.starts_with("typed_per_filter_config:") || trimmed == "- name: envoy.filters.http.ext_authz" {
            skipping_below = Some(indent);
            continue;
        }
        kept.push(line);
    }
    let stripped = kept.join("\n") + "\n";
    // Comments may still speak of ext_authz; no setting may.
    let settings: String = stripped.lines().filter(|line| !line.trim_start().starts_with('#')).collect();
    assert!(
        !settings.contains("ext_authz") && settings.contains("envoy.filters.http.router"),
        "could not take the ext_authz filter out of deploy/envoy/envoy.yaml:\n{stripped}"
    );
    stripped
}

/// The status of one `GET /v1/things` with the credential, or `None` if there was no answer.
async fn get(port: u16, credential: &str) -> Option<u16> {
    http_call(port, "GET", "/v1/things", &[("x-api-key", credential)]).await.map(|(status, _, _)| status)
}

/// What h2load said about one run.
struct Run {
    rps: f64,
    /// No request failed, errored or timed out, and every status was a 2xx.
    clean: bool,
    /// h2load's `requests:` and `status codes:` lines.
    summary: String,
}

/// Runs h2load over HTTP/1.1 (what an API's clients mostly speak to a gateway) against Envoy's
/// listener, with the credential on every request.
async fn h2load(port: u16, credential: &str, args: &[String], log: Option<&Path>) -> Run {
    let mut command = tokio::process::Command::new("h2load");
    command.args(["--h1", "-t", "1", "-H"]).arg(format!("x-api-key: {credential}")).args(args);
    if let Some(log) = log {
        command.arg("--log-file").arg(log);
    }
    command.arg(format!("http://127.0.0.1:{port}/v1/things"));
    let out = command.output().await.expect("h2load is installed (scripts/bench installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |prefix: &str| text.lines().find(|l| l.starts_with(prefix)).unwrap_or_default().to_owned();
    let requests = line("requests:");
    let statuses = line("status codes:");
    let rps = line("finished in")
        .split(", ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or(0.0);
    let clean = out.status.success()
        && requests.contains(" 0 failed, 0 errored, 0 timeout")
        && statuses.contains(" 0 3xx, 0 4xx, 0 5xx");
    let summary = if requests.is_empty() {
        format!("h2load said:\n{text}{}", String::from_utf8_lossy(&out.stderr))
    } else {
        format!("{requests}\n{statuses}")
    };
    Run { rps, clean, summary }
}

/// The sorted durations (µs) of an h2load `--log-file` (start µs, status, duration µs per
/// line) and how many requests got each status other than 200.
fn read_log(log: &Path) -> (Vec<u64>, BTreeMap<String, u64>) {
    let mut latencies = Vec::new();
    let mut other = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let mut columns = line.split('\t');
        let (status, duration) = (columns.nth(1).unwrap_or("?").trim(), columns.next().unwrap_or("").trim());
        if status != "200" {
            *other.entry(status.to_owned()).or_insert(0) += 1;
        }
        if let Ok(duration) = duration.parse() {
            latencies.push(duration);
        }
    }
    latencies.sort_unstable();
    (latencies, other)
}

/// Prints one distribution; returns its p50 and p99 in µs.
fn report(name: &str, sorted: &[u64], other_statuses: &BTreeMap<String, u64>, missing: u64) -> (u64, u64) {
    let as_durations: Vec<Duration> = sorted.iter().map(|&us| Duration::from_micros(us)).collect();
    let micros = |p| percentile(&as_durations, p).as_micros() as u64;
    let (p50, p99) = (micros(50.0), micros(99.0));
    let non_200: u64 = other_statuses.values().sum::<u64>() + missing;
    let detail = if non_200 == 0 { String::new() } else { format!(" {other_statuses:?}, {missing} without an answer") };
    println!(
        "{name:<28} n={:<6} p50 {p50:>6} µs   p90 {:>6} µs   p99 {p99:>6} µs   max {:>7} µs   non-200: {non_200}{detail}",
        sorted.len(),
        micros(90.0),
        sorted.last().copied().unwrap_or_default()
    );
    (p50, p99)
}

/// Runs in which a request did not get a 200, for the end of the output.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn add(&mut self, name: &str, other_statuses: &BTreeMap<String, u64>, missing: u64, run: &Run) {
        if !other_statuses.is_empty() || missing > 0 || !run.clean {
            let summary = &run.summary;
            self.0.push(format!("{name}: statuses {other_statuses:?}, {missing} without an answer\n{summary}"));
        }
    }
}
