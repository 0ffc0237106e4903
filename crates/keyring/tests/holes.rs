//! Small holes tried from outside through the real gRPC API: update masks that reset what the
//! caller never sent, timestamps out of range taken as "never expires", crafted page tokens,
//! sharing details shown to contributors.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use keyshare_proto::keyring::v1 as pb;
use keyshare_runtime::clock::Clock;
use prost_types::{FieldMask, Timestamp};
use tonic::Code;

/// An owner with a project and a key: (owner token, project, key name).
async fn owner_with_key(h: &Harness) -> (String, String, String) {
    let (_, owner) = h.account("owner@example.com").await;
    let org = h.organization(&owner, "Acme").await;
    let mut keyring = h.keyring().await;
    let project = create_project(&mut keyring, &owner, &org, "Payments API").await.name;
    let key = create_key(&mut keyring, &owner, &project, "Partner").await.key.unwrap().name;
    (owner, project, key)
}

fn sandbox(key: &str) -> String {
    format!("{key}/environments/sandbox")
}

async fn set_sandbox(
    keyring: &mut Keyring,
    token: &str,
    environment: pb::KeyEnvironment,
    mask: Option<&[&str]>,
) -> Result<pb::Key, tonic::Status> {
    keyring
        .update_key_environment(authed(
            token,
            pb::UpdateKeyEnvironmentRequest {
                environment: Some(environment),
                update_mask: mask.map(|paths| FieldMask { paths: paths.iter().map(|p| (*p).into()).collect() }),
                etag: String::new(),
            },
        ))
        .await
        .map(|r| r.into_inner().key.unwrap())
}

#[tokio::test]
async fn an_absent_update_mask_never_resets_unsent_settings() {
    let h = Harness::start().await;
    let (owner, project, key) = owner_with_key(&h).await;
    let mut keyring = h.keyring().await;

    // Security settings are set with an explicit mask: read only, an allowlist, a rate limit.
    let read_only = pb::Permissions { create: false, read: true, update: false, delete: false };
    set_sandbox(
        &mut keyring,
        &owner,
        pb::KeyEnvironment {
            name: sandbox(&key),
            permissions: Some(read_only),
            ip_allowlist: vec!["203.0.113.0/24".into()],
            rate_limit_per_second: 10,
            active: true,
            ..Default::default()
        },
        Some(&["permissions", "ip_allowlist", "rate_limit_per_second"]),
    )
    .await
    .unwrap();

    // A client that sends only a daily quota and no mask changes the quota and nothing else: it
    // does not reopen every method, clear the allowlist, lift the rate limit or switch it off.
    let after = set_sandbox(
        &mut keyring,
        &owner,
        pb::KeyEnvironment { name: sandbox(&key), daily_quota: 500, ..Default::default() },
        None,
    )
    .await
    .unwrap()
    .sandbox
    .unwrap();
    assert_eq!(after.daily_quota, 500);
    assert_eq!(after.permissions, Some(read_only));
    assert_eq!(after.ip_allowlist, ["203.0.113.0/24"]);
    assert_eq!(after.rate_limit_per_second, 10);
    assert!(after.active);

    // The same for the key's text and the project's limits.
    let updated = keyring
        .update_key(authed(
            &owner,
            pb::UpdateKeyRequest {
                key: Some(pb::Key { name: key.clone(), display_name: "Renamed".into(), ..Default::default() }),
                update_mask: None,
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!((updated.display_name.as_str(), updated.description.as_str()), ("Renamed", "for tests"));
    let limits = |rate, quota| Some(pb::ProjectEnvironmentLimits { rate_limit_per_second: rate, monthly_quota: quota });
    let update_project = |project: pb::Project, paths: Option<Vec<String>>| {
        let mut keyring = keyring.clone();
        let owner = owner.clone();
        async move {
            keyring
                .update_project(authed(
                    &owner,
                    pb::UpdateProjectRequest {
                        project: Some(project),
                        update_mask: paths.map(|paths| FieldMask { paths }),
                    },
                ))
                .await
                .unwrap()
                .into_inner()
                .project
                .unwrap()
        }
    };
    update_project(
        pb::Project { name: project.clone(), production: limits(50, 1000), ..Default::default() },
        Some(vec!["production".into()]),
    )
    .await;
    let p =
        update_project(pb::Project { name: project.clone(), sandbox: limits(5, 0), ..Default::default() }, None).await;
    assert_eq!(p.display_name, "Payments API");
    assert_eq!(p.sandbox, limits(5, 0));
    assert_eq!(p.production, limits(50, 1000), "production limits were not sent and stay");

    // `*` is the explicit full replacement: every unsent setting goes back to its default.
    let replaced = set_sandbox(
        &mut keyring,
        &owner,
        pb::KeyEnvironment { name: sandbox(&key), active: true, ..Default::default() },
        Some(&["*"]),
    )
    .await
    .unwrap()
    .sandbox
    .unwrap();
    assert_eq!((replaced.daily_quota, replaced.rate_limit_per_second), (0, 0));
    assert!(replaced.ip_allowlist.is_empty());
}

#[tokio::test]
async fn an_out_of_range_expire_time_is_refused_not_taken_as_never() {
    let h = Harness::start().await;
    let (owner, _, key) = owner_with_key(&h).await;
    let mut keyring = h.keyring().await;
    let soon = h.clock.now().timestamp() + 3600;
    let expiring = |seconds, nanos| pb::KeyEnvironment {
        name: sandbox(&key),
        expire_time: Some(Timestamp { seconds, nanos }),
        ..Default::default()
    };
    let set = set_sandbox(&mut keyring, &owner, expiring(soon, 0), Some(&["expire_time"])).await.unwrap();
    assert_eq!(set.sandbox.unwrap().expire_time.map(|t| t.seconds), Some(soon));

    for (seconds, nanos) in [(i64::MAX, 0), (i64::MIN, 0), (soon, -1), (soon, 1_000_000_000), (300_000_000_000, 0)] {
        let err =
            set_sandbox(&mut keyring, &owner, expiring(seconds, nanos), Some(&["expire_time"])).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{seconds}s {nanos}ns");
        assert_eq!(bad_fields(&err), ["environment.expire_time"]);
    }
    // Nothing was changed: the key still expires when it was set to.
    let shown = keyring
        .get_key(authed(&owner, pb::GetKeyRequest { name: key.clone() }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(shown.sandbox.unwrap().expire_time.map(|t| t.seconds), Some(soon));
}

async fn list_keys(
    keyring: &mut Keyring,
    token: &str,
    project: &str,
    page_token: &str,
) -> Result<pb::ListKeysResponse, tonic::Status> {
    keyring
        .list_keys(authed(
            token,
            pb::ListKeysRequest { parent: project.into(), page_size: 1, page_token: page_token.into() },
        ))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn a_crafted_page_token_cannot_tell_an_outsider_a_project_exists() {
    use base64::Engine as _;
    let mut h = Harness::start().await;
    let (owner, project, _) = owner_with_key(&h).await;
    let (_, outsider) = h.account("outsider@example.com").await;
    let mut keyring = h.keyring().await;
    create_key(&mut keyring, &owner, &project, "Second").await;
    let missing = format!("projects/{}", uuid::Uuid::now_v7());

    // A genuine token of the owner's listing, handed to (or kept by) an outsider.
    let genuine = list_keys(&mut keyring, &owner, &project, "").await.unwrap().next_page_token;
    assert!(!genuine.is_empty());
    // Tokens of the old shape anyone could write: scope and cursor in plain base64.
    let crafted = |parent: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("v1\n{parent}/keys\n0_{}", uuid::Uuid::nil()))
    };

    // Without a token, with a genuine one and with a crafted one, the outsider learns nothing:
    // the existing project answers exactly as a missing one does.
    for (token, code) in [(String::new(), Code::NotFound), (genuine.clone(), Code::NotFound)] {
        let err = list_keys(&mut keyring, &outsider, &project, &token).await.unwrap_err();
        assert_eq!(err.code(), code, "existing project, token {token:?}");
    }
    let err = list_keys(&mut keyring, &outsider, &missing, "").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let existing = list_keys(&mut keyring, &outsider, &project, &crafted(&project)).await.unwrap_err();
    let absent = list_keys(&mut keyring, &outsider, &missing, &crafted(&missing)).await.unwrap_err();
    assert_eq!((existing.code(), absent.code()), (Code::InvalidArgument, Code::InvalidArgument));
    assert_eq!(bad_fields(&existing), ["page_token"]);

    // A genuine token with one character changed is refused too.
    let mut tampered = genuine.clone().into_bytes();
    tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
    let err = list_keys(&mut keyring, &owner, &project, &String::from_utf8(tampered).unwrap()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // The owner's token works, on this replica and on another one.
    let other = keyring_at(h.start_keyring(&h.kek.clone()).await).await;
    for mut replica in [keyring.clone(), other] {
        let next = list_keys(&mut replica, &owner, &project, &genuine).await.unwrap();
        assert_eq!(next.keys.len(), 1);
    }
}
