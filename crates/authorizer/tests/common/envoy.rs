//! A real Envoy (the shipped `deploy/envoy/envoy.yaml`) in front of the authorizer and a small
//! upstream that echoes what reached it.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use keyshare_runtime::testkit::{EnvoySite, envoy_config, eventually, free_port, http_call, shipped_envoy_yaml};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::World;

pub use keyshare_runtime::testkit::Envoy;

/// An upstream that answers 200 with the request head it received.
pub async fn echo_upstream() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let body = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let response =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    port
}

/// One HTTP/1.1 request for `/v1/things` through Envoy: (status, response head, body).
pub async fn call(port: u16, method: &str, headers: &[(&str, &str)]) -> Option<(u16, String, String)> {
    http_call(port, method, "/v1/things", headers).await
}

/// [`call`] for another path.
pub async fn call_path(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Option<(u16, String, String)> {
    http_call(port, method, path, headers).await
}

pub async fn start_envoy(w: &World, project: &str, upstream: u16) -> (Envoy, u16) {
    start_envoy_at(project, upstream, &[w.authorizer_addr.port()]).await
}

/// The shipped configuration with `authorizers` (check ports on 127.0.0.1) as the authorizer
/// cluster's endpoints.
pub async fn start_envoy_at(project: &str, upstream: u16, authorizers: &[u16]) -> (Envoy, u16) {
    start_envoy_with(&shipped_envoy_yaml(), project, upstream, authorizers).await
}

/// [`start_envoy_at`] with another configuration than the shipped one (of the same shape).
pub async fn start_envoy_with(shipped: &str, project: &str, upstream: u16, authorizers: &[u16]) -> (Envoy, u16) {
    let (listen, admin) = (free_port(), free_port());
    let authorizers: Vec<(u16, u32)> = authorizers.iter().map(|port| (*port, 1)).collect();
    let site = EnvoySite { listen, admin, upstream, authorizers: &authorizers, project };
    // A loaded test machine may take longer than a production authorizer to answer; a timeout
    // here would be the machine's failure, not the authorizer's.
    let config = envoy_config(shipped, &site).replace("timeout: 0.25s", "timeout: 10s");
    let mut envoy = Envoy::start("envoy", &config, listen, &tempfile_dir());
    envoy.wait_until("an answer", || async move { call(listen, "GET", &[]).await.is_some() }).await;
    (envoy, listen)
}

pub fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("keyshare-envoy-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Valid checks without pause, each made twice: through CheckKey and through Envoy, until
/// [`Load::finish`]. Counts what was answered and what was not a valid answer (an RPC error, a
/// refusal, or anything but a 200 from Envoy).
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    answered: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failures: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    /// Starts checking `credential` (valid from 127.0.0.1 and `client_ip`) at the authorizer and
    /// at the Envoy on `envoy_port`.
    pub fn start(w: &World, envoy_port: u16, credential: &str, client_ip: &str) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failures = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut client = w.authorizer.clone();
        let (credential, client_ip) = (credential.to_owned(), client_ip.to_owned());
        let task = tokio::spawn({
            let (stop, answered, failures) = (stop.clone(), answered.clone(), failures.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    let request = keyshare_proto::authorizer::v1::CheckKeyRequest {
                        key: credential.clone(),
                        method: "GET".into(),
                        path: "/v1/things".into(),
                        client_ip: client_ip.clone(),
                        ..Default::default()
                    };
                    let valid = keyshare_proto::authorizer::v1::Outcome::Valid as i32;
                    let grpc_ok = matches!(client.check_key(request).await, Ok(r) if r.get_ref().outcome == valid);
                    let envoy_ok =
                        call(envoy_port, "GET", &[("x-api-key", &credential)]).await.is_some_and(|(s, _, _)| s == 200);
                    answered.fetch_add(2, Ordering::Relaxed);
                    failures.fetch_add(u64::from(!grpc_ok) + u64::from(!envoy_ok), Ordering::Relaxed);
                }
            }
        });
        Self { stop, answered, failures, task }
    }

    /// Checks answered so far (both paths).
    pub fn answered(&self) -> u64 {
        self.answered.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `more` further checks have been answered.
    pub async fn wait_for(&self, what: &str, more: u64) {
        let target = self.answered() + more;
        eventually(what, Duration::from_secs(30), || async { (self.answered() >= target).then_some(()) }).await;
    }

    /// Stops and returns (answered, failures).
    pub async fn finish(self) -> (u64, u64) {
        let Self { stop, answered, failures, task } = self;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        task.await.unwrap();
        (answered.load(std::sync::atomic::Ordering::Relaxed), failures.load(std::sync::atomic::Ordering::Relaxed))
    }
}
