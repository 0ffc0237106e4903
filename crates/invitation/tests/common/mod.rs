//! Test harness: identity, keyring and invitation started in-process on one database made for
//! the test, sharing a clock the test can move, with a real SMTP server receiving the mail.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keyshare_proto::identity::v1::identity_service_client::IdentityServiceClient;
use keyshare_proto::invitation::v1 as pb;
use keyshare_proto::invitation::v1::invitation_service_client::InvitationServiceClient;
use keyshare_proto::keyring::v1::keyring_service_client::KeyringServiceClient;
use keyshare_runtime::clock::ManualClock;
use keyshare_testkit::{Kind, Setting, SmtpServer, Stack, Store, TestDatabase};
#[allow(unused_imports)] // each test binary uses some of them
pub use keyshare_testkit::{PASSWORD, authed, bad_fields, reason, token_from_mail as token_in};
use tonic::transport::Channel;

pub type Invitations = InvitationServiceClient<Channel>;
pub type Keyring = KeyringServiceClient<Channel>;
pub type Identity = IdentityServiceClient<Channel>;

pub struct Harness {
    pub stack: Stack,
    pub db: TestDatabase,
    pub smtp: SmtpServer,
    pub clock: Arc<ManualClock>,
    pub identity: SocketAddr,
    pub keyring: SocketAddr,
    pub invitation: SocketAddr,
}

impl Harness {
    pub async fn start() -> Self {
        let db = TestDatabase::create().await;
        let smtp = SmtpServer::start().await;
        let clock = ManualClock::new();
        let second = Duration::from_secs(1);
        let stack = Stack::builder()
            .invitation()
            .on(Store::Given(db.url.clone()))
            .smtp_url(smtp.url())
            .clock(clock.clone())
            .with_all(Setting::MailRetryMax(second))
            .with_all(Setting::MailPoll(second))
            .with_all(Setting::PoolSize(8))
            // Unverified accounts may log in here, so tests can show they cannot accept.
            .with(Kind::Identity, Setting::RequireVerifiedEmail(false))
            .with(Kind::Invitation, Setting::CallRetry(second))
            // Drains hold a connection across their grant, and accepting asks keyring first
            // whether the inviter may still grant: the race test's twenty accepts and twenty
            // revokes at once need more than eight.
            .with(Kind::Invitation, Setting::PoolSize(16))
            .start()
            .await;
        let (identity, keyring, invitation) =
            (stack.addr(Kind::Identity), stack.addr(Kind::Keyring), stack.addr(Kind::Invitation));
        Self { stack, db, smtp, clock, identity, keyring, invitation }
    }

    pub async fn invitations(&self) -> Invitations {
        InvitationServiceClient::new(keyshare_testkit::channel(self.invitation).await)
    }

    pub async fn keyring(&self) -> Keyring {
        KeyringServiceClient::new(keyshare_testkit::channel(self.keyring).await)
    }

    pub async fn identity(&self) -> Identity {
        IdentityServiceClient::new(keyshare_testkit::channel(self.identity).await)
    }

    /// Signs up; verifies unless told not to. Returns (`accounts/{id}`, access token).
    pub async fn account(&self, email: &str, verify: bool) -> (String, String) {
        let smtp = verify.then_some(&self.smtp);
        let account =
            keyshare_testkit::sign_up(keyshare_testkit::channel(self.identity).await, email, PASSWORD, smtp).await;
        (account.name, account.token)
    }

    pub async fn login(&self, email: &str) -> String {
        keyshare_testkit::login(keyshare_testkit::channel(self.identity).await, email, PASSWORD)
            .await
            .unwrap()
            .access_token
    }

    /// An owner with an organization, a project and a key: (owner token, org, project, key).
    pub async fn key_with_owner(&self, owner_email: &str) -> (String, String, String, String) {
        let (_, owner) = self.account(owner_email, true).await;
        let org = self.stack.organization(&owner, "Org").await;
        let project = self.stack.project(&owner, &org, "API").await;
        let key = self.stack.key_in(&owner, &project, "Partner").await.name;
        (owner, org, project, key)
    }

    /// An access token of the invitation service's internal client, for what only Keyshare's
    /// own services may do (adding a membership directly, as a grant does).
    pub async fn internal_token(&self) -> String {
        self.stack.invitation_token().await
    }

    pub async fn count(&self, table: &str) -> i64 {
        let (client, connection) = tokio_postgres::connect(&self.db.url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get(0)
    }
}

pub fn invite(parent: &str, list: &[(&str, pb::InvitationRole)]) -> pb::CreateInvitationsRequest {
    pb::CreateInvitationsRequest {
        parent: parent.into(),
        invitees: list.iter().map(|(email, role)| pb::Invitee { email: (*email).into(), role: *role as i32 }).collect(),
    }
}
