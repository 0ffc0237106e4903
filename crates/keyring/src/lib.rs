//! Keyshare keyring service: projects with members and limits, keys with one credential per
//! environment, sharing roles, the audit log, and the change feed the authorizer follows.
//!
//! Layout: [`grpc`] is the adapter (the only module that sees protobuf), [`app`] the use cases,
//! [`domain`] validated types and the roles matrix, [`store`] the SQL, [`feed`] the change
//! feed, [`directory`] what keyring asks identity.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use keyshare_proto::keyring::v1::keyring_service_server::KeyringServiceServer;
use keyshare_runtime::auth::{IdentityKeySource, TokenVerifier};
use keyshare_runtime::client::{ServiceToken, lazy_channel};
use keyshare_runtime::clock::SharedClock;
use keyshare_runtime::db;
use keyshare_runtime::metrics::Metrics;
pub use keyshare_runtime::server::StartError;
use keyshare_runtime::server::{self, ServeError, ServeOptions};
use keyshare_runtime::sessions::SessionRevocations;
use tokio::task::JoinHandle;

pub mod app;
pub mod config;
pub mod directory;
pub mod domain;
pub mod error;
pub mod feed;
pub mod grpc;
pub mod invitations;
pub mod store;

pub use config::Config;

/// Fully qualified gRPC service name.
pub const GRPC_SERVICE: &str = "keyshare.keyring.v1.KeyringService";

mod migrations {
    refinery::embed_migrations!("migrations");
}

/// Creates or upgrades keyring's schema in the database at `database_url`, as `start` does
/// first (tests use it to read the store without a service running).
pub async fn migrate(database_url: &str) -> Result<(), db::DbError> {
    db::migrate(database_url, "keyring", migrations::migrations::runner()).await
}

/// A service that is listening.
#[derive(Debug)]
pub struct Started {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub app: Arc<app::Keyring>,
    /// Ends when the server has shut down.
    pub server: JoinHandle<Result<(), ServeError>>,
}

/// Migrates, prepares and starts serving; returns once the listener is bound.
pub async fn start(
    config: Config,
    clock: SharedClock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Started, StartError> {
    let common = config.common.clone();
    migrate(&common.database_url).await?;
    let pool = db::pool(&common.database_url, common.db_pool_size)?;

    let identity = lazy_channel("KEYSHARE_IDENTITY_URL", &config.identity_url, &common.tls)?;
    let verifier = TokenVerifier::new(IdentityKeySource::new(identity.clone()), config.tokens.clone(), clock.clone());
    verifier.spawn_refresh();
    let token = ServiceToken::new(identity.clone(), config.credentials.clone(), clock.clone());
    let sessions = SessionRevocations::new(clock.clone());
    sessions.follow(identity.clone(), token.clone());
    verifier.refuse_revoked_sessions(sessions.clone());
    let directory = directory::Directory::new(identity, token.clone());
    let invitation = lazy_channel("KEYSHARE_INVITATION_URL", &config.invitation_url, &common.tls)?;
    let invitations = invitations::InvitationClient::new(invitation, token);
    invitations.clone().spawn_worker(pool.clone(), std::time::Duration::from_secs(2));

    let feed_wake = feed::spawn_listener(common.database_url.clone());
    spawn_pruning(pool.clone(), clock.clone(), config.feed_retention);

    let app = Arc::new(app::Keyring::new(pool.clone(), clock, config.sealer.clone(), directory, invitations));
    let metrics = Metrics::new("keyring");
    metrics.register_pool(pool);
    sessions.register_metrics(&metrics);
    let metrics_addr = metrics.bind_and_serve(common.metrics_addr).await?;
    let bound = server::bind(&common, GRPC_SERVICE).await?;
    let addr = bound.local_addr();
    let options = ServeOptions::ready(common, metrics, verifier);
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    };
    let grpc = grpc::KeyringGrpc::new(app.clone(), feed_wake, stopping);
    let server = tokio::spawn(async move {
        bound.serve(options, |routes| routes.add_service(KeyringServiceServer::new(grpc)), shutdown).await
    });
    tracing::info!(%addr, %metrics_addr, "keyring serving");
    Ok(Started { addr, metrics_addr, app, server })
}

/// Prunes feed entries older than the retention once an hour.
fn spawn_pruning(pool: deadpool_postgres::Pool, clock: SharedClock, retention: std::time::Duration) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(std::time::Duration::from_secs(3600));
        loop {
            ticker.tick().await;
            let Ok(retention) = chrono::Duration::from_std(retention) else { return };
            let result = async {
                let client = pool.get().await.map_err(db::DbError::from)?;
                feed::prune(&client, clock.now() - retention).await
            }
            .await;
            match result {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "pruned the change feed"),
                Err(e) => tracing::warn!(error = %e, "pruning the change feed failed"),
            }
        }
    });
}
