//! Keyshare authorizer: `CheckKey` answered from memory, fed by keyring's change feed.
//!
//! Layout: [`grpc`] is the adapter, [`check`] decides one check, [`index`] holds what the feed
//! said, [`follower`] keeps the index current.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use keyshare_proto::authorizer::v1::authorizer_service_server::AuthorizerServiceServer;
use keyshare_runtime::auth::{IdentityKeySource, TokenVerifier};
use keyshare_runtime::client::{ServiceToken, lazy_channel};
use keyshare_runtime::clock::SharedClock;
use keyshare_runtime::metrics::Metrics;
pub use keyshare_runtime::server::StartError;
use keyshare_runtime::server::{self, ServeError, ServeOptions};
use prometheus_client::metrics::gauge::Gauge;
use tokio::task::JoinHandle;

pub mod check;
pub mod config;
pub mod ext_authz;
pub mod follower;
pub mod grpc;
pub mod index;
pub mod limits;

pub use config::Config;

/// Fully qualified gRPC service name.
pub const GRPC_SERVICE: &str = "keyshare.authorizer.v1.AuthorizerService";

/// A service that is listening.
#[derive(Debug)]
pub struct Started {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub shared: Arc<follower::Shared>,
    /// Ends when the server has shut down.
    pub server: JoinHandle<Result<(), ServeError>>,
}

/// Starts serving. Health stays NOT_SERVING until the first snapshot of the feed is loaded.
pub async fn start(
    config: Config,
    clock: SharedClock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Started, StartError> {
    let common = config.common.clone();
    let identity = lazy_channel("KEYSHARE_IDENTITY_URL", &config.identity_url)?;
    let keyring = lazy_channel("KEYSHARE_KEYRING_URL", &config.keyring_url)?;
    let verifier = TokenVerifier::new(IdentityKeySource::new(identity.clone()), config.tokens.clone(), clock.clone());
    verifier.spawn_refresh();
    let token = ServiceToken::new(identity, config.credentials.clone(), clock.clone());

    let shared = Arc::new(follower::Shared::default());
    let metrics = Metrics::new("authorizer");
    register_feed_metrics(&metrics, shared.clone());
    let metrics_addr = metrics.bind_and_serve(common.metrics_addr).await?;
    let bound = server::bind(&common, GRPC_SERVICE).await?;
    let addr = bound.local_addr();
    follower::spawn(keyring, token, shared.clone(), bound.readiness());

    let options =
        ServeOptions { config: common, grpc_service_name: GRPC_SERVICE, metrics, verifier, ready_on_start: false };
    let checker = check::Checker::new(shared.clone(), clock);
    let grpc = grpc::AuthorizerGrpc::new(checker.clone());
    let envoy = ext_authz::ExtAuthz::new(checker, config.ext_authz.clone());
    let server = tokio::spawn(async move {
        bound
            .serve(
                options,
                |routes| {
                    routes.add_service(AuthorizerServiceServer::new(grpc)).add_service(AuthorizationServer::new(envoy))
                },
                shutdown,
            )
            .await
    });
    tracing::info!(%addr, %metrics_addr, "authorizer serving (ready after the first snapshot)");
    Ok(Started { addr, metrics_addr, shared, server })
}

/// `keyshare_feed_connected` (0/1), `keyshare_feed_stale_seconds` (how long checks have been
/// answered without the feed), `keyshare_feed_sequence` and `keyshare_index_credentials`.
fn register_feed_metrics(metrics: &Metrics, shared: Arc<follower::Shared>) {
    use std::sync::atomic::Ordering;
    let (connected, sequence, credentials) =
        (Gauge::<i64>::default(), Gauge::<i64>::default(), Gauge::<i64>::default());
    let stale = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    {
        let mut registry = metrics.registry();
        registry.register(
            "feed_connected",
            "Whether the keyring change feed is connected (0 while answering from a stale copy)",
            connected.clone(),
        );
        registry.register("feed_sequence", "Last change-feed sequence applied", sequence.clone());
        registry.register(
            "feed_stale_seconds",
            "Seconds since the change feed was lost (0 while connected)",
            stale.clone(),
        );
        registry.register("index_credentials", "Credentials held in memory", credentials.clone());
    }
    metrics.on_scrape(move || {
        connected.set(i64::from(shared.connected.load(Ordering::Relaxed)));
        stale.set(shared.stale_for().as_secs_f64());
        sequence.set(shared.sequence.load(Ordering::Relaxed));
        credentials.set(shared.index.read().unwrap_or_else(|p| p.into_inner()).credentials() as i64);
    });
}
