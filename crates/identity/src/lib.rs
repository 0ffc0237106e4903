//! Keyshare identity service: accounts, email verification, login, organizations, service
//! accounts, and the keys that sign every access token.
//!
//! Layout: [`grpc`] is the adapter (the only module that sees protobuf), [`app`] the use cases,
//! [`domain`] the validated types, [`store`] the SQL, [`keys`] the signing keys, [`revocations`]
//! the feed of ended sessions the other services follow.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use keyshare_proto::identity::v1::identity_service_server::IdentityServiceServer;
use keyshare_runtime::auth::TokenVerifier;
use keyshare_runtime::clock::SharedClock;
use keyshare_runtime::db;
use keyshare_runtime::mail::OutboxWorker;
use keyshare_runtime::metrics::Metrics;
pub use keyshare_runtime::server::StartError;
use keyshare_runtime::server::{self, ServeError, ServeOptions};
use tokio::task::JoinHandle;

pub mod app;
pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod keys;
pub mod password;
pub mod peers;
pub mod revocations;
pub mod store;

pub use config::Config;

/// Fully qualified gRPC service name.
pub const GRPC_SERVICE: &str = "keyshare.identity.v1.IdentityService";

mod migrations {
    refinery::embed_migrations!("migrations");
}

/// A service that is listening.
#[derive(Debug)]
pub struct Started {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// Ends when the server has shut down.
    pub server: JoinHandle<Result<(), ServeError>>,
}

impl From<error::Error> for StartError {
    fn from(e: error::Error) -> Self {
        StartError::Setup(e.to_string())
    }
}

/// Migrates, prepares and starts serving; returns once the listener is bound. The server runs
/// until `shutdown` completes.
pub async fn start(
    config: Config,
    clock: SharedClock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Started, StartError> {
    let common = config.common.clone();
    db::migrate(&common.database_url, "identity", migrations::migrations::runner()).await?;
    let pool = db::pool(&common.database_url, common.db_pool_size)?;

    let signing_keys = Arc::new(keys::SigningKeys::new(pool.clone(), config.sealer.clone()));
    signing_keys.ensure_initial(&clock).await?;

    let outbox = OutboxWorker::new(pool.clone(), "identity", config.mail.clone());
    let waker = outbox.waker();
    tracing::info!(mail = %config.mail.describe(), "mail outbox ready");

    let verifier = TokenVerifier::new(
        keys::DbKeySource { pool: pool.clone(), clock: clock.clone() },
        config.tokens.clone(),
        clock.clone(),
    );
    verifier.spawn_refresh();

    let keyring = keyshare_runtime::client::lazy_channel("KEYSHARE_KEYRING_URL", &config.keyring_url, &common.tls)?;
    let trust_forwarded_for = config.trust_forwarded_for;
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let revocations = revocations::Revocations::start(
        pool.clone(),
        common.database_url.clone(),
        clock.clone(),
        config.access_token_ttl,
        stopping,
    );
    let app =
        Arc::new(app::Identity::new(pool.clone(), clock, config, signing_keys, waker, peers::Keyring::new(keyring)));
    app.provision_internal_clients().await?;
    app.spawn_keyring_calls(std::time::Duration::from_secs(2));

    let metrics = Metrics::new("identity");
    metrics.register_pool(pool);
    let metrics_addr = metrics.bind_and_serve(common.metrics_addr).await?;
    let bound = server::bind(&common, GRPC_SERVICE).await?;
    let addr = bound.local_addr();

    let outbox_task = outbox.spawn();
    let options = ServeOptions::ready(common, metrics, verifier);
    let grpc = grpc::IdentityGrpc::new(app, trust_forwarded_for, revocations);
    // Streams end as soon as the server starts stopping, so the drain is not held up by them.
    let shutdown = async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    };
    let server = tokio::spawn(async move {
        let result =
            bound.serve(options, |routes| routes.add_service(IdentityServiceServer::new(grpc)), shutdown).await;
        outbox_task.abort();
        result
    });
    tracing::info!(%addr, %metrics_addr, "identity serving");
    Ok(Started { addr, metrics_addr, server })
}

/// Operator command: make a new signing key current. Tokens signed by the previous key stay
/// valid until they expire; running replicas switch to the new key within a minute.
pub async fn rotate_signing_key(config: &Config, clock: SharedClock) -> Result<String, StartError> {
    let common = &config.common;
    db::migrate(&common.database_url, "identity", migrations::migrations::runner()).await?;
    let pool = db::pool(&common.database_url, 1)?;
    Ok(keys::rotate(&pool, &config.sealer, &clock, config.access_token_ttl).await?)
}
