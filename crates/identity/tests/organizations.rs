//! Organizations, service accounts, internal RPCs and input validation through the gRPC API.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use keyshare_proto::identity::v1 as pb;
use prost_types::FieldMask;
use tonic::Code;

async fn create_org(client: &mut Client, token: &str, name: &str) -> String {
    client
        .create_organization(authed(
            token,
            pb::CreateOrganizationRequest {
                organization: Some(pb::Organization { display_name: name.into(), ..Default::default() }),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .organization
        .unwrap()
        .name
}

/// Grants a membership the way an accepted invitation does (internal, keyed by invitation).
async fn grant(
    client: &mut Client,
    internal: &str,
    org: &str,
    account: &str,
    role: pb::OrganizationRole,
    invitation: &str,
) -> Result<pb::OrganizationMember, tonic::Status> {
    let request = pb::AddOrganizationMemberRequest {
        parent: org.into(),
        account: account.into(),
        role: role as i32,
        invitation_id: invitation.into(),
    };
    client.add_organization_member(authed(internal, request)).await.map(|r| r.into_inner().member.unwrap())
}

fn member_name(org: &str, account: &str) -> String {
    format!("{org}/members/{}", account.trim_start_matches("accounts/"))
}

async fn set_role(
    client: &mut Client,
    token: &str,
    org: &str,
    account: &str,
    role: pb::OrganizationRole,
) -> Result<(), tonic::Status> {
    client
        .update_organization_member(authed(
            token,
            pb::UpdateOrganizationMemberRequest {
                member: Some(pb::OrganizationMember {
                    name: member_name(org, account),
                    role: role as i32,
                    ..Default::default()
                }),
                update_mask: Some(FieldMask { paths: vec!["role".into()] }),
            },
        ))
        .await
        .map(|_| ())
}

#[tokio::test]
async fn roles_and_removals_apply_on_the_next_call_and_the_last_owner_stays() {
    let h = Harness::start().await;
    let (owner, owner_token, _) = verified_account(&h, "owner@example.com").await;
    let (reader, reader_token, _) = verified_account(&h, "reader@example.com").await;
    let mut client = h.client().await;
    let org = create_org(&mut client, &owner_token, "Acme").await;

    // Grant through the internal, idempotent path (as an accepted invitation does).
    let internal = internal_token(&h).await;
    for _ in 0..2 {
        let member = grant(&mut client, &internal, &org, &reader, pb::OrganizationRole::Reader, "inv-1").await.unwrap();
        assert_eq!(member.role, pb::OrganizationRole::Reader as i32);
    }
    let members = client
        .list_organization_members(authed(
            &owner_token,
            pb::ListOrganizationMembersRequest { parent: org.clone(), ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner()
        .members;
    assert_eq!(members.len(), 2, "a retried grant adds one membership");

    // A reader cannot change roles; after promotion, the very next call can.
    let err = set_role(&mut client, &reader_token, &org, &owner, pb::OrganizationRole::Reader).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    set_role(&mut client, &owner_token, &org, &reader, pb::OrganizationRole::Owner).await.unwrap();
    set_role(&mut client, &reader_token, &org, &reader, pb::OrganizationRole::Owner).await.unwrap();

    // Demotion applies at once too.
    set_role(&mut client, &owner_token, &org, &reader, pb::OrganizationRole::Reader).await.unwrap();
    let err = set_role(&mut client, &reader_token, &org, &owner, pb::OrganizationRole::Reader).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // The last owner can be neither demoted nor removed.
    let err = set_role(&mut client, &owner_token, &org, &owner, pb::OrganizationRole::Reader).await.unwrap_err();
    assert_eq!((err.code(), reason(&err).as_str()), (Code::FailedPrecondition, "LAST_OWNER"));
    let err = client
        .delete_organization_member(authed(
            &owner_token,
            pb::DeleteOrganizationMemberRequest { name: member_name(&org, &owner), ..Default::default() },
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "LAST_OWNER");

    // Removal: the removed member's next call no longer sees the organization.
    client.get_organization(authed(&reader_token, pb::GetOrganizationRequest { name: org.clone() })).await.unwrap();
    client
        .delete_organization_member(authed(
            &owner_token,
            pb::DeleteOrganizationMemberRequest { name: member_name(&org, &reader), ..Default::default() },
        ))
        .await
        .unwrap();
    let err = client
        .get_organization(authed(&reader_token, pb::GetOrganizationRequest { name: org.clone() }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // A retried grant does not bring a removed member back.
    let err = grant(&mut client, &internal, &org, &reader, pb::OrganizationRole::Reader, "inv-1").await.unwrap_err();
    assert_eq!((err.code(), reason(&err).as_str()), (Code::FailedPrecondition, "GRANT_REVOKED"));

    // The same invitation id cannot grant a different membership.
    let other_org = create_org(&mut client, &owner_token, "Other").await;
    let err =
        grant(&mut client, &internal, &other_org, &reader, pb::OrganizationRole::Reader, "inv-1").await.unwrap_err();
    assert_eq!(reason(&err), "INVITATION_CONFLICT");
}

#[tokio::test]
async fn concurrent_demotions_keep_one_owner() {
    let h = Harness::start().await;
    let (a, a_token, _) = verified_account(&h, "a@example.com").await;
    let (b, b_token, _) = verified_account(&h, "b@example.com").await;
    let mut client = h.client().await;
    let org = create_org(&mut client, &a_token, "Twin").await;
    let internal = internal_token(&h).await;
    grant(&mut client, &internal, &org, &b, pb::OrganizationRole::Owner, "inv-twin").await.unwrap();
    // Each owner demotes the other at the same moment: one must fail.
    let (mut c1, mut c2) = (client.clone(), client.clone());
    let (r1, r2) = tokio::join!(
        set_role(&mut c1, &a_token, &org, &b, pb::OrganizationRole::Reader),
        set_role(&mut c2, &b_token, &org, &a, pb::OrganizationRole::Reader),
    );
    assert_eq!(r1.is_ok() as u8 + r2.is_ok() as u8, 1, "{r1:?} {r2:?}");
}

#[tokio::test]
async fn service_accounts_and_internal_rpcs() {
    let h = Harness::start().await;
    let (_, owner_token, _) = verified_account(&h, "ops@example.com").await;
    let mut client = h.client().await;
    let org = create_org(&mut client, &owner_token, "Ops").await;
    let created = client
        .create_service_account(authed(
            &owner_token,
            pb::CreateServiceAccountRequest {
                parent: org.clone(),
                service_account: Some(pb::ServiceAccount { display_name: "gateway".into(), ..Default::default() }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let sa = created.service_account.unwrap();
    let grant = client
        .issue_service_account_token(pb::IssueServiceAccountTokenRequest {
            client_id: sa.client_id.clone(),
            client_secret: created.client_secret.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap();
    assert!(grant.refresh_token.is_empty());

    // An organization's service account sees its organization but not internal RPCs.
    client
        .get_organization(authed(&grant.access_token, pb::GetOrganizationRequest { name: org.clone() }))
        .await
        .unwrap();
    let err = client
        .lookup_account(authed(&grant.access_token, pb::LookupAccountRequest { email: "ops@example.com".into() }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Keyshare's own services may look accounts up by verified email.
    let internal = internal_token(&h).await;
    let found = client
        .lookup_account(authed(&internal, pb::LookupAccountRequest { email: "OPS@example.com".into() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.account.unwrap().email, "ops@example.com");
    let missing = client
        .lookup_account(authed(&internal, pb::LookupAccountRequest { email: "nobody@example.com".into() }))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // A wrong secret and a deleted account are refused; the secret is never echoed.
    let err = client
        .issue_service_account_token(pb::IssueServiceAccountTokenRequest {
            client_id: sa.client_id.clone(),
            client_secret: "wrong-secret".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let listed = client
        .list_service_accounts(authed(
            &owner_token,
            pb::ListServiceAccountsRequest { parent: org.clone(), ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner()
        .service_accounts;
    assert_eq!(listed.len(), 1);
    client
        .delete_service_account(authed(&owner_token, pb::DeleteServiceAccountRequest { name: sa.name.clone() }))
        .await
        .unwrap();
    let err = client
        .issue_service_account_token(pb::IssueServiceAccountTokenRequest {
            client_id: sa.client_id,
            client_secret: created.client_secret.clone(),
        })
        .await
        .unwrap_err();
    assert!(!err.message().contains(&created.client_secret));
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = client
        .get_organization(authed(&grant.access_token, pb::GetOrganizationRequest { name: org }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "a deleted service account's token stops at once");
}

#[tokio::test]
async fn pagination_walks_every_member_once() {
    let h = Harness::start().await;
    let (_, owner_token, _) = verified_account(&h, "pager@example.com").await;
    let mut client = h.client().await;
    let org = create_org(&mut client, &owner_token, "Pages").await;
    let internal = internal_token(&h).await;
    for i in 0..7 {
        let email = format!("m{i}@example.com");
        let (account, _, _) = verified_account(&h, &email).await;
        grant(&mut client, &internal, &org, &account, pb::OrganizationRole::Reader, &format!("inv-{i}")).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_organization_members(authed(
                &owner_token,
                pb::ListOrganizationMembersRequest { parent: org.clone(), page_size: 3, page_token: token.clone() },
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.members.len() <= 3);
        seen.extend(page.members.into_iter().map(|m| m.email));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 8);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 8);
}

#[tokio::test]
async fn bad_input_names_the_field_and_writes_nothing() {
    let h = Harness::start().await;
    let (_, token, _) = verified_account(&h, "valid@example.com").await;
    let mut client = h.client().await;
    let org = create_org(&mut client, &token, "Valid").await;
    let (accounts, orgs, outbox) =
        (count(&h, "accounts").await, count(&h, "organizations").await, count(&h, "outbox").await);
    let huge = "x".repeat(10_000);

    let sign_up = |email: &str, name: &str, password: &str| pb::CreateAccountRequest {
        email: email.into(),
        display_name: name.into(),
        password: password.into(),
    };
    let cases: Vec<(&str, Result<(), tonic::Status>, Vec<&str>)> = vec![
        (
            "malformed email",
            client.create_account(sign_up("not-an-email", "Name", PASSWORD)).await.map(|_| ()),
            vec!["email"],
        ),
        (
            "short password",
            client.create_account(sign_up("short@example.com", "Name", "short")).await.map(|_| ()),
            vec!["password"],
        ),
        (
            "10 kB display name",
            client.create_account(sign_up("long@example.com", &huge, PASSWORD)).await.map(|_| ()),
            vec!["display_name"],
        ),
        (
            "everything wrong at once",
            client.create_account(sign_up("x@", "", "")).await.map(|_| ()),
            vec!["email", "display_name", "password"],
        ),
        (
            "bad resource name",
            client
                .get_organization(authed(&token, pb::GetOrganizationRequest { name: "organizations/42".into() }))
                .await
                .map(|_| ()),
            vec!["name"],
        ),
        (
            "bad parent",
            client
                .list_organization_members(authed(
                    &token,
                    pb::ListOrganizationMembersRequest { parent: "orgs/x".into(), ..Default::default() },
                ))
                .await
                .map(|_| ()),
            vec!["parent"],
        ),
        (
            "bad page token",
            client
                .list_organization_members(authed(
                    &token,
                    pb::ListOrganizationMembersRequest {
                        parent: org.clone(),
                        page_token: "bm90IGEgdG9rZW4".into(),
                        ..Default::default()
                    },
                ))
                .await
                .map(|_| ()),
            vec!["page_token"],
        ),
        (
            "negative page size",
            client
                .list_organizations(authed(
                    &token,
                    pb::ListOrganizationsRequest { page_size: -5, ..Default::default() },
                ))
                .await
                .map(|_| ()),
            vec!["page_size"],
        ),
        (
            "10 kB organization name",
            client
                .create_organization(authed(
                    &token,
                    pb::CreateOrganizationRequest {
                        organization: Some(pb::Organization { display_name: huge.clone(), ..Default::default() }),
                    },
                ))
                .await
                .map(|_| ()),
            vec!["organization.display_name"],
        ),
        (
            "unknown role",
            client
                .update_organization_member(authed(
                    &token,
                    pb::UpdateOrganizationMemberRequest {
                        member: Some(pb::OrganizationMember {
                            name: format!("{org}/members/{}", uuid::Uuid::new_v4()),
                            role: 9,
                            ..Default::default()
                        }),
                        update_mask: Some(FieldMask { paths: vec!["role".into()] }),
                    },
                ))
                .await
                .map(|_| ()),
            vec!["member.role"],
        ),
        (
            "unknown update mask path",
            client
                .update_account(authed(
                    &token,
                    pb::UpdateAccountRequest {
                        account: Some(pb::Account {
                            name: "accounts/me".into(),
                            email: "new@example.com".into(),
                            ..Default::default()
                        }),
                        update_mask: Some(FieldMask { paths: vec!["email".into()] }),
                    },
                ))
                .await
                .map(|_| ()),
            vec!["update_mask"],
        ),
    ];
    for (case, result, fields) in cases {
        let err = result.expect_err(case);
        assert_eq!(err.code(), Code::InvalidArgument, "{case}: {err:?}");
        assert_eq!(bad_fields(&err), fields, "{case}");
        assert_eq!(reason(&err), "INVALID_ARGUMENT", "{case}");
    }
    assert_eq!(count(&h, "accounts").await, accounts);
    assert_eq!(count(&h, "organizations").await, orgs);
    assert_eq!(count(&h, "outbox").await, outbox);

    // A duplicate email is ALREADY_EXISTS and writes nothing either.
    let err = client.create_account(sign_up("VALID@example.com", "Again", PASSWORD)).await.unwrap_err();
    assert_eq!((err.code(), reason(&err).as_str()), (Code::AlreadyExists, "EMAIL_TAKEN"));
    assert_eq!(count(&h, "accounts").await, accounts);
    assert_eq!(count(&h, "outbox").await, outbox);
}

/// keyring takes the connection and never answers: deleting a service account still answers
/// once the change's own run gives up (after two seconds, where keyring's client would wait
/// ten), and the call stays queued for the worker, which tells keyring when it answers.
#[tokio::test]
async fn a_keyring_that_never_answers_does_not_hold_the_change() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let keyring_url = format!("http://{}", silent.local_addr().unwrap());
    let holding = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            open.push(connection);
        }
    });
    let h = Harness::start_with([Setting::KeyringUrl(keyring_url.clone())]).await;
    let (_, owner_token, _) = verified_account(&h, "ops@example.com").await;
    let mut client = h.client().await;
    let org = create_org(&mut client, &owner_token, "Ops").await;
    let request = pb::CreateServiceAccountRequest {
        parent: org,
        service_account: Some(pb::ServiceAccount { display_name: "gateway".into(), ..Default::default() }),
    };
    let created = client.create_service_account(authed(&owner_token, request)).await.unwrap().into_inner();

    let started = std::time::Instant::now();
    let name = created.service_account.unwrap().name;
    client.delete_service_account(authed(&owner_token, pb::DeleteServiceAccountRequest { name })).await.unwrap();
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(8), "the deletion waited {took:?} for a keyring that never answers");

    let (db, connection) = tokio_postgres::connect(&h.db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let queued: i64 =
        db.query_one("SELECT count(*) FROM identity.keyring_calls WHERE done_at IS NULL", &[]).await.unwrap().get(0);
    assert_eq!(queued, 1, "the call to keyring stays queued for the worker");
    holding.abort();
}
