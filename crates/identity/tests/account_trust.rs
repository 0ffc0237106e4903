//! Attacks on accounts from outside, through the real gRPC API: squatting an email, taking an
//! account over through a resent verification, guessing passwords faster than the limit,
//! flooding logins to starve other calls, and filling someone's inbox.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use keyshare_proto::identity::v1 as pb;
use keyshare_runtime::testkit::eventually;
use tonic::Code;

async fn sign_up(client: &mut Client, email: &str, password: &str) -> Result<pb::Account, tonic::Status> {
    client
        .create_account(pb::CreateAccountRequest {
            email: email.into(),
            display_name: "Someone".into(),
            password: password.into(),
        })
        .await
        .map(|r| r.into_inner().account.unwrap())
}

async fn login_with(client: &mut Client, email: &str, password: &str) -> Result<pb::TokenGrant, tonic::Status> {
    client
        .login(pb::LoginRequest { email: email.into(), password: password.into() })
        .await
        .map(|r| r.into_inner().grant.unwrap())
}

/// Mails to `to` whose subject contains `subject`, oldest first as far as the server tells.
async fn mails_about(h: &Harness, to: &str, subject: &str, count: usize) -> Vec<String> {
    eventually(&format!("{count} mail(s) to {to} about {subject:?}"), Duration::from_secs(30), || {
        let found: Vec<String> = h
            .smtp
            .received()
            .into_iter()
            .filter(|m| m.to.to_ascii_lowercase().contains(to) && m.subject.contains(subject))
            .map(|m| m.body)
            .collect();
        async move { (found.len() >= count).then_some(found) }
    })
    .await
}

const ATTACKER_PASSWORD: &str = "the squatter's own password";
const OWNER_PASSWORD: &str = "the owner's real passphrase";

#[tokio::test]
async fn squatted_unverified_signup_is_replaced_by_the_owners() {
    let h = Harness::start_with([Setting::RequireVerifiedEmail(false)]).await;
    let mut client = h.client().await;
    let email = "victim@example.com";
    // The attacker signs up first with the victim's address (and, as login does not need a
    // verified email here, even holds a session).
    let squatted = sign_up(&mut client, email, ATTACKER_PASSWORD).await.unwrap();
    let squatter_session = login_with(&mut client, email, ATTACKER_PASSWORD).await.unwrap();
    let squatter_mail = mails_about(&h, email, "Verify", 1).await.pop().unwrap();

    // The owner's own sign-up is not refused: it replaces the pending account.
    let owned = sign_up(&mut client, email, OWNER_PASSWORD).await.unwrap();
    assert_ne!(owned.name, squatted.name);
    assert!(!owned.email_verified);

    // The first mail's token died with the squatted account; the owner's verifies the new one.
    let err = client.verify_email(pb::VerifyEmailRequest { token: token_from_mail(&squatter_mail) }).await.unwrap_err();
    assert_eq!(reason(&err), "VERIFICATION_TOKEN_INVALID");
    let mails = mails_about(&h, email, "Verify", 2).await;
    let owner_mail = mails.iter().find(|body| **body != squatter_mail).unwrap();
    let verified = client.verify_email(pb::VerifyEmailRequest { token: token_from_mail(owner_mail) }).await.unwrap();
    assert_eq!(verified.into_inner().account.unwrap().name, owned.name);

    // Only the owner's password opens the verified account; the squatter's session is over.
    let err = login_with(&mut client, email, ATTACKER_PASSWORD).await.unwrap_err();
    assert_eq!(reason(&err), "INVALID_CREDENTIALS");
    login_with(&mut client, email, OWNER_PASSWORD).await.unwrap();
    let err = client
        .refresh_token(pb::RefreshTokenRequest { refresh_token: squatter_session.refresh_token })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // A verified account is not replaced.
    let err = sign_up(&mut client, email, ATTACKER_PASSWORD).await.unwrap_err();
    assert_eq!((err.code(), reason(&err).as_str()), (Code::AlreadyExists, "EMAIL_TAKEN"));
}

#[tokio::test]
async fn resent_verification_does_not_verify_the_squatters_password() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let email = "owner@example.com";
    sign_up(&mut client, email, ATTACKER_PASSWORD).await.unwrap();
    let squatter_mail = mails_about(&h, email, "Verify", 1).await.pop().unwrap();

    // The owner, finding "email taken", asks for the verification mail again.
    client.resend_verification_email(pb::ResendVerificationEmailRequest { email: email.into() }).await.unwrap();
    let resent = mails_about(&h, email, "Finish signing up", 1).await.pop().unwrap();

    // Earlier verification links stop working: none verifies the squatter's password.
    let err = client.verify_email(pb::VerifyEmailRequest { token: token_from_mail(&squatter_mail) }).await.unwrap_err();
    assert_eq!(reason(&err), "VERIFICATION_TOKEN_INVALID");

    // The resent link verifies only together with a password, which the verifier chooses.
    let reset = client
        .reset_password(pb::ResetPasswordRequest {
            token: token_from_mail(&resent),
            new_password: OWNER_PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reset.account.unwrap().email_verified);
    let err = login_with(&mut client, email, ATTACKER_PASSWORD).await.unwrap_err();
    assert_eq!(reason(&err), "INVALID_CREDENTIALS");
    login_with(&mut client, email, OWNER_PASSWORD).await.unwrap();
}

#[tokio::test]
async fn password_reset_by_mail_is_single_use_short_lived_and_ends_every_session() {
    let h = Harness::start().await;
    let email = "forgetful@example.com";
    let (_, access, refresh) = verified_account(&h, email).await;
    let mut client = h.client().await;
    let other = login(&mut client, email).await.unwrap();

    // The request answers the same whether or not the email has an account.
    let known = client.request_password_reset(pb::RequestPasswordResetRequest { email: email.into() }).await.unwrap();
    let unknown = client
        .request_password_reset(pb::RequestPasswordResetRequest { email: "nobody-here@example.com".into() })
        .await
        .unwrap();
    assert_eq!(known.into_inner(), unknown.into_inner());
    let err =
        client.request_password_reset(pb::RequestPasswordResetRequest { email: "nope".into() }).await.unwrap_err();
    assert_eq!((err.code(), bad_fields(&err)), (Code::InvalidArgument, vec!["email".to_owned()]));

    let mail = mails_about(&h, email, "Reset your Keyshare password", 1).await.pop().unwrap();
    let token = token_from_mail(&mail);
    let first = token.clone();
    let err = client
        .reset_password(pb::ResetPasswordRequest { token: token.clone(), new_password: "short".into() })
        .await
        .unwrap_err();
    assert_eq!((err.code(), bad_fields(&err)), (Code::InvalidArgument, vec!["new_password".to_owned()]));

    let new_password = "a freshly chosen passphrase";
    let reset = client
        .reset_password(pb::ResetPasswordRequest { token: token.clone(), new_password: new_password.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reset.revoked_sessions, 2);

    // Every session is over: refresh tokens, and access tokens at identity.
    for refresh in [refresh, other.refresh_token] {
        let err = client.refresh_token(pb::RefreshTokenRequest { refresh_token: refresh }).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let err =
        client.get_account(authed(&access, pb::GetAccountRequest { name: "accounts/me".into() })).await.unwrap_err();
    assert_eq!(reason(&err), "SESSION_ENDED");
    assert!(login(&mut client, email).await.is_err());
    login_with(&mut client, email, new_password).await.unwrap();

    // The token works once.
    let err = client
        .reset_password(pb::ResetPasswordRequest { token, new_password: "yet another passphrase".into() })
        .await
        .unwrap_err();
    assert_eq!((err.code(), reason(&err).as_str()), (Code::FailedPrecondition, "PASSWORD_RESET_TOKEN_INVALID"));

    // A token expires after 30 minutes.
    client.request_password_reset(pb::RequestPasswordResetRequest { email: email.into() }).await.unwrap();
    let mails = mails_about(&h, email, "Reset your Keyshare password", 2).await;
    let late = mails.iter().map(|body| token_from_mail(body)).find(|t| *t != first).unwrap();
    h.clock.advance(chrono::Duration::minutes(31));
    let err = client
        .reset_password(pb::ResetPasswordRequest { token: late, new_password: "too late a passphrase".into() })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "PASSWORD_RESET_TOKEN_INVALID");
    login_with(&mut client, email, new_password).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_wrong_passwords_cannot_outrun_the_limit() {
    // A queue that holds every guess, so that only the throttle decides which are checked.
    let h = Harness::start_with([Setting::PasswordHashQueue(64)]).await;
    let email = "target@example.com";
    verified_account(&h, email).await;
    let client = h.client().await;
    let guesses = (0..50).map(|i| {
        let mut client = client.clone();
        async move { login_with(&mut client, email, &format!("wrong guess number {i}")).await.unwrap_err() }
    });
    let answers = futures::future::join_all(guesses).await;
    let evaluated = answers.iter().filter(|e| reason(e) == "INVALID_CREDENTIALS").count();
    let throttled = answers.iter().filter(|e| reason(e) == "LOGIN_THROTTLED").count();
    assert_eq!((evaluated, throttled), (5, 45), "of 50 simultaneous guesses, exactly the limit may be checked");
    // Locked: the right password waits for the lockout too.
    let err = login(&mut client.clone(), email).await.unwrap_err();
    assert_eq!(reason(&err), "LOGIN_THROTTLED");
}

#[tokio::test]
async fn one_client_address_cannot_spread_guesses_over_many_emails() {
    let h = Harness::start_with([Setting::LoginMaxFailuresPerAddress(8)]).await;
    let mut client = h.client().await;
    for i in 0..8 {
        let err = login_with(&mut client, &format!("spray{i}@example.com"), "some guessed password").await.unwrap_err();
        assert_eq!(reason(&err), "INVALID_CREDENTIALS", "attempt {i}");
    }
    // The ninth email is fresh, but the address is spent, and a forged x-forwarded-for does not
    // help when no trusted proxy is configured.
    let mut forged = tonic::Request::new(pb::LoginRequest {
        email: "spray-fresh@example.com".into(),
        password: "some guessed password".into(),
    });
    forged.metadata_mut().insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    let err = client.login(forged).await.unwrap_err();
    assert_eq!((err.code(), reason(&err).as_str()), (Code::ResourceExhausted, "LOGIN_THROTTLED"));

    // Behind a trusted proxy, the address is the last x-forwarded-for entry: entries the caller
    // wrote before it do not choose the bucket.
    let proxied =
        Harness::start_with([Setting::LoginMaxFailuresPerAddress(2), Setting::LoginTrustForwardedFor(true)]).await;
    let mut client = proxied.client().await;
    let attempt = |email: String, chain: &'static str| {
        let mut request = tonic::Request::new(pb::LoginRequest { email, password: "some guessed password".into() });
        request.metadata_mut().insert("x-forwarded-for", chain.parse().unwrap());
        request
    };
    for i in 0..2 {
        let chain = if i == 0 { "198.51.100.1, 192.0.2.7" } else { "198.51.100.2, 192.0.2.7" };
        let err = client.login(attempt(format!("p{i}@example.com"), chain)).await.unwrap_err();
        assert_eq!(reason(&err), "INVALID_CREDENTIALS");
    }
    let err = client.login(attempt("p2@example.com".into(), "198.51.100.3, 192.0.2.7")).await.unwrap_err();
    assert_eq!(reason(&err), "LOGIN_THROTTLED");
    let err = client.login(attempt("p3@example.com".into(), "192.0.2.8")).await.unwrap_err();
    assert_eq!(reason(&err), "INVALID_CREDENTIALS", "another client behind the proxy has its own budget");
}

/// p99 of `samples`, in milliseconds.
fn p99(samples: &mut [Duration]) -> f64 {
    samples.sort();
    let index = ((samples.len() as f64) * 0.99).ceil() as usize;
    samples[index.clamp(1, samples.len()) - 1].as_secs_f64() * 1000.0
}

/// How long each watched call may take during the login flood. Unloaded, their p99 is under
/// 100 ms; the margin is for a loaded 2-core CI machine, where the flood's own cost (2,000 calls
/// through a debug build, in this process) competes for the same cores. Before hashing had a
/// pool of its own, these calls waited for the whole flood's hashing: minutes.
const CALL_DEADLINE: Duration = Duration::from_secs(5);

/// Calls `call` back to back until `done`, each with `deadline`; returns every latency.
async fn keep_calling<F, Fut>(
    what: &'static str,
    done: tokio::sync::watch::Receiver<bool>,
    mut call: F,
) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    const DEADLINE: Duration = CALL_DEADLINE;
    let mut latencies = Vec::new();
    while !*done.borrow() {
        let start = Instant::now();
        match tokio::time::timeout(DEADLINE, call()).await {
            Ok(Ok(())) => latencies.push(start.elapsed()),
            Ok(Err(status)) => panic!("{what} failed during the login flood: {status:?}"),
            Err(_) => panic!("{what} missed its {DEADLINE:?} deadline during the login flood"),
        }
    }
    latencies
}

/// Runs `work` on a new thread with a runtime of its own; its result arrives on the receiver
/// (which errs if `work` panicked).
fn on_own_thread<T, F, Fut>(work: F) -> tokio::sync::oneshot::Receiver<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _ = tx.send(runtime.block_on(work()));
    });
    rx
}

fn with_deadline<T>(token: Option<&str>, message: T) -> tonic::Request<T> {
    let mut request = match token {
        Some(token) => authed(token, message),
        None => tonic::Request::new(message),
    };
    request.set_timeout(CALL_DEADLINE);
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_flood_leaves_internal_and_management_calls_answering() {
    // The per-address limit would stop this flood from one address almost at once; it is
    // lifted so that the flood reaches password hashing, the resource under attack. The
    // database pool is the default one, not the harness's small one.
    let h = Harness::start_with([Setting::LoginMaxFailuresPerAddress(1_000_000), Setting::PoolSize(16)]).await;
    let (account, owner_token, _) = verified_account(&h, "owner@example.com").await;
    let mut client = h.client().await;
    let internal = internal_token(&h).await;
    let org = client
        .create_organization(authed(
            &owner_token,
            pb::CreateOrganizationRequest {
                organization: Some(pb::Organization { display_name: "Acme".into(), ..Default::default() }),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .organization
        .unwrap()
        .name;
    let member = format!("{org}/members/{}", account.trim_start_matches("accounts/"));

    // The flood and the watching calls each run on a thread and runtime of their own, as
    // separate clients would, so neither queues behind the other's client-side work.
    let addr = h.addr;
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let flood_start = Instant::now();
    let flood = on_own_thread(move || async move {
        // 2,000 concurrent bad logins over 20 connections.
        let mut flooders = Vec::new();
        for _ in 0..20 {
            flooders.push(connect(addr).await);
        }
        let logins = (0..2000).map(|i| {
            let mut client = flooders[i % flooders.len()].clone();
            async move {
                let request = pb::LoginRequest {
                    email: format!("flood{i}@example.com"),
                    password: "not anybody's password".into(),
                };
                client.login(request).await.unwrap_err()
            }
        });
        let answers = futures::future::join_all(logins).await;
        let _ = done_tx.send(true);
        answers
    });
    let watchers = on_own_thread(move || async move {
        let (keys_client, member_client, members_client) =
            (connect(addr).await, connect(addr).await, connect(addr).await);
        let public_keys = keep_calling("ListPublicKeys (internal)", done_rx.clone(), || {
            let mut client = keys_client.clone();
            async move {
                client.list_public_keys(with_deadline(None, pb::ListPublicKeysRequest::default())).await.map(|_| ())
            }
        });
        let role_lookup = keep_calling("GetOrganizationMember (internal role lookup)", done_rx.clone(), || {
            let (mut client, internal, member) = (member_client.clone(), internal.clone(), member.clone());
            async move {
                let request = pb::GetOrganizationMemberRequest { name: member };
                client.get_organization_member(with_deadline(Some(&internal), request)).await.map(|_| ())
            }
        });
        let management = keep_calling("ListOrganizationMembers (management)", done_rx.clone(), || {
            let (mut client, token, org) = (members_client.clone(), owner_token.clone(), org.clone());
            async move {
                let request = pb::ListOrganizationMembersRequest { parent: org, ..Default::default() };
                client.list_organization_members(with_deadline(Some(&token), request)).await.map(|_| ())
            }
        });
        tokio::join!(public_keys, role_lookup, management)
    });
    let answers = flood.await.unwrap();
    let flood_time = flood_start.elapsed();
    let (mut keys, mut roles, mut members) = watchers.await.expect("the watching calls kept their deadlines");

    // Every login got an answer: a checked password, or "busy, retry" at once.
    let checked = answers.iter().filter(|e| reason(e) == "INVALID_CREDENTIALS").count();
    let busy = answers
        .iter()
        .filter(|e| (e.code(), reason(e).as_str()) == (Code::Unavailable, "PASSWORD_CHECKS_BUSY"))
        .count();
    assert_eq!(
        checked + busy,
        2000,
        "unexpected answers: {:?}",
        answers.iter().find(|e| { !matches!(reason(e).as_str(), "INVALID_CREDENTIALS" | "PASSWORD_CHECKS_BUSY") })
    );
    assert!(checked > 0, "the flood reached password hashing");
    assert!(!keys.is_empty() && !roles.is_empty() && !members.is_empty());
    println!(
        "login flood: 2000 logins in {:.0} ms ({checked} checked, {busy} busy); p99 during the flood: \
         ListPublicKeys {:.1} ms ({} calls), GetOrganizationMember {:.1} ms ({} calls), \
         ListOrganizationMembers {:.1} ms ({} calls)",
        flood_time.as_secs_f64() * 1000.0,
        p99(&mut keys),
        keys.len(),
        p99(&mut roles),
        roles.len(),
        p99(&mut members),
        members.len(),
    );
    // After the flood, logins are checked again.
    login(&mut client, "owner@example.com").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resend_flood_cannot_fill_an_inbox() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let email = "inbox@example.com";
    sign_up(&mut client, email, OWNER_PASSWORD).await.unwrap();
    for address in [email, "no-account@example.com"] {
        let resends = (0..20).map(|_| {
            let mut client = client.clone();
            async move {
                client.resend_verification_email(pb::ResendVerificationEmailRequest { email: address.into() }).await
            }
        });
        let answers = futures::future::join_all(resends).await;
        let throttled: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
        assert!(
            throttled.iter().all(|e| (e.code(), reason(e).as_str()) == (Code::ResourceExhausted, "MAIL_THROTTLED"))
        );
        // The sign-up's mail counts against the same budget of 5 mails an hour.
        let expected_ok = if address == email { 4 } else { 5 };
        assert_eq!(answers.len() - throttled.len(), expected_ok, "{address}");
        let retry = tonic_types::StatusExt::get_details_retry_info(throttled[0]).unwrap().retry_delay.unwrap();
        assert!(retry > Duration::ZERO && retry <= Duration::from_secs(3600));
    }
    // Reset requests share the budget, so they cannot be used instead.
    let err = client.request_password_reset(pb::RequestPasswordResetRequest { email: email.into() }).await.unwrap_err();
    assert_eq!(reason(&err), "MAIL_THROTTLED");

    // Once the outbox is empty, the inbox holds the five mails and no more.
    eventually("the outbox to deliver everything", Duration::from_secs(30), || async {
        (pending_mails(&h).await == 0).then_some(())
    })
    .await;
    let received = h.smtp.received().into_iter().filter(|m| m.to.contains(email)).count();
    assert_eq!(received, 5);

    // After the window, mail flows again.
    h.clock.advance(chrono::Duration::minutes(61));
    client.resend_verification_email(pb::ResendVerificationEmailRequest { email: email.into() }).await.unwrap();
}

async fn pending_mails(h: &Harness) -> i64 {
    let (db, connection) = tokio_postgres::connect(&h.db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    db.query_one("SELECT count(*) FROM identity.outbox WHERE delivered_at IS NULL AND failed_at IS NULL", &[])
        .await
        .unwrap()
        .get(0)
}

/// Concurrent hits on one throttle each bring their own time, and the one that starts the window
/// may be a moment later than one counted after it: the refused hit is still told to wait no
/// longer than the window.
#[tokio::test]
async fn a_throttled_hit_never_waits_longer_than_the_window() {
    use keyshare_identity::store::{self, Bucket, Limit};
    let h = Harness::start().await;
    let pool = keyshare_runtime::db::pool(&h.db.url, 1).unwrap();
    let client = pool.get().await.unwrap();
    let window = chrono::Duration::hours(1);
    let limit = Limit { max_hits: 1, window, lockout: None };
    let earlier = chrono::Utc::now();
    let later = earlier + chrono::Duration::milliseconds(5);
    // The later hit reaches the row first and starts the window; the earlier one is refused.
    assert_eq!(
        store::throttle_hit(&client, Bucket::MailAddress, "race@example.com", later, limit).await.unwrap(),
        None
    );
    let until = store::throttle_hit(&client, Bucket::MailAddress, "race@example.com", earlier, limit)
        .await
        .unwrap()
        .expect("the second hit is over the limit");
    assert!(until > earlier && until <= earlier + window, "told to wait {:?}", until - earlier);
}
