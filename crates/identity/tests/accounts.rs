//! Accounts and tokens through the real gRPC API, against a real database and SMTP server.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::*;
use keyshare_proto::identity::v1 as pb;
use keyshare_runtime::auth::{Claims, IdentityKeySource, TokenPolicy, TokenSigner, TokenVerifier};
use keyshare_runtime::crypto::{Sealed, Sealer};
use tonic::Code;

#[tokio::test]
async fn sign_up_verify_login_refresh_logout() {
    let h = Harness::start().await;
    let mut client = h.client().await;
    let email = "Ada@Example.com";
    let account = client
        .create_account(pb::CreateAccountRequest {
            email: email.into(),
            display_name: "Ada".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    assert!(!account.email_verified);

    // Unverified: login is refused with a reason, the password is right.
    let err = login(&mut client, email).await.unwrap_err();
    assert_eq!((err.code(), reason(&err).as_str()), (Code::FailedPrecondition, "EMAIL_NOT_VERIFIED"));

    // The mail arrived at a real SMTP server; its token verifies the account once.
    let mail = h.smtp.wait_for("ada@example.com", 1).await.pop().unwrap();
    assert_eq!(mail.subject, "Verify your Keyshare email address");
    let token = token_from_mail(&mail.body);
    let verified = client.verify_email(pb::VerifyEmailRequest { token: token.clone() }).await.unwrap().into_inner();
    assert!(verified.account.unwrap().email_verified);
    let again = client.verify_email(pb::VerifyEmailRequest { token }).await.unwrap_err();
    assert_eq!(reason(&again), "VERIFICATION_TOKEN_INVALID");

    // Login is case-insensitive on the email.
    let grant = login(&mut client, "ada@EXAMPLE.com").await.unwrap();
    let me = client
        .get_account(authed(&grant.access_token, pb::GetAccountRequest { name: "accounts/me".into() }))
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    assert_eq!(me.name, account.name);

    // A second replica's interceptor accepts the token.
    let (second_addr, _, _second) = h.spawn_instance().await;
    let mut second = connect(second_addr).await;
    let same = second
        .get_account(authed(&grant.access_token, pb::GetAccountRequest { name: account.name.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.account.unwrap().email, email);

    // Refresh rotates: the new refresh token works, the old one is spent.
    let rotated = client
        .refresh_token(pb::RefreshTokenRequest { refresh_token: grant.refresh_token.clone() })
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap();
    assert_ne!(rotated.refresh_token, grant.refresh_token);
    client
        .get_account(authed(&rotated.access_token, pb::GetAccountRequest { name: "accounts/me".into() }))
        .await
        .unwrap();

    // Logout ends the session: its refresh token no longer works, nor do its access tokens here.
    client.logout(pb::LogoutRequest { refresh_token: rotated.refresh_token.clone() }).await.unwrap();
    let err = client
        .refresh_token(pb::RefreshTokenRequest { refresh_token: rotated.refresh_token.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = client
        .get_account(authed(&rotated.access_token, pb::GetAccountRequest { name: "accounts/me".into() }))
        .await
        .unwrap_err();
    assert_eq!((err.code(), reason(&err).as_str()), (Code::Unauthenticated, "SESSION_ENDED"));
}

#[tokio::test]
async fn replayed_refresh_token_ends_the_session() {
    let h = Harness::start().await;
    let (_, _, refresh) = verified_account(&h, "replay@example.com").await;
    let mut client = h.client().await;
    let next = client
        .refresh_token(pb::RefreshTokenRequest { refresh_token: refresh.clone() })
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap();
    let replay = client.refresh_token(pb::RefreshTokenRequest { refresh_token: refresh.clone() }).await.unwrap_err();
    assert_eq!((replay.code(), reason(&replay).as_str()), (Code::Unauthenticated, "REFRESH_TOKEN_REUSED"));
    assert!(!replay.message().contains(&refresh));
    // The thief's replay also killed the legitimate holder's newer token.
    let err = client.refresh_token(pb::RefreshTokenRequest { refresh_token: next.refresh_token }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

/// Signs `claims` with identity's current signing key, read from its database with the KEK the
/// test configured: a token that is genuine except for what the case changes.
async fn genuine_signer(h: &Harness) -> TokenSigner {
    let (client, connection) = tokio_postgres::connect(&h.db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT kid, private_key_sealed, kek_id FROM identity.signing_keys WHERE retire_at IS NULL", &[])
        .await
        .unwrap();
    let kid: String = row.get(0);
    let sealer = Sealer::parse(&h.kek).unwrap();
    let der = sealer.open(&Sealed { key_id: row.get(2), blob: row.get(1) }, kid.as_bytes()).unwrap();
    TokenSigner::from_pkcs8(kid, &der)
}

fn decode_claims(token: &str) -> Claims {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap()
}

#[tokio::test]
async fn rejected_tokens_and_credentials() {
    let h = Harness::start().await;
    let (_, access, _) = verified_account(&h, "eve@example.com").await;
    let mut client = h.client().await;
    let genuine = genuine_signer(&h).await;
    let claims = decode_claims(&access);
    let sign = |edit: &dyn Fn(&mut Claims)| {
        let mut c = claims.clone();
        edit(&mut c);
        genuine.sign(&c).unwrap()
    };
    let stranger = {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        TokenSigner::from_pkcs8(genuine.kid(), key.to_pkcs8_der().unwrap().as_bytes())
    };
    let unknown_kid = {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        TokenSigner::from_pkcs8("not-a-key", key.to_pkcs8_der().unwrap().as_bytes())
    };
    let (head, rest) = access.split_once('.').unwrap();
    let signature = rest.split_once('.').unwrap().1;
    let mut forged = claims.clone();
    forged.sub = format!("accounts/{}", uuid::Uuid::new_v4());
    let tampered = format!("{head}.{}.{signature}", B64.encode(serde_json::to_vec(&forged).unwrap()));
    let alg_none = format!(
        "{}.{}.",
        B64.encode(format!(r#"{{"alg":"none","typ":"JWT","kid":"{}"}}"#, genuine.kid())),
        B64.encode(serde_json::to_vec(&claims).unwrap())
    );

    let cases: Vec<(&str, String, &str)> = vec![
        ("wrong audience", sign(&|c| c.aud = "somebody-else".into()), "TOKEN_AUDIENCE"),
        ("wrong issuer", sign(&|c| c.iss = "evil".into()), "TOKEN_AUDIENCE"),
        ("expired", sign(&|c| c.exp = c.iat - 120), "TOKEN_EXPIRED"),
        ("tampered payload", tampered, "TOKEN_INVALID"),
        ("alg none", alg_none, "TOKEN_INVALID"),
        ("signed by an unknown key", unknown_kid.sign(&claims).unwrap(), "TOKEN_UNKNOWN_KEY"),
        ("right kid, wrong key", stranger.sign(&claims).unwrap(), "TOKEN_INVALID"),
        ("not a JWT", "garbage".into(), "TOKEN_INVALID"),
    ];
    for (case, token, expected) in cases {
        let err =
            client.get_account(authed(&token, pb::GetAccountRequest { name: "accounts/me".into() })).await.unwrap_err();
        assert_eq!((err.code(), reason(&err).as_str()), (Code::Unauthenticated, expected), "{case}");
        assert!(!err.message().contains(&token), "{case}: token echoed");
    }

    // The genuine token still works, until the clock passes its expiry.
    client.get_account(authed(&access, pb::GetAccountRequest { name: "accounts/me".into() })).await.unwrap();
    h.clock.advance(chrono::Duration::minutes(16));
    let err =
        client.get_account(authed(&access, pb::GetAccountRequest { name: "accounts/me".into() })).await.unwrap_err();
    assert_eq!(reason(&err), "TOKEN_EXPIRED");

    // No token at all.
    let err = client.get_account(pb::GetAccountRequest { name: "accounts/me".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Wrong password: UNAUTHENTICATED, and the same answer for an unknown email.
    let wrong = client
        .login(pb::LoginRequest { email: "eve@example.com".into(), password: "not the password!".into() })
        .await
        .unwrap_err();
    let unknown = client
        .login(pb::LoginRequest { email: "nobody@example.com".into(), password: "not the password!".into() })
        .await
        .unwrap_err();
    assert_eq!((wrong.code(), reason(&wrong).as_str()), (Code::Unauthenticated, "INVALID_CREDENTIALS"));
    assert_eq!((wrong.code(), wrong.message()), (unknown.code(), unknown.message()));
    assert!(!wrong.message().contains("not the password"));
}

#[tokio::test]
async fn repeated_failures_are_throttled_whether_or_not_the_account_exists() {
    let h = Harness::start().await;
    verified_account(&h, "mallory@example.com").await;
    let mut client = h.client().await;
    for email in ["mallory@example.com", "ghost@example.com"] {
        for _ in 0..5 {
            let err = client
                .login(pb::LoginRequest { email: email.into(), password: "wrong-password-123".into() })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated);
        }
        // Locked now, even with the right password, and the answer says when to retry.
        let err = client.login(pb::LoginRequest { email: email.into(), password: PASSWORD.into() }).await.unwrap_err();
        assert_eq!((err.code(), reason(&err).as_str()), (Code::ResourceExhausted, "LOGIN_THROTTLED"), "{email}");
        let retry = tonic_types::StatusExt::get_details_retry_info(&err).unwrap().retry_delay.unwrap();
        assert!(retry.as_secs() > 0 && retry.as_secs() <= 900, "{retry:?}");
    }
    // After the lockout the right password works again.
    h.clock.advance(chrono::Duration::minutes(16));
    login(&mut client, "mallory@example.com").await.unwrap();
}

#[tokio::test]
async fn change_password_ends_other_sessions() {
    let h = Harness::start().await;
    let (_, access, refresh) = verified_account(&h, "grace@example.com").await;
    let mut client = h.client().await;
    let other = login(&mut client, "grace@example.com").await.unwrap();
    let response = client
        .change_password(authed(
            &access,
            pb::ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: "a brand new passphrase".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.revoked_sessions, 1);
    // This session lives on; the other one is over.
    client.refresh_token(pb::RefreshTokenRequest { refresh_token: refresh }).await.unwrap();
    let err = client.refresh_token(pb::RefreshTokenRequest { refresh_token: other.refresh_token }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(login(&mut client, "grace@example.com").await.is_err());
    client
        .login(pb::LoginRequest { email: "grace@example.com".into(), password: "a brand new passphrase".into() })
        .await
        .unwrap();
}

#[tokio::test]
async fn signing_key_rotation_needs_no_restart() {
    let h = Harness::start().await;
    let (_, old_token, _) = verified_account(&h, "rot@example.com").await;
    let mut client = h.client().await;

    // Another service's verifier, fetching keys from identity over gRPC.
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", h.addr)).unwrap().connect().await.unwrap();
    let remote = TokenVerifier::new(
        IdentityKeySource::new(channel),
        TokenPolicy { issuer: "keyshare-identity".into(), audience: "keyshare".into() },
        h.clock.clone(),
    );
    let caller = remote.verify(&old_token).await.unwrap();
    assert!(caller.account_id().is_some());

    let new_kid = keyshare_identity::rotate_signing_key(&h.config(), h.clock.clone()).await.unwrap();
    // A fresh replica signs with the new key (running ones switch within their cache period).
    let (addr, _, _replica) = h.spawn_instance().await;
    let mut replica = connect(addr).await;
    let new_token = login(&mut replica, "rot@example.com").await.unwrap().access_token;
    let header = jsonwebtoken::decode_header(&new_token).unwrap();
    assert_eq!(header.kid.as_deref(), Some(new_kid.as_str()));

    // The remote verifier learns the new kid on first sight; the old token still verifies.
    remote.verify(&new_token).await.unwrap();
    remote.verify(&old_token).await.unwrap();
    client.get_account(authed(&new_token, pb::GetAccountRequest { name: "accounts/me".into() })).await.unwrap();
    client.get_account(authed(&old_token, pb::GetAccountRequest { name: "accounts/me".into() })).await.unwrap();
    let keys = client.list_public_keys(pb::ListPublicKeysRequest::default()).await.unwrap().into_inner().keys;
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0].kid, new_kid);
    assert!(keys[0].retire_time.is_none() && keys[1].retire_time.is_some());
    let _ = Arc::clone(&h.clock);
}
