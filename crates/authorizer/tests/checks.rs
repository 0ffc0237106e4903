//! CheckKey through the real gRPC API, fed by a real keyring: every outcome, and every kind of
//! change honoured by the next check once the feed has delivered it.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use keyshare_proto::authorizer::v1 as pb;
use keyshare_proto::keyring::v1 as krpb;
use keyshare_runtime::clock::Clock;
use keyshare_runtime::credential::{Credential, Environment};
use keyshare_runtime::testkit::eventually;
use prost_types::FieldMask;

use pb::Environment::{Production as PROD, Sandbox as SANDBOX, Unspecified as ANY};
use pb::Outcome as O;

#[tokio::test]
async fn every_outcome_and_every_change() {
    let (mut w, project, key, sandbox, production) = world().await;
    let prod_env = format!("{key}/environments/production");
    let ip = "198.51.100.7";

    // Format, lookup, project, environment.
    let cases: Vec<(&str, String, &str, &str, pb::Environment, O, i32)> = vec![
        ("valid", production.clone(), "GET", &project, PROD, O::Valid, 200),
        ("valid, any project and environment", production.clone(), "HEAD", "", ANY, O::Valid, 200),
        ("malformed", "ks_live_not-a-credential".into(), "GET", "", ANY, O::Malformed, 401),
        (
            "checksum off by one character",
            {
                let mut c = production.clone();
                let last = c.pop().unwrap();
                c.push(if last == 'a' { 'b' } else { 'a' });
                c
            },
            "GET",
            "",
            ANY,
            O::Malformed,
            401,
        ),
        (
            "unknown",
            Credential::generate(Environment::Production).expose().to_owned(),
            "GET",
            "",
            ANY,
            O::NotFound,
            401,
        ),
        (
            "another project's gateway",
            production.clone(),
            "GET",
            "projects/0193f7e2-0000-7000-8000-000000000001",
            ANY,
            O::NotFound,
            401,
        ),
        ("sandbox key at a production gateway", sandbox.clone(), "GET", "", PROD, O::WrongEnvironment, 401),
        ("production key at a sandbox gateway", production.clone(), "GET", "", SANDBOX, O::WrongEnvironment, 401),
        ("unknown method", production.clone(), "TRACE", "", ANY, O::MethodNotAllowed, 403),
    ];
    for (case, credential, method, gateway_project, environment, outcome, status) in cases {
        let response = w.check(&credential, method, ip, gateway_project, environment).await;
        assert_eq!((response.outcome, response.http_status), (outcome as i32, status), "{case}");
        assert_eq!(response.allowed, outcome == O::Valid, "{case}");
    }
    let response = w.check(&production, "GET", ip, "", ANY).await;
    assert_eq!((response.key.as_str(), response.environment), (key.as_str(), PROD as i32));

    // Permission removed: 403 for that method only, in that environment only.
    w.set(&prod_env, "permissions", |e| {
        e.permissions = Some(krpb::Permissions { create: false, read: true, update: true, delete: true })
    })
    .await;
    assert_eq!(w.check(&production, "POST", ip, "", ANY).await.outcome, O::MethodNotAllowed as i32);
    assert_eq!(w.check(&production, "GET", ip, "", ANY).await.outcome, O::Valid as i32);
    assert_eq!(w.check(&sandbox, "POST", ip, "", ANY).await.outcome, O::Valid as i32);

    // Allowlist.
    w.set(&prod_env, "ip_allowlist", |e| e.ip_allowlist = vec!["10.0.0.0/8".into(), "2001:db8::/32".into()]).await;
    assert_eq!(w.check(&production, "GET", ip, "", ANY).await.outcome, O::SourceNotAllowed as i32);
    assert_eq!(w.check(&production, "GET", "10.1.2.3", "", ANY).await.outcome, O::Valid as i32);
    assert_eq!(w.check(&production, "GET", "2001:db8::1", "", ANY).await.outcome, O::Valid as i32);
    assert_eq!(w.check(&production, "GET", "", "", ANY).await.outcome, O::SourceNotAllowed as i32);
    w.set(&prod_env, "ip_allowlist", |e| e.ip_allowlist = vec![]).await;

    // Toggle inactive, then back.
    w.set(&prod_env, "active", |e| e.active = false).await;
    assert_eq!((w.check(&production, "GET", ip, "", ANY).await.http_status), 403);
    assert_eq!(w.check(&production, "GET", ip, "", ANY).await.outcome, O::Disabled as i32);
    w.set(&prod_env, "active", |e| e.active = true).await;
    assert_eq!(w.check(&production, "GET", ip, "", ANY).await.outcome, O::Valid as i32);

    // Expiry.
    let in_an_hour = prost_types::Timestamp { seconds: w.frozen.now().timestamp() + 3600, nanos: 0 };
    w.set(&prod_env, "expire_time", |e| e.expire_time = Some(in_an_hour)).await;
    assert_eq!(w.check(&production, "GET", ip, "", ANY).await.outcome, O::Valid as i32);
    w.frozen.advance(chrono::Duration::hours(2));
    assert_eq!(w.check(&production, "GET", ip, "", ANY).await.outcome, O::Expired as i32);
    w.frozen.advance(chrono::Duration::hours(-2));
    w.set(&prod_env, "expire_time", |e| e.expire_time = None).await;

    // Regenerate without grace: the old credential stops at once.
    let token = w.token.clone();
    let fresh = w
        .keyring
        .regenerate_credential(authed(
            &token,
            krpb::RegenerateCredentialRequest { name: prod_env.clone(), grace_period: None },
        ))
        .await
        .unwrap()
        .into_inner()
        .credential;
    w.synced().await;
    assert_eq!(w.check(&production, "GET", ip, "", ANY).await.outcome, O::NotFound as i32);
    assert_eq!(w.check(&fresh, "GET", ip, "", ANY).await.outcome, O::Valid as i32);

    // Regenerate with grace: both work until the grace ends, then the old one is expired.
    let newer = w
        .keyring
        .regenerate_credential(authed(
            &token,
            krpb::RegenerateCredentialRequest {
                name: prod_env.clone(),
                grace_period: Some(prost_types::Duration { seconds: 600, nanos: 0 }),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .credential;
    w.synced().await;
    assert_eq!(w.check(&fresh, "GET", ip, "", ANY).await.outcome, O::Valid as i32);
    assert_eq!(w.check(&newer, "GET", ip, "", ANY).await.outcome, O::Valid as i32);
    w.frozen.advance(chrono::Duration::minutes(11));
    assert_eq!(w.check(&fresh, "GET", ip, "", ANY).await.outcome, O::Expired as i32);
    assert_eq!(w.check(&newer, "GET", ip, "", ANY).await.outcome, O::Valid as i32);

    // Delete: calls stop at once.
    w.keyring
        .delete_key(authed(&token, krpb::DeleteKeyRequest { name: key.clone(), etag: String::new() }))
        .await
        .unwrap();
    w.synced().await;
    assert_eq!(w.check(&newer, "GET", ip, "", ANY).await.outcome, O::NotFound as i32);
    assert_eq!(w.check(&sandbox, "GET", ip, "", ANY).await.outcome, O::NotFound as i32);
}

#[tokio::test]
async fn rate_limits_charge_all_or_nothing() {
    let (mut w, project, key, _, production) = world().await;
    let prod_env = format!("{key}/environments/production");
    let ip = "198.51.100.7";
    let project_limit = |rate: i64| krpb::UpdateProjectRequest {
        project: Some(krpb::Project {
            name: project.clone(),
            production: Some(krpb::ProjectEnvironmentLimits { rate_limit_per_second: rate, monthly_quota: 0 }),
            ..Default::default()
        }),
        update_mask: Some(FieldMask { paths: vec!["production.rate_limit_per_second".into()] }),
    };
    w.set(&prod_env, "rate_limit_per_second", |e| e.rate_limit_per_second = 3).await;
    let token = w.token.clone();
    w.keyring.update_project(authed(&token, project_limit(1))).await.unwrap();
    w.synced().await;

    // The project allows one call per second: the second and third are refused by it, with
    // when to retry, and must not use up the key's own budget of three.
    assert_eq!(w.check(&production, "GET", ip, "", ANY).await.outcome, O::Valid as i32);
    for _ in 0..2 {
        let refused = w.check(&production, "GET", ip, "", ANY).await;
        assert_eq!(
            (refused.outcome, refused.http_status, refused.retry_after_seconds),
            (O::RateLimited as i32, 429, 1)
        );
    }
    // With the project limit raised, the key has two of its three left, then refuses too.
    w.keyring.update_project(authed(&token, project_limit(100))).await.unwrap();
    w.synced().await;
    assert_eq!(w.check(&production, "GET", ip, "", ANY).await.outcome, O::Valid as i32);
    assert_eq!(w.check(&production, "GET", ip, "", ANY).await.outcome, O::Valid as i32);
    assert_eq!(w.check(&production, "GET", ip, "", ANY).await.outcome, O::RateLimited as i32);
    // Rejections for other reasons charge nothing either.
    assert_eq!(w.check(&production, "TRACE", ip, "", ANY).await.outcome, O::MethodNotAllowed as i32);
    // A second later the key's budget has refilled.
    w.frozen.advance(chrono::Duration::seconds(1));
    for _ in 0..3 {
        assert_eq!(w.check(&production, "GET", ip, "", ANY).await.outcome, O::Valid as i32);
    }
    assert_eq!(w.check(&production, "GET", ip, "", ANY).await.outcome, O::RateLimited as i32);
}

#[tokio::test]
async fn checks_go_on_while_keyring_is_down_and_catch_up_after() {
    let (mut w, project, key, _, production) = world().await;
    let ip = "198.51.100.7";
    let upstream = common::envoy::echo_upstream().await;
    let (_envoy, port) = common::envoy::start_envoy(&w, &project, upstream).await;

    // Checks run through CheckKey and Envoy while keyring goes away and stays away: every one is
    // answered, from memory, and the staleness shows.
    let load = common::envoy::Load::start(&w, port, &production, ip);
    load.wait_for("checks to run", 20).await;
    w.stop_keyring().await;
    let shared = w.shared.clone();
    eventually("the authorizer to notice keyring is gone", std::time::Duration::from_secs(10), || {
        let connected = shared.connected.load(std::sync::atomic::Ordering::Relaxed);
        async move { (!connected).then_some(()) }
    })
    .await;
    load.wait_for("checks to go on while keyring is down", 200).await;
    assert!(w.shared.stale_for() > std::time::Duration::ZERO);
    let (_, failures) = load.finish().await;
    assert_eq!(failures, 0, "no check failed and no error reached Envoy");

    // Back again: the authorizer resumes the feed by itself and honours the next change.
    w.restart_keyring().await;
    let keyring_addr = w.keyring_config.common.listen_addr;
    w.keyring = krpb::keyring_service_client::KeyringServiceClient::new(channel(keyring_addr).await);
    w.set(&format!("{key}/environments/production"), "active", |e| e.active = false).await;
    assert_eq!(w.check(&production, "GET", ip, "", ANY).await.outcome, O::Disabled as i32);
    assert!(w.shared.connected.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(w.shared.stale_for(), std::time::Duration::ZERO);
}

/// The check port's lean stack (`Stack::Checks`): a gateway's request id comes back, none is
/// made up, a token is neither needed nor looked at, and every check is still counted and
/// timed. The management port keeps the full stack.
#[tokio::test]
async fn the_check_port_echoes_request_ids_and_still_counts_every_call() {
    let (mut w, project, _key, _sandbox, production) = world().await;
    let request = |id: Option<&str>, authorization: Option<&str>| {
        let mut request = tonic::Request::new(pb::CheckKeyRequest {
            key: production.clone(),
            project: project.clone(),
            method: "GET".into(),
            path: "/v1/things".into(),
            client_ip: "198.51.100.7".into(),
            environment: PROD as i32,
        });
        if let Some(id) = id {
            request.metadata_mut().insert("x-request-id", id.parse().unwrap());
        }
        if let Some(value) = authorization {
            request.metadata_mut().insert("authorization", value.parse().unwrap());
        }
        request
    };
    let answered_id = |response: &tonic::Response<pb::CheckKeyResponse>| {
        response.metadata().get("x-request-id").map(|v| v.to_str().unwrap().to_owned())
    };

    let echoed = w.authorizer.check_key(request(Some("gw-42.a/B"), None)).await.unwrap();
    assert_eq!(echoed.get_ref().outcome, O::Valid as i32);
    assert_eq!(answered_id(&echoed).as_deref(), Some("gw-42.a/B"));
    let none = w.authorizer.check_key(request(None, None)).await.unwrap();
    assert_eq!(answered_id(&none), None, "the check port makes no request id");
    let too_long = "x".repeat(129);
    let dropped = w.authorizer.check_key(request(Some(&too_long), None)).await.unwrap();
    assert_eq!(answered_id(&dropped), None, "an unacceptable id is dropped, not echoed");
    // A token, even a bad one, changes nothing: checks carry none.
    let with_token = w.authorizer.check_key(request(None, Some("Bearer not-a-token"))).await.unwrap();
    assert_eq!(with_token.get_ref().outcome, O::Valid as i32);

    let counted = w.metric("keyshare_rpc_calls_total").await.unwrap();
    assert!(counted >= 4.0, "checks are counted like every call: {counted}");

    // UsageService on the management port still gets a fresh request id and needs a token.
    let mut usage = w.usage().await;
    let refused = usage.query_key_usage(pb::QueryKeyUsageRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let fresh = refused.metadata().get("x-request-id").unwrap().to_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&fresh).is_ok(), "{fresh}");
}

/// The ext_authz service answers a method it does not have with UNIMPLEMENTED, saying what it
/// serves.
#[tokio::test]
async fn ext_authz_refuses_an_unknown_method_by_name() {
    let (w, ..) = world().await;
    let mut grpc = tonic::client::Grpc::new(channel(w.authorizer_addr).await);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/envoy.service.auth.v3.Authorization/Nope");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let refused = grpc.unary(tonic::Request::new(()), path, codec).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented);
    assert!(refused.message().contains("serves only Check"), "{refused:?}");
}
