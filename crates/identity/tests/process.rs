//! The real `identity` binary: grpcurl against it (the README walkthrough), metrics, graceful
//! shutdown on SIGTERM, configuration errors, and no secret in its logs.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{PASSWORD, connect};
use keyshare_proto::identity::v1 as pb;
use keyshare_runtime::crypto::Sealer;
use keyshare_testkit::{Kind, Setting, Settings, TestDatabase, eventually, free_port, tool};

struct Process {
    process: keyshare_testkit::Process,
    port: u16,
    metrics_port: u16,
    spool: tempfile::TempDir,
    log: PathBuf,
    _db: TestDatabase,
}

impl Process {
    async fn start() -> Self {
        let db = TestDatabase::create().await;
        let spool = tempfile::tempdir().unwrap();
        let (port, metrics_port) = (free_port(), free_port());
        let log = spool.path().join("identity.log");
        let (_, kek) = Sealer::generate("k1");
        let loopback = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let settings = Settings::from([
            Setting::DatabaseUrl(db.url.clone()),
            Setting::Listen(loopback(port)),
            Setting::Metrics(loopback(metrics_port)),
            Setting::KeyEncryptionKeys(kek),
            Setting::MailSpool(spool.path().join("mail")),
            Setting::MailPoll(Duration::from_secs(1)),
            Setting::Log("debug".into()),
        ]);
        let output = keyshare_testkit::Output::File(log.clone());
        let process = keyshare_testkit::Process::spawn(Kind::Identity, settings, output);
        let process = Self { process, port, metrics_port, spool, log, _db: db };
        eventually("identity to report SERVING", Duration::from_secs(60), || async {
            let out = process.grpcurl(&["grpc.health.v1.Health/Check"], None);
            String::from_utf8_lossy(&out.stdout).contains("SERVING").then_some(())
        })
        .await;
        process
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Runs `grpcurl -plaintext [-d DATA] ADDR ARGS…` like an operator would.
    fn grpcurl(&self, args: &[&str], data: Option<&str>) -> Output {
        let mut command = Command::new(tool("grpcurl"));
        command.arg("-plaintext");
        if let Some(data) = data {
            command.args(["-d", data]);
        }
        let (flags, rest): (Vec<&str>, Vec<&str>) =
            args.iter().partition(|a| a.starts_with("-H") || a.starts_with("authorization"));
        command.args(flags).arg(self.addr()).args(rest).output().unwrap()
    }

    fn grpcurl_json(&self, args: &[&str], data: Option<&str>) -> serde_json::Value {
        let out = self.grpcurl(args, data);
        assert!(out.status.success(), "grpcurl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn terminate(&self) {
        self.process.signal_terminate();
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn spooled_token(dir: &Path) -> Option<String> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries.flatten().find_map(|entry| {
        let text = std::fs::read_to_string(entry.path()).ok()?;
        let text = text.replace("=\r\n", "").replace("=\n", "");
        text.lines().find_map(|l| l.split("token=").nth(1)).map(|t| t.trim().to_owned())
    })
}

#[tokio::test]
async fn grpcurl_walkthrough_metrics_and_clean_logs() {
    let p = Process::start().await;

    // Reflection: the service, health and reflection are listed, and describable without protos.
    let list = String::from_utf8(p.grpcurl(&["list"], None).stdout).unwrap();
    // grpcurl 1.8 asks for reflection v1alpha; both v1 and v1alpha are served.
    for service in ["keyshare.identity.v1.IdentityService", "grpc.health.v1.Health", ".ServerReflection"] {
        assert!(list.contains(service), "{service} missing from: {list}");
    }
    assert!(!list.contains("KeyringService"), "identity advertises only itself: {list}");
    let describe =
        String::from_utf8(p.grpcurl(&["describe", "keyshare.identity.v1.IdentityService"], None).stdout).unwrap();
    assert!(describe.contains("rpc Login"), "{describe}");
    let health =
        p.grpcurl_json(&["grpc.health.v1.Health/Check"], Some(r#"{"service":"keyshare.identity.v1.IdentityService"}"#));
    assert_eq!(health["status"], "SERVING");

    // The README walkthrough: sign up, read the mail from the spool, verify, log in, create an
    // organization, list its members.
    let password = "walkthrough password 123";
    p.grpcurl_json(
        &["keyshare.identity.v1.IdentityService/CreateAccount"],
        Some(&format!(r#"{{"email":"ada@example.com","display_name":"Ada","password":"{password}"}}"#)),
    );
    let mail_dir = p.spool.path().join("mail");
    let token = eventually("the verification mail in the spool", Duration::from_secs(30), || {
        let token = spooled_token(&mail_dir);
        async move { token }
    })
    .await;
    p.grpcurl_json(&["keyshare.identity.v1.IdentityService/VerifyEmail"], Some(&format!(r#"{{"token":"{token}"}}"#)));
    let login = p.grpcurl_json(
        &["keyshare.identity.v1.IdentityService/Login"],
        Some(&format!(r#"{{"email":"ada@example.com","password":"{password}"}}"#)),
    );
    let access = login["grant"]["accessToken"].as_str().unwrap().to_owned();
    let refresh = login["grant"]["refreshToken"].as_str().unwrap().to_owned();
    let bearer = format!("authorization: Bearer {access}");
    let org = p.grpcurl_json(
        &["-H", &bearer, "keyshare.identity.v1.IdentityService/CreateOrganization"],
        Some(r#"{"organization":{"display_name":"Acme"}}"#),
    );
    let org_name = org["organization"]["name"].as_str().unwrap();
    let members = p.grpcurl_json(
        &["-H", &bearer, "keyshare.identity.v1.IdentityService/ListOrganizationMembers"],
        Some(&format!(r#"{{"parent":"{org_name}"}}"#)),
    );
    assert_eq!(members["members"][0]["role"], "ORGANIZATION_ROLE_OWNER");

    // A bad request through grpcurl: INVALID_ARGUMENT naming the field.
    let bad = p.grpcurl(
        &["keyshare.identity.v1.IdentityService/CreateAccount"],
        Some(r#"{"email":"nope","display_name":"X","password":"short"}"#),
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("InvalidArgument") && stderr.contains("email") && stderr.contains("password"), "{stderr}");

    // Metrics: the documented names, with this call's method.
    let body = reqwest_get(&format!("http://127.0.0.1:{}/metrics", p.metrics_port)).await;
    for name in [
        "keyshare_rpc_calls_total",
        "keyshare_rpc_duration_seconds",
        "keyshare_db_pool_connections",
        r#"method="/keyshare.identity.v1.IdentityService/Login""#,
        r#"code="InvalidArgument""#,
    ] {
        assert!(body.contains(name), "{name} missing from metrics");
    }

    // Nothing secret reached the logs, though they are at debug level.
    let logs = p.logs();
    assert!(logs.contains("logged in"), "the log is being written");
    for (what, secret) in
        [("password", password), ("verification token", &token), ("access token", &access), ("refresh token", &refresh)]
    {
        let line = logs.lines().find(|line| line.contains(secret)).map(|line| line.replace(secret, "<SECRET>"));
        assert!(line.is_none(), "the {what} reached the log: {line:?}");
    }
}

/// A minimal HTTP GET over a raw socket: enough for a Prometheus scrape.
async fn reqwest_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    stream
        .write_all(format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

#[tokio::test]
async fn sigterm_lets_in_flight_calls_finish_and_exits_zero() {
    let mut p = Process::start().await;
    let mut client = connect(p.addr().parse().unwrap()).await;
    client
        .create_account(pb::CreateAccountRequest {
            email: "busy@example.com".into(),
            display_name: "Busy".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap();

    // Password hashing makes each login take a while; 24 of them queue on two cores.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..24 {
        let mut client = client.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let result = client
                .login(pb::LoginRequest { email: "busy@example.com".into(), password: "wrong password!!".into() })
                .await;
            let _ = done.send((std::time::Instant::now(), result.map(|_| ()).map_err(|s| s.code())));
        });
    }
    drop(done_tx);
    // The first answer proves the server is working through them; stop it now.
    let first = done_rx.recv().await.unwrap();
    let terminated_at = std::time::Instant::now();
    p.terminate();
    let mut results = vec![first];
    while let Some(result) = done_rx.recv().await {
        results.push(result);
    }
    assert_eq!(results.len(), 24);
    let after_signal = results.iter().filter(|(at, _)| *at > terminated_at).count();
    assert!(after_signal > 0, "no call was still in flight when SIGTERM was sent");
    for (_, result) in &results {
        // Every call got its real answer (wrong password, or throttled after five), none was cut.
        assert!(
            matches!(result, Err(tonic::Code::Unauthenticated) | Err(tonic::Code::ResourceExhausted)),
            "{result:?}"
        );
    }
    let status = p.process.wait(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(0));
}

#[test]
fn configuration_errors_name_the_variable_and_hide_the_value() {
    let run = |env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_identity")).env_clear().envs(env.iter().copied()).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stderr) = run(&[("KEYSHARE_KEY_ENCRYPTION_KEYS", "k1:c2VjcmV0LWJ1dC1zaG9ydA==")]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");

    let (code, stderr) = run(&[
        ("DATABASE_URL", "postgres://postgres@127.0.0.1/x"),
        ("KEYSHARE_KEY_ENCRYPTION_KEYS", "k1:c2VjcmV0LWJ1dC1zaG9ydA=="),
    ]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("KEYSHARE_KEY_ENCRYPTION_KEYS") && !stderr.contains("c2VjcmV0"), "{stderr}");

    let (code, stderr) = run(&[("DATABASE_URL", "postgres://x"), ("KEYSHARE_LISTEN_ADDR", "everywhere")]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("KEYSHARE_LISTEN_ADDR"), "{stderr}");
}
