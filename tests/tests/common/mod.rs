//! Keyshare's service binaries as separate processes, configured the way `scripts/run`
//! configures them, on a database and a real SMTP server made for the test: for what only a
//! whole process shows, such as its trace exporter (process-wide) or its metrics endpoint.
//!
//! The binaries are not built by the test: `cargo build --workspace --bins` first (scripts/test
//! does).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::Duration;

use keyshare_proto::identity::v1 as idpb;
use keyshare_proto::identity::v1::identity_service_client::IdentityServiceClient;
use keyshare_proto::keyring::v1 as krpb;
use keyshare_proto::keyring::v1::keyring_service_client::KeyringServiceClient;
use keyshare_runtime::crypto::Sealer;
use keyshare_runtime::tls::{CertFiles, TlsSettings};
pub use keyshare_testkit::Setting;
use keyshare_testkit::{Kind, Output, Process, Settings, SmtpServer, TestDatabase, TestPki, free_port};
use tonic::transport::Channel;

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

fn kind(service: &str) -> Kind {
    match service {
        "identity" => Kind::Identity,
        "keyring" => Kind::Keyring,
        "invitation" => Kind::Invitation,
        "authorizer" => Kind::Authorizer,
        other => panic!("{other:?} is not a service"),
    }
}

struct Running {
    process: Process,
    grpc: SocketAddr,
    metrics: SocketAddr,
}

/// Running service processes; killed when dropped.
pub struct Keyshare {
    pub smtp: SmtpServer,
    processes: HashMap<&'static str, Running>,
    pub db: TestDatabase,
    /// With [`Keyshare::start_with_mtls`]: the CA of every certificate, and the client
    /// certificate the test's own calls present.
    pub tls: Option<(TestPki, CertFiles)>,
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

impl Keyshare {
    /// Starts `services` in order, each with `extra` on top of the usual settings, and waits
    /// until each reports SERVING.
    pub async fn start(services: &[&'static str], extra: impl IntoIterator<Item = Setting>) -> Self {
        Self::start_maybe_tls(services, extra.into_iter().collect(), None).await
    }

    /// [`Keyshare::start`] with mutual TLS everywhere: every service has a certificate of one
    /// test CA naming it (`keyring`, `keyring.keyshare.svc`, `127.0.0.1`), requires client
    /// certificates of that CA, and calls the others at `https://` URLs; the test's own calls
    /// present a certificate named `console`.
    pub async fn start_with_mtls(services: &[&'static str], extra: impl IntoIterator<Item = Setting>) -> Self {
        let pki = TestPki::new("Keyshare system test CA");
        let (console, _) = pki.issue_files("console", &["console"]);
        Self::start_maybe_tls(services, extra.into_iter().collect(), Some((pki, console))).await
    }

    async fn start_maybe_tls(services: &[&'static str], extra: Settings, tls: Option<(TestPki, CertFiles)>) -> Self {
        let db = TestDatabase::create().await;
        let smtp = SmtpServer::start().await;
        let (_, kek) = Sealer::generate("k1");
        let addrs: HashMap<&str, (SocketAddr, SocketAddr)> =
            SERVICES.iter().map(|service| (*service, (loopback(), loopback()))).collect();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = |service: &str| format!("{scheme}://{}", addrs[service].0);
        let internal_clients = CLIENT_SECRETS.iter().map(|(c, s)| ((*c).to_owned(), (*s).to_owned())).collect();
        let second = Duration::from_secs(1);
        let common = Settings::from([
            Setting::DatabaseUrl(db.url.clone()),
            Setting::IdentityUrl(url("identity")),
            Setting::KeyringUrl(url("keyring")),
            Setting::InvitationUrl(url("invitation")),
            Setting::KeyEncryptionKeys(kek),
            Setting::InternalClients(internal_clients),
            Setting::SmtpUrl(smtp.url()),
            Setting::MailPoll(second),
            Setting::MailRetryMax(second),
            Setting::CallRetry(second),
            Setting::ShutdownGrace(Duration::from_secs(5)),
            Setting::DrainDelay(Duration::ZERO),
            // The authorizer's second listener (UsageService); the others ignore it.
            Setting::Management(loopback()),
            Setting::PoolSize(4),
            Setting::Log("info".into()),
        ]);
        let mut keyshare = Self { smtp, processes: HashMap::new(), db, tls };
        for &service in services {
            let (grpc, metrics) = addrs[service];
            let mut settings = common.clone().with(Setting::Listen(grpc)).with(Setting::Metrics(metrics));
            if let Some((client, secret)) = CLIENT_SECRETS.iter().find(|(client, _)| *client == service) {
                settings.push(Setting::Client { id: (*client).into(), secret: (*secret).into() });
            }
            if let Some((pki, _)) = &keyshare.tls {
                let svc_name = format!("{service}.keyshare.svc");
                let (files, _) = pki.issue_files(service, &[service, &svc_name, "127.0.0.1"]);
                settings.extend(Setting::tls(pki, &files, true));
            }
            settings.extend(extra.clone());
            let process = Process::spawn(kind(service), settings, Output::Inherit);
            keyshare.processes.insert(service, Running { process, grpc, metrics });
            keyshare.until_serving(service).await;
        }
        keyshare
    }

    async fn until_serving(&mut self, service: &str) {
        let health = self.channel(service);
        let running = self.processes.get_mut(service).unwrap();
        running.process.until_serving(health, STARTUP).await;
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
        self.processes.get_mut(service).expect("a started service").process.terminate(STOP).await
    }

    /// Starts a stopped service again, on the same addresses.
    pub async fn restart(&mut self, service: &'static str) {
        self.processes.get_mut(service).expect("a started service").process.respawn();
        self.until_serving(service).await;
    }

    /// A new account with a verified email; returns its access token.
    pub async fn account(&self, email: &str) -> String {
        keyshare_testkit::sign_up(self.channel("identity"), email, PASSWORD, Some(&self.smtp)).await.token
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

#[allow(unused_imports)] // each test binary uses some of them
pub use keyshare_testkit::{authed, token_from_mail as token_in};
