//! The same checks through a real Envoy (the shipped `deploy/envoy/envoy.yaml`) in front of a
//! small upstream that echoes what reached it: status codes, JSON bodies, headers added and
//! removed, retry-after.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use keyshare_proto::keyring::v1 as krpb;
use keyshare_runtime::credential::{Credential, Environment};
use keyshare_runtime::testkit::{eventually, free_port, tool, workspace_root};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Envoy(Child);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An upstream that answers 200 with the request head it received.
async fn echo_upstream() -> u16 {
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

/// One HTTP/1.1 request through Envoy: (status, response head, body).
async fn call(port: u16, method: &str, headers: &[(&str, &str)]) -> Option<(u16, String, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let mut request = format!("{method} /v1/things HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if method == "POST" {
        request.push_str("Content-Length: 0\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, head.to_ascii_lowercase(), body.to_owned()))
}

async fn start_envoy(w: &World, project: &str, upstream: u16) -> (Envoy, u16) {
    let (listen, admin) = (free_port(), free_port());
    let config = std::fs::read_to_string(workspace_root().join("deploy/envoy/envoy.yaml"))
        .unwrap()
        .replace("port_value: 8080", &format!("port_value: {listen}"))
        .replace("port_value: 9901", &format!("port_value: {admin}"))
        .replace("address: upstream, port_value: 8000", &format!("address: 127.0.0.1, port_value: {upstream}"))
        .replace(
            "address: authorizer, port_value: 50054",
            &format!("address: 127.0.0.1, port_value: {}", w.authorizer_addr.port()),
        )
        .replace("projects/REPLACE-WITH-YOUR-PROJECT-ID", project);
    let dir = tempfile_dir();
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, config).unwrap();
    let child = Command::new(tool("envoy"))
        .arg("-c")
        .arg(&path)
        .args(["--base-id", &listen.to_string(), "--log-level", "warn", "--disable-hot-restart"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let envoy = Envoy(child);
    eventually(
        "Envoy to answer",
        Duration::from_secs(60),
        || async move { call(listen, "GET", &[]).await.map(|_| ()) },
    )
    .await;
    (envoy, listen)
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("keyshare-envoy-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn envoy_in_front_of_the_authorizer() {
    let (mut w, project, key, sandbox, production) = world().await;
    let upstream = echo_upstream().await;
    let (_envoy, port) = start_envoy(&w, &project, upstream).await;
    let prod_env = format!("{key}/environments/production");

    // Allowed: the upstream sees who called and in which environment, never the credential.
    let (status, _, body) = call(port, "GET", &[("x-api-key", &production)]).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&format!("x-keyshare-key: {}", key.to_ascii_lowercase())), "{body}");
    assert!(body.contains("x-keyshare-environment: production"), "{body}");
    assert!(!body.contains("x-api-key") && !body.contains(&production.to_ascii_lowercase()), "{body}");
    let (status, _, body) = call(port, "GET", &[("authorization", &format!("Bearer {production}"))]).await.unwrap();
    assert_eq!(status, 200);
    assert!(!body.contains("authorization"), "{body}");

    // Denied: the outcome's status and a small JSON body.
    let unknown = Credential::generate(Environment::Production);
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("no key", vec![], 401, "OUTCOME_MALFORMED"),
        ("malformed", vec![("x-api-key", "ks_live_oops")], 401, "OUTCOME_MALFORMED"),
        ("unknown", vec![("x-api-key", unknown.expose())], 401, "OUTCOME_NOT_FOUND"),
        ("sandbox key at a production gateway", vec![("x-api-key", &sandbox)], 401, "OUTCOME_WRONG_ENVIRONMENT"),
    ];
    for (case, headers, expected, outcome) in cases {
        let (status, head, body) = call(port, "GET", &headers).await.unwrap();
        assert_eq!(status, expected, "{case}: {body}");
        assert!(body.contains(&format!(r#""outcome":"{outcome}""#)), "{case}: {body}");
        assert!(head.contains("content-type: application/json"), "{case}: {head}");
    }

    w.set(&prod_env, "permissions", |e| {
        e.permissions = Some(krpb::Permissions { create: false, read: true, update: true, delete: true })
    })
    .await;
    let (status, _, body) = call(port, "POST", &[("x-api-key", &production)]).await.unwrap();
    assert_eq!((status, body.contains("OUTCOME_METHOD_NOT_ALLOWED")), (403, true), "{body}");

    w.set(&prod_env, "ip_allowlist", |e| e.ip_allowlist = vec!["10.0.0.0/8".into()]).await;
    let (status, _, body) = call(port, "GET", &[("x-api-key", &production)]).await.unwrap();
    assert_eq!((status, body.contains("OUTCOME_SOURCE_NOT_ALLOWED")), (403, true), "{body}");
    w.set(&prod_env, "ip_allowlist", |e| e.ip_allowlist = vec!["127.0.0.0/8".into()]).await;

    w.set(&prod_env, "active", |e| e.active = false).await;
    let (status, _, body) = call(port, "GET", &[("x-api-key", &production)]).await.unwrap();
    assert_eq!((status, body.contains("OUTCOME_DISABLED")), (403, true), "{body}");
    w.set(&prod_env, "active", |e| e.active = true).await;

    // Rate limited: 429 with retry-after.
    w.set(&prod_env, "rate_limit_per_second", |e| e.rate_limit_per_second = 1).await;
    assert_eq!(call(port, "GET", &[("x-api-key", &production)]).await.unwrap().0, 200);
    let (status, head, body) = call(port, "GET", &[("x-api-key", &production)]).await.unwrap();
    assert_eq!((status, body.contains("OUTCOME_RATE_LIMITED")), (429, true), "{body}");
    assert!(head.contains("retry-after: 1"), "{head}");

    // Expired.
    w.frozen.advance(chrono::Duration::seconds(2));
    let past = prost_types::Timestamp { seconds: chrono::Utc::now().timestamp() - 60, nanos: 0 };
    w.set(&prod_env, "expire_time", |e| e.expire_time = Some(past)).await;
    let (status, _, body) = call(port, "GET", &[("x-api-key", &production)]).await.unwrap();
    assert_eq!((status, body.contains("OUTCOME_EXPIRED")), (401, true), "{body}");
}

#[test]
fn the_shipped_envoy_configuration_validates() {
    let out = Command::new(tool("envoy"))
        .args(["--mode", "validate", "-c"])
        .arg(workspace_root().join("deploy/envoy/envoy.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
