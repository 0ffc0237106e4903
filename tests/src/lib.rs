//! Starting Keyshare's services together in one process, for system tests and benchmarks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use keyshare_proto::identity::v1 as idpb;
use keyshare_runtime::clock::SystemClock;
use keyshare_runtime::config::Env;
use keyshare_runtime::crypto::Sealer;
pub use keyshare_runtime::testkit::authed;
use keyshare_runtime::testkit::{self, TestDatabase};
use tonic::transport::Channel;

/// The secret of the internal client a test or benchmark acts as.
pub const WATCHER_SECRET: &str = "watcher-secret-0123456789abcdef0123456789";
const AUTHORIZER_SECRET: &str = "authorizer-secret-0123456789abcdef012345";
const KEYRING_SECRET: &str = "keyring-secret-0123456789abcdef0123456789";
const INVITATION_SECRET: &str = "invitation-secret-0123456789abcdef0123456";

/// identity, keyring and the authorizer on a database of their own (invitation on request).
pub struct Stack {
    pub db: TestDatabase,
    pub identity: SocketAddr,
    pub keyring: SocketAddr,
    pub authorizer: SocketAddr,
    /// The first authorizer's management port (UsageService).
    pub usage: SocketAddr,
    /// Where identity (and invitation) write their mails.
    pub mail_spool: PathBuf,
    /// identity's settings, to start it again on the same address.
    identity_env: Vec<(&'static str, String)>,
    identity_running: Option<RunningIdentity>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

struct RunningIdentity {
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), keyshare_runtime::server::ServeError>>,
}

fn env(pairs: &[(&str, String)]) -> Env {
    Env::from_pairs(pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())))
}

impl Stack {
    /// Starts identity, keyring and an authorizer. Email verification is not required, so
    /// accounts log in at once.
    pub async fn start() -> Self {
        let db = TestDatabase::create().await;
        let (_, kek) = Sealer::generate("k1");
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mail_spool =
            std::env::temp_dir().join(format!("keyshare-stack-{}-{}", std::process::id(), started.as_nanos()));
        let clock = Arc::new(SystemClock);
        let common = |extra: &[(&'static str, String)]| {
            let mut all = vec![
                ("DATABASE_URL", db.url.clone()),
                ("KEYSHARE_LISTEN_ADDR", "127.0.0.1:0".into()),
                ("KEYSHARE_METRICS_ADDR", "127.0.0.1:0".into()),
                ("KEYSHARE_KEY_ENCRYPTION_KEYS", kek.clone()),
                ("KEYSHARE_DRAIN_DELAY_SECS", "0".into()),
            ];
            all.extend(extra.iter().cloned());
            all
        };
        let mut identity_env = common(&[
            ("KEYSHARE_REQUIRE_VERIFIED_EMAIL", "false".into()),
            ("KEYSHARE_MAIL_SPOOL_DIR", mail_spool.display().to_string()),
            // These stacks remove nobody from an organization; keep identity from calling
            // whatever else may listen on keyring's default port.
            ("KEYSHARE_KEYRING_URL", "http://127.0.0.1:1".into()),
            (
                "KEYSHARE_INTERNAL_CLIENTS",
                format!(
                    "keyring:{KEYRING_SECRET},watcher:{WATCHER_SECRET},authorizer:{AUTHORIZER_SECRET},\
                     invitation:{INVITATION_SECRET}"
                ),
            ),
            // The watcher follows the feeds, like an authorizer, and may do nothing else.
            ("KEYSHARE_INTERNAL_CLIENT_SCOPES", "watcher=keys.watch sessions.watch".into()),
        ]);
        let (identity_addr, identity_running) = start_identity(&identity_env).await;
        // A restart binds the same address, so the other services find it again.
        for (name, value) in &mut identity_env {
            if *name == "KEYSHARE_LISTEN_ADDR" {
                *value = identity_addr.to_string();
            }
        }
        let (keyring_stop, keyring_stopped) = tokio::sync::oneshot::channel::<()>();
        let keyring = keyshare_keyring::start(
            keyshare_keyring::Config::from_env(&env(&common(&[
                ("KEYSHARE_IDENTITY_URL", format!("http://{identity_addr}")),
                ("KEYSHARE_INVITATION_URL", "http://127.0.0.1:1".into()),
                ("KEYSHARE_CLIENT_ID", "keyring".into()),
                ("KEYSHARE_CLIENT_SECRET", KEYRING_SECRET.into()),
            ])))
            .unwrap(),
            clock,
            async move {
                let _ = keyring_stopped.await;
            },
        )
        .await
        .unwrap();
        let mut stack = Self {
            db,
            identity: identity_addr,
            keyring: keyring.addr,
            authorizer: identity_addr,
            usage: identity_addr,
            mail_spool,
            identity_env,
            identity_running: Some(identity_running),
            stops: vec![keyring_stop],
        };
        let authorizer = stack.launch_authorizer().await;
        (stack.authorizer, stack.usage) = (authorizer.addr, authorizer.management_addr);
        stack
    }

    /// Stops identity (waiting until it has drained) and starts it again on the same address
    /// and database, as a redeploy would.
    pub async fn restart_identity(&mut self) {
        if let Some(running) = self.identity_running.take() {
            let _ = running.stop.send(());
            running.server.await.unwrap().unwrap();
        }
        let (addr, running) = start_identity(&self.identity_env).await;
        assert_eq!(addr, self.identity);
        self.identity_running = Some(running);
    }

    /// Starts invitation on the stack's database, identity and keyring, stopped with the stack;
    /// returns its address.
    pub async fn start_invitation(&mut self) -> SocketAddr {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let env = env(&[
            ("DATABASE_URL", self.db.url.clone()),
            ("KEYSHARE_LISTEN_ADDR", "127.0.0.1:0".into()),
            ("KEYSHARE_METRICS_ADDR", "127.0.0.1:0".into()),
            ("KEYSHARE_DRAIN_DELAY_SECS", "0".into()),
            ("KEYSHARE_IDENTITY_URL", format!("http://{}", self.identity)),
            ("KEYSHARE_KEYRING_URL", format!("http://{}", self.keyring)),
            ("KEYSHARE_CLIENT_ID", "invitation".into()),
            ("KEYSHARE_CLIENT_SECRET", INVITATION_SECRET.into()),
            ("KEYSHARE_MAIL_SPOOL_DIR", self.mail_spool.display().to_string()),
        ]);
        let started = keyshare_invitation::start(
            keyshare_invitation::Config::from_env(&env).unwrap(),
            Arc::new(SystemClock),
            async move {
                let _ = stopped.await;
            },
        )
        .await
        .unwrap();
        self.stops.push(stop);
        started.addr
    }

    /// Starts another authorizer replica on the same database, identity and keyring (its own
    /// index, feed and usage writer), stopped with the stack; returns its check port without
    /// waiting for it to be SERVING.
    pub async fn start_authorizer(&mut self) -> SocketAddr {
        self.launch_authorizer().await.addr
    }

    /// The settings of an authorizer replica of this stack (any free port for each listener).
    pub fn authorizer_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DATABASE_URL", self.db.url.clone()),
            ("KEYSHARE_LISTEN_ADDR", "127.0.0.1:0".into()),
            ("KEYSHARE_METRICS_ADDR", "127.0.0.1:0".into()),
            ("KEYSHARE_DRAIN_DELAY_SECS", "0".into()),
            ("KEYSHARE_IDENTITY_URL", format!("http://{}", self.identity)),
            ("KEYSHARE_KEYRING_URL", format!("http://{}", self.keyring)),
            ("KEYSHARE_CLIENT_ID", "authorizer".into()),
            ("KEYSHARE_CLIENT_SECRET", AUTHORIZER_SECRET.into()),
            ("KEYSHARE_MANAGEMENT_ADDR", "127.0.0.1:0".into()),
        ]
    }

    async fn launch_authorizer(&mut self) -> keyshare_authorizer::Started {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let env = env(&self.authorizer_env());
        let started = keyshare_authorizer::start(
            keyshare_authorizer::Config::from_env(&env).unwrap(),
            Arc::new(SystemClock),
            async move {
                let _ = stopped.await;
            },
        )
        .await
        .unwrap();
        self.stops.push(stop);
        started
    }

    /// Waits until the server at `addr` reports SERVING (at most `deadline`).
    pub async fn serving(addr: SocketAddr, deadline: std::time::Duration) {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let health = HealthClient::new(Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy());
        let start = std::time::Instant::now();
        loop {
            let status = health.clone().check(HealthCheckRequest { service: String::new() }).await;
            if status.is_ok_and(|s| s.into_inner().status == ServingStatus::Serving as i32) {
                return;
            }
            assert!(start.elapsed() < deadline, "{addr} did not report SERVING within {deadline:?}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    pub async fn channel(addr: SocketAddr) -> Channel {
        testkit::channel(addr).await
    }

    /// A new account's access token.
    pub async fn account(&self, email: &str) -> String {
        testkit::sign_up(Self::channel(self.identity).await, email, "benchmark password 123", None).await.token
    }

    /// An organization, a project and a key owned by the account behind `token`; returns the
    /// keyring client and the key as created (with both credentials).
    pub async fn key(
        &self,
        token: &str,
    ) -> (
        keyshare_proto::keyring::v1::keyring_service_client::KeyringServiceClient<Channel>,
        keyshare_proto::keyring::v1::CreateKeyResponse,
    ) {
        use keyshare_proto::keyring::v1 as pb;
        let mut identity =
            idpb::identity_service_client::IdentityServiceClient::new(Self::channel(self.identity).await);
        let organization = Some(idpb::Organization { display_name: "Bench".into(), ..Default::default() });
        let org = identity
            .create_organization(authed(token, idpb::CreateOrganizationRequest { organization }))
            .await
            .unwrap()
            .into_inner()
            .organization
            .unwrap()
            .name;
        let mut keyring = pb::keyring_service_client::KeyringServiceClient::new(Self::channel(self.keyring).await);
        let project = Some(pb::Project { display_name: "Bench".into(), ..Default::default() });
        let project =
            keyring.create_project(authed(token, pb::CreateProjectRequest { parent: org, project })).await.unwrap();
        let key = Some(pb::Key { display_name: "bench key".into(), ..Default::default() });
        let request =
            pb::CreateKeyRequest { parent: project.into_inner().project.unwrap().name, key, ..Default::default() };
        let created = keyring.create_key(authed(token, request)).await.unwrap().into_inner();
        (keyring, created)
    }

    /// The access token of the internal client `watcher`.
    pub async fn watcher_token(&self) -> String {
        let mut identity =
            idpb::identity_service_client::IdentityServiceClient::new(Self::channel(self.identity).await);
        let grant = identity
            .issue_service_account_token(idpb::IssueServiceAccountTokenRequest {
                client_id: "watcher".into(),
                client_secret: WATCHER_SECRET.into(),
            })
            .await
            .unwrap();
        grant.into_inner().grant.unwrap().access_token
    }
}

/// More authorizer replicas on a stack's database and keyring.
impl Stack {
    /// Starts another authorizer (on the system clock, serving until the process ends) with
    /// `extra` settings, e.g. `KEYSHARE_REDIS_URL`; returns once it is listening.
    pub async fn authorizer_replica(&self, extra: &[(&str, String)]) -> keyshare_authorizer::Started {
        let mut all = vec![
            ("DATABASE_URL", self.db.url.clone()),
            ("KEYSHARE_LISTEN_ADDR", "127.0.0.1:0".into()),
            ("KEYSHARE_MANAGEMENT_ADDR", "127.0.0.1:0".into()),
            ("KEYSHARE_METRICS_ADDR", "127.0.0.1:0".into()),
            ("KEYSHARE_IDENTITY_URL", format!("http://{}", self.identity)),
            ("KEYSHARE_KEYRING_URL", format!("http://{}", self.keyring)),
            ("KEYSHARE_CLIENT_ID", "authorizer".into()),
            ("KEYSHARE_CLIENT_SECRET", AUTHORIZER_SECRET.into()),
        ];
        all.extend(extra.iter().cloned());
        let config = keyshare_authorizer::Config::from_env(&env(&all)).unwrap();
        keyshare_authorizer::start(config, Arc::new(SystemClock), std::future::pending()).await.unwrap()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        if let Some(running) = self.identity_running.take() {
            let _ = running.stop.send(());
        }
    }
}

/// Starts identity with `pairs`; returns its address and how to stop it.
async fn start_identity(pairs: &[(&'static str, String)]) -> (SocketAddr, RunningIdentity) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = keyshare_identity::start(
        keyshare_identity::Config::from_env(&env(pairs)).unwrap(),
        Arc::new(SystemClock),
        async move {
            let _ = stopped.await;
        },
    )
    .await
    .unwrap();
    (started.addr, RunningIdentity { stop, server: started.server })
}

/// p-th percentile (0–100) of sorted samples.
pub fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    if sorted.is_empty() {
        return std::time::Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}
