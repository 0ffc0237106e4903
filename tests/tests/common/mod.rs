//! Keyshare's service binaries as separate processes, configured the way `scripts/run`
//! configures them, on a database and a real SMTP server made for the test: for what only a
//! whole process shows, such as its trace exporter (process-wide) or its metrics endpoint.
//!
//! The binaries are not built by the test: `cargo build --workspace --bins` first (scripts/test
//! does).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use keyshare_proto::identity::v1 as idpb;
use keyshare_proto::identity::v1::identity_service_client::IdentityServiceClient;
use keyshare_proto::keyring::v1 as krpb;
use keyshare_proto::keyring::v1::keyring_service_client::KeyringServiceClient;
use keyshare_runtime::crypto::Sealer;
use keyshare_runtime::testkit::{self, SmtpServer, TestDatabase, TestPki, free_port};
use keyshare_runtime::tls::{CertFiles, TlsSettings};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Every service, in the order they start (identity first: the others authenticate there).
pub const SERVICES: [&str; 4] = ["identity", "keyring", "invitation", "authorizer"];
pub const PASSWORD: &str = "a long test passphrase";

/// Internal clients and their secrets, as `var/dev-secrets.env` holds them for `scripts/run`.
const CLIENT_SECRETS: [(&str, &str); 3] = [
    ("keyring", "keyring-secret-for-system-tests-0123456789"),
    ("invitation", "invitation-secret-for-system-tests-0123456"),
    ("authorizer", "authorizer-secret-for-system-tests-0123456"),
];

/// The client secret of one of Keyshare's internal clients.
pub fn client_secret(client: &str) -> &'static str {
    CLIENT_SECRETS.iter().find(|(name, _)| *name == client).map(|(_, secret)| *secret).expect("a known client")
}

const STARTUP: Duration = Duration::from_secs(30);
const STOP: Duration = Duration::from_secs(15);

struct Process {
    child: Option<Child>,
    grpc: SocketAddr,
    metrics: SocketAddr,
    env: Vec<(String, String)>,
}

/// Running service processes; killed when dropped.
pub struct Keyshare {
    pub smtp: SmtpServer,
    processes: HashMap<&'static str, Process>,
    pub db: TestDatabase,
    /// With [`Keyshare::start_with_mtls`]: the CA of every certificate, and the client
    /// certificate the test's own calls present.
    pub tls: Option<(TestPki, CertFiles)>,
}

/// Where cargo put this test's sibling binaries (`target/<profile>`).
fn binary(service: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test>-<hash>
    let path = exe.parent().and_then(|deps| deps.parent()).unwrap().join(service);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace --bins` first", path.display());
    path
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

impl Keyshare {
    /// Starts `services` in order, each with `extra_env` on top of the usual environment, and
    /// waits until each reports SERVING.
    pub async fn start(services: &[&'static str], extra_env: &[(&str, String)]) -> Self {
        Self::start_maybe_tls(services, extra_env, None).await
    }

    /// [`Keyshare::start`] with mutual TLS everywhere: every service has a certificate of one
    /// test CA naming it (`keyring`, `keyring.keyshare.svc`, `127.0.0.1`), requires client
    /// certificates of that CA, and calls the others at `https://` URLs; the test's own calls
    /// present a certificate named `console`.
    pub async fn start_with_mtls(services: &[&'static str], extra_env: &[(&str, String)]) -> Self {
        let pki = TestPki::new("Keyshare system test CA");
        let (console, _) = pki.issue_files("console", &["console"]);
        Self::start_maybe_tls(services, extra_env, Some((pki, console))).await
    }

    async fn start_maybe_tls(
        services: &[&'static str],
        extra_env: &[(&str, String)],
        tls: Option<(TestPki, CertFiles)>,
    ) -> Self {
        let db = TestDatabase::create().await;
        let smtp = SmtpServer::start().await;
        let (_, kek) = Sealer::generate("k1");
        let addrs: HashMap<&str, (SocketAddr, SocketAddr)> =
            SERVICES.iter().map(|service| (*service, (loopback(), loopback()))).collect();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = |service: &str| format!("{scheme}://{}", addrs[service].0);
        let internal_clients =
            CLIENT_SECRETS.iter().map(|(client, secret)| format!("{client}:{secret}")).collect::<Vec<_>>().join(",");
        let mut keyshare = Self { smtp, processes: HashMap::new(), db, tls };
        for &service in services {
            let (grpc, metrics) = addrs[service];
            let mut env: Vec<(String, String)> = [
                ("DATABASE_URL", keyshare.db.url.clone()),
                ("KEYSHARE_LISTEN_ADDR", grpc.to_string()),
                ("KEYSHARE_METRICS_ADDR", metrics.to_string()),
                ("KEYSHARE_IDENTITY_URL", url("identity")),
                ("KEYSHARE_KEYRING_URL", url("keyring")),
                ("KEYSHARE_INVITATION_URL", url("invitation")),
                ("KEYSHARE_KEY_ENCRYPTION_KEYS", kek.clone()),
                ("KEYSHARE_INTERNAL_CLIENTS", internal_clients.clone()),
                ("KEYSHARE_SMTP_URL", keyshare.smtp.url()),
                ("KEYSHARE_MAIL_POLL_SECS", "1".into()),
                ("KEYSHARE_MAIL_RETRY_MAX_SECS", "1".into()),
                ("KEYSHARE_CALL_RETRY_SECS", "1".into()),
                ("KEYSHARE_SHUTDOWN_GRACE_SECS", "5".into()),
                ("KEYSHARE_DRAIN_DELAY_SECS", "0".into()),
                // The authorizer's second listener (UsageService); the others ignore it.
                ("KEYSHARE_MANAGEMENT_ADDR", loopback().to_string()),
                ("KEYSHARE_DB_POOL_SIZE", "4".into()),
                ("RUST_LOG", "info".into()),
            ]
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect();
            if let Some((client, secret)) = CLIENT_SECRETS.iter().find(|(client, _)| *client == service) {
                env.push(("KEYSHARE_CLIENT_ID".into(), (*client).into()));
                env.push(("KEYSHARE_CLIENT_SECRET".into(), (*secret).into()));
            }
            if let Some((pki, _)) = &keyshare.tls {
                let svc_name = format!("{service}.keyshare.svc");
                let (files, _) = pki.issue_files(service, &[service, &svc_name, "127.0.0.1"]);
                env.extend(pki.settings(&files, true));
            }
            env.extend(extra_env.iter().map(|(key, value)| ((*key).to_owned(), value.clone())));
            keyshare.processes.insert(service, Process { child: None, grpc, metrics, env });
            keyshare.launch(service).await;
        }
        keyshare
    }

    async fn launch(&mut self, service: &'static str) {
        let process = self.processes.get_mut(service).unwrap();
        let child = Command::new(binary(service))
            .env_clear()
            .envs(process.env.iter().cloned())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {service}: {e}"));
        process.child = Some(child);
        let grpc = process.grpc;
        let health = HealthClient::new(self.channel_to(grpc));
        let start = Instant::now();
        loop {
            let process = self.processes.get_mut(service).unwrap();
            if let Some(status) = process.child.as_mut().and_then(|child| child.try_wait().ok().flatten()) {
                panic!("{service} exited during startup ({status}); its log is above");
            }
            let answer = health.clone().check(HealthCheckRequest { service: String::new() }).await;
            if answer.is_ok_and(|answer| answer.into_inner().status == ServingStatus::Serving as i32) {
                return;
            }
            assert!(start.elapsed() < STARTUP, "{service} did not report SERVING within {STARTUP:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A service's gRPC address.
    pub fn grpc(&self, service: &str) -> SocketAddr {
        self.processes[service].grpc
    }

    /// A service's `/metrics` address.
    pub fn metrics(&self, service: &str) -> SocketAddr {
        self.processes[service].metrics
    }

    pub fn channel(&self, service: &str) -> Channel {
        self.channel_to(self.grpc(service))
    }

    /// A channel to `addr`, over mTLS when the services use it.
    fn channel_to(&self, addr: SocketAddr) -> Channel {
        match &self.tls {
            Some((pki, client)) => {
                let settings = TlsSettings { identity: Some(client.clone()), client_ca: None, ca: Some(pki.ca_path()) };
                keyshare_runtime::client::lazy_channel("test", &format!("https://{addr}"), &settings).unwrap()
            }
            None => Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy(),
        }
    }

    pub fn identity(&self) -> IdentityServiceClient<Channel> {
        IdentityServiceClient::new(self.channel("identity"))
    }

    pub fn keyring(&self) -> KeyringServiceClient<Channel> {
        KeyringServiceClient::new(self.channel("keyring"))
    }

    /// Stops a service as an operator would (SIGTERM) and returns how it exited.
    pub async fn terminate(&mut self, service: &str) -> ExitStatus {
        let mut child = self.processes.get_mut(service).and_then(|p| p.child.take()).expect("a running service");
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > STOP {
                let _ = child.kill();
                panic!("{service} did not stop within {STOP:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a stopped service again, on the same addresses.
    pub async fn restart(&mut self, service: &'static str) {
        assert!(self.processes[service].child.is_none(), "{service} is still running");
        self.launch(service).await;
    }

    /// A new account with a verified email; returns its access token.
    pub async fn account(&self, email: &str) -> String {
        testkit::sign_up(self.channel("identity"), email, PASSWORD, Some(&self.smtp)).await.token
    }

    /// An organization, a project and a key owned by the account behind `token`.
    pub async fn key(&self, token: &str) -> krpb::CreateKeyResponse {
        let organization = Some(idpb::Organization { display_name: "Acme".into(), ..Default::default() });
        let org = self
            .identity()
            .create_organization(authed(token, idpb::CreateOrganizationRequest { organization }))
            .await
            .unwrap()
            .into_inner()
            .organization
            .unwrap()
            .name;
        let mut keyring = self.keyring();
        let project = Some(krpb::Project { display_name: "Payments API".into(), ..Default::default() });
        let project = keyring
            .create_project(authed(token, krpb::CreateProjectRequest { parent: org, project }))
            .await
            .unwrap()
            .into_inner()
            .project
            .unwrap()
            .name;
        let key = Some(krpb::Key { display_name: "Partner".into(), ..Default::default() });
        let request = krpb::CreateKeyRequest { parent: project, key, ..Default::default() };
        keyring.create_key(authed(token, request)).await.unwrap().into_inner()
    }
}

impl Drop for Keyshare {
    fn drop(&mut self) {
        for process in self.processes.values_mut() {
            if let Some(mut child) = process.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[allow(unused_imports)] // each test binary uses some of them
pub use keyshare_runtime::testkit::{authed, token_from_mail as token_in};
