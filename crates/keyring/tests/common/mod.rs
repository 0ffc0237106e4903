//! Test harness: identity and keyring started in-process on port 0 against one database made
//! for the test (each in its own schema), keyring calling identity as its internal client.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use keyshare_proto::identity::v1 as idpb;
use keyshare_proto::identity::v1::identity_service_client::IdentityServiceClient;
use keyshare_proto::keyring::v1 as pb;
use keyshare_proto::keyring::v1::keyring_service_client::KeyringServiceClient;
use keyshare_runtime::clock::ManualClock;
use keyshare_testkit::{Kind, Service, Setting, SmtpServer, Stack, Store, TestDatabase};
#[allow(unused_imports)] // each test binary uses some of them
pub use keyshare_testkit::{PASSWORD, authed, bad_fields, reason};
use tonic::transport::Channel;

pub type Keyring = KeyringServiceClient<Channel>;
pub type Identity = IdentityServiceClient<Channel>;

pub struct Harness {
    pub stack: Stack,
    pub db: TestDatabase,
    pub smtp: SmtpServer,
    pub clock: Arc<ManualClock>,
    pub kek: String,
    pub identity_addr: std::net::SocketAddr,
    pub keyring_addr: std::net::SocketAddr,
    /// More keyrings, stopped with the harness.
    others: Vec<Service>,
}

impl Harness {
    pub async fn start() -> Self {
        let db = TestDatabase::create().await;
        let smtp = SmtpServer::start().await;
        let clock = ManualClock::new();
        let stack = Stack::builder()
            .keyring()
            .on(Store::Given(db.url.clone()))
            .smtp_url(smtp.url())
            .clock(clock.clone())
            .with(Kind::Identity, Setting::PoolSize(4))
            .with(Kind::Keyring, Setting::PoolSize(8))
            .start()
            .await;
        let (kek, identity_addr, keyring_addr) =
            (stack.kek.clone(), stack.addr(Kind::Identity), stack.addr(Kind::Keyring));
        Self { stack, db, smtp, clock, kek, identity_addr, keyring_addr, others: Vec::new() }
    }

    /// Starts (another) keyring on the same database with the given key-encryption keys.
    pub async fn start_keyring(&mut self, kek: &str) -> std::net::SocketAddr {
        self.launch_keyring(Setting::KeyEncryptionKeys(kek.to_owned())).await
    }

    /// Starts another keyring that authenticates to identity with `client_secret` (a wrong one
    /// leaves it without its internal client's token).
    pub async fn start_keyring_with_secret(&mut self, client_secret: &str) -> std::net::SocketAddr {
        self.launch_keyring(Setting::Client { id: "keyring".into(), secret: client_secret.into() }).await
    }

    async fn launch_keyring(&mut self, setting: Setting) -> std::net::SocketAddr {
        let keyring = self.stack.launch(Kind::Keyring, [setting]).await;
        let addr = keyring.addr;
        self.others.push(keyring);
        addr
    }

    pub async fn keyring(&self) -> Keyring {
        keyring_at(self.keyring_addr).await
    }

    pub async fn identity(&self) -> Identity {
        let channel = Channel::from_shared(format!("http://{}", self.identity_addr)).unwrap().connect().await.unwrap();
        IdentityServiceClient::new(channel)
    }

    /// A verified, logged-in account: (account id as `accounts/{id}`, access token).
    pub async fn account(&self, email: &str) -> (String, String) {
        let account =
            keyshare_testkit::sign_up(self.stack.channel(Kind::Identity).await, email, PASSWORD, Some(&self.smtp))
                .await;
        (account.name, account.token)
    }

    /// An access token of the authorizer's internal client, the one that follows the feed.
    pub async fn feed_token(&self) -> String {
        self.stack.authorizer_token().await
    }

    /// An access token of invitation's internal client, the one that grants memberships.
    pub async fn internal_token(&self) -> String {
        self.stack.invitation_token().await
    }

    async fn client_token(&self, client_id: &str, client_secret: &str) -> String {
        self.stack.client_token(client_id, client_secret).await
    }

    /// A new service account of `org` (created by its owner), made a member of `project` with
    /// `role`; returns its name and its access token.
    pub async fn service_account_member(
        &self,
        org_owner: &str,
        org: &str,
        project: &str,
        role: pb::ProjectRole,
    ) -> (String, String) {
        let mut identity = self.identity().await;
        let request = idpb::CreateServiceAccountRequest {
            parent: org.into(),
            service_account: Some(idpb::ServiceAccount { display_name: "Automation".into(), ..Default::default() }),
        };
        let created = identity.create_service_account(authed(org_owner, request)).await.unwrap().into_inner();
        let service_account = created.service_account.unwrap();
        let request = pb::CreateProjectMemberRequest {
            parent: project.into(),
            member: Some(pb::ProjectMember {
                account: service_account.name.clone(),
                role: role as i32,
                ..Default::default()
            }),
        };
        self.keyring().await.create_project_member(authed(org_owner, request)).await.unwrap();
        let token = self.client_token(&service_account.client_id, &created.client_secret).await;
        (service_account.name, token)
    }

    pub async fn organization(&self, owner_token: &str, name: &str) -> String {
        self.stack.organization(owner_token, name).await
    }

    /// Row count of a keyring table, to prove nothing was written.
    pub async fn count(&self, table: &str) -> i64 {
        let (client, connection) = tokio_postgres::connect(&self.db.url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client.query_one(&format!("SELECT count(*) FROM keyring.{table}"), &[]).await.unwrap().get(0)
    }
}

pub async fn keyring_at(addr: std::net::SocketAddr) -> Keyring {
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    KeyringServiceClient::new(channel)
}

pub async fn create_project(keyring: &mut Keyring, token: &str, org: &str, name: &str) -> pb::Project {
    keyring
        .create_project(authed(
            token,
            pb::CreateProjectRequest {
                parent: org.into(),
                project: Some(pb::Project { display_name: name.into(), ..Default::default() }),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .project
        .unwrap()
}

pub async fn create_key(keyring: &mut Keyring, token: &str, project: &str, name: &str) -> pb::CreateKeyResponse {
    keyring
        .create_key(authed(
            token,
            pb::CreateKeyRequest {
                parent: project.into(),
                key: Some(pb::Key { display_name: name.into(), description: "for tests".into(), ..Default::default() }),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

/// Waits until a statement on the pool's database waits for a row lock (a test holds one on
/// purpose), or fails naming `what` after 30 s.
pub async fn until_a_statement_waits_on_a_lock(pool: &deadpool_postgres::Pool, what: &str) {
    keyshare_testkit::eventually(what, std::time::Duration::from_secs(30), || async {
        let client = pool.get().await.unwrap();
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0) >= 1).then_some(())
    })
    .await;
}
