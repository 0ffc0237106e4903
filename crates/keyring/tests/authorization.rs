//! The roles matrix (PRODUCT §3) as data: every keyring RPC × every kind of caller → the code
//! they get. Each cell runs against a fresh key, so a delete in one cell cannot change another.
#![allow(clippy::unwrap_used)]

mod common;

use std::future::Future;
use std::pin::Pin;

use common::*;
use keyshare_proto::identity::v1 as idpb;
use keyshare_proto::keyring::v1 as pb;
use prost_types::FieldMask;
use tonic::Code;

/// The callers of the matrix, in column order. The last two are service accounts an
/// organization owner made project members: they must stand exactly where a person with the
/// same project role stands.
const CALLERS: [&str; 11] = [
    "key owner",
    "admin",
    "contributor",
    "project owner",
    "project member",
    "org owner",
    "org reader",
    "outsider",
    "unauthenticated",
    "service account, project owner",
    "service account, project member",
];

/// The expected code for a column: service accounts mirror the person with their project role.
fn expected_for(expected: &[Code; 9], column: usize) -> Code {
    match column {
        9 => expected[3],
        10 => expected[4],
        column => expected[column],
    }
}

const OK: Code = Code::Ok;
const PD: Code = Code::PermissionDenied;
const NF: Code = Code::NotFound;
const UA: Code = Code::Unauthenticated;
const FP: Code = Code::FailedPrecondition;

/// What a cell works on: a fresh key and the people around it.
struct Cell {
    project: String,
    key: String,
    contributor: String,
    owner: String,
    n: usize,
}

type Call = for<'a> fn(
    &'a mut Keyring,
    Option<&'a str>,
    &'a Cell,
) -> Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send + 'a>>;

fn req<T>(token: Option<&str>, message: T) -> tonic::Request<T> {
    match token {
        Some(token) => authed(token, message),
        None => tonic::Request::new(message),
    }
}

fn env(key: &str) -> String {
    format!("{key}/environments/sandbox")
}

fn member(key: &str, account: &str) -> String {
    format!("{key}/members/{}", account.trim_start_matches("accounts/"))
}

macro_rules! call {
    (|$k:ident, $t:ident, $c:ident| $body:expr) => {{
        fn f<'a>(
            $k: &'a mut Keyring,
            $t: Option<&'a str>,
            $c: &'a Cell,
        ) -> Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send + 'a>> {
            Box::pin(async move { $body.await.map(|_| ()) })
        }
        f as Call
    }};
}

/// One row per RPC: its name, how to call it, and the expected code per caller (CALLERS order).
fn matrix() -> Vec<(&'static str, Call, [Code; 9])> {
    vec![
        (
            "GetKey",
            call!(|k, t, c| k.get_key(req(t, pb::GetKeyRequest { name: c.key.clone() }))),
            [OK, OK, OK, OK, NF, OK, NF, NF, UA],
        ),
        (
            "RevealCredential",
            call!(|k, t, c| k.reveal_credential(req(t, pb::RevealCredentialRequest { name: env(&c.key) }))),
            [OK, OK, OK, OK, NF, OK, NF, NF, UA],
        ),
        (
            "ListKeys",
            call!(
                |k, t, c| k.list_keys(req(t, pb::ListKeysRequest { parent: c.project.clone(), ..Default::default() }))
            ),
            [OK, OK, OK, OK, OK, OK, NF, NF, UA],
        ),
        (
            "UpdateKey",
            call!(|k, t, c| k.update_key(req(
                t,
                pb::UpdateKeyRequest {
                    key: Some(pb::Key { name: c.key.clone(), description: "changed".into(), ..Default::default() }),
                    update_mask: Some(FieldMask { paths: vec!["description".into()] }),
                }
            ))),
            [OK, OK, PD, OK, NF, OK, NF, NF, UA],
        ),
        (
            "UpdateKeyEnvironment",
            call!(|k, t, c| k.update_key_environment(req(
                t,
                pb::UpdateKeyEnvironmentRequest {
                    environment: Some(pb::KeyEnvironment { name: env(&c.key), active: false, ..Default::default() }),
                    update_mask: Some(FieldMask { paths: vec!["active".into()] }),
                    etag: String::new(),
                }
            ))),
            [OK, OK, PD, OK, NF, OK, NF, NF, UA],
        ),
        (
            "RegenerateCredential",
            call!(|k, t, c| k.regenerate_credential(req(
                t,
                pb::RegenerateCredentialRequest { name: env(&c.key), grace_period: None }
            ))),
            [OK, OK, PD, OK, NF, OK, NF, NF, UA],
        ),
        (
            "ListKeyMembers",
            call!(|k, t, c| k
                .list_key_members(req(t, pb::ListKeyMembersRequest { parent: c.key.clone(), ..Default::default() }))),
            [OK, OK, PD, OK, NF, OK, NF, NF, UA],
        ),
        (
            "UpdateKeyMember",
            call!(|k, t, c| k.update_key_member(req(
                t,
                pb::UpdateKeyMemberRequest {
                    member: Some(pb::KeyMember {
                        name: member(&c.key, &c.contributor),
                        role: pb::KeyRole::Admin as i32,
                        ..Default::default()
                    }),
                    update_mask: Some(FieldMask { paths: vec!["role".into()] }),
                }
            ))),
            [OK, OK, PD, OK, NF, OK, NF, NF, UA],
        ),
        (
            "UpdateKeyMember (the owner)",
            call!(|k, t, c| k.update_key_member(req(
                t,
                pb::UpdateKeyMemberRequest {
                    member: Some(pb::KeyMember {
                        name: member(&c.key, &c.owner),
                        role: pb::KeyRole::Admin as i32,
                        ..Default::default()
                    }),
                    update_mask: Some(FieldMask { paths: vec!["role".into()] }),
                }
            ))),
            [FP, FP, PD, FP, NF, FP, NF, NF, UA],
        ),
        (
            "DeleteKeyMember",
            call!(|k, t, c| k.delete_key_member(req(
                t,
                pb::DeleteKeyMemberRequest { name: member(&c.key, &c.contributor), ..Default::default() }
            ))),
            [OK, OK, PD, OK, NF, OK, NF, NF, UA],
        ),
        (
            "ListAuditEvents (key)",
            call!(|k, t, c| k
                .list_audit_events(req(t, pb::ListAuditEventsRequest { parent: c.key.clone(), ..Default::default() }))),
            [OK, OK, PD, OK, NF, OK, NF, NF, UA],
        ),
        (
            "DeleteKey",
            call!(|k, t, c| k.delete_key(req(t, pb::DeleteKeyRequest { name: c.key.clone(), etag: String::new() }))),
            [OK, PD, PD, OK, NF, OK, NF, NF, UA],
        ),
        (
            "GetProject",
            call!(|k, t, c| k.get_project(req(t, pb::GetProjectRequest { name: c.project.clone() }))),
            [OK, NF, NF, OK, OK, OK, NF, NF, UA],
        ),
        (
            "UpdateProject (limits)",
            call!(|k, t, c| k.update_project(req(
                t,
                pb::UpdateProjectRequest {
                    project: Some(pb::Project {
                        name: c.project.clone(),
                        sandbox: Some(pb::ProjectEnvironmentLimits { rate_limit_per_second: 100, monthly_quota: 0 }),
                        ..Default::default()
                    }),
                    update_mask: Some(FieldMask { paths: vec!["sandbox.rate_limit_per_second".into()] }),
                }
            ))),
            [PD, NF, NF, OK, PD, OK, NF, NF, UA],
        ),
        (
            "ListProjectMembers",
            call!(|k, t, c| k.list_project_members(req(
                t,
                pb::ListProjectMembersRequest { parent: c.project.clone(), ..Default::default() }
            ))),
            [OK, NF, NF, OK, OK, OK, NF, NF, UA],
        ),
        (
            "CreateKey",
            call!(|k, t, c| k.create_key(req(
                t,
                pb::CreateKeyRequest {
                    parent: c.project.clone(),
                    key: Some(pb::Key { display_name: format!("made in cell {}", c.n), ..Default::default() }),
                    ..Default::default()
                }
            ))),
            [OK, NF, NF, OK, OK, OK, NF, NF, UA],
        ),
        (
            "AddKeyMember (internal)",
            call!(|k, t, c| k.add_key_member(req(
                t,
                pb::AddKeyMemberRequest {
                    parent: c.key.clone(),
                    account: c.owner.clone(),
                    role: pb::KeyRole::Admin as i32,
                    invitation_id: format!("cell-{}", c.n),
                }
            ))),
            [PD, PD, PD, PD, PD, PD, PD, PD, UA],
        ),
        (
            "WatchKeys (internal)",
            call!(|k, t, _c| k.watch_keys(req(t, pb::WatchKeysRequest { after_sequence: 0 }))),
            [PD, PD, PD, PD, PD, PD, PD, PD, UA],
        ),
    ]
}

#[tokio::test]
async fn roles_matrix() {
    let h = Harness::start().await;
    let mut identity = h.identity().await;
    let mut keyring = h.keyring().await;
    let internal = h.internal_token().await;

    let (_, org_owner) = h.account("org-owner@example.com").await;
    let (project_owner_id, project_owner) = h.account("project-owner@example.com").await;
    let (project_member_id, project_member) = h.account("project-member@example.com").await;
    let (key_owner_id, key_owner) = h.account("key-owner@example.com").await;
    let (admin_id, admin) = h.account("admin@example.com").await;
    let (contributor_id, contributor) = h.account("contributor@example.com").await;
    let (reader_id, reader) = h.account("reader@example.com").await;
    let (_, outsider) = h.account("outsider@example.com").await;

    let org = h.organization(&org_owner, "Matrix").await;
    identity
        .add_organization_member(authed(
            &internal,
            idpb::AddOrganizationMemberRequest {
                parent: org.clone(),
                account: reader_id,
                role: idpb::OrganizationRole::Reader as i32,
                invitation_id: "org-reader".into(),
            },
        ))
        .await
        .unwrap();
    let project = create_project(&mut keyring, &org_owner, &org, "Matrix API").await.name;
    for (account, role, invitation) in [
        (&project_owner_id, pb::ProjectRole::Owner, "p-owner"),
        (&project_member_id, pb::ProjectRole::Member, "p-member"),
        (&key_owner_id, pb::ProjectRole::Member, "p-key-owner"),
    ] {
        keyring
            .add_project_member(authed(
                &internal,
                pb::AddProjectMemberRequest {
                    parent: project.clone(),
                    account: account.clone(),
                    role: role as i32,
                    invitation_id: invitation.into(),
                },
            ))
            .await
            .unwrap();
    }
    // The organization owner leaves the project: from here on they act as organization owner only.
    let org_owner_id = identity
        .get_account(authed(&org_owner, idpb::GetAccountRequest { name: "accounts/me".into() }))
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap()
        .name;
    keyring
        .delete_project_member(authed(
            &project_owner,
            pb::DeleteProjectMemberRequest {
                name: format!("{project}/members/{}", org_owner_id.trim_start_matches("accounts/")),
                ..Default::default()
            },
        ))
        .await
        .unwrap();

    let (_, sa_owner) = h.service_account_member(&org_owner, &org, &project, pb::ProjectRole::Owner).await;
    let (_, sa_member) = h.service_account_member(&org_owner, &org, &project, pb::ProjectRole::Member).await;
    let tokens: [Option<&str>; 11] = [
        Some(&key_owner),
        Some(&admin),
        Some(&contributor),
        Some(&project_owner),
        Some(&project_member),
        Some(&org_owner),
        Some(&reader),
        Some(&outsider),
        None,
        Some(&sa_owner),
        Some(&sa_member),
    ];
    let mut cells = 0;
    let mut failures = Vec::new();
    for (row, (rpc, call, expected)) in matrix().into_iter().enumerate() {
        for (column, token) in tokens.iter().enumerate() {
            let n = row * CALLERS.len() + column;
            let key = create_key(&mut keyring, &key_owner, &project, &format!("key {n}")).await.key.unwrap().name;
            for (account, role, suffix) in
                [(&admin_id, pb::KeyRole::Admin, "a"), (&contributor_id, pb::KeyRole::Contributor, "c")]
            {
                keyring
                    .add_key_member(authed(
                        &internal,
                        pb::AddKeyMemberRequest {
                            parent: key.clone(),
                            account: account.clone(),
                            role: role as i32,
                            invitation_id: format!("{n}-{suffix}"),
                        },
                    ))
                    .await
                    .unwrap();
            }
            let cell = Cell {
                project: project.clone(),
                key,
                contributor: contributor_id.clone(),
                owner: key_owner_id.clone(),
                n,
            };
            let got = match call(&mut keyring, *token, &cell).await {
                Ok(()) => Code::Ok,
                Err(status) => status.code(),
            };
            cells += 1;
            let want = expected_for(&expected, column);
            if got != want {
                failures.push(format!("{rpc} as {}: expected {want:?}, got {got:?}", CALLERS[column]));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {cells} cells wrong:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(cells, 18 * CALLERS.len());
}
