//! Each of Keyshare's internal clients holds only the powers it needs. Every internal RPC is
//! tried with every client's token, as the services' own binaries are configured: only the
//! client that needs the RPC gets through; the others, and an organization's service account,
//! get PERMISSION_DENIED.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Keyshare, SERVICES, authed};
use keyshare_proto::identity::v1 as idpb;
use keyshare_proto::invitation::v1 as ivpb;
use keyshare_proto::invitation::v1::invitation_service_client::InvitationServiceClient;
use keyshare_proto::keyring::v1 as krpb;
use tonic::Code;

/// Keyshare's internal clients, configured as `scripts/run` configures them (see `common`).
const CLIENTS: [&str; 3] = ["keyring", "invitation", "authorizer"];

const ORG_SERVICE_ACCOUNT: &str = "an organization's service account";

#[derive(Clone, Copy, Debug)]
enum Rpc {
    LookupAccount,
    GetOrganizationMember,
    AddOrganizationMember,
    DeleteOrganizationMember,
    WatchKeys,
    ListProjectMembers,
    ListKeyMembers,
    TestPermissionsForAccount,
    AddProjectMember,
    AddKeyMember,
    DeleteProjectMember,
    DeleteKeyMember,
    EndOrganizationMembership,
    CountInvitations,
    RevokeTargetInvitations,
    EndAcceptedInvitations,
    WatchSessionRevocations,
}

/// Which client needs each RPC (`None`: only identity's own client, which nobody can log in as).
const MATRIX: [(Rpc, Option<&str>); 17] = [
    (Rpc::LookupAccount, Some("invitation")),
    (Rpc::AddOrganizationMember, Some("invitation")),
    (Rpc::DeleteOrganizationMember, Some("invitation")),
    (Rpc::WatchKeys, Some("authorizer")),
    (Rpc::ListProjectMembers, Some("invitation")),
    (Rpc::ListKeyMembers, Some("invitation")),
    (Rpc::TestPermissionsForAccount, Some("invitation")),
    (Rpc::AddProjectMember, Some("invitation")),
    (Rpc::AddKeyMember, Some("invitation")),
    (Rpc::DeleteProjectMember, Some("invitation")),
    (Rpc::DeleteKeyMember, Some("invitation")),
    (Rpc::EndOrganizationMembership, None),
    (Rpc::CountInvitations, Some("keyring")),
    (Rpc::RevokeTargetInvitations, Some("keyring")),
    (Rpc::EndAcceptedInvitations, Some("keyring")),
    // Reading any organization's roles: keyring (who may see a project) and invitation (who
    // may invite). The authorizer reads none.
    (Rpc::GetOrganizationMember, Some("keyring+invitation")),
    // Every service that verifies people's tokens follows the ended sessions.
    (Rpc::WatchSessionRevocations, Some("keyring+invitation+authorizer")),
];

struct World {
    keyshare: Keyshare,
    org: String,
    project: String,
    key: String,
    owner: String,
    owner_token: String,
    stranger: String,
    stranger_email: String,
}

async fn account_of(keyshare: &Keyshare, token: &str) -> String {
    let request = authed(token, idpb::GetAccountRequest { name: "accounts/me".into() });
    keyshare.identity().get_account(request).await.unwrap().into_inner().account.unwrap().name
}

async fn client_token(keyshare: &Keyshare, client: &str) -> String {
    let secret = common::client_secret(client);
    let grant = keyshare
        .identity()
        .issue_service_account_token(idpb::IssueServiceAccountTokenRequest {
            client_id: client.into(),
            client_secret: secret.into(),
        })
        .await
        .unwrap();
    grant.into_inner().grant.unwrap().access_token
}

fn code<T>(result: Result<T, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Calls `rpc` with `token` and answers the outcome's code. Every request is well formed and
/// names resources that exist, so a refusal can only be about the caller.
async fn call(world: &World, rpc: Rpc, token: &str) -> Code {
    let mut identity = world.keyshare.identity();
    let mut keyring = world.keyshare.keyring();
    let mut invitation = InvitationServiceClient::new(world.keyshare.channel("invitation"));
    let invitation_id = uuid::Uuid::new_v4().to_string();
    let stranger_id = world.stranger.trim_start_matches("accounts/");
    match rpc {
        Rpc::LookupAccount => code(
            identity
                .lookup_account(authed(token, idpb::LookupAccountRequest { email: world.stranger_email.clone() }))
                .await,
        ),
        Rpc::GetOrganizationMember => {
            let name = format!("{}/members/{}", world.org, world.owner.trim_start_matches("accounts/"));
            code(identity.get_organization_member(authed(token, idpb::GetOrganizationMemberRequest { name })).await)
        }
        Rpc::AddOrganizationMember => code(
            identity
                .add_organization_member(authed(
                    token,
                    idpb::AddOrganizationMemberRequest {
                        parent: world.org.clone(),
                        account: world.stranger.clone(),
                        role: idpb::OrganizationRole::Owner as i32,
                        invitation_id,
                    },
                ))
                .await,
        ),
        Rpc::DeleteOrganizationMember => {
            // The invitation made nothing, so nothing is removed even when allowed.
            let name = format!("{}/members/{}", world.org, world.owner.trim_start_matches("accounts/"));
            let request = idpb::DeleteOrganizationMemberRequest { name, invitation_id };
            code(identity.delete_organization_member(authed(token, request)).await)
        }
        Rpc::WatchKeys => match keyring.watch_keys(authed(token, krpb::WatchKeysRequest { after_sequence: 0 })).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                code(stream.message().await)
            }
            Err(status) => status.code(),
        },
        Rpc::ListProjectMembers => {
            let request = krpb::ListProjectMembersRequest { parent: world.project.clone(), ..Default::default() };
            code(keyring.list_project_members(authed(token, request)).await)
        }
        Rpc::ListKeyMembers => {
            let request = krpb::ListKeyMembersRequest { parent: world.key.clone(), ..Default::default() };
            code(keyring.list_key_members(authed(token, request)).await)
        }
        Rpc::TestPermissionsForAccount => {
            let request = krpb::TestPermissionsRequest {
                resource: world.key.clone(),
                permissions: vec!["keys.manage".into()],
                account: world.owner.clone(),
            };
            code(keyring.test_permissions(authed(token, request)).await)
        }
        Rpc::AddProjectMember => {
            let request = krpb::AddProjectMemberRequest {
                parent: world.project.clone(),
                account: world.stranger.clone(),
                role: krpb::ProjectRole::Owner as i32,
                invitation_id,
            };
            code(keyring.add_project_member(authed(token, request)).await)
        }
        Rpc::AddKeyMember => {
            let request = krpb::AddKeyMemberRequest {
                parent: world.key.clone(),
                account: world.stranger.clone(),
                role: krpb::KeyRole::Admin as i32,
                invitation_id,
            };
            code(keyring.add_key_member(authed(token, request)).await)
        }
        Rpc::DeleteProjectMember => {
            let name = format!("{}/members/{stranger_id}", world.project);
            let request = krpb::DeleteProjectMemberRequest { name, invitation_id };
            code(keyring.delete_project_member(authed(token, request)).await)
        }
        Rpc::DeleteKeyMember => {
            let name = format!("{}/members/{stranger_id}", world.key);
            let request = krpb::DeleteKeyMemberRequest { name, invitation_id };
            code(keyring.delete_key_member(authed(token, request)).await)
        }
        Rpc::EndOrganizationMembership => {
            let name = format!("{}/members/{stranger_id}", world.org);
            let remove_time = Some(prost_types::Timestamp { seconds: chrono::Utc::now().timestamp(), nanos: 0 });
            let request = krpb::EndOrganizationMembershipRequest { name, remove_time };
            code(keyring.end_organization_membership(authed(token, request)).await)
        }
        Rpc::CountInvitations => {
            let request = ivpb::CountInvitationsRequest { targets: vec![world.key.clone()] };
            code(invitation.count_invitations(authed(token, request)).await)
        }
        Rpc::RevokeTargetInvitations => {
            let request = ivpb::RevokeTargetInvitationsRequest { target: world.key.clone() };
            code(invitation.revoke_target_invitations(authed(token, request)).await)
        }
        Rpc::WatchSessionRevocations => {
            let request = authed(token, idpb::WatchSessionRevocationsRequest {});
            match identity.watch_session_revocations(request).await {
                Ok(response) => code(response.into_inner().message().await),
                Err(status) => status.code(),
            }
        }
        Rpc::EndAcceptedInvitations => {
            let request =
                ivpb::EndAcceptedInvitationsRequest { target: world.key.clone(), account: world.stranger.clone() };
            code(invitation.end_accepted_invitations(authed(token, request)).await)
        }
    }
}

async fn org_service_account(world: &World) -> String {
    let mut identity = world.keyshare.identity();
    let request = idpb::CreateServiceAccountRequest {
        parent: world.org.clone(),
        service_account: Some(idpb::ServiceAccount { display_name: "CI".into(), ..Default::default() }),
    };
    let created = identity.create_service_account(authed(&world.owner_token, request)).await.unwrap().into_inner();
    let request = idpb::IssueServiceAccountTokenRequest {
        client_id: created.service_account.unwrap().client_id,
        client_secret: created.client_secret,
    };
    identity.issue_service_account_token(request).await.unwrap().into_inner().grant.unwrap().access_token
}

async fn world() -> World {
    let keyshare = Keyshare::start(&SERVICES, []).await;
    let owner_token = keyshare.account("owner@scopes.test").await;
    let stranger_email = "stranger@scopes.test".to_owned();
    let stranger_token = keyshare.account(&stranger_email).await;
    let created = keyshare.key(&owner_token).await;
    let key = created.key.unwrap().name;
    let project = key.split("/keys/").next().unwrap().to_owned();
    let got = keyshare
        .keyring()
        .get_project(authed(&owner_token, krpb::GetProjectRequest { name: project.clone() }))
        .await
        .unwrap()
        .into_inner();
    let owner = account_of(&keyshare, &owner_token).await;
    let stranger = account_of(&keyshare, &stranger_token).await;
    World {
        org: got.project.unwrap().organization,
        owner_token,
        project,
        key,
        owner,
        stranger,
        stranger_email,
        keyshare,
    }
}

#[tokio::test]
async fn every_internal_rpc_answers_only_the_client_that_needs_it() {
    let world = world().await;
    let mut tokens = Vec::new();
    for client in CLIENTS {
        tokens.push((client, client_token(&world.keyshare, client).await));
    }
    // An organization's own service account is not one of Keyshare's services.
    tokens.push((ORG_SERVICE_ACCOUNT, org_service_account(&world).await));
    let mut failures = Vec::new();
    for (rpc, needed_by) in MATRIX {
        for (client, token) in &tokens {
            let needs = needed_by.is_some_and(|needed| needed.split('+').any(|n| n == *client));
            let got = call(&world, rpc, token).await;
            let fine = if *client == ORG_SERVICE_ACCOUNT {
                // Not one of Keyshare's services: it may read its own organization, as a reader,
                // and is a member of nothing else, so the RPCs people use are NOT_FOUND to it.
                match rpc {
                    Rpc::GetOrganizationMember => got == Code::Ok,
                    Rpc::ListProjectMembers | Rpc::ListKeyMembers | Rpc::DeleteProjectMember | Rpc::DeleteKeyMember => {
                        got == Code::NotFound
                    }
                    _ => got == Code::PermissionDenied,
                }
            } else if needs {
                got != Code::PermissionDenied && got != Code::Unauthenticated
            } else {
                got == Code::PermissionDenied
            };
            if !fine {
                failures.push(format!("{rpc:?} as {client}: {got:?} (needs it: {needs})"));
            }
        }
    }
    assert!(failures.is_empty(), "wrong answers:\n{}", failures.join("\n"));
}

#[tokio::test]
async fn the_authorizers_secret_cannot_make_anyone_an_organization_owner_or_key_admin() {
    let world = world().await;
    let authorizer = client_token(&world.keyshare, "authorizer").await;
    assert_eq!(call(&world, Rpc::AddOrganizationMember, &authorizer).await, Code::PermissionDenied);
    assert_eq!(call(&world, Rpc::AddKeyMember, &authorizer).await, Code::PermissionDenied);
    assert_eq!(call(&world, Rpc::AddProjectMember, &authorizer).await, Code::PermissionDenied);
    // Nothing was granted: the stranger is a member of neither the organization nor the key.
    let members = world
        .keyshare
        .identity()
        .list_organization_members(authed(
            &client_token(&world.keyshare, "keyring").await,
            idpb::ListOrganizationMembersRequest { parent: world.org.clone(), ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner()
        .members;
    assert!(members.iter().all(|m| !m.name.ends_with(world.stranger.trim_start_matches("accounts/"))));
    let key_members = world
        .keyshare
        .keyring()
        .list_key_members(authed(
            &client_token(&world.keyshare, "invitation").await,
            krpb::ListKeyMembersRequest { parent: world.key.clone(), ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner()
        .members;
    assert!(key_members.iter().all(|m| !m.name.ends_with(world.stranger.trim_start_matches("accounts/"))));
}
