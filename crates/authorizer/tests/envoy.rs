//! The same checks through a real Envoy (the shipped `deploy/envoy/envoy.yaml`) in front of a
//! small upstream that echoes what reached it: status codes, JSON bodies, headers added and
//! removed, retry-after.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::envoy::*;
use common::*;
use keyshare_proto::keyring::v1 as krpb;
use keyshare_runtime::clock::Clock;
use keyshare_runtime::credential::{Credential, Environment};
use keyshare_runtime::testkit::{TestPki, eventually, free_port, tool, workspace_root};

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

    // Quota exceeded: 429 with retry-after until the next UTC day. The key made three valid
    // calls through Envoy above (GET, Bearer, the rate-limited one's first).
    w.set(&prod_env, "rate_limit_per_second", |e| e.rate_limit_per_second = 0).await;
    w.set(&prod_env, "daily_quota", |e| e.daily_quota = 4).await;
    assert_eq!(call(port, "GET", &[("x-api-key", &production)]).await.unwrap().0, 200);
    let (status, head, body) = call(port, "GET", &[("x-api-key", &production)]).await.unwrap();
    assert_eq!((status, body.contains("OUTCOME_QUOTA_EXCEEDED")), (429, true), "{body}");
    let now = w.frozen.now().timestamp();
    let to_midnight = 86_400 - now.rem_euclid(86_400);
    assert!(head.contains(&format!("retry-after: {to_midnight}")), "{head}");
    w.set(&prod_env, "daily_quota", |e| e.daily_quota = 0).await;

    // Expired.
    w.frozen.advance(chrono::Duration::seconds(2));
    let past = prost_types::Timestamp { seconds: chrono::Utc::now().timestamp() - 60, nanos: 0 };
    w.set(&prod_env, "expire_time", |e| e.expire_time = Some(past)).await;
    let (status, _, body) = call(port, "GET", &[("x-api-key", &production)]).await.unwrap();
    assert_eq!((status, body.contains("OUTCOME_EXPIRED")), (401, true), "{body}");
}

/// Behind a load balancer that appends the address it saw to `x-forwarded-for`, the client is
/// that last entry: an address the caller wrote before it does not get past an allowlist.
#[tokio::test]
async fn only_the_last_forwarded_address_is_trusted() {
    let (mut w, project, key, _, production) = world().await;
    w.authorizer_config.ext_authz.trust_forwarded_for = true;
    w.restart_authorizer().await;
    let upstream = echo_upstream().await;
    let (_envoy, port) = start_envoy(&w, &project, upstream).await;
    let prod_env = format!("{key}/environments/production");
    w.set(&prod_env, "ip_allowlist", |e| e.ip_allowlist = vec!["10.0.0.0/8".into()]).await;

    for (forwarded, expected) in [
        ("10.1.2.3", 200),
        ("198.51.100.7, 10.1.2.3", 200),
        // A caller outside the allowlist claiming an address inside it.
        ("10.1.2.3, 198.51.100.7", 403),
        ("198.51.100.7", 403),
        ("10.1.2.3, not-an-address", 403),
    ] {
        let headers = [("x-api-key", production.as_str()), ("x-forwarded-for", forwarded)];
        let (status, _, body) = call(port, "GET", &headers).await.unwrap();
        assert_eq!(status, expected, "x-forwarded-for: {forwarded}: {body}");
        if expected == 403 {
            assert!(body.contains("OUTCOME_SOURCE_NOT_ALLOWED"), "{body}");
        }
    }
}

/// What a gateway operator and a browser expect: the Bearer scheme in any case (RFC 9110), and a
/// CORS preflight from the web app's origin answered by Envoy before ext_authz (a preflight
/// carries no credential), while the real calls from that origin are checked and get the CORS
/// headers.
#[tokio::test]
async fn browsers_and_any_case_bearer_get_through_envoy() {
    let (w, project, _key, _, production) = world().await;
    let upstream = echo_upstream().await;
    let (_envoy, port) = start_envoy(&w, &project, upstream).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let (status, _, body) =
            call(port, "GET", &[("authorization", &format!("{scheme} {production}"))]).await.unwrap();
        assert_eq!(status, 200, "{scheme}: {body}");
    }
    let (status, _, body) = call(port, "GET", &[("authorization", &format!("Basic {production}"))]).await.unwrap();
    assert_eq!((status, body.contains("OUTCOME_MALFORMED")), (401, true), "{body}");

    let checks = w.metric("keyshare_checks_total").await.unwrap();
    let origin = "https://app.example.com";
    let preflight =
        [("origin", origin), ("access-control-request-method", "GET"), ("access-control-request-headers", "x-api-key")];
    let (status, head, _) = call(port, "OPTIONS", &preflight).await.unwrap();
    assert_eq!(status, 200, "{head}");
    assert!(head.contains(&format!("access-control-allow-origin: {origin}")), "{head}");
    assert!(head.contains("access-control-allow-headers: authorization, content-type, x-api-key"), "{head}");
    assert_eq!(w.metric("keyshare_checks_total").await.unwrap(), checks, "a preflight reached the authorizer");

    // The call itself is checked like any other, and the browser may read the answer.
    let (status, head, _) = call(port, "GET", &[("origin", origin), ("x-api-key", &production)]).await.unwrap();
    assert_eq!(status, 200);
    assert!(head.contains(&format!("access-control-allow-origin: {origin}")), "{head}");
    let (status, head, _) = call(port, "GET", &[("origin", origin)]).await.unwrap();
    assert_eq!(status, 401, "{head}");
    // Another origin's preflight is no preflight Envoy answers: it needs a key like any call.
    let elsewhere = [("origin", "https://evil.example"), ("access-control-request-method", "GET")];
    let (status, head, _) = call(port, "OPTIONS", &elsewhere).await.unwrap();
    assert_eq!(status, 401, "{head}");
    assert!(!head.contains("access-control-allow-origin"), "{head}");
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

/// The production gateway's configuration (`envoy-mtls.yaml`): Envoy checks over mutual TLS
/// with a certificate of the authorizer's CA; with another CA's it gets no answer, and the API
/// stays closed.
#[tokio::test]
async fn envoy_checks_over_mutual_tls() {
    let (w, project, _, _, production) = world().await;
    let pki = TestPki::new("Keyshare test CA");
    let (server, _) = pki.issue_files("authorizer", &["authorizer", "127.0.0.1"]);
    let mut config = w.authorizer_config.clone();
    config.common.tls = keyshare_runtime::tls::TlsSettings {
        identity: Some(server),
        client_ca: Some(pki.ca_path()),
        ca: Some(pki.ca_path()),
    };
    let health = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    config.common.health_addr = Some(health);
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = keyshare_authorizer::start(config, w.frozen.clone(), async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    serving(health).await;

    let shipped = std::fs::read_to_string(workspace_root().join("deploy/k8s/overlays/production/envoy-mtls.yaml"));
    let shipped = shipped.unwrap();
    let gateway_with = |ca: &TestPki| {
        let issued = ca.issue(&["gateway"]);
        let dir = tempfile_dir();
        std::fs::write(dir.join("tls.crt"), &issued.cert_pem).unwrap();
        std::fs::write(dir.join("tls.key"), &issued.key_pem).unwrap();
        // The gateway trusts the authorizer's CA either way.
        std::fs::write(dir.join("ca.crt"), pki.ca_pem()).unwrap();
        shipped.replace("/etc/keyshare/tls", &dir.display().to_string())
    };
    let upstream = echo_upstream().await;
    let port = started.addr.port();

    let (_envoy, listen) = start_envoy_with(&gateway_with(&pki), &project, upstream, &[port]).await;
    eventually("Envoy to pass a valid key over mTLS", std::time::Duration::from_secs(30), || {
        let production = production.clone();
        async move { (call(listen, "GET", &[("x-api-key", &production)]).await?.0 == 200).then_some(()) }
    })
    .await;

    let stranger = TestPki::new("Another CA");
    let (_envoy, listen) = start_envoy_with(&gateway_with(&stranger), &project, upstream, &[port]).await;
    let (status, _, body) = call(listen, "GET", &[("x-api-key", &production)]).await.unwrap();
    assert_eq!(status, 503, "{body}");
}

/// The shipped configuration tells the authorizer only what a check reads: the credential's
/// headers and `x-forwarded-for`. A cookie, or any other header of the caller's, never reaches
/// it. The authorization server here records the headers of every check and allows it.
#[tokio::test]
async fn envoy_sends_the_authorizer_only_the_headers_a_check_reads() {
    use envoy_types::ext_authz::v3::CheckResponseExt;
    use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse};
    use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;

    struct Recording(tokio::sync::mpsc::UnboundedSender<Vec<String>>);

    #[tonic::async_trait]
    impl Authorization for Recording {
        async fn check(
            &self,
            request: tonic::Request<CheckRequest>,
        ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
            let http = request.into_inner().attributes.and_then(|a| a.request).and_then(|r| r.http);
            let mut names: Vec<String> = http.map(|h| h.headers.into_keys().collect()).unwrap_or_default();
            names.sort();
            let _ = self.0.send(names);
            let mut response = CheckResponse::new();
            response.set_status(tonic::Status::ok(""));
            Ok(tonic::Response::new(response))
        }
    }

    let (sender, mut checks) = tokio::sync::mpsc::unbounded_channel();
    let authorizer = keyshare_testkit::serve_authorization(Recording(sender)).await;
    let upstream = echo_upstream().await;
    let (_envoy, port) = start_envoy_at("projects/any", upstream, &[authorizer]).await;

    let headers = [
        ("x-api-key", "ks_live_recorded"),
        ("authorization", "Bearer ks_live_recorded"),
        ("x-forwarded-for", "198.51.100.7"),
        ("cookie", "session=secret"),
        ("x-internal-token", "secret"),
        ("user-agent", "test"),
    ];
    let (status, _, body) = call(port, "GET", &headers).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let seen = loop {
        let names = tokio::time::timeout_at(deadline, checks.recv()).await.unwrap().unwrap();
        // Envoy's own first calls (start_envoy_at waits for an answer) carry no credential.
        if names.iter().any(|name| name == "x-api-key") {
            break names;
        }
    };
    assert_eq!(seen, ["authorization", "x-api-key", "x-forwarded-for"]);
}
