//! Projects and keys through the real gRPC API: the key lifecycle, credential reveal and
//! regeneration, KEK rotation, and bad input answered without writing anything.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use keyshare_proto::keyring::v1 as pb;
use keyshare_runtime::credential;
use keyshare_runtime::crypto::Sealer;
use prost_types::FieldMask;
use tonic::Code;

fn env_name(key: &str, env: &str) -> String {
    format!("{key}/environments/{env}")
}

#[tokio::test]
async fn key_lifecycle() {
    let h = Harness::start().await;
    let (_, owner) = h.account("owner@example.com").await;
    let org = h.organization(&owner, "Acme").await;
    let mut keyring = h.keyring().await;
    let project = create_project(&mut keyring, &owner, &org, "Payments API").await;

    // Creating a key issues both credentials, in plaintext, once.
    let created = create_key(&mut keyring, &owner, &project.name, "Partner Corp").await;
    let key = created.key.unwrap();
    assert_eq!(credential::parse(&created.sandbox_credential), Ok(credential::Environment::Sandbox));
    assert_eq!(credential::parse(&created.production_credential), Ok(credential::Environment::Production));
    assert_eq!(key.caller_role, pb::KeyRole::Owner as i32);
    let sandbox = key.sandbox.clone().unwrap();
    assert!(sandbox.active);
    assert_eq!(sandbox.permissions.unwrap(), pb::Permissions { create: true, read: true, update: true, delete: true });
    let shown = sandbox.credential.unwrap();
    assert_eq!(shown.prefix, "ks_test_");
    assert!(created.sandbox_credential.ends_with(&shown.last_four));

    // The detail never carries plaintext; reveal does, and is audited.
    let detail =
        keyring.get_key(authed(&owner, pb::GetKeyRequest { name: key.name.clone() })).await.unwrap().into_inner();
    assert!(!format!("{detail:?}").contains(&created.sandbox_credential));
    let revealed = keyring
        .reveal_credential(authed(&owner, pb::RevealCredentialRequest { name: env_name(&key.name, "production") }))
        .await
        .unwrap()
        .into_inner()
        .credential;
    assert_eq!(revealed, created.production_credential);

    // Toggle production off; sandbox is independent.
    let updated = keyring
        .update_key_environment(authed(
            &owner,
            pb::UpdateKeyEnvironmentRequest {
                environment: Some(pb::KeyEnvironment {
                    name: env_name(&key.name, "production"),
                    active: false,
                    ..Default::default()
                }),
                update_mask: Some(FieldMask { paths: vec!["active".into()] }),
                etag: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert!(!updated.production.unwrap().active);
    assert!(updated.sandbox.unwrap().active);

    // Regenerate with a grace period: both credentials are shown while it lasts.
    let regenerated = keyring
        .regenerate_credential(authed(
            &owner,
            pb::RegenerateCredentialRequest {
                name: env_name(&key.name, "sandbox"),
                grace_period: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(regenerated.credential, created.sandbox_credential);
    let sandbox = regenerated.key.unwrap().sandbox.unwrap();
    assert!(created.sandbox_credential.ends_with(&sandbox.previous_credential.unwrap().last_four));
    assert!(sandbox.previous_credential_expire_time.is_some());
    // After the grace period, only the new one is shown.
    h.clock.advance(chrono::Duration::minutes(2));
    let key_now = keyring
        .get_key(authed(&owner, pb::GetKeyRequest { name: key.name.clone() }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert!(key_now.sandbox.unwrap().previous_credential.is_none());

    // Idempotent create: the same request id gives the same key and credentials.
    let request = || pb::CreateKeyRequest {
        parent: project.name.clone(),
        key: Some(pb::Key { display_name: "Retry Inc".into(), ..Default::default() }),
        request_id: "req-1".into(),
        ..Default::default()
    };
    let first = keyring.create_key(authed(&owner, request())).await.unwrap().into_inner();
    let second = keyring.create_key(authed(&owner, request())).await.unwrap().into_inner();
    assert_eq!(first.key.unwrap().name, second.key.unwrap().name);
    assert_eq!(first.production_credential, second.production_credential);

    // List, shared-with-me, audit log.
    let list = keyring
        .list_keys(authed(&owner, pb::ListKeysRequest { parent: project.name.clone(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.keys.len(), 2);
    assert!(
        !list.keys[0].invitations.unwrap().known,
        "no invitation service: counts are unknown, the list still answers"
    );
    let shared =
        keyring.list_shared_keys(authed(&owner, pb::ListSharedKeysRequest::default())).await.unwrap().into_inner();
    assert_eq!(shared.keys.len(), 2);
    let audit = keyring
        .list_audit_events(authed(
            &owner,
            pb::ListAuditEventsRequest { parent: key.name.clone(), ..Default::default() },
        ))
        .await
        .unwrap()
        .into_inner();
    let actions: Vec<_> = audit.events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["credential.regenerate", "key_environment.update", "credential.reveal", "key.create"]);
    assert!(audit.events.iter().all(|e| e.actor.starts_with("accounts/") && !e.request_id.is_empty()));

    // Delete: gone for everyone; the project can then be deleted.
    let err = keyring
        .delete_project(authed(&owner, pb::DeleteProjectRequest { name: project.name.clone(), force: false }))
        .await
        .unwrap_err();
    assert_eq!((err.code(), reason(&err).as_str()), (Code::FailedPrecondition, "PROJECT_HAS_KEYS"));
    keyring
        .delete_key(authed(&owner, pb::DeleteKeyRequest { name: key.name.clone(), etag: String::new() }))
        .await
        .unwrap();
    let err = keyring.get_key(authed(&owner, pb::GetKeyRequest { name: key.name.clone() })).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    keyring
        .delete_project(authed(&owner, pb::DeleteProjectRequest { name: project.name.clone(), force: true }))
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_input_gets_the_right_code_and_writes_nothing() {
    let h = Harness::start().await;
    let (_, owner) = h.account("careful@example.com").await;
    let org = h.organization(&owner, "Careful").await;
    let mut keyring = h.keyring().await;
    let project = create_project(&mut keyring, &owner, &org, "Careful API").await;
    let key = create_key(&mut keyring, &owner, &project.name, "Taken").await.key.unwrap();
    let tables = ["keys", "credentials", "key_environments", "audit_events", "changes"];
    let mut before = Vec::new();
    for table in tables {
        before.push(h.count(table).await);
    }
    let env = |name: &str, edit: &dyn Fn(&mut pb::KeyEnvironment)| {
        let mut e = pb::KeyEnvironment { name: name.into(), ..Default::default() };
        edit(&mut e);
        e
    };
    let sandbox = env_name(&key.name, "sandbox");

    type Case = (&'static str, Result<(), tonic::Status>, Code, Vec<&'static str>);
    let cases: Vec<Case> = vec![
        (
            "stale etag",
            keyring
                .update_key(authed(
                    &owner,
                    pb::UpdateKeyRequest {
                        key: Some(pb::Key {
                            name: key.name.clone(),
                            display_name: "New".into(),
                            etag: "\"999\"".into(),
                            ..Default::default()
                        }),
                        update_mask: Some(FieldMask { paths: vec!["display_name".into()] }),
                    },
                ))
                .await
                .map(|_| ()),
            Code::Aborted,
            vec!["key.etag"],
        ),
        (
            "duplicate name (case-insensitive)",
            keyring
                .create_key(authed(
                    &owner,
                    pb::CreateKeyRequest {
                        parent: project.name.clone(),
                        key: Some(pb::Key { display_name: "taken".into(), ..Default::default() }),
                        ..Default::default()
                    },
                ))
                .await
                .map(|_| ()),
            Code::AlreadyExists,
            vec!["key.display_name"],
        ),
        (
            "grace period over 24 h",
            keyring
                .regenerate_credential(authed(
                    &owner,
                    pb::RegenerateCredentialRequest {
                        name: sandbox.clone(),
                        grace_period: Some(prost_types::Duration { seconds: 24 * 3600 + 1, nanos: 0 }),
                    },
                ))
                .await
                .map(|_| ()),
            Code::InvalidArgument,
            vec!["grace_period"],
        ),
        (
            "bad CIDR",
            keyring
                .update_key_environment(authed(
                    &owner,
                    pb::UpdateKeyEnvironmentRequest {
                        environment: Some(env(&sandbox, &|e| {
                            e.ip_allowlist = vec!["10.0.0.0/8".into(), "300.1.1.1/8".into()]
                        })),
                        update_mask: Some(FieldMask { paths: vec!["ip_allowlist".into()] }),
                        etag: String::new(),
                    },
                ))
                .await
                .map(|_| ()),
            Code::InvalidArgument,
            vec!["environment.ip_allowlist[1]"],
        ),
        (
            "unknown environment",
            keyring
                .update_key_environment(authed(
                    &owner,
                    pb::UpdateKeyEnvironmentRequest {
                        environment: Some(env(&env_name(&key.name, "staging"), &|e| e.active = false)),
                        update_mask: Some(FieldMask { paths: vec!["active".into()] }),
                        etag: String::new(),
                    },
                ))
                .await
                .map(|_| ()),
            Code::InvalidArgument,
            vec!["environment.name"],
        ),
        (
            "oversized description",
            keyring
                .create_key(authed(
                    &owner,
                    pb::CreateKeyRequest {
                        parent: project.name.clone(),
                        key: Some(pb::Key {
                            display_name: "Fresh".into(),
                            description: "d".repeat(501),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ))
                .await
                .map(|_| ()),
            Code::InvalidArgument,
            vec!["key.description"],
        ),
        (
            "negative limit",
            keyring
                .update_key_environment(authed(
                    &owner,
                    pb::UpdateKeyEnvironmentRequest {
                        environment: Some(env(&sandbox, &|e| e.daily_quota = -1)),
                        update_mask: Some(FieldMask { paths: vec!["daily_quota".into()] }),
                        etag: String::new(),
                    },
                ))
                .await
                .map(|_| ()),
            Code::InvalidArgument,
            vec!["environment.daily_quota"],
        ),
        (
            "bad key name and page token",
            keyring
                .list_keys(authed(
                    &owner,
                    pb::ListKeysRequest { parent: "projects/nope".into(), page_size: -1, page_token: String::new() },
                ))
                .await
                .map(|_| ()),
            Code::InvalidArgument,
            vec!["parent"],
        ),
        (
            "empty name",
            keyring
                .create_key(authed(
                    &owner,
                    pb::CreateKeyRequest {
                        parent: project.name.clone(),
                        key: Some(pb::Key::default()),
                        ..Default::default()
                    },
                ))
                .await
                .map(|_| ()),
            Code::InvalidArgument,
            vec!["key.display_name"],
        ),
    ];
    for (case, result, code, fields) in cases {
        let err = result.expect_err(case);
        assert_eq!(err.code(), code, "{case}: {err:?}");
        assert_eq!(bad_fields(&err), fields, "{case}");
    }
    for (table, count) in tables.iter().zip(before) {
        assert_eq!(h.count(table).await, count, "{table} changed");
    }
}

#[tokio::test]
async fn sealed_credentials_survive_kek_rotation() {
    let mut h = Harness::start().await;
    let (_, owner) = h.account("kek@example.com").await;
    let org = h.organization(&owner, "Kek").await;
    let mut keyring = h.keyring().await;
    let project = create_project(&mut keyring, &owner, &org, "Sealed").await;
    let old = create_key(&mut keyring, &owner, &project.name, "Old").await;
    let old_name = old.key.unwrap().name;

    // A replica with a new KEK first and the old one after: old credentials still open, new
    // ones are sealed with the new KEK.
    let (_, new_kek) = Sealer::generate("kek2");
    let rotated_addr = h.start_keyring(&format!("{new_kek},{}", h.kek)).await;
    let mut rotated = keyring_at(rotated_addr).await;
    let revealed = rotated
        .reveal_credential(authed(
            &owner,
            pb::RevealCredentialRequest { name: format!("{old_name}/environments/sandbox") },
        ))
        .await
        .unwrap()
        .into_inner()
        .credential;
    assert_eq!(revealed, old.sandbox_credential);
    let new = create_key(&mut rotated, &owner, &project.name, "New").await;
    let (client, connection) = tokio_postgres::connect(&h.db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let kek_ids: Vec<String> = client
        .query("SELECT DISTINCT kek_id FROM keyring.credentials ORDER BY kek_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(kek_ids, ["kek1", "kek2"]);

    // With only the new KEK, the new key opens and the old one cannot (INTERNAL, no detail).
    let only_new = h.start_keyring(&new_kek).await;
    let mut only_new = keyring_at(only_new).await;
    let new_name = new.key.unwrap().name;
    only_new
        .reveal_credential(authed(
            &owner,
            pb::RevealCredentialRequest { name: format!("{new_name}/environments/sandbox") },
        ))
        .await
        .unwrap();
    let err = only_new
        .reveal_credential(authed(
            &owner,
            pb::RevealCredentialRequest { name: format!("{old_name}/environments/sandbox") },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert_eq!(err.message(), "internal error");
}

/// A call queued for the invitation service is made by one runner at a time: a worker passes
/// over a call another runner holds, and a change's own run waits for the holder, then finds the
/// call done instead of making it again.
#[tokio::test]
async fn a_queued_call_is_made_by_one_runner_at_a_time() {
    use keyshare_keyring::store;
    // A database of its own with no keyring running, so only this test's runners take calls.
    let db = keyshare_runtime::testkit::TestDatabase::create().await;
    keyshare_keyring::migrate(&db.url).await.unwrap();
    let pool = keyshare_runtime::db::pool(&db.url, 8).unwrap();
    store::queue_call(&pool.get().await.unwrap(), "revoke_invitations", "projects/p/keys/k").await.unwrap();
    let due = store::due_pending_calls(&pool.get().await.unwrap()).await.unwrap();
    assert_eq!(due.len(), 1);
    let id = due[0];

    // One runner takes the call and holds it while it makes the call.
    let mut first = pool.get().await.unwrap();
    let first_tx = first.transaction().await.unwrap();
    let taken = store::lock_pending_call(&first_tx, id, true).await.unwrap().expect("the call is due");
    assert_eq!((taken.kind.as_str(), taken.target.as_str()), ("revoke_invitations", "projects/p/keys/k"));

    // A worker on another replica passes it over.
    {
        let mut worker = pool.get().await.unwrap();
        let worker_tx = worker.transaction().await.unwrap();
        assert!(
            store::lock_pending_call(&worker_tx, id, true).await.unwrap().is_none(),
            "a worker must not make a call another runner is making"
        );
    }

    // A change's own run waits for the holder.
    let waiting = tokio::spawn({
        let pool = pool.clone();
        async move {
            let mut client = pool.get().await.unwrap();
            let tx = client.transaction().await.unwrap();
            store::lock_pending_call(&tx, id, false).await.unwrap().map(|call| call.id)
        }
    });
    until_a_statement_waits_on_a_lock(&pool, "the change's run to wait for the call's row").await;
    assert!(!waiting.is_finished());

    // The holder finishes the call; the waiting run finds it done.
    store::pending_call_done(&first_tx, id, None).await.unwrap();
    first_tx.commit().await.unwrap();
    assert_eq!(waiting.await.unwrap(), None, "the waiting run must not make the call again");
    assert!(store::due_pending_calls(&pool.get().await.unwrap()).await.unwrap().is_empty());
}

/// Retries of one CreateKey that arrive together (a client that timed out and retried at once)
/// make one key, and every one of them is answered with it and its credentials: the ones that
/// lose the race to insert are answered as the winner was.
#[tokio::test]
async fn concurrent_retries_of_one_create_key_make_one_key() {
    let h = Harness::start().await;
    let (_, owner) = h.account("owner@example.com").await;
    let org = h.organization(&owner, "Acme").await;
    let mut keyring = h.keyring().await;
    let project = create_project(&mut keyring, &owner, &org, "Payments API").await;
    let request = pb::CreateKeyRequest {
        parent: project.name.clone(),
        key: Some(pb::Key { display_name: "Retried".into(), ..Default::default() }),
        request_id: "retried-at-once".into(),
        ..Default::default()
    };
    let calls = (0..8).map(|_| {
        let (mut keyring, request, owner) = (keyring.clone(), request.clone(), owner.clone());
        tokio::spawn(async move { keyring.create_key(authed(&owner, request)).await.map(|r| r.into_inner()) })
    });
    let mut answers = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        answers.push(call.await.unwrap().expect("every retry is answered with the key"));
    }
    let first = &answers[0];
    for answer in &answers {
        assert_eq!(answer.key.as_ref().unwrap().name, first.key.as_ref().unwrap().name);
        assert_eq!(answer.sandbox_credential, first.sandbox_credential);
        assert_eq!(answer.production_credential, first.production_credential);
    }
    let list = keyring
        .list_keys(authed(&owner, pb::ListKeysRequest { parent: project.name.clone(), ..Default::default() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.keys.len(), 1, "one key, however many retries");
}

/// A key created while its project is being deleted is answered NOT_FOUND, as if the deletion
/// had come first, rather than failing on the project's foreign key.
#[tokio::test]
async fn a_key_created_while_its_project_is_deleted_is_not_found() {
    let h = Harness::start().await;
    let (_, owner) = h.account("owner@example.com").await;
    let org = h.organization(&owner, "Acme").await;
    let mut keyring = h.keyring().await;
    let project = create_project(&mut keyring, &owner, &org, "Payments API").await;
    let project_id: uuid::Uuid = project.name.strip_prefix("projects/").unwrap().parse().unwrap();

    // A deletion under way holds the project's row until it commits.
    let pool = keyshare_runtime::db::pool(&h.db.url, 2).unwrap();
    let mut deleter = pool.get().await.unwrap();
    let deletion = deleter.transaction().await.unwrap();
    deletion.execute("SELECT 1 FROM keyring.projects WHERE id = $1 FOR UPDATE", &[&project_id]).await.unwrap();

    let creating = tokio::spawn({
        let (mut keyring, owner, parent) = (keyring.clone(), owner.clone(), project.name.clone());
        async move {
            let key = pb::Key { display_name: "Late".into(), ..Default::default() };
            keyring
                .create_key(authed(&owner, pb::CreateKeyRequest { parent, key: Some(key), ..Default::default() }))
                .await
        }
    });
    until_a_statement_waits_on_a_lock(&pool, "CreateKey to wait for the deletion").await;
    deletion.execute("DELETE FROM keyring.projects WHERE id = $1", &[&project_id]).await.unwrap();
    deletion.commit().await.unwrap();

    let status = creating.await.unwrap().expect_err("the project is gone");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}
