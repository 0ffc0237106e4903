//! An organization's service accounts can manage a project's keys once an organization owner
//! makes them project members, with their own client-credential tokens, through the same API
//! people use; they are never invited, never accept, never own the organization, and their
//! access ends when they are deleted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Keyshare, SERVICES, Setting, authed};
use keyshare_proto::authorizer::v1 as azpb;
use keyshare_proto::authorizer::v1::usage_service_client::UsageServiceClient;
use keyshare_proto::identity::v1 as idpb;
use keyshare_proto::invitation::v1 as ivpb;
use keyshare_proto::invitation::v1::invitation_service_client::InvitationServiceClient;
use keyshare_proto::keyring::v1 as krpb;
use keyshare_runtime::testkit::free_port;
use prost_types::FieldMask;
use tonic::Code;

struct World {
    keyshare: Keyshare,
    management: std::net::SocketAddr,
    owner: String,
    org: String,
    project: String,
}

struct ServiceAccount {
    name: String,
    client_id: String,
    secret: String,
}

impl ServiceAccount {
    async fn token(&self, keyshare: &Keyshare) -> String {
        let request = idpb::IssueServiceAccountTokenRequest {
            client_id: self.client_id.clone(),
            client_secret: self.secret.clone(),
        };
        keyshare.identity().issue_service_account_token(request).await.unwrap().into_inner().grant.unwrap().access_token
    }
}

async fn world() -> World {
    let management = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let keyshare = Keyshare::start(&SERVICES, [Setting::Management(management)]).await;
    let owner = keyshare.account("owner@automation.test").await;
    let key = keyshare.key(&owner).await.key.unwrap().name;
    let project = key.split("/keys/").next().unwrap().to_owned();
    let got = keyshare.keyring().get_project(authed(&owner, krpb::GetProjectRequest { name: project.clone() })).await;
    let org = got.unwrap().into_inner().project.unwrap().organization;
    World { keyshare, management, owner, org, project }
}

async fn service_account(world: &World, org: &str, owner: &str) -> ServiceAccount {
    let request = idpb::CreateServiceAccountRequest {
        parent: org.into(),
        service_account: Some(idpb::ServiceAccount { display_name: "Deploy bot".into(), ..Default::default() }),
    };
    let created = world.keyshare.identity().create_service_account(authed(owner, request)).await.unwrap().into_inner();
    let account = created.service_account.unwrap();
    ServiceAccount { name: account.name, client_id: account.client_id, secret: created.client_secret }
}

fn add(project: &str, account: &str, role: krpb::ProjectRole) -> krpb::CreateProjectMemberRequest {
    krpb::CreateProjectMemberRequest {
        parent: project.into(),
        member: Some(krpb::ProjectMember { account: account.into(), role: role as i32, ..Default::default() }),
    }
}

fn code<T>(result: Result<T, tonic::Status>) -> Code {
    result.map_or_else(|status| status.code(), |_| Code::Ok)
}

#[tokio::test]
async fn a_service_account_made_a_project_member_manages_keys_with_its_own_token() {
    let world = world().await;
    let bot = service_account(&world, &world.org, &world.owner).await;
    let token = bot.token(&world.keyshare).await;
    let mut keyring = world.keyshare.keyring();

    // Before the owner adds it, the project does not exist for it.
    let list = krpb::ListKeysRequest { parent: world.project.clone(), ..Default::default() };
    assert_eq!(code(keyring.list_keys(authed(&token, list.clone())).await), Code::NotFound);

    let member = keyring
        .create_project_member(authed(&world.owner, add(&world.project, &bot.name, krpb::ProjectRole::Member)))
        .await
        .unwrap()
        .into_inner()
        .member
        .unwrap();
    assert_eq!(member.account, bot.name, "the member is named as the service account it is");

    // With the same token as before: it creates a key and owns it.
    let request = krpb::CreateKeyRequest {
        parent: world.project.clone(),
        key: Some(krpb::Key { display_name: "deploy".into(), ..Default::default() }),
        ..Default::default()
    };
    let created = keyring.create_key(authed(&token, request)).await.unwrap().into_inner();
    let key = created.key.unwrap().name;
    let members = keyring
        .list_key_members(authed(&token, krpb::ListKeyMembersRequest { parent: key.clone(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner()
        .members;
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].account, bot.name);
    assert_eq!(members[0].role, krpb::KeyRole::Owner as i32);

    // Regenerates, toggles and reveals.
    let sandbox = format!("{key}/environments/sandbox");
    let regenerated = keyring
        .regenerate_credential(authed(
            &token,
            krpb::RegenerateCredentialRequest { name: sandbox.clone(), grace_period: None },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(regenerated.credential, created.sandbox_credential);
    let toggled = keyring
        .update_key_environment(authed(
            &token,
            krpb::UpdateKeyEnvironmentRequest {
                environment: Some(krpb::KeyEnvironment { name: sandbox.clone(), active: false, ..Default::default() }),
                update_mask: Some(FieldMask { paths: vec!["active".into()] }),
                etag: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!toggled.key.unwrap().sandbox.unwrap().active);
    let revealed = keyring
        .reveal_credential(authed(&token, krpb::RevealCredentialRequest { name: sandbox }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revealed.credential, regenerated.credential);

    // Reads its key's usage from the authorizer.
    let mut usage = UsageServiceClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", world.management)).unwrap().connect_lazy(),
    );
    let now = chrono::Utc::now().timestamp();
    let query = azpb::QueryKeyUsageRequest {
        name: key.clone(),
        granularity: azpb::Granularity::Hour as i32,
        start_time: Some(prost_types::Timestamp { seconds: now - 3600, nanos: 0 }),
        end_time: Some(prost_types::Timestamp { seconds: now + 60, nanos: 0 }),
        ..Default::default()
    };
    usage.query_key_usage(authed(&token, query.clone())).await.unwrap();

    // A member, not an owner: it cannot change the project's limits or membership.
    let limits = krpb::UpdateProjectRequest {
        project: Some(krpb::Project {
            name: world.project.clone(),
            sandbox: Some(krpb::ProjectEnvironmentLimits { rate_limit_per_second: 5, monthly_quota: 0 }),
            ..Default::default()
        }),
        update_mask: Some(FieldMask { paths: vec!["sandbox.rate_limit_per_second".into()] }),
    };
    assert_eq!(code(keyring.update_project(authed(&token, limits)).await), Code::PermissionDenied);

    // Deleted, it loses everything at once, although its token is still signed and unexpired.
    let request = idpb::DeleteServiceAccountRequest { name: bot.name.clone() };
    world.keyshare.identity().delete_service_account(authed(&world.owner, request)).await.unwrap();
    assert_eq!(code(keyring.list_keys(authed(&token, list)).await), Code::NotFound);
    let get = krpb::GetKeyRequest { name: key.clone() };
    assert_eq!(code(keyring.get_key(authed(&token, get)).await), Code::NotFound);
    assert_eq!(code(usage.query_key_usage(authed(&token, query)).await), Code::NotFound);
    let members = keyring
        .list_project_members(authed(
            &world.owner,
            krpb::ListProjectMembersRequest { parent: world.project.clone(), ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner()
        .members;
    assert!(members.iter().all(|m| m.account != bot.name), "its membership is gone: {members:?}");
}

#[tokio::test]
async fn only_an_organization_owner_adds_a_service_account_and_only_one_of_their_own() {
    let world = world().await;
    let bot = service_account(&world, &world.org, &world.owner).await;
    let mut keyring = world.keyshare.keyring();
    let role = krpb::ProjectRole::Owner;

    // An outsider does not see the project.
    let outsider = world.keyshare.account("outsider@automation.test").await;
    let got = keyring.create_project_member(authed(&outsider, add(&world.project, &bot.name, role))).await;
    assert_eq!(code(got), Code::NotFound);

    // A service account cannot add itself or another (even one already an owner of the project).
    let insider = service_account(&world, &world.org, &world.owner).await;
    let request = add(&world.project, &insider.name, krpb::ProjectRole::Owner);
    keyring.create_project_member(authed(&world.owner, request)).await.unwrap();
    let insider_token = insider.token(&world.keyshare).await;
    let got = keyring.create_project_member(authed(&insider_token, add(&world.project, &bot.name, role))).await;
    assert_eq!(code(got), Code::PermissionDenied);

    // People join by invitation only; a service account of another organization is refused.
    let person = format!("accounts/{}", uuid::Uuid::new_v4());
    let got = keyring.create_project_member(authed(&world.owner, add(&world.project, &person, role))).await;
    let status = got.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("invitation"), "{}", status.message());
    let other_owner = world.keyshare.account("other@automation.test").await;
    let other_org = world
        .keyshare
        .identity()
        .create_organization(authed(
            &other_owner,
            idpb::CreateOrganizationRequest {
                organization: Some(idpb::Organization { display_name: "Other".into(), ..Default::default() }),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .organization
        .unwrap()
        .name;
    let foreign = service_account(&world, &other_org, &other_owner).await;
    let got = keyring.create_project_member(authed(&world.owner, add(&world.project, &foreign.name, role))).await;
    assert_eq!(code(got), Code::InvalidArgument);
    // Nor a service account that does not exist, or is deleted.
    let ghost = format!("{}/serviceAccounts/{}", world.org, uuid::Uuid::new_v4());
    let got = keyring.create_project_member(authed(&world.owner, add(&world.project, &ghost, role))).await;
    assert_eq!(code(got), Code::NotFound);

    // Added once; a second time is ALREADY_EXISTS.
    keyring.create_project_member(authed(&world.owner, add(&world.project, &bot.name, role))).await.unwrap();
    let again = keyring.create_project_member(authed(&world.owner, add(&world.project, &bot.name, role))).await;
    assert_eq!(code(again), Code::AlreadyExists);
}

#[tokio::test]
async fn a_service_account_is_never_invited_never_accepts_and_never_owns_the_organization() {
    let world = world().await;
    let bot = service_account(&world, &world.org, &world.owner).await;
    let mut keyring = world.keyshare.keyring();
    let request = add(&world.project, &bot.name, krpb::ProjectRole::Owner);
    keyring.create_project_member(authed(&world.owner, request)).await.unwrap();
    let token = bot.token(&world.keyshare).await;
    let mut invitations = InvitationServiceClient::new(world.keyshare.channel("invitation"));

    // As a project owner it still cannot share: invitations are people's business.
    let invite = ivpb::CreateInvitationsRequest {
        parent: world.project.clone(),
        invitees: vec![ivpb::Invitee {
            email: "friend@automation.test".into(),
            role: ivpb::InvitationRole::ProjectMember as i32,
        }],
    };
    assert_eq!(code(invitations.create_invitations(authed(&token, invite.clone())).await), Code::PermissionDenied);
    // Nor accept one (it has no mailbox; a token from someone else's mail is refused too).
    invitations.create_invitations(authed(&world.owner, invite)).await.unwrap();
    let mail = world.keyshare.smtp.wait_for_mail("friend@automation.test", "invited you").await;
    let accept = ivpb::AcceptInvitationRequest { token: common::token_in(&mail.body) };
    assert_eq!(code(invitations.accept_invitation(authed(&token, accept)).await), Code::PermissionDenied);

    // It is no member of the organization, so it cannot be made an owner of it.
    let mut identity = world.keyshare.identity();
    let id = bot.name.rsplit('/').next().unwrap();
    let promote = idpb::UpdateOrganizationMemberRequest {
        member: Some(idpb::OrganizationMember {
            name: format!("{}/members/{id}", world.org),
            role: idpb::OrganizationRole::Owner as i32,
            ..Default::default()
        }),
        update_mask: Some(FieldMask { paths: vec!["role".into()] }),
    };
    assert_eq!(code(identity.update_organization_member(authed(&world.owner, promote)).await), Code::NotFound);
    // And it cannot found an organization of its own.
    let found = idpb::CreateOrganizationRequest {
        organization: Some(idpb::Organization { display_name: "Bot Inc".into(), ..Default::default() }),
    };
    assert_ne!(code(identity.create_organization(authed(&token, found)).await), Code::Ok);
}
