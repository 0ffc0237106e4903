//! Test harness: identity, keyring and invitation started in-process on one database made for
//! the test, sharing a clock the test can move, with a real SMTP server receiving the mail.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use keyshare_proto::identity::v1 as idpb;
use keyshare_proto::identity::v1::identity_service_client::IdentityServiceClient;
use keyshare_proto::invitation::v1 as pb;
use keyshare_proto::invitation::v1::invitation_service_client::InvitationServiceClient;
use keyshare_proto::keyring::v1 as krpb;
use keyshare_proto::keyring::v1::keyring_service_client::KeyringServiceClient;
use keyshare_runtime::clock::ManualClock;
use keyshare_runtime::config::Env;
use keyshare_runtime::crypto::Sealer;
use keyshare_runtime::testkit::{self, SmtpServer, TestDatabase, free_port};
#[allow(unused_imports)] // each test binary uses some of them
pub use keyshare_runtime::testkit::{authed, bad_fields, reason, token_from_mail as token_in};
use tonic::transport::Channel;

pub type Invitations = InvitationServiceClient<Channel>;
pub type Keyring = KeyringServiceClient<Channel>;
pub type Identity = IdentityServiceClient<Channel>;

pub const PASSWORD: &str = "correct horse battery staple";
const KEYRING_SECRET: &str = "keyring-secret-for-tests-0123456789abcdef";
const INVITATION_SECRET: &str = "invitation-secret-for-tests-0123456789abcd";

pub struct Harness {
    pub db: TestDatabase,
    pub smtp: SmtpServer,
    pub clock: Arc<ManualClock>,
    pub identity: SocketAddr,
    pub keyring: SocketAddr,
    pub invitation: SocketAddr,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

fn env(pairs: &[(&str, String)]) -> Env {
    Env::from_pairs(pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())))
}

fn stopper() -> (tokio::sync::oneshot::Sender<()>, impl Future<Output = ()> + Send + 'static) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

impl Harness {
    pub async fn start() -> Self {
        let db = TestDatabase::create().await;
        let smtp = SmtpServer::start().await;
        let (_, kek) = Sealer::generate("kek1");
        let clock = ManualClock::new();
        let base = |extra: Vec<(&'static str, String)>| {
            let mut all = vec![
                ("DATABASE_URL", db.url.clone()),
                ("KEYSHARE_LISTEN_ADDR", "127.0.0.1:0".to_owned()),
                ("KEYSHARE_METRICS_ADDR", "127.0.0.1:0".to_owned()),
                ("KEYSHARE_KEY_ENCRYPTION_KEYS", kek.clone()),
                ("KEYSHARE_SMTP_URL", smtp.url()),
                ("KEYSHARE_MAIL_RETRY_MAX_SECS", "1".to_owned()),
                ("KEYSHARE_MAIL_POLL_SECS", "1".to_owned()),
                ("KEYSHARE_DB_POOL_SIZE", "8".to_owned()),
            ];
            all.extend(extra);
            env(&all)
        };
        let mut stops = Vec::new();
        let (stop, stopped) = stopper();
        stops.push(stop);
        // Keyring's port is chosen first so identity can tell it when someone leaves an organization.
        let keyring_port = free_port();
        let identity = keyshare_identity::start(
            keyshare_identity::Config::from_env(&base(vec![
                ("KEYSHARE_KEYRING_URL", format!("http://127.0.0.1:{keyring_port}")),
                ("KEYSHARE_INTERNAL_CLIENTS", format!("keyring:{KEYRING_SECRET},invitation:{INVITATION_SECRET}")),
                // Unverified accounts may log in here, so tests can show they cannot accept.
                ("KEYSHARE_REQUIRE_VERIFIED_EMAIL", "false".into()),
            ]))
            .unwrap(),
            clock.clone(),
            stopped,
        )
        .await
        .unwrap()
        .addr;
        // The invitation port is chosen first so keyring knows where to find it.
        let invitation_port = free_port();
        let (stop, stopped) = stopper();
        stops.push(stop);
        let keyring = keyshare_keyring::start(
            keyshare_keyring::Config::from_env(&base(vec![
                ("KEYSHARE_LISTEN_ADDR", format!("127.0.0.1:{keyring_port}")),
                ("KEYSHARE_IDENTITY_URL", format!("http://{identity}")),
                ("KEYSHARE_INVITATION_URL", format!("http://127.0.0.1:{invitation_port}")),
                ("KEYSHARE_CLIENT_ID", "keyring".into()),
                ("KEYSHARE_CLIENT_SECRET", KEYRING_SECRET.into()),
            ]))
            .unwrap(),
            clock.clone(),
            stopped,
        )
        .await
        .unwrap()
        .addr;
        let (stop, stopped) = stopper();
        stops.push(stop);
        let invitation = keyshare_invitation::start(
            keyshare_invitation::Config::from_env(&base(vec![
                ("KEYSHARE_LISTEN_ADDR", format!("127.0.0.1:{invitation_port}")),
                ("KEYSHARE_IDENTITY_URL", format!("http://{identity}")),
                ("KEYSHARE_KEYRING_URL", format!("http://{keyring}")),
                ("KEYSHARE_CLIENT_ID", "invitation".into()),
                ("KEYSHARE_CLIENT_SECRET", INVITATION_SECRET.into()),
                ("KEYSHARE_CALL_RETRY_SECS", "1".into()),
                // Drains hold a connection across their grant, and accepting asks keyring first
                // whether the inviter may still grant: the race test's twenty accepts and twenty
                // revokes at once need more than eight.
                ("KEYSHARE_DB_POOL_SIZE", "16".into()),
            ]))
            .unwrap(),
            clock.clone(),
            stopped,
        )
        .await
        .unwrap()
        .addr;
        Self { db, smtp, clock, identity, keyring, invitation, stops }
    }

    pub async fn invitations(&self) -> Invitations {
        InvitationServiceClient::new(testkit::channel(self.invitation).await)
    }

    pub async fn keyring(&self) -> Keyring {
        KeyringServiceClient::new(testkit::channel(self.keyring).await)
    }

    pub async fn identity(&self) -> Identity {
        IdentityServiceClient::new(testkit::channel(self.identity).await)
    }

    /// Signs up; verifies unless told not to. Returns (`accounts/{id}`, access token).
    pub async fn account(&self, email: &str, verify: bool) -> (String, String) {
        let smtp = verify.then_some(&self.smtp);
        let account = testkit::sign_up(testkit::channel(self.identity).await, email, PASSWORD, smtp).await;
        (account.name, account.token)
    }

    pub async fn login(&self, email: &str) -> String {
        testkit::login(testkit::channel(self.identity).await, email, PASSWORD).await.unwrap().access_token
    }

    /// An owner with an organization, a project and a key: (owner token, org, project, key).
    pub async fn key_with_owner(&self, owner_email: &str) -> (String, String, String, String) {
        let (_, owner) = self.account(owner_email, true).await;
        let org = self
            .identity()
            .await
            .create_organization(authed(
                &owner,
                idpb::CreateOrganizationRequest {
                    organization: Some(idpb::Organization { display_name: "Org".into(), ..Default::default() }),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .organization
            .unwrap()
            .name;
        let mut keyring = self.keyring().await;
        let project = keyring
            .create_project(authed(
                &owner,
                krpb::CreateProjectRequest {
                    parent: org.clone(),
                    project: Some(krpb::Project { display_name: "API".into(), ..Default::default() }),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .project
            .unwrap()
            .name;
        let key = keyring
            .create_key(authed(
                &owner,
                krpb::CreateKeyRequest {
                    parent: project.clone(),
                    key: Some(krpb::Key { display_name: "Partner".into(), ..Default::default() }),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap()
            .name;
        (owner, org, project, key)
    }

    /// An access token of the invitation service's internal client, for what only Keyshare's
    /// own services may do (adding a membership directly, as a grant does).
    pub async fn internal_token(&self) -> String {
        testkit::client_token(testkit::channel(self.identity).await, "invitation", INVITATION_SECRET).await
    }

    pub async fn count(&self, table: &str) -> i64 {
        let (client, connection) = tokio_postgres::connect(&self.db.url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get(0)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

pub fn invite(parent: &str, list: &[(&str, pb::InvitationRole)]) -> pb::CreateInvitationsRequest {
    pb::CreateInvitationsRequest {
        parent: parent.into(),
        invitees: list.iter().map(|(email, role)| pb::Invitee { email: (*email).into(), role: *role as i32 }).collect(),
    }
}
