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
use keyshare_testkit::{Kind, Stack, eventually};
#[allow(unused_imports)] // each test binary uses some of them
pub use keyshare_testkit::{PrivateCluster, Setting, Store, TestDatabase, authed, channel, scrape};
use prost_types::FieldMask;
use tonic::transport::Channel;

pub mod envoy;
pub mod process;

pub struct World {
    /// identity and keyring, on a clock of their own.
    pub stack: Stack,
    pub keyring_config: keyshare_keyring::Config,
    pub keyring_clock: Arc<ManualClock>,
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
}

impl World {
    /// Stops keyring gracefully and waits until it has stopped.
    pub async fn stop_keyring(&mut self) {
        self.stack.service_mut(Kind::Keyring).stop().await;
    }

    /// Starts keyring again at the same address.
    pub async fn restart_keyring(&mut self) {
        self.stack.service_mut(Kind::Keyring).start().await;
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

/// Waits until a server's health says SERVING.
pub async fn serving(addr: std::net::SocketAddr) {
    keyshare_testkit::serving(addr, Duration::from_secs(20)).await;
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
    let db_url = store.url();
    let clock = ManualClock::new();
    let stack = Stack::builder()
        .keyring()
        .on(Store::Given(db_url.clone()))
        .clock(clock.clone())
        .with(Kind::Identity, Setting::RequireVerifiedEmail(false))
        .start()
        .await;
    let keyring_settings = stack.service(Kind::Keyring).settings.env();
    let keyring_config = keyshare_keyring::Config::from_env(&keyring_settings).unwrap();

    // An account, an organization, a project and a key, before the authorizer starts.
    let token = stack.unverified_account("o@example.com").await.token;
    let org = stack.organization(&token, "O").await;
    let project = stack.project(&token, &org, "P").await;
    let created = stack.key_in(&token, &project, "K").await;
    let kr = krpb::keyring_service_client::KeyringServiceClient::new(stack.channel(Kind::Keyring).await);

    let frozen = FrozenClock::new();
    let mut authorizer_settings = stack.settings(Kind::Authorizer);
    authorizer_settings.push(Setting::UsageFlush(Duration::from_millis(100)));
    let authorizer_config = keyshare_authorizer::Config::from_env(&authorizer_settings.env()).unwrap();
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
        stack,
        keyring_config,
        keyring_clock: clock,
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
    };
    (world, project, created.name, created.sandbox, created.production)
}

// --- The usage API (UsageService) and the people around a key ---

impl World {
    /// A client of the authorizer's UsageService.
    pub async fn usage(&self) -> pb::usage_service_client::UsageServiceClient<Channel> {
        pb::usage_service_client::UsageServiceClient::new(channel(self.management_addr).await)
    }

    pub async fn identity(&self) -> idpb::identity_service_client::IdentityServiceClient<Channel> {
        idpb::identity_service_client::IdentityServiceClient::new(self.stack.channel(Kind::Identity).await)
    }

    /// A new, logged-in account: (`accounts/{id}`, access token).
    pub async fn account(&self, email: &str) -> (String, String) {
        let account = self.stack.unverified_account(email).await;
        (account.name, account.token)
    }

    /// An access token of invitation's internal client, the one that grants memberships for
    /// accepted invitations (the authorizer's own client may not).
    pub async fn internal_token(&self) -> String {
        self.stack.invitation_token().await
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
