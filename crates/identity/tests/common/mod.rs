//! Test harness: identity started in-process on port 0 against a database made for the test.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use keyshare_identity::Config;
use keyshare_proto::identity::v1 as pb;
use keyshare_proto::identity::v1::identity_service_client::IdentityServiceClient;
use keyshare_runtime::clock::ManualClock;
use keyshare_testkit::{Kind, Service, SmtpServer, Stack, Store, TestDatabase};
#[allow(unused_imports)] // each test binary uses some of them
pub use keyshare_testkit::{PASSWORD, Setting, authed, bad_fields, reason, token_from_mail};
use tonic::transport::Channel;

pub type Client = IdentityServiceClient<Channel>;

/// The secret of invitation's internal client, the one these tests act as.
pub const INTERNAL_SECRET: &str = keyshare_testkit::secrets::INVITATION;

pub struct Harness {
    pub stack: Stack,
    pub db: TestDatabase,
    pub smtp: SmtpServer,
    pub clock: Arc<ManualClock>,
    pub kek: String,
    pub addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with([]).await
    }

    /// Starts with these settings added (or overriding the defaults).
    pub async fn start_with(settings: impl IntoIterator<Item = Setting>) -> Self {
        Self::start_with_smtp(SmtpServer::start().await, settings).await
    }

    /// Starts against a given SMTP server, with these settings.
    pub async fn start_with_smtp(smtp: SmtpServer, settings: impl IntoIterator<Item = Setting>) -> Self {
        let db = TestDatabase::create().await;
        let clock = ManualClock::new();
        // No keyring here: removals from organizations stay queued for it.
        let mut builder = Stack::builder()
            .on(Store::Given(db.url.clone()))
            .smtp_url(smtp.url())
            .clock(clock.clone())
            .with(Kind::Identity, Setting::MailRetryMax(Duration::from_secs(1)))
            .with(Kind::Identity, Setting::PoolSize(4));
        for setting in settings {
            builder = builder.with(Kind::Identity, setting);
        }
        let stack = builder.start().await;
        let identity = stack.service(Kind::Identity);
        let (kek, addr, metrics_addr) = (stack.kek.clone(), identity.addr, identity.metrics_addr);
        Self { stack, db, smtp, clock, kek, addr, metrics_addr }
    }

    pub fn config(&self) -> Config {
        Config::from_env(&self.stack.settings(Kind::Identity).env()).unwrap()
    }

    /// Starts another replica on the same database and clock; it stops when dropped.
    pub async fn spawn_instance(&self) -> (std::net::SocketAddr, std::net::SocketAddr, Service) {
        let replica = self.stack.launch(Kind::Identity, []).await;
        (replica.addr, replica.metrics_addr, replica)
    }

    pub async fn client(&self) -> Client {
        connect(self.addr).await
    }
}

pub async fn connect(addr: std::net::SocketAddr) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    IdentityServiceClient::new(channel)
}

/// A verified, logged-in account: (account name, access token, refresh token).
pub async fn verified_account(h: &Harness, email: &str) -> (String, String, String) {
    let account =
        keyshare_testkit::sign_up(keyshare_testkit::channel(h.addr).await, email, PASSWORD, Some(&h.smtp)).await;
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
    h.stack.invitation_token().await
}

/// Row count of an identity table, to prove nothing was written.
pub async fn count(h: &Harness, table: &str) -> i64 {
    let (client, connection) = tokio_postgres::connect(&h.db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.query_one(&format!("SELECT count(*) FROM identity.{table}"), &[]).await.unwrap().get(0)
}
