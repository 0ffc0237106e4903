//! Access that ends when it should, tried from outside as an attacker would, through the real
//! gRPC APIs of identity, keyring and invitation (a real SMTP server delivers the links).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use keyshare_proto::identity::v1 as idpb;
use keyshare_proto::invitation::v1 as pb;
use keyshare_proto::keyring::v1 as krpb;
use keyshare_runtime::testkit::eventually;
use pb::InvitationRole::{KeyAdmin, KeyContributor, OrganizationOwner, OrganizationReader, ProjectMember};
use tonic::Code;

/// Invites `email` to `target` as `role`: (invitation name, the token of its mail).
async fn invite_one(
    h: &Harness,
    inviter: &str,
    target: &str,
    email: &str,
    role: pb::InvitationRole,
) -> (String, String) {
    let tokens = |h: &Harness| -> Vec<String> {
        h.smtp
            .received()
            .into_iter()
            .filter(|m| m.to.contains(email) && m.subject.contains("invited"))
            .map(|m| token_in(&m.body))
            .collect()
    };
    let before = tokens(h).len();
    let created =
        h.invitations().await.create_invitations(authed(inviter, invite(target, &[(email, role)]))).await.unwrap();
    let result = created.into_inner().results.remove(0);
    let name = result.invitation.unwrap_or_else(|| panic!("not invited: {}", result.error_message)).name;
    let candidates = eventually("the invitation mail", Duration::from_secs(30), || {
        let all = tokens(h);
        async move { (all.len() > before).then_some(all) }
    })
    .await;
    // Several invitations may have gone to this email: take the token that opens this one.
    let mut invitations = h.invitations().await;
    for token in candidates {
        let found = invitations.lookup_invitation(pb::LookupInvitationRequest { token: token.clone() }).await;
        if found.is_ok_and(|r| r.into_inner().invitation.is_some_and(|i| i.name == name)) {
            return (name, token);
        }
    }
    panic!("no mail opens {name}");
}

async fn accept(h: &Harness, invitee: &str, token: &str) -> Result<pb::Invitation, tonic::Status> {
    h.invitations()
        .await
        .accept_invitation(authed(invitee, pb::AcceptInvitationRequest { token: token.into() }))
        .await
        .map(|r| r.into_inner().invitation.unwrap())
}

async fn status_of(h: &Harness, manager: &str, invitation: &str) -> i32 {
    let mut invitations = h.invitations().await;
    let got = invitations.get_invitation(authed(manager, pb::GetInvitationRequest { name: invitation.into() })).await;
    got.unwrap().into_inner().invitation.unwrap().status
}

fn member_name(parent: &str, account: &str) -> String {
    format!("{parent}/members/{}", account.trim_start_matches("accounts/"))
}

/// What `token` gets from keyring's reads of a project and a key.
async fn reads(h: &Harness, token: &str, project: &str, key: &str) -> [Code; 4] {
    let mut keyring = h.keyring().await;
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    [
        code(keyring.get_project(authed(token, krpb::GetProjectRequest { name: project.into() })).await.map(|_| ())),
        code(
            keyring
                .list_keys(authed(token, krpb::ListKeysRequest { parent: project.into(), ..Default::default() }))
                .await
                .map(|_| ()),
        ),
        code(keyring.get_key(authed(token, krpb::GetKeyRequest { name: key.into() })).await.map(|_| ())),
        code(
            keyring
                .reveal_credential(authed(
                    token,
                    krpb::RevealCredentialRequest { name: format!("{key}/environments/production") },
                ))
                .await
                .map(|_| ()),
        ),
    ]
}

async fn shared_with_me(h: &Harness, token: &str) -> usize {
    let shared = h.keyring().await.list_shared_keys(authed(token, krpb::ListSharedKeysRequest::default())).await;
    shared.unwrap().into_inner().keys.len()
}

async fn key_counts(h: &Harness, token: &str, project: &str) -> Vec<Option<krpb::InvitationCounts>> {
    let keys = h
        .keyring()
        .await
        .list_keys(authed(token, krpb::ListKeysRequest { parent: project.into(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner()
        .keys;
    keys.into_iter().map(|k| k.invitations).collect()
}

async fn remove_from_org(h: &Harness, owner: &str, org: &str, account: &str) {
    h.identity()
        .await
        .delete_organization_member(authed(
            owner,
            idpb::DeleteOrganizationMemberRequest { name: member_name(org, account), ..Default::default() },
        ))
        .await
        .unwrap();
}

async fn set_org_role(h: &Harness, owner: &str, org: &str, account: &str, role: idpb::OrganizationRole) {
    h.identity()
        .await
        .update_organization_member(authed(
            owner,
            idpb::UpdateOrganizationMemberRequest {
                member: Some(idpb::OrganizationMember {
                    name: member_name(org, account),
                    role: role as i32,
                    ..Default::default()
                }),
                update_mask: None,
            },
        ))
        .await
        .unwrap();
}

const OK4: [Code; 4] = [Code::Ok; 4];
const GONE4: [Code; 4] = [Code::NotFound; 4];

#[tokio::test]
async fn a_person_removed_from_the_organization_keeps_nothing_in_it() {
    let h = Harness::start().await;
    let (owner, org, project, key) = h.key_with_owner("owner@example.com").await;

    // Mallory joins the organization, the project and the key, and makes a key of her own.
    let (mallory_id, mallory) = h.account("mallory@example.com", true).await;
    for (target, role) in [(&org, OrganizationReader), (&project, ProjectMember), (&key, KeyAdmin)] {
        let (_, token) = invite_one(&h, &owner, target, "mallory@example.com", role).await;
        accept(&h, &mallory, &token).await.unwrap();
    }
    let own_key = h
        .keyring()
        .await
        .create_key(authed(
            &mallory,
            krpb::CreateKeyRequest {
                parent: project.clone(),
                key: Some(krpb::Key { display_name: "Mallory's".into(), ..Default::default() }),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
        .name;
    assert_eq!(reads(&h, &mallory, &project, &key).await, OK4);
    assert_eq!(shared_with_me(&h, &mallory).await, 2);

    // The owner removes her from the organization: her very next calls find nothing of it.
    remove_from_org(&h, &owner, &org, &mallory_id).await;
    assert_eq!(reads(&h, &mallory, &project, &key).await, GONE4);
    assert_eq!(reads(&h, &mallory, &project, &own_key).await, GONE4);
    assert_eq!(shared_with_me(&h, &mallory).await, 0);
    let held = h
        .keyring()
        .await
        .test_permissions(authed(
            &mallory,
            krpb::TestPermissionsRequest {
                resource: key.clone(),
                permissions: vec!["keys.get".into(), "keys.manage".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .permissions;
    assert!(held.is_empty(), "{held:?}");
    // Her memberships are gone, not just hidden, and the invitations that granted them no
    // longer count as accepted.
    let members = h
        .keyring()
        .await
        .list_project_members(authed(
            &owner,
            krpb::ListProjectMembersRequest { parent: project.clone(), ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner()
        .members;
    assert!(members.iter().all(|m| m.account != mallory_id), "{members:?}");
    assert!(key_counts(&h, &owner, &project).await.iter().all(|c| c.is_some_and(|c| c.accepted == 0)));

    // Removal by revoking the organization invitation does the same.
    let (trent_id, trent) = h.account("trent@example.com", true).await;
    let (org_invitation, token) = invite_one(&h, &owner, &org, "trent@example.com", OrganizationReader).await;
    accept(&h, &trent, &token).await.unwrap();
    let (_, token) = invite_one(&h, &owner, &key, "trent@example.com", KeyContributor).await;
    accept(&h, &trent, &token).await.unwrap();
    let (_, token) = invite_one(&h, &owner, &project, "trent@example.com", ProjectMember).await;
    accept(&h, &trent, &token).await.unwrap();
    assert_eq!(reads(&h, &trent, &project, &key).await, OK4);
    h.invitations()
        .await
        .revoke_access(authed(&owner, pb::RevokeAccessRequest { name: org_invitation }))
        .await
        .unwrap();
    assert_eq!(reads(&h, &trent, &project, &key).await, GONE4);
    let _ = trent_id;

    // A demotion narrows at once: an organization owner who is no project member sees the
    // project as owner, and nothing once a reader.
    let (olga_id, olga) = h.account("olga@example.com", true).await;
    let (_, token) = invite_one(&h, &owner, &org, "olga@example.com", OrganizationOwner).await;
    accept(&h, &olga, &token).await.unwrap();
    assert_eq!(reads(&h, &olga, &project, &key).await, OK4);
    set_org_role(&h, &owner, &org, &olga_id, idpb::OrganizationRole::Reader).await;
    assert_eq!(reads(&h, &olga, &project, &key).await, GONE4);
}

#[tokio::test]
async fn an_invitation_is_only_as_good_as_its_inviter() {
    let h = Harness::start().await;
    let (owner, org, _, key) = h.key_with_owner("owner@example.com").await;

    // An admin of the key invites Eve, then loses the admin role before she accepts.
    let (admin_id, admin) = h.account("admin@example.com", true).await;
    let (_, token) = invite_one(&h, &owner, &key, "admin@example.com", KeyAdmin).await;
    accept(&h, &admin, &token).await.unwrap();
    let (_, eve) = h.account("eve@example.com", true).await;
    let (eve_invitation, eve_token) = invite_one(&h, &admin, &key, "eve@example.com", KeyAdmin).await;
    h.keyring()
        .await
        .delete_key_member(authed(
            &owner,
            krpb::DeleteKeyMemberRequest { name: member_name(&key, &admin_id), ..Default::default() },
        ))
        .await
        .unwrap();
    let err = accept(&h, &eve, &eve_token).await.unwrap_err();
    assert_eq!((err.code(), reason(&err).as_str()), (Code::FailedPrecondition, "INVITER_LOST_ROLE"), "{err:?}");
    let denied = h.keyring().await.get_key(authed(&eve, krpb::GetKeyRequest { name: key.clone() })).await;
    assert_eq!(denied.unwrap_err().code(), Code::NotFound);
    assert_eq!(status_of(&h, &owner, &eve_invitation).await, pb::InvitationStatus::Revoked as i32);

    // An organization owner invites Carl as owner, then is demoted to reader.
    let (olga_id, olga) = h.account("olga@example.com", true).await;
    let (_, token) = invite_one(&h, &owner, &org, "olga@example.com", OrganizationOwner).await;
    accept(&h, &olga, &token).await.unwrap();
    let (_, carl) = h.account("carl@example.com", true).await;
    let (_, carl_token) = invite_one(&h, &olga, &org, "carl@example.com", OrganizationOwner).await;
    set_org_role(&h, &owner, &org, &olga_id, idpb::OrganizationRole::Reader).await;
    let err = accept(&h, &carl, &carl_token).await.unwrap_err();
    assert_eq!(reason(&err), "INVITER_LOST_ROLE");
    let got =
        h.identity().await.get_organization(authed(&carl, idpb::GetOrganizationRequest { name: org.clone() })).await;
    assert_eq!(got.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn revoking_an_invitation_never_removes_a_membership_it_did_not_grant() {
    let h = Harness::start().await;
    let (owner, org, _, key) = h.key_with_owner("owner@example.com").await;
    let internal = h.internal_token().await;
    let (bob_id, bob) = h.account("bob@example.com", true).await;

    // Bob is invited; before he accepts, he becomes an admin of the key by another grant.
    let (invitation, token) = invite_one(&h, &owner, &key, "bob@example.com", KeyContributor).await;
    h.keyring()
        .await
        .add_key_member(authed(
            &internal,
            krpb::AddKeyMemberRequest {
                parent: key.clone(),
                account: bob_id.clone(),
                role: krpb::KeyRole::Admin as i32,
                invitation_id: "an earlier grant".into(),
            },
        ))
        .await
        .unwrap();
    accept(&h, &bob, &token).await.unwrap();
    // Revoking the access this invitation gave leaves the membership it did not make.
    h.invitations().await.revoke_access(authed(&owner, pb::RevokeAccessRequest { name: invitation })).await.unwrap();
    let seen = h.keyring().await.get_key(authed(&bob, krpb::GetKeyRequest { name: key.clone() })).await.unwrap();
    assert_eq!(seen.into_inner().key.unwrap().caller_role, krpb::KeyRole::Admin as i32);

    // The same for an organization.
    let (invitation, token) = invite_one(&h, &owner, &org, "bob@example.com", OrganizationReader).await;
    h.identity()
        .await
        .add_organization_member(authed(
            &internal,
            idpb::AddOrganizationMemberRequest {
                parent: org.clone(),
                account: bob_id.clone(),
                role: idpb::OrganizationRole::Reader as i32,
                invitation_id: "an earlier organization grant".into(),
            },
        ))
        .await
        .unwrap();
    accept(&h, &bob, &token).await.unwrap();
    h.invitations().await.revoke_access(authed(&owner, pb::RevokeAccessRequest { name: invitation })).await.unwrap();
    let got = h.identity().await.get_organization(authed(&bob, idpb::GetOrganizationRequest { name: org })).await;
    assert!(got.is_ok(), "{got:?}");
}

#[tokio::test]
async fn a_deleted_target_ends_its_invitations_at_once() {
    let h = Harness::start().await;
    let (owner, _, project, key) = h.key_with_owner("owner@example.com").await;
    let (_, eve) = h.account("eve@example.com", true).await;
    let mut keyring = h.keyring().await;

    // A key is deleted with Eve's invitation pending: accepting a moment later is refused with
    // the reason, and the invitation leaves her banner.
    let (_, token) = invite_one(&h, &owner, &key, "eve@example.com", KeyContributor).await;
    keyring
        .delete_key(authed(&owner, krpb::DeleteKeyRequest { name: key.clone(), etag: String::new() }))
        .await
        .unwrap();
    let err = accept(&h, &eve, &token).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(["INVITATION_TARGET_GONE", "INVITATION_REVOKED"].contains(&reason(&err).as_str()), "{err:?}");
    let mine = h.invitations().await.list_my_invitations(authed(&eve, pb::ListMyInvitationsRequest::default())).await;
    assert!(mine.unwrap().into_inner().invitations.is_empty());

    // A project deleted with force takes the invitations to the project itself with it.
    let second = keyring
        .create_key(authed(
            &owner,
            krpb::CreateKeyRequest {
                parent: project.clone(),
                key: Some(krpb::Key { display_name: "Second".into(), ..Default::default() }),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
        .name;
    let (_, to_project) = invite_one(&h, &owner, &project, "eve@example.com", ProjectMember).await;
    let (_, to_key) = invite_one(&h, &owner, &second, "eve@example.com", KeyContributor).await;
    keyring
        .delete_project(authed(&owner, krpb::DeleteProjectRequest { name: project.clone(), force: true }))
        .await
        .unwrap();
    let mine = h.invitations().await.list_my_invitations(authed(&eve, pb::ListMyInvitationsRequest::default())).await;
    assert!(mine.unwrap().into_inner().invitations.is_empty(), "no banner for a deleted project");
    for token in [to_project, to_key] {
        let err = accept(&h, &eve, &token).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "never ACCEPTED for a target that is gone: {err:?}");
    }
}

#[tokio::test]
async fn a_removed_key_member_no_longer_counts_as_accepted() {
    let h = Harness::start().await;
    let (owner, _, project, key) = h.key_with_owner("owner@example.com").await;
    let (bob_id, bob) = h.account("bob@example.com", true).await;
    let (invitation, token) = invite_one(&h, &owner, &key, "bob@example.com", KeyContributor).await;
    accept(&h, &bob, &token).await.unwrap();
    assert_eq!(key_counts(&h, &owner, &project).await[0].unwrap().accepted, 1);

    h.keyring()
        .await
        .delete_key_member(authed(
            &owner,
            krpb::DeleteKeyMemberRequest { name: member_name(&key, &bob_id), ..Default::default() },
        ))
        .await
        .unwrap();
    assert_eq!(key_counts(&h, &owner, &project).await[0].unwrap().accepted, 0);
    assert_eq!(status_of(&h, &owner, &invitation).await, pb::InvitationStatus::Revoked as i32);
}

#[tokio::test]
async fn contributors_do_not_see_who_a_key_is_shared_with() {
    let h = Harness::start().await;
    let (owner, _, project, key) = h.key_with_owner("owner@example.com").await;
    let (_, bob) = h.account("bob@example.com", true).await;
    let (_, token) = invite_one(&h, &owner, &key, "bob@example.com", KeyContributor).await;
    accept(&h, &bob, &token).await.unwrap();
    invite_one(&h, &owner, &key, "carol@example.com", KeyContributor).await;

    let owner_sees = key_counts(&h, &owner, &project).await;
    assert_eq!(owner_sees, [Some(krpb::InvitationCounts { known: true, accepted: 1, pending: 1 })]);
    // The contributor sees the key, but neither the counts nor the members nor the invitations.
    assert_eq!(key_counts(&h, &bob, &project).await, [None]);
    let members = h
        .keyring()
        .await
        .list_key_members(authed(&bob, krpb::ListKeyMembersRequest { parent: key.clone(), ..Default::default() }))
        .await;
    assert_eq!(members.unwrap_err().code(), Code::PermissionDenied);
    let listed = h
        .invitations()
        .await
        .list_invitations(authed(&bob, pb::ListInvitationsRequest { parent: key.clone(), ..Default::default() }))
        .await;
    assert_eq!(listed.unwrap_err().code(), Code::PermissionDenied);
}
