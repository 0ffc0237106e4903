//! TLS and mutual TLS, through real sockets: identity serving TLS with certificates made here,
//! clients made as every service makes them (`lazy_channel`), certificates renewed on disk, and
//! PostgreSQL over TLS on a private cluster with `ssl = on`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Harness, INTERNAL_SECRET, Setting, authed, reason};
use keyshare_proto::identity::v1 as pb;
use keyshare_proto::identity::v1::identity_service_client::IdentityServiceClient;
use keyshare_runtime::client::lazy_channel;
use keyshare_runtime::testkit::{PrivateCluster, SmtpServer, TestPki, eventually, served_certificate};
use keyshare_runtime::tls::{CertFiles, TlsSettings};

/// The names identity's test certificate holds; clients dial `https://127.0.0.1:…`.
const SERVER_NAMES: &[&str] = &["identity", "identity.keyshare.svc", "127.0.0.1"];

struct TlsHarness {
    harness: Harness,
    health_addr: std::net::SocketAddr,
}

impl std::ops::Deref for TlsHarness {
    type Target = Harness;

    fn deref(&self) -> &Harness {
        &self.harness
    }
}

async fn start_tls(pki: &TestPki, server: &CertFiles, mtls: bool) -> TlsHarness {
    let health_addr = std::net::SocketAddr::from(([127, 0, 0, 1], keyshare_runtime::testkit::free_port()));
    let mut settings = Setting::tls(pki, server, mtls);
    settings.push(Setting::Health(health_addr));
    TlsHarness { harness: Harness::start_with(settings).await, health_addr }
}

/// A client of the harness's identity as a service makes one: verifying the server against
/// `ca`, presenting `cert` when given.
fn client(h: &Harness, ca: &TestPki, cert: Option<&CertFiles>) -> IdentityServiceClient<tonic::transport::Channel> {
    let settings = TlsSettings { identity: cert.cloned(), client_ca: None, ca: Some(ca.ca_path()) };
    let url = format!("https://127.0.0.1:{}", h.addr.port());
    IdentityServiceClient::new(lazy_channel("KEYSHARE_IDENTITY_URL", &url, &settings).unwrap())
}

async fn list_keys(client: &mut IdentityServiceClient<tonic::transport::Channel>) -> Result<usize, tonic::Status> {
    Ok(client.list_public_keys(pb::ListPublicKeysRequest::default()).await?.into_inner().keys.len())
}

/// The connection failed (a transport error on the client's side, never a server's answer).
fn assert_refused(status: &tonic::Status, what: &str) {
    assert!(
        matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown) && reason(status).is_empty(),
        "{what}: {status:?}"
    );
}

#[tokio::test]
async fn a_tls_server_answers_tls_clients_and_refuses_plaintext() {
    let pki = TestPki::new("Keyshare test CA");
    let (server, _) = pki.issue_files("identity", SERVER_NAMES);
    let h = start_tls(&pki, &server, false).await;

    assert!(list_keys(&mut client(&h, &pki, None)).await.unwrap() >= 1);

    // Probes that cannot speak TLS ask the plaintext health listener, which serves nothing else.
    let health = tonic::transport::Channel::from_shared(format!("http://{}", h.health_addr)).unwrap().connect_lazy();
    let answer = tonic_health::pb::health_client::HealthClient::new(health.clone())
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap();
    assert_eq!(answer.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let status = list_keys(&mut IdentityServiceClient::new(health)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");

    let plaintext = tonic::transport::Channel::from_shared(format!("http://{}", h.addr)).unwrap().connect_lazy();
    let refused = list_keys(&mut IdentityServiceClient::new(plaintext)).await.unwrap_err();
    assert_refused(&refused, "plaintext or an untrusted server");

    // A client that trusts another CA does not take the server's certificate.
    let stranger = TestPki::new("Another CA");
    let refused = list_keys(&mut client(&h, &stranger, None)).await.unwrap_err();
    assert_refused(&refused, "plaintext or an untrusted server");
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_or_with_another_cas() {
    let pki = TestPki::new("Keyshare test CA");
    let (server, _) = pki.issue_files("identity", SERVER_NAMES);
    let (keyring, _) = pki.issue_files("keyring", &["keyring"]);
    let h = start_tls(&pki, &server, true).await;

    let refused = list_keys(&mut client(&h, &pki, None)).await.unwrap_err();
    assert_refused(&refused, "no certificate");

    let stranger = TestPki::new("Another CA");
    let (forged, _) = stranger.issue_files("keyring", &["keyring"]);
    let refused = list_keys(&mut client(&h, &pki, Some(&forged))).await.unwrap_err();
    assert_refused(&refused, "another CA's certificate");

    assert!(list_keys(&mut client(&h, &pki, Some(&keyring))).await.unwrap() >= 1);
}

#[tokio::test]
async fn an_internal_client_must_present_its_own_certificate() {
    let pki = TestPki::new("Keyshare test CA");
    let (server, _) = pki.issue_files("identity", SERVER_NAMES);
    let (invitation, _) = pki.issue_files("invitation", &["invitation.keyshare.svc", "invitation"]);
    let (invitation_fqdn, _) = pki.issue_files("invitation-fqdn", &["invitation.keyshare.svc.cluster.local"]);
    let (keyring, _) = pki.issue_files("keyring", &["keyring.keyshare.svc"]);
    let (lookalike, _) = pki.issue_files("lookalike", &["invitation-proxy.keyshare.svc"]);
    let h = start_tls(&pki, &server, true).await;

    // Issuing a token needs none, so any certificate of the CA will do.
    let token = client(&h, &pki, Some(&keyring))
        .issue_service_account_token(pb::IssueServiceAccountTokenRequest {
            client_id: "invitation".into(),
            client_secret: INTERNAL_SECRET.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap()
        .access_token;
    let lookup = |cert: &CertFiles| {
        let mut identity = client(&h, &pki, Some(cert));
        let request = authed(&token, pb::LookupAccountRequest { email: "nobody@example.com".into() });
        async move { identity.lookup_account(request).await }
    };

    // Its own certificate: the call is made (and finds no such account).
    for own in [&invitation, &invitation_fqdn] {
        let status = lookup(own).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    }
    // Another service's certificate, or one whose first label only starts with the client id.
    for other in [&keyring, &lookalike] {
        let status = lookup(other).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert_eq!(reason(&status), "CERTIFICATE_MISMATCH");
        assert!(status.message().contains("invitation"), "{}", status.message());
    }
}

#[tokio::test]
async fn a_renewed_server_certificate_is_served_without_a_restart() {
    let pki = TestPki::new("Keyshare test CA");
    let (server, first) = pki.issue_files("identity", SERVER_NAMES);
    let h = start_tls(&pki, &server, false).await;
    let ca_path = pki.ca_path();
    let served = || served_certificate(h.addr, "identity", &ca_path, None);
    assert_eq!(served().await.unwrap(), first.cert_der);

    // A broken renewal (a certificate without its key) keeps the loaded certificate: every
    // connection over a few reload intervals still gets the first one.
    std::fs::write(&server.cert, "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n").unwrap();
    let until = Instant::now() + 3 * keyshare_runtime::tls::RELOAD_CHECK_INTERVAL;
    while Instant::now() < until {
        assert_eq!(served().await.unwrap(), first.cert_der);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (_, second) = pki.issue_files("identity", SERVER_NAMES);
    assert_ne!(second.cert_der, first.cert_der);
    eventually("the renewed certificate to be served", Duration::from_secs(10), || async {
        (served().await.ok()? == second.cert_der).then_some(())
    })
    .await;
    // The running server still answers calls, on new connections, with the new certificate.
    assert!(list_keys(&mut client(&h, &pki, None)).await.unwrap() >= 1);
}

/// PostgreSQL with `ssl = on`, its certificate naming `localhost` only.
struct TlsDatabase {
    cluster: PrivateCluster,
    pki: TestPki,
}

impl TlsDatabase {
    fn start() -> Self {
        let pki = TestPki::new("Database CA");
        let cert = pki.issue(&["localhost"]);
        Self { cluster: PrivateCluster::start_with_tls(&cert.cert_pem, &cert.key_pem), pki }
    }

    fn url(&self, host: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{query}", self.cluster.port)
    }
}

async fn ssl_in_use(url: &str) -> Result<bool, keyshare_runtime::db::DbError> {
    let (client, connection) = keyshare_runtime::db::connect(url).await?;
    let driver = tokio::spawn(connection);
    let row = client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await?;
    drop(client);
    let _ = driver.await;
    Ok(row.get(0))
}

#[tokio::test]
async fn postgres_over_tls_verifies_the_server_as_sslmode_says() {
    let db = TlsDatabase::start();
    let ca = db.pki.ca_path().display().to_string();
    let ca_query = |mode: &str| format!("sslmode={mode}&sslrootcert={ca}");

    assert!(ssl_in_use(&db.url("localhost", &ca_query("verify-full"))).await.unwrap());
    assert!(ssl_in_use(&db.url("127.0.0.1", &ca_query("verify-ca"))).await.unwrap());
    assert!(ssl_in_use(&db.url("127.0.0.1", "sslmode=require")).await.unwrap());
    assert!(!ssl_in_use(&db.url("127.0.0.1", "sslmode=disable")).await.unwrap());

    // verify-full checks the host name: the certificate does not name 127.0.0.1.
    let err = ssl_in_use(&db.url("127.0.0.1", &ca_query("verify-full"))).await.unwrap_err();
    assert!(err.to_string().contains("DATABASE_URL"), "{err}");

    let stranger = TestPki::new("Another CA");
    let wrong_ca = format!("sslmode=verify-full&sslrootcert={}", stranger.ca_path().display());
    let err = ssl_in_use(&db.url("localhost", &wrong_ca)).await.unwrap_err();
    assert!(matches!(err, keyshare_runtime::db::DbError::Tls(_)), "{err:?}");
    assert!(err.to_string().contains("DATABASE_URL"), "{err}");
}

#[tokio::test]
async fn identity_runs_on_a_database_over_verified_tls_and_refuses_a_wrong_ca() {
    let db = TlsDatabase::start();
    let smtp = SmtpServer::start().await;
    let env = |url: String, ca: std::path::PathBuf| {
        let any_port = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        keyshare_testkit::Settings::from([
            Setting::DatabaseUrl(url),
            Setting::DatabaseCa(ca),
            Setting::Listen(any_port),
            Setting::Metrics(any_port),
            Setting::KeyEncryptionKeys(keyshare_runtime::crypto::Sealer::generate("k1").1),
            Setting::SmtpUrl(smtp.url()),
            Setting::KeyringUrl("http://127.0.0.1:1".into()),
            Setting::PoolSize(2),
        ])
        .env()
    };
    let clock = keyshare_runtime::clock::ManualClock::new();
    let url = db.url("localhost", "sslmode=verify-full");

    let stranger = TestPki::new("Another CA");
    let config = keyshare_identity::Config::from_env(&env(url.clone(), stranger.ca_path()));
    let refused = keyshare_identity::start(config.unwrap(), clock.clone(), std::future::pending::<()>()).await;
    let Err(err) = refused.map(|_| ()) else { panic!("a database with a certificate of another CA is refused") };
    let err = err.to_string();
    assert!(err.contains("DATABASE_URL"), "{err}");

    let config = keyshare_identity::Config::from_env(&env(url, db.pki.ca_path())).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = keyshare_identity::start(config, clock, async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", started.addr)).unwrap().connect_lazy();
    let keys =
        IdentityServiceClient::new(channel).list_public_keys(pb::ListPublicKeysRequest::default()).await.unwrap();
    assert!(!keys.into_inner().keys.is_empty());
    let _ = stop.send(());
}
