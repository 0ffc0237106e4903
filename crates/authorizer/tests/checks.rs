//! CheckKey through the real gRPC API, fed by a real keyring: every outcome, and every kind of
//! change honoured by the next check once the feed has delivered it.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keyshare_proto::authorizer::v1 as pb;
use keyshare_proto::authorizer::v1::authorizer_service_client::AuthorizerServiceClient;
use keyshare_proto::identity::v1 as idpb;
use keyshare_proto::keyring::v1 as krpb;
use keyshare_runtime::clock::{Clock, FrozenClock, ManualClock};
use keyshare_runtime::config::Env;
use keyshare_runtime::credential::{Credential, Environment};
use keyshare_runtime::crypto::Sealer;
use keyshare_runtime::testkit::{TestDatabase, eventually};
use prost_types::FieldMask;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const KEYRING_SECRET: &str = "keyring-secret-for-tests-0123456789abcdef";
const AUTHORIZER_SECRET: &str = "authorizer-secret-for-tests-0123456789abc";

fn env(pairs: Vec<(&str, String)>) -> Env {
    Env::from_pairs(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)))
}

fn authed<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

struct World {
    db: TestDatabase,
    /// The authorizer's own clock: it moves only when the test moves it.
    frozen: Arc<FrozenClock>,
    keyring: krpb::keyring_service_client::KeyringServiceClient<Channel>,
    authorizer: AuthorizerServiceClient<Channel>,
    shared: Arc<keyshare_authorizer::follower::Shared>,
    token: String,
    _stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl World {
    /// Waits until the authorizer has applied every change committed so far.
    async fn synced(&self) {
        let (client, connection) = tokio_postgres::connect(&self.db.url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let newest: i64 =
            client.query_one("SELECT coalesce(max(seq), 0) FROM keyring.changes", &[]).await.unwrap().get(0);
        let shared = self.shared.clone();
        eventually("the authorizer to apply the feed", Duration::from_secs(10), || {
            let applied = shared.sequence.load(Ordering::Acquire);
            async move { (applied >= newest).then_some(()) }
        })
        .await;
    }

    async fn check(
        &mut self,
        key: &str,
        method: &str,
        ip: &str,
        project: &str,
        environment: pb::Environment,
    ) -> pb::CheckKeyResponse {
        self.authorizer
            .check_key(pb::CheckKeyRequest {
                key: key.into(),
                project: project.into(),
                method: method.into(),
                path: "/v1/things".into(),
                client_ip: ip.into(),
                environment: environment as i32,
            })
            .await
            .expect("a rejected key is an answer, never an RPC error")
            .into_inner()
    }

    async fn set(&mut self, env_name: &str, path: &str, edit: impl FnOnce(&mut krpb::KeyEnvironment)) {
        let mut environment = krpb::KeyEnvironment { name: env_name.into(), ..Default::default() };
        edit(&mut environment);
        self.keyring
            .update_key_environment(authed(
                &self.token,
                krpb::UpdateKeyEnvironmentRequest {
                    environment: Some(environment),
                    update_mask: Some(FieldMask { paths: vec![path.into()] }),
                    etag: String::new(),
                },
            ))
            .await
            .unwrap();
        self.synced().await;
    }
}

async fn world() -> (World, String, String, String, String) {
    let db = TestDatabase::create().await;
    let (_, kek) = Sealer::generate("k1");
    let clock = ManualClock::new();
    let spool = std::env::temp_dir().join(format!("authorizer-test-{}", std::process::id()));
    let base = |extra: Vec<(&'static str, String)>| {
        let mut all = vec![
            ("DATABASE_URL", db.url.clone()),
            ("KEYSHARE_LISTEN_ADDR", "127.0.0.1:0".to_owned()),
            ("KEYSHARE_METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("KEYSHARE_KEY_ENCRYPTION_KEYS", kek.clone()),
            ("KEYSHARE_MAIL_SPOOL_DIR", spool.display().to_string()),
        ];
        all.extend(extra);
        env(all)
    };
    let mut stops = Vec::new();
    let mut stopper = || {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(tx);
        async move {
            let _ = rx.await;
        }
    };
    let identity = keyshare_identity::start(
        keyshare_identity::Config::from_env(&base(vec![
            ("KEYSHARE_INTERNAL_CLIENTS", format!("keyring:{KEYRING_SECRET},authorizer:{AUTHORIZER_SECRET}")),
            ("KEYSHARE_REQUIRE_VERIFIED_EMAIL", "false".into()),
        ]))
        .unwrap(),
        clock.clone(),
        stopper(),
    )
    .await
    .unwrap()
    .addr;
    let keyring = keyshare_keyring::start(
        keyshare_keyring::Config::from_env(&base(vec![
            ("KEYSHARE_IDENTITY_URL", format!("http://{identity}")),
            ("KEYSHARE_INVITATION_URL", "http://127.0.0.1:1".into()),
            ("KEYSHARE_CLIENT_ID", "keyring".into()),
            ("KEYSHARE_CLIENT_SECRET", KEYRING_SECRET.into()),
        ]))
        .unwrap(),
        clock.clone(),
        stopper(),
    )
    .await
    .unwrap()
    .addr;

    // An account, an organization, a project and a key, before the authorizer starts.
    let mut id = idpb::identity_service_client::IdentityServiceClient::new(channel(identity).await);
    let password = "authorizer test password";
    id.create_account(idpb::CreateAccountRequest {
        email: "o@example.com".into(),
        display_name: "O".into(),
        password: password.into(),
    })
    .await
    .unwrap();
    let token = id
        .login(idpb::LoginRequest { email: "o@example.com".into(), password: password.into() })
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap()
        .access_token;
    let org = id
        .create_organization(authed(
            &token,
            idpb::CreateOrganizationRequest {
                organization: Some(idpb::Organization { display_name: "O".into(), ..Default::default() }),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .organization
        .unwrap()
        .name;
    let mut kr = krpb::keyring_service_client::KeyringServiceClient::new(channel(keyring).await);
    let project = kr
        .create_project(authed(
            &token,
            krpb::CreateProjectRequest {
                parent: org,
                project: Some(krpb::Project { display_name: "P".into(), ..Default::default() }),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .project
        .unwrap()
        .name;
    let created = kr
        .create_key(authed(
            &token,
            krpb::CreateKeyRequest {
                parent: project.clone(),
                key: Some(krpb::Key { display_name: "K".into(), ..Default::default() }),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();

    let frozen = FrozenClock::new();
    let started = keyshare_authorizer::start(
        keyshare_authorizer::Config::from_env(&base(vec![
            ("KEYSHARE_IDENTITY_URL", format!("http://{identity}")),
            ("KEYSHARE_KEYRING_URL", format!("http://{keyring}")),
            ("KEYSHARE_CLIENT_ID", "authorizer".into()),
            ("KEYSHARE_CLIENT_SECRET", AUTHORIZER_SECRET.into()),
        ]))
        .unwrap(),
        frozen.clone(),
        stopper(),
    )
    .await
    .unwrap();
    // SERVING only once the first snapshot is in memory.
    let mut health = HealthClient::new(channel(started.addr).await);
    let shared = started.shared.clone();
    eventually("the authorizer to report SERVING", Duration::from_secs(10), || {
        let mut health = health.clone();
        async move {
            let status = health.check(HealthCheckRequest { service: String::new() }).await.ok()?.into_inner().status;
            (status == ServingStatus::Serving as i32).then_some(())
        }
    })
    .await;
    assert!(shared.index.read().unwrap().credentials() >= 2, "SERVING means the snapshot is loaded");
    let _ = &mut health;
    let world = World {
        db,
        frozen,
        keyring: kr,
        authorizer: AuthorizerServiceClient::new(channel(started.addr).await),
        shared,
        token,
        _stops: stops,
    };
    let key = created.key.unwrap().name;
    (world, project, key, created.sandbox_credential, created.production_credential)
}

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
