//! Starting Keyshare's services together in one process, for system tests and benchmarks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use keyshare_proto::identity::v1 as idpb;
use keyshare_runtime::clock::SystemClock;
use keyshare_runtime::config::Env;
use keyshare_runtime::crypto::Sealer;
use keyshare_runtime::testkit::TestDatabase;
use tonic::transport::Channel;

/// The secret of the internal client a test or benchmark acts as.
pub const WATCHER_SECRET: &str = "watcher-secret-0123456789abcdef0123456789";
const AUTHORIZER_SECRET: &str = "authorizer-secret-0123456789abcdef012345";
const KEYRING_SECRET: &str = "keyring-secret-0123456789abcdef0123456789";

/// identity, keyring and the authorizer on a database of their own.
pub struct Stack {
    pub db: TestDatabase,
    pub identity: SocketAddr,
    pub keyring: SocketAddr,
    pub authorizer: SocketAddr,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

fn env(pairs: &[(&str, String)]) -> Env {
    Env::from_pairs(pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())))
}

impl Stack {
    /// Starts both services. Email verification is not required, so accounts log in at once.
    pub async fn start() -> Self {
        let db = TestDatabase::create().await;
        let (_, kek) = Sealer::generate("k1");
        let spool = std::env::temp_dir().join(format!("keyshare-stack-{}", std::process::id()));
        let clock = Arc::new(SystemClock);
        let common = |extra: &[(&str, String)]| {
            let mut all = vec![
                ("DATABASE_URL", db.url.clone()),
                ("KEYSHARE_LISTEN_ADDR", "127.0.0.1:0".into()),
                ("KEYSHARE_METRICS_ADDR", "127.0.0.1:0".into()),
                ("KEYSHARE_KEY_ENCRYPTION_KEYS", kek.clone()),
                ("KEYSHARE_DRAIN_DELAY_SECS", "0".into()),
            ];
            all.extend(extra.iter().cloned());
            env(&all)
        };
        let (identity_stop, identity_stopped) = tokio::sync::oneshot::channel::<()>();
        let identity = keyshare_identity::start(
            keyshare_identity::Config::from_env(&common(&[
                ("KEYSHARE_REQUIRE_VERIFIED_EMAIL", "false".into()),
                ("KEYSHARE_MAIL_SPOOL_DIR", spool.display().to_string()),
                // These stacks remove nobody from an organization; keep identity from calling
                // whatever else may listen on keyring's default port.
                ("KEYSHARE_KEYRING_URL", "http://127.0.0.1:1".into()),
                (
                    "KEYSHARE_INTERNAL_CLIENTS",
                    format!("keyring:{KEYRING_SECRET},watcher:{WATCHER_SECRET},authorizer:{AUTHORIZER_SECRET}"),
                ),
                // The watcher follows the key feed, like an authorizer, and may do nothing else.
                ("KEYSHARE_INTERNAL_CLIENT_SCOPES", "watcher=keys.watch".into()),
            ]))
            .unwrap(),
            clock.clone(),
            async move {
                let _ = identity_stopped.await;
            },
        )
        .await
        .unwrap();
        let (keyring_stop, keyring_stopped) = tokio::sync::oneshot::channel::<()>();
        let keyring = keyshare_keyring::start(
            keyshare_keyring::Config::from_env(&common(&[
                ("KEYSHARE_IDENTITY_URL", format!("http://{}", identity.addr)),
                ("KEYSHARE_INVITATION_URL", "http://127.0.0.1:1".into()),
                ("KEYSHARE_CLIENT_ID", "keyring".into()),
                ("KEYSHARE_CLIENT_SECRET", KEYRING_SECRET.into()),
            ]))
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
            identity: identity.addr,
            keyring: keyring.addr,
            authorizer: identity.addr,
            stops: vec![identity_stop, keyring_stop],
        };
        stack.authorizer = stack.start_authorizer().await;
        stack
    }

    /// Starts another authorizer replica on the same database, identity and keyring (its own
    /// index, feed and usage writer), stopped with the stack; returns its check port without
    /// waiting for it to be SERVING.
    pub async fn start_authorizer(&mut self) -> SocketAddr {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let env = env(&[
            ("DATABASE_URL", self.db.url.clone()),
            ("KEYSHARE_LISTEN_ADDR", "127.0.0.1:0".into()),
            ("KEYSHARE_METRICS_ADDR", "127.0.0.1:0".into()),
            ("KEYSHARE_DRAIN_DELAY_SECS", "0".into()),
            ("KEYSHARE_IDENTITY_URL", format!("http://{}", self.identity)),
            ("KEYSHARE_KEYRING_URL", format!("http://{}", self.keyring)),
            ("KEYSHARE_CLIENT_ID", "authorizer".into()),
            ("KEYSHARE_CLIENT_SECRET", AUTHORIZER_SECRET.into()),
            ("KEYSHARE_MANAGEMENT_ADDR", "127.0.0.1:0".into()),
        ]);
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
        started.addr
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
        Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
    }

    /// A new account's access token.
    pub async fn account(&self, email: &str) -> String {
        let mut identity =
            idpb::identity_service_client::IdentityServiceClient::new(Self::channel(self.identity).await);
        let password = "benchmark password 123";
        identity
            .create_account(idpb::CreateAccountRequest {
                email: email.into(),
                display_name: email.into(),
                password: password.into(),
            })
            .await
            .unwrap();
        let login =
            identity.login(idpb::LoginRequest { email: email.into(), password: password.into() }).await.unwrap();
        login.into_inner().grant.unwrap().access_token
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
    }
}

/// Bearer-authenticated request.
pub fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// p-th percentile (0–100) of sorted samples.
pub fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    if sorted.is_empty() {
        return std::time::Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}
