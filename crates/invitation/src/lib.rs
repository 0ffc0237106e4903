//! Keyshare invitation service: invitations by email to an organization, a project or a key,
//! valid 7 days, accepted with a single-use token; the emails leave through the outbox.
//!
//! Layout: [`grpc`] is the adapter, [`app`] the use cases, [`domain`] the types and rules,
//! [`store`] the SQL, [`peers`] what is asked of identity and keyring, [`trace`] the trace context
//! queued calls keep.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use keyshare_proto::invitation::v1::invitation_service_server::InvitationServiceServer;
use keyshare_runtime::auth::{IdentityKeySource, TokenVerifier};
use keyshare_runtime::client::{ServiceToken, lazy_channel};
use keyshare_runtime::clock::SharedClock;
use keyshare_runtime::db;
use keyshare_runtime::mail::OutboxWorker;
use keyshare_runtime::metrics::Metrics;
pub use keyshare_runtime::server::StartError;
use keyshare_runtime::server::{self, ServeError, ServeOptions};
use keyshare_runtime::sessions::SessionRevocations;
use tokio::task::JoinHandle;

pub mod app;
pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod peers;
pub mod store;
pub mod trace;

pub use config::Config;

/// Fully qualified gRPC service name.
pub const GRPC_SERVICE: &str = "keyshare.invitation.v1.InvitationService";

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

/// Migrates, prepares and starts serving; returns once the listener is bound.
pub async fn start(
    config: Config,
    clock: SharedClock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Started, StartError> {
    let common = config.common.clone();
    db::migrate(&common.database_url, "invitation", migrations::migrations::runner()).await?;
    let pool = db::pool(&common.database_url, common.db_pool_size)?;

    let identity = lazy_channel("KEYSHARE_IDENTITY_URL", &config.identity_url, &common.tls)?;
    let keyring = lazy_channel("KEYSHARE_KEYRING_URL", &config.keyring_url, &common.tls)?;
    let verifier = TokenVerifier::new(IdentityKeySource::new(identity.clone()), config.tokens.clone(), clock.clone());
    verifier.spawn_refresh();
    let token = ServiceToken::new(identity.clone(), config.credentials.clone(), clock.clone());
    let sessions = SessionRevocations::new(clock.clone());
    sessions.follow(identity.clone(), token.clone());
    verifier.refuse_revoked_sessions(sessions.clone());
    let peers = peers::Peers::new(identity, keyring, token);

    let outbox = OutboxWorker::new(pool.clone(), "invitation", config.mail.clone());
    let waker = outbox.waker();
    let app =
        Arc::new(app::Invitations::new(pool.clone(), clock, peers, waker, config.public_url.clone(), config.validity));
    app.spawn_retries(config.call_retry);

    let metrics = Metrics::new("invitation");
    metrics.register_pool(pool);
    sessions.register_metrics(&metrics);
    let metrics_addr = metrics.bind_and_serve(common.metrics_addr).await?;
    let bound = server::bind(&common, GRPC_SERVICE).await?;
    let addr = bound.local_addr();
    let outbox_task = outbox.spawn();
    let options = ServeOptions::ready(common, metrics, verifier);
    let grpc = grpc::InvitationGrpc::new(app);
    let server = tokio::spawn(async move {
        let result =
            bound.serve(options, |routes| routes.add_service(InvitationServiceServer::new(grpc)), shutdown).await;
        outbox_task.abort();
        result
    });
    tracing::info!(%addr, %metrics_addr, mail = %config.mail.describe(), "invitation serving");
    Ok(Started { addr, metrics_addr, server })
}
