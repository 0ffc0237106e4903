//! Invitations end to end through the real gRPC APIs of identity, keyring and invitation, with
//! a real SMTP server and a clock the test moves.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use keyshare_proto::invitation::v1 as pb;
use keyshare_proto::keyring::v1 as krpb;
use pb::InvitationRole::{KeyAdmin, KeyContributor, OrganizationReader, ProjectMember};
use tonic::Code;

async fn get_key(h: &Harness, token: &str, key: &str) -> Result<krpb::Key, tonic::Status> {
    h.keyring()
        .await
        .get_key(authed(token, krpb::GetKeyRequest { name: key.into() }))
        .await
        .map(|r| r.into_inner().key.unwrap())
}

#[tokio::test]
async fn invite_accept_and_the_key_list_counts() {
    let h = Harness::start().await;
    let (owner, _, project, key) = h.key_with_owner("owner@example.com").await;
    let (_, admin) = h.account("admin@example.com", true).await;
    let mut invitations = h.invitations().await;

    // The owner makes an admin through an invitation.
    let result =
        invitations.create_invitations(authed(&owner, invite(&key, &[("admin@example.com", KeyAdmin)]))).await.unwrap();
    assert!(result.into_inner().results[0].invitation.is_some());
    let mail =
        h.smtp.wait_for("admin@example.com", 2).await.into_iter().find(|m| m.subject.contains("invited")).unwrap();
    // An inviter who sees the project names it too.
    assert!(mail.body.contains("as an admin of the API key \"Partner\" in the project \"API\"."), "{}", mail.body);
    invitations
        .accept_invitation(authed(&admin, pb::AcceptInvitationRequest { token: token_in(&mail.body) }))
        .await
        .unwrap();

    // The admin invites two emails to the key; both mails arrive with links.
    let (_, bob) = h.account("bob@example.com", true).await;
    let response = invitations
        .create_invitations(authed(
            &admin,
            invite(&key, &[("bob@example.com", KeyContributor), ("carol@example.com", KeyContributor)]),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(response.results.iter().all(|r| r.invitation.is_some()), "{response:?}");
    let bob_mail =
        h.smtp.wait_for("bob@example.com", 2).await.into_iter().find(|m| m.subject.contains("invited")).unwrap();
    let carol_mail = h.smtp.wait_for("carol@example.com", 1).await.pop().unwrap();
    // The mail names what it is for; with no web front end configured it carries no link, only
    // the call that takes the token.
    let key_title = get_key(&h, &owner, &key).await.unwrap().display_name;
    for mail in [&bob_mail, &carol_mail] {
        // (The admin who invites does not see the project, so its name is not in the mail.)
        assert!(mail.body.contains(&format!("as a contributor on the API key \"{key_title}\".")), "{}", mail.body);
        assert!(mail.subject.contains(&format!("to the API key \"{key_title}\"")), "{}", mail.subject);
        assert!(
            mail.body.contains("InvitationService/AcceptInvitation") && !mail.body.contains("http"),
            "{}",
            mail.body
        );
    }

    // Bob cannot see the key yet; after accepting, he sees it, its credentials, as a contributor.
    assert_eq!(get_key(&h, &bob, &key).await.unwrap_err().code(), Code::NotFound);
    let accepted = invitations
        .accept_invitation(authed(&bob, pb::AcceptInvitationRequest { token: token_in(&bob_mail.body) }))
        .await
        .unwrap()
        .into_inner()
        .invitation
        .unwrap();
    assert_eq!(accepted.status, pb::InvitationStatus::Accepted as i32);
    let seen = get_key(&h, &bob, &key).await.unwrap();
    assert_eq!(seen.caller_role, krpb::KeyRole::Contributor as i32);
    h.keyring()
        .await
        .reveal_credential(authed(&bob, krpb::RevealCredentialRequest { name: format!("{key}/environments/sandbox") }))
        .await
        .unwrap();
    // A contributor may not share the key further.
    let err = invitations
        .create_invitations(authed(&bob, invite(&key, &[("dave@example.com", KeyContributor)])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // The key list: 2 accepted (admin, bob), 1 pending (carol).
    let keys = h
        .keyring()
        .await
        .list_keys(authed(&owner, krpb::ListKeysRequest { parent: project, ..Default::default() }))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys[0].invitations, Some(krpb::InvitationCounts { known: true, accepted: 2, pending: 1 }));

    // The token works once; a second accept answers why.
    let err = invitations
        .accept_invitation(authed(&bob, pb::AcceptInvitationRequest { token: token_in(&bob_mail.body) }))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "INVITATION_ALREADY_ACCEPTED");
    let members = h
        .keyring()
        .await
        .list_key_members(authed(&owner, krpb::ListKeyMembersRequest { parent: key.clone(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner()
        .members;
    assert_eq!(members.len(), 3, "owner, admin, bob: one membership each");

    // Carol's dashboard banner shows her pending invitation once she has an account.
    let (_, carol) = h.account("carol@example.com", true).await;
    let mine = invitations
        .list_my_invitations(authed(&carol, pb::ListMyInvitationsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.invitations.len(), 1);
}

#[tokio::test]
async fn resend_expiry_and_revoking_access() {
    let h = Harness::start().await;
    let (owner, _, _, key) = h.key_with_owner("owner@example.com").await;
    let (_, eve) = h.account("eve@example.com", true).await;
    let mut invitations = h.invitations().await;
    let created = invitations
        .create_invitations(authed(&owner, invite(&key, &[("eve@example.com", KeyContributor)])))
        .await
        .unwrap();
    let name = created.into_inner().results[0].invitation.clone().unwrap().name;
    let first = token_in(
        &h.smtp.wait_for("eve@example.com", 2).await.into_iter().find(|m| m.subject.contains("invited")).unwrap().body,
    );

    // Resend: a new link; the old one no longer works.
    invitations.resend_invitation(authed(&owner, pb::ResendInvitationRequest { name: name.clone() })).await.unwrap();
    let mails: Vec<_> =
        h.smtp.wait_for("eve@example.com", 3).await.into_iter().filter(|m| m.subject.contains("invited")).collect();
    let second = mails.iter().map(|m| token_in(&m.body)).find(|t| *t != first).unwrap();
    let err =
        invitations.accept_invitation(authed(&eve, pb::AcceptInvitationRequest { token: first })).await.unwrap_err();
    assert_eq!((err.code(), reason(&err).as_str()), (Code::FailedPrecondition, "INVITATION_LINK_REPLACED"));

    // Seven days later it is expired: accept and revoke refuse, resend works.
    h.clock.advance(chrono::Duration::days(7) + chrono::Duration::minutes(1));
    let owner = h.login("owner@example.com").await;
    let eve = h.login("eve@example.com").await;
    let got = invitations
        .get_invitation(authed(&owner, pb::GetInvitationRequest { name: name.clone() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.invitation.unwrap().status, pb::InvitationStatus::Expired as i32);
    let err = invitations
        .accept_invitation(authed(&eve, pb::AcceptInvitationRequest { token: second.clone() }))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "INVITATION_EXPIRED");
    assert!(err.message().contains("sent again"));
    let err = invitations
        .revoke_invitation(authed(&owner, pb::RevokeInvitationRequest { name: name.clone() }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    invitations.resend_invitation(authed(&owner, pb::ResendInvitationRequest { name: name.clone() })).await.unwrap();
    let third = h
        .smtp
        .wait_for("eve@example.com", 4)
        .await
        .into_iter()
        .filter(|m| m.subject.contains("invited"))
        .map(|m| token_in(&m.body))
        .find(|t| *t != second && !mails.iter().any(|m| token_in(&m.body) == *t))
        .unwrap();
    invitations.accept_invitation(authed(&eve, pb::AcceptInvitationRequest { token: third })).await.unwrap();
    get_key(&h, &eve, &key).await.unwrap();

    // Revoke access: the membership goes, and her very next call no longer sees the key.
    invitations.revoke_access(authed(&owner, pb::RevokeAccessRequest { name: name.clone() })).await.unwrap();
    assert_eq!(get_key(&h, &eve, &key).await.unwrap_err().code(), Code::NotFound);
    let got = invitations.get_invitation(authed(&owner, pb::GetInvitationRequest { name })).await.unwrap().into_inner();
    assert_eq!(got.invitation.unwrap().status, pb::InvitationStatus::Revoked as i32);
}

#[tokio::test]
async fn accept_racing_revoke_has_one_winner_and_membership_follows() {
    let h = Harness::start().await;
    let (owner, _, project, _) = h.key_with_owner("owner@example.com").await;
    let mut invitations = h.invitations().await;
    const RACES: usize = 20;
    let mut accounts = Vec::new();
    for i in 0..RACES {
        let email = format!("racer{i}@example.com");
        let (id, token) = h.account(&email, true).await;
        let created =
            invitations.create_invitations(authed(&owner, invite(&project, &[(&email, ProjectMember)]))).await.unwrap();
        let name = created.into_inner().results[0].invitation.clone().unwrap().name;
        accounts.push((email, id, token, name));
    }
    let mut races = Vec::new();
    for (n, (email, id, token, name)) in accounts.into_iter().enumerate() {
        // Accept starts a little later in some races, so both orders of arrival happen (this
        // shapes the race; it waits for nothing).
        let head_start = Duration::from_micros((n as u64 % 5) * 2000);
        let link = token_in(
            &h.smtp.wait_for(&email, 2).await.into_iter().find(|m| m.subject.contains("invited")).unwrap().body,
        );
        let (mut a, mut b) = (h.invitations().await, h.invitations().await);
        let owner = owner.clone();
        races.push(tokio::spawn(async move {
            let (accept, revoke) = tokio::join!(
                async {
                    tokio::time::sleep(head_start).await;
                    a.accept_invitation(authed(&token, pb::AcceptInvitationRequest { token: link.clone() })).await
                },
                b.revoke_invitation(authed(&owner, pb::RevokeInvitationRequest { name: name.clone() })),
            );
            // A second accept of the same link never adds a second membership.
            let again = a.accept_invitation(authed(&token, pb::AcceptInvitationRequest { token: link })).await;
            assert!(again.is_err());
            (id, accept.is_ok(), revoke.is_ok(), name)
        }));
    }
    let mut keyring = h.keyring().await;
    let mut accepted_count = 0;
    for race in races {
        let (id, accepted, revoked, name) = race.await.unwrap();
        assert!(accepted ^ revoked, "exactly one of accept and revoke wins");
        accepted_count += usize::from(accepted);
        let status = invitations
            .get_invitation(authed(&owner, pb::GetInvitationRequest { name }))
            .await
            .unwrap()
            .into_inner()
            .invitation
            .unwrap()
            .status;
        let members = keyring
            .list_project_members(authed(
                &owner,
                krpb::ListProjectMembersRequest { parent: project.clone(), page_size: 1000, ..Default::default() },
            ))
            .await
            .unwrap()
            .into_inner()
            .members;
        let is_member = members.iter().filter(|m| m.account == id).count();
        if accepted {
            assert_eq!((status, is_member), (pb::InvitationStatus::Accepted as i32, 1));
        } else {
            assert_eq!((status, is_member), (pb::InvitationStatus::Revoked as i32, 0));
        }
    }
    println!("{accepted_count} of {RACES} races won by accept");
}

#[tokio::test]
async fn mail_sent_while_smtp_is_down_arrives_once_it_returns() {
    let mut h = Harness::start().await;
    let (owner, _, _, key) = h.key_with_owner("owner@example.com").await;
    let mut invitations = h.invitations().await;
    h.smtp.stop();
    let emails: Vec<String> = (0..5).map(|i| format!("later{i}@example.com")).collect();
    let list: Vec<(&str, pb::InvitationRole)> = emails.iter().map(|e| (e.as_str(), KeyContributor)).collect();
    let response = invitations.create_invitations(authed(&owner, invite(&key, &list))).await.unwrap().into_inner();
    let names: Vec<String> = response.results.iter().map(|r| r.invitation.clone().unwrap().name).collect();

    // While the server is down the invitations exist, with their delivery visibly pending.
    keyshare_runtime::testkit::eventually("a failed delivery attempt to show", Duration::from_secs(30), || {
        let mut invitations = invitations.clone();
        let (owner, name) = (owner.clone(), names[0].clone());
        async move {
            let invitation = invitations
                .get_invitation(authed(&owner, pb::GetInvitationRequest { name }))
                .await
                .ok()?
                .into_inner()
                .invitation?;
            (invitation.delivery_status == pb::DeliveryStatus::Pending as i32 && !invitation.delivery_error.is_empty())
                .then_some(())
        }
    })
    .await;

    h.smtp.restart().await;
    for email in &emails {
        h.smtp.wait_for(email, 1).await;
    }
    // None lost, none duplicated: exactly one mail each, and every invitation says delivered.
    keyshare_runtime::testkit::eventually("every invitation to report delivery", Duration::from_secs(30), || {
        let mut invitations = invitations.clone();
        let (owner, names) = (owner.clone(), names.clone());
        async move {
            for name in names {
                let invitation = invitations
                    .get_invitation(authed(&owner, pb::GetInvitationRequest { name }))
                    .await
                    .ok()?
                    .into_inner()
                    .invitation?;
                if invitation.delivery_status != pb::DeliveryStatus::Delivered as i32 {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    for email in &emails {
        assert_eq!(h.smtp.received().iter().filter(|m| m.to.contains(email.as_str())).count(), 1, "{email}");
    }
}

#[tokio::test]
async fn only_the_invited_verified_account_can_accept() {
    let h = Harness::start().await;
    let (owner, _, _, key) = h.key_with_owner("owner@example.com").await;
    let mut invitations = h.invitations().await;
    invitations
        .create_invitations(authed(&owner, invite(&key, &[("frank@example.com", KeyContributor)])))
        .await
        .unwrap();
    let link = token_in(&h.smtp.wait_for("frank@example.com", 1).await.pop().unwrap().body);

    // Before frank has an account, the link says so.
    let looked =
        invitations.lookup_invitation(pb::LookupInvitationRequest { token: link.clone() }).await.unwrap().into_inner();
    assert!(!looked.invitee_has_account);
    let err = invitations.accept_invitation(pb::AcceptInvitationRequest { token: link.clone() }).await.unwrap_err();
    assert_eq!((err.code(), reason(&err).as_str()), (Code::Unauthenticated, "LOGIN_TO_ACCEPT"));
    assert!(err.message().contains("sign up with the invited email"));

    // Someone else's account: refused, and told why.
    let (_, grace) = h.account("grace@example.com", true).await;
    let err = invitations
        .accept_invitation(authed(&grace, pb::AcceptInvitationRequest { token: link.clone() }))
        .await
        .unwrap_err();
    assert_eq!((err.code(), reason(&err).as_str()), (Code::PermissionDenied, "WRONG_ACCOUNT"));

    // Frank's account with the email not yet verified: refused, told to verify.
    let (_, frank) = h.account("frank@example.com", false).await;
    let err = invitations
        .accept_invitation(authed(&frank, pb::AcceptInvitationRequest { token: link.clone() }))
        .await
        .unwrap_err();
    assert_eq!((err.code(), reason(&err).as_str()), (Code::FailedPrecondition, "EMAIL_NOT_VERIFIED"));
    assert_eq!(get_key(&h, &frank, &key).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn bad_input_is_answered_per_email_or_refused_whole() {
    let h = Harness::start().await;
    let (owner, _, _, key) = h.key_with_owner("owner@example.com").await;
    let (_, member) = h.account("member@example.com", true).await;
    let mut invitations = h.invitations().await;
    invitations.create_invitations(authed(&owner, invite(&key, &[("member@example.com", KeyAdmin)]))).await.unwrap();
    let link = token_in(
        &h.smtp
            .wait_for("member@example.com", 2)
            .await
            .into_iter()
            .find(|m| m.subject.contains("invited"))
            .unwrap()
            .body,
    );
    invitations.accept_invitation(authed(&member, pb::AcceptInvitationRequest { token: link })).await.unwrap();
    invitations
        .create_invitations(authed(&owner, invite(&key, &[("pending@example.com", KeyContributor)])))
        .await
        .unwrap();

    // Malformed emails among good ones: answered one by one.
    let response = invitations
        .create_invitations(authed(
            &owner,
            invite(
                &key,
                &[
                    ("good1@example.com", KeyContributor),
                    ("not an email", KeyContributor),
                    ("member@example.com", KeyContributor),
                    ("pending@example.com", KeyContributor),
                    ("good2@example.com", KeyAdmin),
                    ("GOOD1@example.com", KeyContributor),
                ],
            ),
        ))
        .await
        .unwrap()
        .into_inner();
    let reasons: Vec<&str> = response.results.iter().map(|r| r.error_reason.as_str()).collect();
    assert_eq!(reasons, ["", "MALFORMED_EMAIL", "ALREADY_MEMBER", "ALREADY_PENDING", "", "DUPLICATE_IN_REQUEST"]);
    assert!(response.results[3].existing_invitation.starts_with("invitations/"));

    // Refused whole, nothing written: 1,000 emails, a role of another target, no emails.
    let before = (h.count("invitation.invitations").await, h.count("invitation.outbox").await);
    let thousand: Vec<String> = (0..1000).map(|i| format!("bulk{i}@example.com")).collect();
    let list: Vec<(&str, pb::InvitationRole)> = thousand.iter().map(|e| (e.as_str(), KeyContributor)).collect();
    let err = invitations.create_invitations(authed(&owner, invite(&key, &list))).await.unwrap_err();
    assert_eq!((err.code(), bad_fields(&err)), (Code::InvalidArgument, vec!["invitees".to_owned()]));
    let err = invitations
        .create_invitations(authed(
            &owner,
            invite(&key, &[("ok@example.com", KeyContributor), ("x@example.com", ProjectMember)]),
        ))
        .await
        .unwrap_err();
    assert_eq!((err.code(), bad_fields(&err)), (Code::InvalidArgument, vec!["invitees[1].role".to_owned()]));
    let err = invitations.create_invitations(authed(&owner, invite(&key, &[]))).await.unwrap_err();
    assert_eq!(bad_fields(&err), ["invitees"]);
    let err = invitations
        .create_invitations(authed(&owner, invite("keys/nope", &[("a@example.com", KeyContributor)])))
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&err), ["parent"]);
    assert_eq!((h.count("invitation.invitations").await, h.count("invitation.outbox").await), before);

    // A bad token: INVALID_ARGUMENT; a well-formed unknown one: NOT_FOUND.
    let err = invitations
        .accept_invitation(authed(&member, pb::AcceptInvitationRequest { token: "short".into() }))
        .await
        .unwrap_err();
    assert_eq!((err.code(), bad_fields(&err)), (Code::InvalidArgument, vec!["token".to_owned()]));
    let unknown = "A".repeat(43);
    let err = invitations
        .accept_invitation(authed(&member, pb::AcceptInvitationRequest { token: unknown }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn my_invitations_come_a_page_at_a_time_and_a_page_token_is_mine_alone() {
    let h = Harness::start().await;
    let (owner, org, project, key) = h.key_with_owner("owner@example.com").await;
    let (_, dana) = h.account("dana@example.com", true).await;
    let (_, erin) = h.account("erin@example.com", true).await;
    let mut invitations = h.invitations().await;
    for (target, role) in [(&org, OrganizationReader), (&project, ProjectMember), (&key, KeyContributor)] {
        invitations.create_invitations(authed(&owner, invite(target, &[("dana@example.com", role)]))).await.unwrap();
    }

    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut erin_tried = false;
    loop {
        let request = pb::ListMyInvitationsRequest { page_size: 2, page_token: page_token.clone() };
        let page = invitations.list_my_invitations(authed(&dana, request)).await.unwrap().into_inner();
        assert!(page.invitations.len() <= 2, "{page:?}");
        seen.extend(page.invitations.into_iter().map(|i| i.target));
        if page.next_page_token.is_empty() {
            break;
        }
        if !erin_tried {
            // Someone else's page token is refused, naming the field.
            let stolen = pb::ListMyInvitationsRequest { page_size: 2, page_token: page.next_page_token.clone() };
            let err = invitations.list_my_invitations(authed(&erin, stolen)).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
            assert_eq!(bad_fields(&err), ["page_token"]);
            erin_tried = true;
        }
        page_token = page.next_page_token;
    }
    assert!(erin_tried, "three invitations at two a page make two pages");
    // Newest first, each once.
    assert_eq!(seen, [key.clone(), project.clone(), org.clone()]);

    let negative = pb::ListMyInvitationsRequest { page_size: -1, page_token: String::new() };
    let err = invitations.list_my_invitations(authed(&dana, negative)).await.unwrap_err();
    assert_eq!(bad_fields(&err), ["page_size"]);
}
