//! Test world: identity, keyring and the authorizer in-process on one database; a project with
//! a key exists before the authorizer starts.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keyshare_proto::authorizer::v1 as pb;
use keyshare_proto::authorizer::v1::authorizer_service_client::AuthorizerServiceClient;
use keyshare_proto::identity::v1 as idpb;
use keyshare_proto::keyring::v1 as krpb;
use keyshare_runtime::clock::{FrozenClock, ManualClock};
use keyshare_runtime::config::Env;
use keyshare_runtime::crypto::Sealer;
use keyshare_runtime::testkit::{self, PrivateCluster, TestDatabase, eventually};
#[allow(unused_imports)] // each test binary uses some of them
pub use keyshare_runtime::testkit::{authed, channel, scrape};
use prost_types::FieldMask;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

pub mod envoy;
pub mod process;

const KEYRING_SECRET: &str = "keyring-secret-for-tests-0123456789abcdef";
pub const AUTHORIZER_SECRET: &str = "authorizer-secret-for-tests-0123456789abc";
const INVITATION_SECRET: &str = "invitation-secret-for-tests-0123456789abc";

pub fn env(pairs: Vec<(&str, String)>) -> Env {
    Env::from_pairs(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)))
}

/// Starts keyring; returns its stop switch, its server task and its address.
pub async fn start_keyring(
    config: keyshare_keyring::Config,
    clock: Arc<ManualClock>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), keyshare_runtime::server::ServeError>>,
    std::net::SocketAddr,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let started = keyshare_keyring::start(config, clock, async move {
        let _ = rx.await;
    })
    .await
    .unwrap();
    (tx, started.server, started.addr)
}

pub struct World {
    pub keyring_config: keyshare_keyring::Config,
    pub keyring_clock: Arc<ManualClock>,
    pub keyring_stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub keyring_server: Option<tokio::task::JoinHandle<Result<(), keyshare_runtime::server::ServeError>>>,
    /// The database every service uses.
    pub db_url: String,
    pub store: Store,
    pub authorizer_config: keyshare_authorizer::Config,
    pub authorizer_stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub authorizer_server: Option<tokio::task::JoinHandle<Result<(), keyshare_runtime::server::ServeError>>>,
    pub authorizer_metrics: std::net::SocketAddr,
    /// The authorizer's own clock: it moves only when the test moves it.
    pub frozen: Arc<FrozenClock>,
    pub keyring: krpb::keyring_service_client::KeyringServiceClient<Channel>,
    pub authorizer: AuthorizerServiceClient<Channel>,
    pub shared: Arc<keyshare_authorizer::state::Shared>,
    pub token: String,
    /// The authorizer's check port (CheckKey, ext_authz).
    pub authorizer_addr: std::net::SocketAddr,
    /// The authorizer's management port (UsageService).
    pub management_addr: std::net::SocketAddr,
    _stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl World {
    /// Stops keyring gracefully and waits until it has stopped.
    pub async fn stop_keyring(&mut self) {
        if let Some(stop) = self.keyring_stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.keyring_server.take() {
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .expect("keyring stops promptly")
                .unwrap()
                .unwrap();
        }
    }

    /// Starts keyring again at the same address.
    pub async fn restart_keyring(&mut self) {
        let (stop, server, _) = start_keyring(self.keyring_config.clone(), self.keyring_clock.clone()).await;
        (self.keyring_stop, self.keyring_server) = (Some(stop), Some(server));
    }

    /// Stops the authorizer gracefully (it writes the usage it holds) and starts it again on
    /// the same database, with empty memory; waits until it reports SERVING.
    pub async fn restart_authorizer(&mut self) {
        if let Some(stop) = self.authorizer_stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.authorizer_server.take() {
            tokio::time::timeout(Duration::from_secs(15), server)
                .await
                .expect("the authorizer stops promptly")
                .unwrap()
                .unwrap();
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let started = keyshare_authorizer::start(self.authorizer_config.clone(), self.frozen.clone(), async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
        serving(started.addr).await;
        self.authorizer = AuthorizerServiceClient::new(channel(started.addr).await);
        self.authorizer_addr = started.addr;
        self.management_addr = started.management_addr;
        self.authorizer_metrics = started.metrics_addr;
        self.shared = started.shared;
        (self.authorizer_stop, self.authorizer_server) = (Some(tx), Some(started.server));
    }

    /// A connection to the test database.
    pub async fn sql(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.db_url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }

    /// The authorizer's Prometheus metric `name` (summed over its labels), if exported.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric_at(self.authorizer_metrics, name).await
    }

    /// Waits until the authorizer has applied every change committed so far.
    pub async fn synced(&self) {
        let (client, connection) = tokio_postgres::connect(&self.db_url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let newest: i64 =
            client.query_one("SELECT coalesce(max(seq), 0) FROM keyring.changes", &[]).await.unwrap().get(0);
        let shared = self.shared.clone();
        eventually("the authorizer to apply the feed", Duration::from_secs(10), || {
            let applied = shared.sequence.load(Ordering::Acquire);
            async move { (applied >= newest).then_some(()) }
        })
        .await;
    }

    pub async fn check(
        &mut self,
        key: &str,
        method: &str,
        ip: &str,
        project: &str,
        environment: pb::Environment,
    ) -> pb::CheckKeyResponse {
        self.authorizer
            .check_key(pb::CheckKeyRequest {
                key: key.into(),
                project: project.into(),
                method: method.into(),
                path: "/v1/things".into(),
                client_ip: ip.into(),
                environment: environment as i32,
            })
            .await
            .expect("a rejected key is an answer, never an RPC error")
            .into_inner()
    }

    pub async fn set(&mut self, env_name: &str, path: &str, edit: impl FnOnce(&mut krpb::KeyEnvironment)) {
        let mut environment = krpb::KeyEnvironment { name: env_name.into(), ..Default::default() };
        edit(&mut environment);
        self.keyring
            .update_key_environment(authed(
                &self.token,
                krpb::UpdateKeyEnvironmentRequest {
                    environment: Some(environment),
                    update_mask: Some(FieldMask { paths: vec![path.into()] }),
                    etag: String::new(),
                },
            ))
            .await
            .unwrap();
        self.synced().await;
    }
}

/// The metric `name` (summed over its labels) at a metrics endpoint, if exported.
pub async fn metric_at(metrics: std::net::SocketAddr, name: &str) -> Option<f64> {
    let text = scrape(metrics).await;
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// The database a world runs on.
#[derive(Debug)]
pub enum Store {
    /// A database of its own on the shared test server.
    Fresh(TestDatabase),
    /// A server of its own, which the test may stop and start.
    Cluster(PrivateCluster),
}

/// Waits until a server's health says SERVING.
pub async fn serving(addr: std::net::SocketAddr) {
    // Lazily: a process may not be listening yet.
    let health = HealthClient::new(Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy());
    eventually("the authorizer to report SERVING", Duration::from_secs(20), || {
        let mut health = health.clone();
        async move {
            let status = health.check(HealthCheckRequest { service: String::new() }).await.ok()?.into_inner().status;
            (status == ServingStatus::Serving as i32).then_some(())
        }
    })
    .await;
}

pub async fn world() -> (World, String, String, String, String) {
    world_on(Store::Fresh(TestDatabase::create().await)).await
}

/// Creates a key named `name` in `project` as the holder of `token`.
pub async fn create_key(
    keyring: &mut krpb::keyring_service_client::KeyringServiceClient<Channel>,
    token: &str,
    project: &str,
    name: &str,
) -> krpb::CreateKeyResponse {
    let key = Some(krpb::Key { display_name: name.into(), ..Default::default() });
    let request = krpb::CreateKeyRequest { parent: project.to_owned(), key, ..Default::default() };
    keyring.create_key(authed(token, request)).await.unwrap().into_inner()
}

/// A world on the given database: (world, project, key, sandbox credential, production credential).
pub async fn world_on(store: Store) -> (World, String, String, String, String) {
    let db_url = match &store {
        Store::Fresh(db) => db.url.clone(),
        Store::Cluster(cluster) => cluster.url(),
    };
    let (_, kek) = Sealer::generate("k1");
    let clock = ManualClock::new();
    let spool = std::env::temp_dir().join(format!("authorizer-test-{}", std::process::id()));
    let base = |extra: Vec<(&'static str, String)>| {
        let mut all = vec![
            ("DATABASE_URL", db_url.clone()),
            ("KEYSHARE_LISTEN_ADDR", "127.0.0.1:0".to_owned()),
            ("KEYSHARE_METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("KEYSHARE_KEY_ENCRYPTION_KEYS", kek.clone()),
            ("KEYSHARE_MAIL_SPOOL_DIR", spool.display().to_string()),
            // Nothing balances load here: a stopping service need not wait for anyone to notice.
            ("KEYSHARE_DRAIN_DELAY_SECS", "0".to_owned()),
        ];
        all.extend(extra);
        env(all)
    };
    let mut stops = Vec::new();
    let mut stopper = || {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(tx);
        async move {
            let _ = rx.await;
        }
    };
    // keyring listens on a fixed port, so a test can stop it and start it again at one address
    // (and identity knows where to find it).
    let keyring_port = keyshare_runtime::testkit::free_port();
    let identity = keyshare_identity::start(
        keyshare_identity::Config::from_env(&base(vec![
            ("KEYSHARE_KEYRING_URL", format!("http://127.0.0.1:{keyring_port}")),
            (
                "KEYSHARE_INTERNAL_CLIENTS",
                format!("keyring:{KEYRING_SECRET},authorizer:{AUTHORIZER_SECRET},invitation:{INVITATION_SECRET}"),
            ),
            ("KEYSHARE_REQUIRE_VERIFIED_EMAIL", "false".into()),
        ]))
        .unwrap(),
        clock.clone(),
        stopper(),
    )
    .await
    .unwrap()
    .addr;
    let keyring_config = keyshare_keyring::Config::from_env(&base(vec![
        ("KEYSHARE_LISTEN_ADDR", format!("127.0.0.1:{keyring_port}")),
        ("KEYSHARE_IDENTITY_URL", format!("http://{identity}")),
        ("KEYSHARE_INVITATION_URL", "http://127.0.0.1:1".into()),
        ("KEYSHARE_CLIENT_ID", "keyring".into()),
        ("KEYSHARE_CLIENT_SECRET", KEYRING_SECRET.into()),
    ]))
    .unwrap();
    let (keyring_stop, keyring_server, keyring) = start_keyring(keyring_config.clone(), clock.clone()).await;

    // An account, an organization, a project and a key, before the authorizer starts.
    let mut id = idpb::identity_service_client::IdentityServiceClient::new(channel(identity).await);
    let password = "authorizer test password";
    id.create_account(idpb::CreateAccountRequest {
        email: "o@example.com".into(),
        display_name: "O".into(),
        password: password.into(),
    })
    .await
    .unwrap();
    let token = id
        .login(idpb::LoginRequest { email: "o@example.com".into(), password: password.into() })
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap()
        .access_token;
    let org = id
        .create_organization(authed(
            &token,
            idpb::CreateOrganizationRequest {
                organization: Some(idpb::Organization { display_name: "O".into(), ..Default::default() }),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .organization
        .unwrap()
        .name;
    let mut kr = krpb::keyring_service_client::KeyringServiceClient::new(channel(keyring).await);
    let project = kr
        .create_project(authed(
            &token,
            krpb::CreateProjectRequest {
                parent: org,
                project: Some(krpb::Project { display_name: "P".into(), ..Default::default() }),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .project
        .unwrap()
        .name;
    let created = create_key(&mut kr, &token, &project, "K").await;

    let frozen = FrozenClock::new();
    let authorizer_config = keyshare_authorizer::Config::from_env(&base(vec![
        ("KEYSHARE_IDENTITY_URL", format!("http://{identity}")),
        ("KEYSHARE_KEYRING_URL", format!("http://{keyring}")),
        ("KEYSHARE_CLIENT_ID", "authorizer".into()),
        ("KEYSHARE_CLIENT_SECRET", AUTHORIZER_SECRET.into()),
        ("KEYSHARE_USAGE_FLUSH_MILLIS", "100".into()),
        ("KEYSHARE_MANAGEMENT_ADDR", "127.0.0.1:0".into()),
    ]))
    .unwrap();
    let (authorizer_stop, rx) = tokio::sync::oneshot::channel::<()>();
    let started = keyshare_authorizer::start(authorizer_config.clone(), frozen.clone(), async move {
        let _ = rx.await;
    })
    .await
    .unwrap();
    // SERVING only once the first snapshot is in memory.
    serving(started.addr).await;
    let shared = started.shared.clone();
    assert!(shared.index.read().unwrap().credentials() >= 2, "SERVING means the snapshot is loaded");
    let world = World {
        keyring_config,
        keyring_clock: clock.clone(),
        keyring_stop: Some(keyring_stop),
        keyring_server: Some(keyring_server),
        db_url,
        store,
        authorizer_config,
        authorizer_stop: Some(authorizer_stop),
        authorizer_server: Some(started.server),
        authorizer_metrics: started.metrics_addr,
        frozen,
        keyring: kr,
        authorizer: AuthorizerServiceClient::new(channel(started.addr).await),
        authorizer_addr: started.addr,
        management_addr: started.management_addr,
        shared,
        token,
        _stops: stops,
    };
    let key = created.key.unwrap().name;
    (world, project, key, created.sandbox_credential, created.production_credential)
}

// --- The usage API (UsageService) and the people around a key ---

impl World {
    /// A client of the authorizer's UsageService.
    pub async fn usage(&self) -> pb::usage_service_client::UsageServiceClient<Channel> {
        pb::usage_service_client::UsageServiceClient::new(channel(self.management_addr).await)
    }

    pub async fn identity(&self) -> idpb::identity_service_client::IdentityServiceClient<Channel> {
        idpb::identity_service_client::IdentityServiceClient::new(self.identity_channel().await)
    }

    async fn identity_channel(&self) -> Channel {
        Channel::from_shared(self.keyring_config.identity_url.clone()).unwrap().connect().await.unwrap()
    }

    /// A new, logged-in account: (`accounts/{id}`, access token).
    pub async fn account(&self, email: &str) -> (String, String) {
        let account = testkit::sign_up(self.identity_channel().await, email, "usage test password", None).await;
        (account.name, account.token)
    }

    /// An access token of invitation's internal client, the one that grants memberships for
    /// accepted invitations (the authorizer's own client may not).
    pub async fn internal_token(&self) -> String {
        testkit::client_token(self.identity_channel().await, "invitation", INVITATION_SECRET).await
    }

    /// Makes `account` a member of `key` with `role`.
    pub async fn add_key_member(&mut self, key: &str, account: &str, role: krpb::KeyRole) {
        let internal = self.internal_token().await;
        self.keyring
            .add_key_member(authed(
                &internal,
                krpb::AddKeyMemberRequest {
                    parent: key.into(),
                    account: account.into(),
                    role: role as i32,
                    invitation_id: format!("{key}:{account}"),
                },
            ))
            .await
            .unwrap();
    }

    /// Makes `account` a member of `project` with `role`.
    pub async fn add_project_member(&mut self, project: &str, account: &str, role: krpb::ProjectRole) {
        let internal = self.internal_token().await;
        self.keyring
            .add_project_member(authed(
                &internal,
                krpb::AddProjectMemberRequest {
                    parent: project.into(),
                    account: account.into(),
                    role: role as i32,
                    invitation_id: format!("{project}:{account}"),
                },
            ))
            .await
            .unwrap();
    }

    /// Makes `account` an owner of the organization `project` belongs to.
    pub async fn add_organization_owner(&mut self, project: &str, account: &str) {
        let organization = self
            .keyring
            .get_project(authed(&self.token, krpb::GetProjectRequest { name: project.into() }))
            .await
            .unwrap()
            .into_inner()
            .project
            .unwrap()
            .organization;
        let internal = self.internal_token().await;
        self.identity()
            .await
            .add_organization_member(authed(
                &internal,
                idpb::AddOrganizationMemberRequest {
                    parent: organization,
                    account: account.into(),
                    role: idpb::OrganizationRole::Owner as i32,
                    invitation_id: format!("{project}:org:{account}"),
                },
            ))
            .await
            .unwrap();
    }
}
