//! The whole of Keyshare over mutual TLS, as processes: every service with a certificate of its
//! own, every call between them (tokens, organization roles, invitations' grants, the
//! authorizer's key feed) over `https://` with client certificates, the check still answering.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Keyshare, SERVICES, authed, token_in};
use keyshare_proto::authorizer::v1 as azpb;
use keyshare_proto::authorizer::v1::authorizer_service_client::AuthorizerServiceClient;
use keyshare_proto::invitation::v1 as ivpb;
use keyshare_proto::invitation::v1::invitation_service_client::InvitationServiceClient;
use keyshare_runtime::testkit::{eventually, tool};

#[tokio::test]
async fn every_service_works_over_mutual_tls() {
    let keyshare = Keyshare::start_with_mtls(&SERVICES, []).await;

    // identity → keyring and keyring → identity (organization roles).
    let ada = keyshare.account("ada@example.com").await;
    let created = keyshare.key(&ada).await;

    // invitation → identity (who may invite) and → keyring (granting the membership).
    let mut invitations = InvitationServiceClient::new(keyshare.channel("invitation"));
    let invitee = ivpb::Invitee { email: "bob@example.com".into(), role: ivpb::InvitationRole::KeyContributor as i32 };
    let request = ivpb::CreateInvitationsRequest { parent: created.key.unwrap().name, invitees: vec![invitee] };
    let result = invitations.create_invitations(authed(&ada, request)).await.unwrap().into_inner();
    assert!(result.results[0].invitation.is_some(), "Bob was not invited: {:?}", result.results);
    let bob = keyshare.account("bob@example.com").await;
    let mail = keyshare.smtp.wait_for_mail("bob@example.com", "invited you").await;
    let accept = ivpb::AcceptInvitationRequest { token: token_in(&mail.body) };
    invitations.accept_invitation(authed(&bob, accept)).await.unwrap();

    // authorizer → keyring (the key feed) and → identity (token keys, ended sessions).
    let authorizer = AuthorizerServiceClient::new(keyshare.channel("authorizer"));
    let check = azpb::CheckKeyRequest {
        key: created.sandbox_credential,
        method: "GET".into(),
        path: "/v1/things".into(),
        ..Default::default()
    };
    let answer = eventually("the authorizer to know the new key", Duration::from_secs(20), || {
        let (mut authorizer, check) = (authorizer.clone(), check.clone());
        async move { authorizer.check_key(check).await.ok().map(|r| r.into_inner()).filter(|r| r.allowed) }
    })
    .await;
    assert_eq!(answer.http_status, 200);
}

#[tokio::test]
async fn without_a_client_certificate_no_service_answers() {
    let keyshare = Keyshare::start_with_mtls(&["identity"], []).await;
    let (pki, _) = keyshare.tls.as_ref().unwrap();
    let settings = keyshare_runtime::tls::TlsSettings { identity: None, client_ca: None, ca: Some(pki.ca_path()) };
    let url = format!("https://{}", keyshare.grpc("identity"));
    let channel = keyshare_runtime::client::lazy_channel("test", &url, &settings).unwrap();
    let mut identity = keyshare_proto::identity::v1::identity_service_client::IdentityServiceClient::new(channel);
    let refused = identity.list_public_keys(keyshare_proto::identity::v1::ListPublicKeysRequest::default()).await;
    assert!(refused.is_err(), "{refused:?}");
}

/// The README's grpcurl line for a service with mTLS (`-cacert`, `-cert`, `-key`), against
/// identity at 127.0.0.1, which its certificate names.
#[tokio::test]
async fn grpcurl_reaches_a_service_over_mutual_tls() {
    let keyshare = Keyshare::start_with_mtls(&["identity"], []).await;
    let (pki, console) = keyshare.tls.as_ref().unwrap();
    let addr = keyshare.grpc("identity").to_string();
    let grpcurl = |args: &[&str]| {
        let mut command = std::process::Command::new(tool("grpcurl"));
        command.arg("-cacert").arg(pki.ca_path());
        command.args(args).arg(&addr).arg("grpc.health.v1.Health/Check");
        command.output().unwrap()
    };
    let cert = console.cert.display().to_string();
    let key = console.key.display().to_string();
    let out = grpcurl(&["-cert", &cert, "-key", &key]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("SERVING"));
    // Without its certificate grpcurl is refused.
    assert!(!grpcurl(&["-connect-timeout", "3"]).status.success());
}
