//! A stack of Keyshare's services started in this process, on a database made for the test:
//! `Stack::builder().keyring().invitation().authorizer().smtp().clock(..).start()`. Every
//! listener binds port 0, except keyring's and invitation's first instances, whose ports are
//! reserved beforehand with `free_port` (their peers must know them before they start); each
//! service can be stopped, started again on the same address, or joined by more replicas.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keyshare_proto::identity::v1 as idpb;
use keyshare_proto::keyring::v1 as krpb;
use keyshare_runtime::clock::{SharedClock, SystemClock};
use keyshare_runtime::crypto::Sealer;
use keyshare_runtime::server::ServeError;
use keyshare_runtime::testkit::{self, PrivateCluster, SmtpServer, TestAccount, TestDatabase, authed, free_port};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::settings::{Setting, Settings};

/// The password of every account a stack signs up.
pub const PASSWORD: &str = "correct horse battery staple";

/// The secrets of the internal clients identity knows in a stack: each service's own, and a
/// `watcher` that may only follow the feeds, as an authorizer does.
pub mod secrets {
    pub const KEYRING: &str = "keyring-secret-for-tests-0123456789abcdef";
    pub const INVITATION: &str = "invitation-secret-for-tests-0123456789abcd";
    pub const AUTHORIZER: &str = "authorizer-secret-for-tests-0123456789abcd";
    pub const WATCHER: &str = "watcher-secret-for-tests-0123456789abcdef0";
}

/// The four services.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Identity,
    Keyring,
    Invitation,
    Authorizer,
}

impl Kind {
    fn index(self) -> usize {
        self as usize
    }

    /// The internal client the service authenticates to identity as, if it calls identity.
    fn client(self) -> Option<Setting> {
        let (id, secret) = match self {
            Kind::Identity => return None,
            Kind::Keyring => ("keyring", secrets::KEYRING),
            Kind::Invitation => ("invitation", secrets::INVITATION),
            Kind::Authorizer => ("authorizer", secrets::AUTHORIZER),
        };
        Some(Setting::Client { id: id.into(), secret: secret.into() })
    }
}

/// The database a stack runs on.
#[derive(Debug)]
pub enum Store {
    /// A database of its own on the shared test server.
    Fresh(TestDatabase),
    /// A server of its own, which the test may stop and start.
    Cluster(PrivateCluster),
    /// A database the test made and owns, by URL.
    Given(String),
}

impl Store {
    pub fn url(&self) -> String {
        match self {
            Store::Fresh(db) => db.url.clone(),
            Store::Cluster(cluster) => cluster.url(),
            Store::Given(url) => url.clone(),
        }
    }
}

/// One running (or stopped) instance of a service.
pub struct Service {
    pub kind: Kind,
    /// Its settings, as it was started: a restart binds the same gRPC address.
    pub settings: Settings,
    pub clock: SharedClock,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The authorizer's management port (UsageService).
    pub management_addr: Option<SocketAddr>,
    /// What the authorizer's follower fills and its checks read.
    pub shared: Option<Arc<keyshare_authorizer::state::Shared>>,
    running: Option<Running>,
}

/// How to stop a running instance, and the task that ends when it has.
type Running = (oneshot::Sender<()>, JoinHandle<Result<(), ServeError>>);

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("kind", &self.kind).field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Service {
    /// Starts `kind` with `settings` on `clock`; returns once it listens (an authorizer may not be
    /// SERVING yet: see [`serving`]). Panics, naming the service, if it does not start.
    pub async fn launch(kind: Kind, settings: Settings, clock: SharedClock) -> Self {
        let env = settings.env();
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let fail = |e: &dyn std::fmt::Display| -> ! { panic!("{kind:?} did not start: {e}") };
        let (addr, metrics_addr, management_addr, shared, server) = match kind {
            Kind::Identity => {
                let config = keyshare_identity::Config::from_env(&env).unwrap_or_else(|e| fail(&e));
                let s = keyshare_identity::start(config, clock.clone(), shutdown).await.unwrap_or_else(|e| fail(&e));
                (s.addr, s.metrics_addr, None, None, s.server)
            }
            Kind::Keyring => {
                let config = keyshare_keyring::Config::from_env(&env).unwrap_or_else(|e| fail(&e));
                let s = keyshare_keyring::start(config, clock.clone(), shutdown).await.unwrap_or_else(|e| fail(&e));
                (s.addr, s.metrics_addr, None, None, s.server)
            }
            Kind::Invitation => {
                let config = keyshare_invitation::Config::from_env(&env).unwrap_or_else(|e| fail(&e));
                let s = keyshare_invitation::start(config, clock.clone(), shutdown).await.unwrap_or_else(|e| fail(&e));
                (s.addr, s.metrics_addr, None, None, s.server)
            }
            Kind::Authorizer => {
                let config = keyshare_authorizer::Config::from_env(&env).unwrap_or_else(|e| fail(&e));
                let s = keyshare_authorizer::start(config, clock.clone(), shutdown).await.unwrap_or_else(|e| fail(&e));
                (s.addr, s.metrics_addr, Some(s.management_addr), Some(s.shared), s.server)
            }
        };
        let settings = settings.with(Setting::Listen(addr));
        Self { kind, settings, clock, addr, metrics_addr, management_addr, shared, running: Some((stop, server)) }
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Stops the service gracefully and waits (at most 30 s) until it has stopped: drained, and
    /// for the authorizer, the usage it held written.
    pub async fn stop(&mut self) {
        let Some((stop, server)) = self.running.take() else { return };
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .unwrap_or_else(|_| panic!("{:?} did not stop within 30 s", self.kind))
            .expect("the server task ends without panicking")
            .expect("the server stops cleanly");
    }

    /// Starts the service again, on the same gRPC address, settings and clock.
    pub async fn start(&mut self) {
        assert!(!self.is_running(), "{:?} is already running", self.kind);
        *self = Self::launch(self.kind, self.settings.clone(), self.clock.clone()).await;
    }

    /// Stops the service and starts it again on the same address, as a redeploy would.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
    }

    /// Sends the stop signal without waiting for the service to stop.
    pub fn signal_stop(&mut self) {
        if let Some((stop, _)) = self.running.take() {
            let _ = stop.send(());
        }
    }

    /// A connected channel to the service's gRPC port.
    pub async fn channel(&self) -> Channel {
        testkit::channel(self.addr).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

/// Where a stack's mail goes.
enum Mail {
    Spool,
    OwnSmtp,
    Smtp(String),
}

/// What [`Stack::builder`] starts.
pub struct StackBuilder {
    wanted: [bool; 4],
    mail: Mail,
    clock: SharedClock,
    authorizer_clock: Option<SharedClock>,
    store: Option<Store>,
    all: Settings,
    each: [Settings; 4],
}

impl StackBuilder {
    /// keyring too (identity is always started).
    pub fn keyring(mut self) -> Self {
        self.wanted[Kind::Keyring.index()] = true;
        self
    }

    /// invitation too (and keyring, which it calls).
    pub fn invitation(mut self) -> Self {
        self.wanted[Kind::Invitation.index()] = true;
        self.keyring()
    }

    /// An authorizer too (and keyring, whose feed it follows). [`Stack::start`] does not wait
    /// for it to be SERVING.
    pub fn authorizer(mut self) -> Self {
        self.wanted[Kind::Authorizer.index()] = true;
        self.keyring()
    }

    /// A real SMTP server of the stack's own receives the mail; without it (or
    /// [`StackBuilder::smtp_url`]), mail is written into a spool directory.
    pub fn smtp(mut self) -> Self {
        self.mail = Mail::OwnSmtp;
        self
    }

    /// Mail goes to the test's own SMTP server at `url`.
    pub fn smtp_url(mut self, url: String) -> Self {
        self.mail = Mail::Smtp(url);
        self
    }

    /// The clock every service reads (the system's by default).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// A clock of the authorizer's own (the stack's clock by default).
    pub fn authorizer_clock(mut self, clock: SharedClock) -> Self {
        self.authorizer_clock = Some(clock);
        self
    }

    /// Runs on `store` rather than on a fresh database of the shared test server.
    pub fn on(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }

    /// A setting for every service, over the stack's defaults.
    pub fn with_all(mut self, setting: Setting) -> Self {
        self.all.push(setting);
        self
    }

    /// A setting for one service, over the stack's defaults and [`StackBuilder::with_all`]'s.
    pub fn with(mut self, kind: Kind, setting: Setting) -> Self {
        self.each[kind.index()].push(setting);
        self
    }

    /// Starts identity, then keyring, invitation and the authorizer as asked, each told where
    /// the others are. keyring's and invitation's ports are chosen before identity starts, since
    /// identity calls keyring and keyring calls invitation.
    pub async fn start(self) -> Stack {
        let store = match self.store {
            Some(store) => store,
            None => Store::Fresh(TestDatabase::create().await),
        };
        let smtp = match self.mail {
            Mail::OwnSmtp => Some(SmtpServer::start().await),
            _ => None,
        };
        let smtp_url = match self.mail {
            Mail::Smtp(url) => Some(url),
            _ => smtp.as_ref().map(SmtpServer::url),
        };
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mail_spool =
            std::env::temp_dir().join(format!("keyshare-stack-{}-{}", std::process::id(), started.as_nanos()));
        let (_, kek) = Sealer::generate("kek1");
        let wants = |kind: Kind| self.wanted[kind.index()];
        let port_of = |kind: Kind| wants(kind).then(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let keyring_addr = port_of(Kind::Keyring);
        let invitation_addr = port_of(Kind::Invitation);
        let mut stack = Stack {
            identity: None,
            keyring: None,
            invitation: None,
            authorizer: None,
            replicas: Vec::new(),
            smtp,
            smtp_url,
            mail_spool,
            kek,
            clock: self.clock,
            authorizer_clock: self.authorizer_clock,
            all: self.all,
            each: self.each,
            store,
            peers: [None; 4],
        };
        stack.peers[Kind::Keyring.index()] = keyring_addr;
        stack.peers[Kind::Invitation.index()] = invitation_addr;

        let identity = stack.launch(Kind::Identity, []).await;
        stack.peers[Kind::Identity.index()] = Some(identity.addr);
        stack.identity = Some(identity);
        if let Some(addr) = keyring_addr {
            stack.keyring = Some(stack.launch(Kind::Keyring, [Setting::Listen(addr)]).await);
        }
        if let Some(addr) = invitation_addr {
            stack.invitation = Some(stack.launch(Kind::Invitation, [Setting::Listen(addr)]).await);
        }
        if wants(Kind::Authorizer) {
            stack.authorizer = Some(stack.launch(Kind::Authorizer, []).await);
        }
        stack
    }
}

/// Services started together on one database, stopped when dropped.
pub struct Stack {
    pub identity: Option<Service>,
    pub keyring: Option<Service>,
    pub invitation: Option<Service>,
    pub authorizer: Option<Service>,
    /// More instances started with [`Stack::add`], stopped with the stack.
    pub replicas: Vec<Service>,
    /// The stack's own SMTP server, with [`StackBuilder::smtp`].
    pub smtp: Option<SmtpServer>,
    smtp_url: Option<String>,
    /// Where mail is written when there is no SMTP server.
    pub mail_spool: PathBuf,
    /// The key-encryption keys every service is given.
    pub kek: String,
    pub clock: SharedClock,
    authorizer_clock: Option<SharedClock>,
    all: Settings,
    each: [Settings; 4],
    /// Where each service's first instance listens (or will).
    peers: [Option<SocketAddr>; 4],
    /// Dropped last, after every service has been told to stop.
    pub store: Store,
}

impl Stack {
    pub fn builder() -> StackBuilder {
        StackBuilder {
            wanted: [true, false, false, false],
            mail: Mail::Spool,
            clock: Arc::new(SystemClock),
            authorizer_clock: None,
            store: None,
            all: Settings::new(),
            each: Default::default(),
        }
    }

    /// The database's URL.
    pub fn db_url(&self) -> String {
        self.store.url()
    }

    fn peer_url(&self, kind: Kind) -> String {
        // Nothing listens on port 1: calls to a service the stack lacks fail and stay queued.
        match self.peers[kind.index()] {
            Some(addr) => format!("http://{addr}"),
            None => "http://127.0.0.1:1".into(),
        }
    }

    /// The settings a new instance of `kind` gets: the stack's defaults (any free port, the
    /// stack's database, mail, keys and peers, its internal client), then the builder's.
    pub fn settings(&self, kind: Kind) -> Settings {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut settings = Settings::from([
            Setting::DatabaseUrl(self.db_url()),
            Setting::Listen(loopback),
            Setting::Metrics(loopback),
            Setting::KeyEncryptionKeys(self.kek.clone()),
            // Nothing balances load here: a stopping service need not wait for anyone to notice.
            Setting::DrainDelay(Duration::ZERO),
            match &self.smtp_url {
                Some(url) => Setting::SmtpUrl(url.clone()),
                None => Setting::MailSpool(self.mail_spool.clone()),
            },
        ]);
        match kind {
            Kind::Identity => settings.extend([
                Setting::KeyringUrl(self.peer_url(Kind::Keyring)),
                Setting::InternalClients(
                    [
                        ("keyring", secrets::KEYRING),
                        ("invitation", secrets::INVITATION),
                        ("authorizer", secrets::AUTHORIZER),
                        ("watcher", secrets::WATCHER),
                    ]
                    .iter()
                    .map(|(id, secret)| ((*id).to_owned(), (*secret).to_owned()))
                    .collect(),
                ),
                Setting::InternalClientScopes(vec![("watcher".into(), "keys.watch sessions.watch".into())]),
            ]),
            Kind::Keyring => settings.extend([
                Setting::IdentityUrl(self.peer_url(Kind::Identity)),
                Setting::InvitationUrl(self.peer_url(Kind::Invitation)),
            ]),
            Kind::Invitation | Kind::Authorizer => settings.extend([
                Setting::IdentityUrl(self.peer_url(Kind::Identity)),
                Setting::KeyringUrl(self.peer_url(Kind::Keyring)),
            ]),
        }
        if kind == Kind::Authorizer {
            settings.push(Setting::Management(loopback));
        }
        settings.extend(kind.client());
        settings.extend(self.all.clone());
        settings.extend(self.each[kind.index()].clone());
        settings
    }

    fn clock_of(&self, kind: Kind) -> SharedClock {
        match (&self.authorizer_clock, kind) {
            (Some(clock), Kind::Authorizer) => clock.clone(),
            _ => self.clock.clone(),
        }
    }

    /// Starts an instance of `kind` with `extra` settings over [`Stack::settings`]; the caller
    /// owns it (dropping it stops it).
    pub async fn launch(&self, kind: Kind, extra: impl IntoIterator<Item = Setting>) -> Service {
        let mut settings = self.settings(kind);
        settings.extend(extra);
        Service::launch(kind, settings, self.clock_of(kind)).await
    }

    /// Starts another instance of `kind` (a replica on the same database and peers), kept and
    /// stopped with the stack.
    pub async fn add(&mut self, kind: Kind, extra: impl IntoIterator<Item = Setting>) -> &Service {
        let service = self.launch(kind, extra).await;
        self.replicas.push(service);
        self.replicas.last().expect("just added")
    }

    /// The first instance of `kind`. Panics if the stack was built without it.
    pub fn service(&self, kind: Kind) -> &Service {
        let service = match kind {
            Kind::Identity => &self.identity,
            Kind::Keyring => &self.keyring,
            Kind::Invitation => &self.invitation,
            Kind::Authorizer => &self.authorizer,
        };
        service.as_ref().unwrap_or_else(|| panic!("this stack has no {kind:?}"))
    }

    /// The first instance of `kind`, to stop or restart it.
    pub fn service_mut(&mut self, kind: Kind) -> &mut Service {
        let service = match kind {
            Kind::Identity => &mut self.identity,
            Kind::Keyring => &mut self.keyring,
            Kind::Invitation => &mut self.invitation,
            Kind::Authorizer => &mut self.authorizer,
        };
        service.as_mut().unwrap_or_else(|| panic!("this stack has no {kind:?}"))
    }

    /// The gRPC address of the first instance of `kind`.
    pub fn addr(&self, kind: Kind) -> SocketAddr {
        self.service(kind).addr
    }

    pub async fn channel(&self, kind: Kind) -> Channel {
        self.service(kind).channel().await
    }

    /// Signs `email` up with [`PASSWORD`] and logs in. With an SMTP server, the account first
    /// verifies its address through the mail it received.
    pub async fn account(&self, email: &str) -> TestAccount {
        testkit::sign_up(self.channel(Kind::Identity).await, email, PASSWORD, self.smtp.as_ref()).await
    }

    /// Signs `email` up and logs in without verifying the address (the stack must not require
    /// verification: [`Setting::RequireVerifiedEmail`]).
    pub async fn unverified_account(&self, email: &str) -> TestAccount {
        testkit::sign_up(self.channel(Kind::Identity).await, email, PASSWORD, None).await
    }

    /// An access token of the internal client `client_id`.
    pub async fn client_token(&self, client_id: &str, client_secret: &str) -> String {
        testkit::client_token(self.channel(Kind::Identity).await, client_id, client_secret).await
    }

    /// An access token of invitation's internal client, the one that grants memberships.
    pub async fn invitation_token(&self) -> String {
        self.client_token("invitation", secrets::INVITATION).await
    }

    /// An access token of the authorizer's internal client, the one that follows the feeds.
    pub async fn authorizer_token(&self) -> String {
        self.client_token("authorizer", secrets::AUTHORIZER).await
    }

    /// An access token of the internal client `watcher`, which may only follow the feeds.
    pub async fn watcher_token(&self) -> String {
        self.client_token("watcher", secrets::WATCHER).await
    }

    /// An organization named `display_name`, created by the holder of `token`.
    pub async fn organization(&self, token: &str, display_name: &str) -> String {
        let mut identity =
            idpb::identity_service_client::IdentityServiceClient::new(self.channel(Kind::Identity).await);
        let organization = Some(idpb::Organization { display_name: display_name.into(), ..Default::default() });
        let request = authed(token, idpb::CreateOrganizationRequest { organization });
        identity
            .create_organization(request)
            .await
            .expect("CreateOrganization")
            .into_inner()
            .organization
            .expect("an organization")
            .name
    }

    /// A project named `display_name` in `organization`, created by the holder of `token`.
    pub async fn project(&self, token: &str, organization: &str, display_name: &str) -> String {
        let mut keyring = krpb::keyring_service_client::KeyringServiceClient::new(self.channel(Kind::Keyring).await);
        let project = Some(krpb::Project { display_name: display_name.into(), ..Default::default() });
        let request = authed(token, krpb::CreateProjectRequest { parent: organization.into(), project });
        keyring.create_project(request).await.expect("CreateProject").into_inner().project.expect("a project").name
    }

    /// A key named `display_name` in `project`, created by the holder of `token`, with both
    /// credentials as CreateKey returned them.
    pub async fn key_in(&self, token: &str, project: &str, display_name: &str) -> TestKey {
        let mut keyring = krpb::keyring_service_client::KeyringServiceClient::new(self.channel(Kind::Keyring).await);
        let key = Some(krpb::Key { display_name: display_name.into(), ..Default::default() });
        let request = authed(token, krpb::CreateKeyRequest { parent: project.into(), key, ..Default::default() });
        let created = keyring.create_key(request).await.expect("CreateKey").into_inner();
        TestKey {
            project: project.into(),
            name: created.key.expect("a key").name,
            sandbox: created.sandbox_credential,
            production: created.production_credential,
        }
    }

    /// An organization, a project and a key, all made by the holder of `token`.
    pub async fn key(&self, token: &str) -> TestKey {
        let organization = self.organization(token, "Org").await;
        let project = self.project(token, &organization, "API").await;
        self.key_in(token, &project, "Partner").await
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let services = [&mut self.authorizer, &mut self.invitation, &mut self.keyring, &mut self.identity];
        for service in services.into_iter().flatten() {
            service.signal_stop();
        }
        for replica in &mut self.replicas {
            replica.signal_stop();
        }
    }
}

/// A key as CreateKey made it: its name, its project and both live credentials.
#[derive(Clone, Debug)]
pub struct TestKey {
    pub project: String,
    pub name: String,
    pub sandbox: String,
    pub production: String,
}

/// Waits until the server at `addr` reports SERVING, failing after `deadline`.
pub async fn serving(addr: SocketAddr, deadline: Duration) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    // Lazily: the server may not be listening yet.
    let health = HealthClient::new(Channel::from_shared(format!("http://{addr}")).expect("a URL").connect_lazy());
    testkit::eventually(&format!("{addr} to report SERVING"), deadline, || {
        let mut health = health.clone();
        async move {
            let status = health.check(HealthCheckRequest { service: String::new() }).await.ok()?.into_inner().status;
            (status == ServingStatus::Serving as i32).then_some(())
        }
    })
    .await;
}
