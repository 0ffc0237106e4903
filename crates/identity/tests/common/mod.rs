//! Test harness: identity started in-process on port 0 against a database made for the test.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use keyshare_identity::Config;
use keyshare_proto::identity::v1 as pb;
use keyshare_proto::identity::v1::identity_service_client::IdentityServiceClient;
use keyshare_runtime::clock::ManualClock;
use keyshare_runtime::config::Env;
use keyshare_runtime::crypto::Sealer;
use keyshare_runtime::testkit::{self, SmtpServer, TestDatabase};
#[allow(unused_imports)] // each test binary uses some of them
pub use keyshare_runtime::testkit::{authed, bad_fields, reason, token_from_mail};
use tonic::transport::Channel;

pub type Client = IdentityServiceClient<Channel>;

pub const PASSWORD: &str = "correct horse battery staple";
pub const INTERNAL_SECRET: &str = "internal-secret-for-tests-0123456789abcdef";

pub struct Harness {
    pub db: TestDatabase,
    pub smtp: SmtpServer,
    pub clock: Arc<ManualClock>,
    pub kek: String,
    pub addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    /// Settings on top of [`Harness::env`]'s.
    extra_env: Vec<(String, String)>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts with these settings added (or overriding the defaults).
    pub async fn start_with(settings: &[(&str, &str)]) -> Self {
        Self::start_with_smtp(SmtpServer::start().await, settings).await
    }

    /// Starts against a given SMTP server, with these settings.
    pub async fn start_with_smtp(smtp: SmtpServer, settings: &[(&str, &str)]) -> Self {
        let db = TestDatabase::create().await;
        let (_, kek) = Sealer::generate("test1");
        let clock = ManualClock::new();
        let mut harness = Self {
            db,
            smtp,
            clock,
            kek,
            addr: "127.0.0.1:0".parse().unwrap(),
            metrics_addr: "127.0.0.1:0".parse().unwrap(),
            extra_env: settings.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            shutdown: None,
        };
        let (addr, metrics_addr, shutdown) = harness.spawn_instance().await;
        harness.addr = addr;
        harness.metrics_addr = metrics_addr;
        harness.shutdown = Some(shutdown);
        harness
    }

    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("DATABASE_URL", self.db.url.clone()),
            ("KEYSHARE_LISTEN_ADDR", "127.0.0.1:0".into()),
            ("KEYSHARE_METRICS_ADDR", "127.0.0.1:0".into()),
            ("KEYSHARE_KEY_ENCRYPTION_KEYS", self.kek.clone()),
            ("KEYSHARE_SMTP_URL", self.smtp.url()),
            ("KEYSHARE_MAIL_RETRY_MAX_SECS", "1".into()),
            ("KEYSHARE_INTERNAL_CLIENTS", format!("invitation:{INTERNAL_SECRET}")),
            ("KEYSHARE_DB_POOL_SIZE", "4".into()),
            // No keyring here: removals from organizations stay queued for it.
            ("KEYSHARE_KEYRING_URL", "http://127.0.0.1:1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain(self.extra_env.iter().cloned())
        .collect()
    }

    pub fn config(&self) -> Config {
        Config::from_env(&Env::from_pairs(self.env())).unwrap()
    }

    /// Starts another replica on the same database and clock.
    pub async fn spawn_instance(
        &self,
    ) -> (std::net::SocketAddr, std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let started = keyshare_identity::start(self.config(), self.clock.clone(), async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
        (started.addr, started.metrics_addr, tx)
    }

    pub async fn client(&self) -> Client {
        connect(self.addr).await
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn connect(addr: std::net::SocketAddr) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    IdentityServiceClient::new(channel)
}

/// A verified, logged-in account: (account name, access token, refresh token).
pub async fn verified_account(h: &Harness, email: &str) -> (String, String, String) {
    let account = testkit::sign_up(testkit::channel(h.addr).await, email, PASSWORD, Some(&h.smtp)).await;
    (account.name, account.token, account.refresh_token)
}

pub async fn login(client: &mut Client, email: &str) -> Result<pb::TokenGrant, tonic::Status> {
    client
        .login(pb::LoginRequest { email: email.into(), password: PASSWORD.into() })
        .await
        .map(|r| r.into_inner().grant.unwrap())
}

/// An access token of invitation's internal client.
pub async fn internal_token(h: &Harness) -> String {
    testkit::client_token(testkit::channel(h.addr).await, "invitation", INTERNAL_SECRET).await
}

/// Row count of an identity table, to prove nothing was written.
pub async fn count(h: &Harness, table: &str) -> i64 {
    let (client, connection) = tokio_postgres::connect(&h.db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.query_one(&format!("SELECT count(*) FROM identity.{table}"), &[]).await.unwrap().get(0)
}
