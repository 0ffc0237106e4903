//! An access token whose session has ended stops working in every service within 5 seconds,
//! not only in identity: keyring, invitation and the authorizer's UsageService follow
//! identity's session-revocation feed. Each test uses the token once before the session ends
//! (it works), ends the session the way a person would, and polls each service with the same
//! token until it answers UNAUTHENTICATED / SESSION_REVOKED, failing after 5 s.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use keyshare_proto::authorizer::v1 as azpb;
use keyshare_proto::identity::v1 as idpb;
use keyshare_proto::invitation::v1 as ivpb;
use keyshare_proto::keyring::v1 as krpb;
use keyshare_system_tests::{Kind, Setting, Stack, authed};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

type Identity = idpb::identity_service_client::IdentityServiceClient<Channel>;

/// The promise: a session that ends is refused everywhere within this.
const WITHIN: Duration = Duration::from_secs(5);
const PASSWORD: &str = "a long test passphrase";

/// identity, keyring, invitation and an authorizer, and a person with a key to ask about.
struct World {
    stack: Stack,
    identity: Identity,
    keyring: krpb::keyring_service_client::KeyringServiceClient<Channel>,
    invitation: ivpb::invitation_service_client::InvitationServiceClient<Channel>,
    usage: azpb::usage_service_client::UsageServiceClient<Channel>,
    email: String,
    project: String,
    key: String,
}

/// The tokens of one login.
struct Session {
    access: String,
    refresh: String,
}

impl World {
    async fn start() -> Self {
        let stack = Stack::builder()
            .invitation()
            .authorizer()
            .with(Kind::Identity, Setting::RequireVerifiedEmail(false))
            .start()
            .await;
        let email = "ada@example.com".to_owned();
        let mut identity = Identity::new(stack.channel(Kind::Identity).await);
        identity
            .create_account(idpb::CreateAccountRequest {
                email: email.clone(),
                display_name: "Ada".into(),
                password: PASSWORD.into(),
            })
            .await
            .unwrap();
        let first = login(&mut identity, &email, PASSWORD).await;
        let created = stack.key(&first.access).await;
        let (key, project) = (created.name, created.project);
        let keyring = keyshare_system_tests::keyring(&stack).await;
        let usage = stack.service(Kind::Authorizer).management_addr.unwrap();
        Self {
            invitation: ivpb::invitation_service_client::InvitationServiceClient::new(
                stack.channel(Kind::Invitation).await,
            ),
            usage: azpb::usage_service_client::UsageServiceClient::new(keyshare_system_tests::channel(usage).await),
            stack,
            identity,
            keyring,
            email,
            project,
            key,
        }
    }

    async fn login(&mut self, password: &str) -> Session {
        login(&mut self.identity, &self.email, password).await
    }

    /// Each service's answer to one call with `token`: `Ok` or the code and `ErrorInfo` reason.
    async fn answers(&mut self, token: &str) -> Vec<(&'static str, Result<(), (Code, String)>)> {
        let outcome = |result: Result<(), tonic::Status>| {
            result.map_err(|status| {
                let reason = status.get_details_error_info().map(|info| info.reason).unwrap_or_default();
                (status.code(), reason)
            })
        };
        let keyring = self.keyring.get_project(authed(token, krpb::GetProjectRequest { name: self.project.clone() }));
        let keyring = outcome(keyring.await.map(drop));
        let invitation = self.invitation.list_my_invitations(authed(token, ivpb::ListMyInvitationsRequest::default()));
        let invitation = outcome(invitation.await.map(drop));
        let request = azpb::ListCallLogsRequest { parent: self.key.clone(), ..Default::default() };
        let usage = outcome(self.usage.list_call_logs(authed(token, request)).await.map(drop));
        vec![("keyring", keyring), ("invitation", invitation), ("authorizer UsageService", usage)]
    }

    /// Asserts that every service accepts `token`.
    async fn accepted_everywhere(&mut self, token: &str, when: &str) {
        for (service, answer) in self.answers(token).await {
            assert_eq!(answer, Ok(()), "{service} refused a live session's token {when}");
        }
    }

    /// Polls every service with `token` until each refuses it as a revoked session; fails if
    /// one still accepts it `WITHIN` after `since`. Returns how long the slowest took.
    async fn refused_everywhere(&mut self, token: &str, since: Instant) -> Duration {
        let revoked = Err((Code::Unauthenticated, "SESSION_REVOKED".to_owned()));
        loop {
            let answers = self.answers(token).await;
            if answers.iter().all(|(_, answer)| *answer == revoked) {
                return since.elapsed();
            }
            assert!(since.elapsed() < WITHIN, "an ended session's token still works after {WITHIN:?}: {answers:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn login(identity: &mut Identity, email: &str, password: &str) -> Session {
    let grant = identity
        .login(idpb::LoginRequest { email: email.into(), password: password.into() })
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap();
    Session { access: grant.access_token, refresh: grant.refresh_token }
}

/// Waits for the password-reset mail to `email` in the stack's spool and returns its token.
async fn reset_token(stack: &Stack, email: &str) -> String {
    let start = Instant::now();
    loop {
        let mails = std::fs::read_dir(&stack.mail_spool).into_iter().flatten().flatten();
        for mail in mails {
            let text = std::fs::read_to_string(mail.path()).unwrap_or_default();
            if text.contains(&format!("To: {email}"))
                && text.contains("Subject: Reset your Keyshare password")
                && let Some(at) = text.find("token=")
            {
                let token: String = text[at + "token=".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                    .collect();
                return token;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no password reset mail to {email}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_logged_out_access_token_is_refused_by_keyring_invitation_and_usage_within_5s() {
    let mut world = World::start().await;
    let stolen = world.login(PASSWORD).await;
    let other = world.login(PASSWORD).await;
    world.accepted_everywhere(&stolen.access, "before logout").await;

    let logged_out = Instant::now();
    world.identity.logout(idpb::LogoutRequest { refresh_token: stolen.refresh.clone() }).await.unwrap();
    world.refused_everywhere(&stolen.access, logged_out).await;
    world.accepted_everywhere(&other.access, "after another session logged out").await;
}

#[tokio::test]
async fn a_password_change_ends_every_other_session_everywhere_within_5s() {
    let mut world = World::start().await;
    let mine = world.login(PASSWORD).await;
    let stolen = world.login(PASSWORD).await;
    world.accepted_everywhere(&stolen.access, "before the password change").await;

    let changed = Instant::now();
    world
        .identity
        .change_password(authed(
            &mine.access,
            idpb::ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: "a new long test passphrase".into(),
            },
        ))
        .await
        .unwrap();
    world.refused_everywhere(&stolen.access, changed).await;
    world.accepted_everywhere(&mine.access, "after changing the password in this session").await;
}

#[tokio::test]
async fn a_password_reset_ends_every_session_everywhere_within_5s() {
    let mut world = World::start().await;
    let first = world.login(PASSWORD).await;
    let second = world.login(PASSWORD).await;
    world.accepted_everywhere(&first.access, "before the reset").await;
    world.accepted_everywhere(&second.access, "before the reset").await;

    world
        .identity
        .request_password_reset(idpb::RequestPasswordResetRequest { email: world.email.clone() })
        .await
        .unwrap();
    let token = reset_token(&world.stack, &world.email).await;
    let new_password = "a brand new test passphrase";
    let reset = Instant::now();
    world
        .identity
        .reset_password(idpb::ResetPasswordRequest { token, new_password: new_password.into() })
        .await
        .unwrap();
    world.refused_everywhere(&first.access, reset).await;
    world.refused_everywhere(&second.access, reset).await;
    let fresh = world.login(new_password).await;
    world.accepted_everywhere(&fresh.access, "after logging in with the new password").await;
}

#[tokio::test]
async fn the_token_of_a_replaced_unverified_account_is_refused_everywhere_within_5s() {
    // The stack lets unverified accounts log in, so whoever signed up with someone else's
    // address holds a session until the address's owner signs up and replaces the account.
    let mut world = World::start().await;
    let squatter = world.login(PASSWORD).await;
    world.accepted_everywhere(&squatter.access, "before the account is replaced").await;

    let replaced = Instant::now();
    world
        .identity
        .create_account(idpb::CreateAccountRequest {
            email: world.email.clone(),
            display_name: "The real Ada".into(),
            password: "the owner's own passphrase".into(),
        })
        .await
        .unwrap();
    world.refused_everywhere(&squatter.access, replaced).await;
}

#[tokio::test]
async fn a_logout_after_identity_restarts_is_still_refused_by_keyring_within_5s() {
    let mut world = World::start().await;
    let session = world.login(PASSWORD).await;
    world.accepted_everywhere(&session.access, "before identity restarts").await;

    world.stack.service_mut(Kind::Identity).restart().await;
    let logged_out = Instant::now();
    world.identity.logout(idpb::LogoutRequest { refresh_token: session.refresh.clone() }).await.unwrap();
    world.refused_everywhere(&session.access, logged_out).await;
}

#[tokio::test]
async fn only_keyshare_services_may_watch_session_revocations() {
    let stack = keyshare_system_tests::stack().await;
    let person = stack.account("eve@example.com").await.token;
    let mut identity = Identity::new(stack.channel(Kind::Identity).await);
    let refused = identity
        .watch_session_revocations(authed(&person, idpb::WatchSessionRevocationsRequest {}))
        .await
        .expect_err("a person's token opened the session-revocation feed");
    assert_eq!(refused.code(), Code::PermissionDenied);
    let anonymous = identity.watch_session_revocations(idpb::WatchSessionRevocationsRequest {}).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    // A Keyshare service gets the snapshot's end, then each session as it ends.
    let mut feed = identity
        .watch_session_revocations(authed(&stack.watcher_token().await, idpb::WatchSessionRevocationsRequest {}))
        .await
        .unwrap()
        .into_inner();
    use idpb::watch_session_revocations_response::Event;
    async fn next(feed: &mut tonic::Streaming<idpb::WatchSessionRevocationsResponse>) -> Event {
        let message = tokio::time::timeout(WITHIN, feed.message()).await.expect("no message within 5 s");
        message.unwrap().unwrap().event.unwrap()
    }
    assert!(matches!(next(&mut feed).await, Event::SnapshotEnd(_)), "the snapshot is empty before any logout");
    let session = login(&mut identity, "eve@example.com", keyshare_system_tests::PASSWORD).await;
    identity.logout(idpb::LogoutRequest { refresh_token: session.refresh }).await.unwrap();
    let Event::Revocation(revocation) = next(&mut feed).await else { panic!("a logout sent no revocation") };
    assert!(revocation.account.starts_with("accounts/"));
    assert!(revocation.expire_time.unwrap().seconds > revocation.revoke_time.unwrap().seconds + 900);
}
