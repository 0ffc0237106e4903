//! Keyshare authorizer: `CheckKey` answered from memory, fed by keyring's change feed.
//!
//! Layout, each module depending only on those listed after it (a tidy test keeps the arrows
//! one way):
//! - adapters: [`grpc`] (CheckKey) and [`ext_authz`] (Envoy) call [`check`]; [`usage_grpc`]
//!   serves [`stats`]; [`follower`] reads keyring's change feed into [`state`];
//! - [`check`] decides one check against [`state`] and hands it to [`usage`], which counts and
//!   logs it; [`shared_limits`] syncs the limits in [`state`] with the other replicas;
//! - [`state`] holds the [`index`] and the [`limits`] arithmetic; [`stats`] reads what
//!   [`usage`] wrote, through its own store;
//! - [`model`] is the vocabulary every module speaks (outcomes, key names, check input and
//!   decision, labels) and depends on none.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use keyshare_proto::authorizer::v1::authorizer_service_server::AuthorizerServiceServer;
use keyshare_runtime::auth::{IdentityKeySource, TokenVerifier};
use keyshare_runtime::client::{ServiceToken, lazy_channel};
use keyshare_runtime::clock::SharedClock;
use keyshare_runtime::db;
use keyshare_runtime::metrics::Metrics;
pub use keyshare_runtime::server::StartError;
use keyshare_runtime::server::{self, ServeError, ServeOptions, Stack};
use keyshare_runtime::sessions::SessionRevocations;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::task::JoinHandle;

pub mod check;
pub mod config;
pub mod error;
pub mod ext_authz;
pub mod follower;
pub mod grpc;
pub mod index;
pub mod limits;
pub mod model;
pub mod shared_limits;
pub mod state;
pub mod stats;
pub mod usage;
pub mod usage_grpc;

pub use config::Config;

mod migrations {
    refinery::embed_migrations!("migrations");
}

/// Applies the authorizer's migrations to its own schema. The authorizer starts and answers
/// checks without its database; its usage writer calls this (with retries) before writing.
pub async fn migrate(database_url: &str) -> Result<(), db::DbError> {
    db::migrate(database_url, "authorizer", migrations::migrations::runner()).await
}

/// Fully qualified gRPC service name.
pub const GRPC_SERVICE: &str = "keyshare.authorizer.v1.AuthorizerService";

/// Envoy's external authorization service, served next to [`GRPC_SERVICE`] on the check port.
pub const EXT_AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";

/// The checks gateways make on every request: CheckKey and Envoy's ext_authz. Counted and timed
/// like every call, but traced only at debug level (see `ServeOptions::untraced_methods`).
pub const CHECK_METHODS: &[&str] =
    &["/keyshare.authorizer.v1.AuthorizerService/CheckKey", "/envoy.service.auth.v3.Authorization/Check"];

/// A service that is listening.
#[derive(Debug)]
pub struct Started {
    /// The check port: CheckKey and ext_authz, for gateways.
    pub addr: SocketAddr,
    /// The management port: UsageService.
    pub management_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub shared: Arc<state::Shared>,
    /// Ends when both listeners have shut down and the usage writer has written what it held.
    pub server: JoinHandle<Result<(), ServeError>>,
}

/// Starts serving on two listeners: the check port (CheckKey, ext_authz), whose health stays
/// NOT_SERVING until the first snapshot of the feed is loaded, and the management port
/// (UsageService). Both serve health and reflection, and both drain on `shutdown`.
pub async fn start(
    config: Config,
    clock: SharedClock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Started, StartError> {
    let common = config.common.clone();
    let identity = lazy_channel("KEYSHARE_IDENTITY_URL", &config.identity_url, &common.tls)?;
    let keyring = lazy_channel("KEYSHARE_KEYRING_URL", &config.keyring_url, &common.tls)?;
    let verifier = TokenVerifier::new(IdentityKeySource::new(identity.clone()), config.tokens.clone(), clock.clone());
    verifier.spawn_refresh();
    let token = ServiceToken::new(identity.clone(), config.credentials.clone(), clock.clone());
    // Only UsageService takes people's tokens; checks carry none.
    let sessions = SessionRevocations::new(clock.clone());
    sessions.follow(identity, token.clone());
    verifier.refuse_revoked_sessions(sessions.clone());

    // Connections are made lazily: the authorizer starts and answers checks without PostgreSQL.
    let pool = db::pool(&common.database_url, common.db_pool_size)?;
    let shared = Arc::new(state::Shared::default());
    let metrics = Metrics::new("authorizer");
    metrics.register_pool(pool.clone());
    sessions.register_metrics(&metrics);
    register_feed_metrics(&metrics, shared.clone());
    register_limit_metrics(&metrics, shared.clone());
    shared_limits::spawn(config.shared_limits.clone(), shared.clone(), clock.clone())?;
    let metrics_addr = metrics.bind_and_serve(common.metrics_addr).await?;
    let (recorder, writer) =
        usage::channel(pool.clone(), common.database_url.clone(), shared.clone(), clock.clone(), config.usage.clone());
    register_usage_metrics(&metrics, &writer.metrics());
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let usage_writer = tokio::spawn(writer.run(stopping));
    // One shutdown for both listeners.
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = shutdown_tx.send(true);
    });
    let shutdown = move || {
        let mut shutdown_rx = shutdown_rx.clone();
        async move {
            let _ = shutdown_rx.wait_for(|stop| *stop).await;
        }
    };
    let gateway = server::bind_services(&common, &[GRPC_SERVICE, EXT_AUTHZ_SERVICE]).await?;
    let management =
        server::bind_services_at(config.management_addr, "KEYSHARE_MANAGEMENT_ADDR", &[usage_grpc::GRPC_SERVICE])
            .await?;
    let (addr, management_addr) = (gateway.local_addr(), management.local_addr());
    follower::spawn(keyring.clone(), token, shared.clone(), gateway.readiness());

    let options = |ready_on_start, stack| ServeOptions {
        config: common.clone(),
        metrics: metrics.clone(),
        verifier: verifier.clone(),
        ready_on_start,
        untraced_methods: CHECK_METHODS,
        stack,
    };
    let checker = check::Checker::new(shared.clone(), clock.clone(), recorder);
    let grpc = grpc::AuthorizerGrpc::new(checker.clone());
    let envoy = ext_authz::ExtAuthz::new(checker, config.ext_authz.clone());
    let usage_api = usage_grpc::UsageGrpc::new(stats::Stats::new(
        pool.clone(),
        stats::access::Access::new(keyring.clone()),
        clock.clone(),
    ));
    // Checks answer from memory and carry no token: the check port's lean stack.
    let checks = gateway.serve(
        options(false, Stack::Checks),
        |routes| {
            routes
                .add_service(AuthorizerServiceServer::new(grpc))
                .add_service(ext_authz::AuthorizationServer::new(envoy))
        },
        shutdown(),
    );
    // Statistics need no snapshot: the management port is ready at once.
    let statistics =
        management.serve(options(true, Stack::Full), |routes| routes.add_service(usage_api.into_server()), shutdown());
    let server = tokio::spawn(async move {
        let (checks, statistics) = tokio::join!(checks, statistics);
        // The usage writer writes what it holds once no check can arrive any more.
        let _ = stopping_tx.send(true);
        let _ = usage_writer.await;
        checks.and(statistics)
    });
    tracing::info!(%addr, %management_addr, %metrics_addr, "authorizer serving (checks ready after the first snapshot)");
    Ok(Started { addr, management_addr, metrics_addr, shared, server })
}

/// The usage writer's `keyshare_usage_*` counters.
fn register_usage_metrics(metrics: &Metrics, usage: &usage::UsageMetrics) {
    let mut registry = metrics.registry();
    registry.register(
        "usage_dropped_records",
        "Check records dropped whole because the usage channel was full",
        usage.dropped_records.clone(),
    );
    registry.register(
        "usage_dropped_call_logs",
        "Call-log lines dropped because the usage buffer was full, in lines or bytes (their counts were kept)",
        usage.dropped_call_logs.clone(),
    );
    registry.register(
        "usage_dropped_counts",
        "Check counts dropped because the counts held unwritten reached KEYSHARE_USAGE_COUNTS_BYTES",
        usage.dropped_counts.clone(),
    );
    registry.register(
        "usage_buffered_bytes",
        "Bytes of call-log lines held in memory, against KEYSHARE_USAGE_BUFFER_BYTES",
        usage.buffered_bytes.clone(),
    );
    registry.register("usage_written_call_logs", "Call-log lines written", usage.written_call_logs.clone());
    registry.register(
        "usage_failed_writes",
        "Usage writes that failed and will be retried",
        usage.failed_writes.clone(),
    );
    registry.register(
        "usage_buffered_call_logs",
        "Call-log lines waiting to be written",
        usage.buffered_call_logs.clone(),
    );
    registry.register(
        "usage_sampled_out_call_logs",
        "VALID calls left out of the call log by KEYSHARE_CALL_LOG_SAMPLE (counted all the same)",
        usage.sampled_out_call_logs.clone(),
    );
}

/// `keyshare_limits_shared` (0/1: sharing through the store right now),
/// `keyshare_limits_replicas`, `keyshare_limits_fallback_grants_total` and
/// `keyshare_limits_sync_failures_total`.
fn register_limit_metrics(metrics: &Metrics, shared: Arc<state::Shared>) {
    use std::sync::atomic::Ordering;
    let (connected, replicas) = (Gauge::<i64>::default(), Gauge::<i64>::default());
    let (fallback, failures) = (Counter::<u64>::default(), Counter::<u64>::default());
    {
        let mut registry = metrics.registry();
        registry.register(
            "limits_shared",
            "Whether rate limits and quotas are being shared through the store (0: per-replica share)",
            connected.clone(),
        );
        registry.register("limits_replicas", "Replicas sharing limits, at the last heartbeat", replicas.clone());
        registry.register(
            "limits_fallback_grants",
            "Calls granted as this replica's share of a limit while the shared store was away",
            fallback.clone(),
        );
        registry.register(
            "limits_sync_failures",
            "Syncs of shared limits the store did not answer in time",
            failures.clone(),
        );
    }
    metrics.on_scrape(move || {
        let sharing = &shared.sharing;
        connected.set(i64::from(sharing.enabled() && sharing.connected()));
        replicas.set(if sharing.enabled() { i64::from(sharing.replicas()) } else { 1 });
        for (counter, value) in [(&fallback, &sharing.fallback_grants), (&failures, &sharing.sync_failures)] {
            let (value, exported) = (value.load(Ordering::Relaxed), counter.get());
            if value > exported {
                counter.inc_by(value - exported);
            }
        }
    });
}

/// `keyshare_feed_connected` (0/1), `keyshare_feed_stale_seconds` (how long checks have been
/// answered without the feed), `keyshare_feed_sequence`, `keyshare_index_credentials` and
/// `keyshare_checks_total{outcome}`.
fn register_feed_metrics(metrics: &Metrics, shared: Arc<state::Shared>) {
    use std::sync::atomic::Ordering;
    let (connected, sequence, credentials) =
        (Gauge::<i64>::default(), Gauge::<i64>::default(), Gauge::<i64>::default());
    let stale = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    let checks = Family::<[(&'static str, &'static str); 1], Counter>::default();
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
        registry.register("checks", "Checks answered, by outcome", checks.clone());
    }
    metrics.on_scrape(move || {
        connected.set(i64::from(shared.connected.load(Ordering::Relaxed)));
        stale.set(shared.stale_for().as_secs_f64());
        sequence.set(shared.sequence.load(Ordering::Relaxed));
        credentials.set(shared.index.read().unwrap_or_else(|p| p.into_inner()).credentials() as i64);
        // Checks count into plain atomics; the exported counters catch up at each scrape.
        for (outcome, answered) in model::Outcome::ALL.iter().zip(&shared.outcomes) {
            let counter = checks.get_or_create(&[("outcome", outcome.as_str())]);
            let answered = answered.load(Ordering::Relaxed);
            let exported = counter.get();
            if answered > exported {
                counter.inc_by(answered - exported);
            }
        }
    });
}
