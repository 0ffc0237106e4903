//! The gRPC server every service runs: its routes plus health and reflection, behind one of two
//! tower stacks ([`Stack`]), with graceful shutdown. The full stack: request id → span and
//! metrics → concurrency limit → authentication → per-call timeout. A client's `x-request-id`
//! is kept only if it is at most [`MAX_REQUEST_ID_LEN`] printable ASCII characters; otherwise
//! the call gets a fresh one, so logs, spans and responses never carry what a client chose to
//! smuggle into them. With `KEYSHARE_TLS_CERT` set the listener serves TLS (see
//! [`crate::tls`]), plaintext otherwise.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tracing::Instrument;

use crate::auth::{AuthLayer, TokenVerifier};
use crate::config::CommonConfig;
use crate::metrics::Metrics;

/// Tells health checkers whether the service can take calls.
#[derive(Clone)]
pub struct Readiness {
    reporter: HealthReporter,
    service_names: Arc<[&'static str]>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness").field("service_names", &self.service_names).finish()
    }
}

impl Readiness {
    /// SERVING or NOT_SERVING, for the whole server (`""`) and every named service alike.
    pub async fn set(&self, serving: bool) {
        let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        self.reporter.set_service_status("", status).await;
        for name in self.service_names.iter() {
            self.reporter.set_service_status(*name, status).await;
        }
    }
}

/// What a service hands to [`serve`].
pub struct ServeOptions {
    pub config: CommonConfig,
    pub metrics: Arc<Metrics>,
    pub verifier: Arc<TokenVerifier>,
    /// Whether the service is ready as soon as it listens. Services that must load state first
    /// (the authorizer's first snapshot) pass `false` and call [`Readiness::set`] later.
    pub ready_on_start: bool,
    /// gRPC paths (`/package.Service/Method`) on a hot path, such as the authorizer's checks:
    /// counted and timed like every call, but their span is at debug level, so at the usual
    /// `info` they cost no span, no log formatting and no trace export. A span per check halved
    /// CheckKey's throughput with JSON logs on (`check_key` benchmark).
    pub untraced_methods: &'static [&'static str],
    pub stack: Stack,
}

/// The tower stack a listener's calls go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// Request id (a client's, or a fresh one) → span and metrics → concurrency limit
    /// (`KEYSHARE_MAX_CONCURRENT_CALLS`) → authentication → per-call timeout
    /// (`KEYSHARE_CALL_TIMEOUT_SECS`).
    Full,
    /// For a listener whose calls answer from memory without waiting and carry no token: the
    /// authorizer's check port (CheckKey, ext_authz, health, reflection). A client's acceptable
    /// `x-request-id` is echoed, but none is made; spans and metrics as in [`Stack::Full`]. No
    /// concurrency limit, authentication or timeout: a call that never waits cannot pile up or
    /// overrun, and HTTP/2's per-connection stream limit still bounds what is in flight. The
    /// three layers cost a fifth of CheckKey's throughput at saturation (`scripts/bench check`).
    Checks,
}

impl ServeOptions {
    /// What most listeners serve with: ready at once, every call traced, the full stack.
    pub fn ready(config: CommonConfig, metrics: Arc<Metrics>, verifier: Arc<TokenVerifier>) -> Self {
        Self { config, metrics, verifier, ready_on_start: true, untraced_methods: &[], stack: Stack::Full }
    }
}

pub use crate::start::StartError;

/// A bound listener with its health reporter, before serving starts.
pub struct Bound {
    listener: TcpListener,
    addr: std::net::SocketAddr,
    readiness: Readiness,
    routes: Routes,
    /// `KEYSHARE_HEALTH_ADDR`: plaintext health of this listener, for probes that cannot speak
    /// TLS (the kubelet's gRPC probes).
    health: Option<TcpListener>,
}

/// Binds the listen address (port 0 picks a free port) and prepares health reporting.
pub async fn bind(config: &CommonConfig, grpc_service_name: &'static str) -> Result<Bound, StartError> {
    bind_services(config, &[grpc_service_name]).await
}

/// [`bind`] for a server that serves several gRPC services: health reports each of them, and
/// reflection lists them all.
pub async fn bind_services(config: &CommonConfig, grpc_service_names: &[&'static str]) -> Result<Bound, StartError> {
    crate::page::use_key(&config.page_token_key);
    let mut bound = bind_services_at(config.listen_addr, "KEYSHARE_LISTEN_ADDR", grpc_service_names).await?;
    if let Some(addr) = config.health_addr {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { what: "KEYSHARE_HEALTH_ADDR", source })?;
        bound.health = Some(listener);
    }
    Ok(bound)
}

/// [`bind_services`] on another address than `KEYSHARE_LISTEN_ADDR`, for a service with a second
/// listener; `setting` names the variable that gave `addr`, for the error.
pub async fn bind_services_at(
    addr: std::net::SocketAddr,
    setting: &'static str,
    grpc_service_names: &[&'static str],
) -> Result<Bound, StartError> {
    let bind_error = |source| StartError::Bind { what: setting, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let (reporter, health) = tonic_health::server::health_reporter();
    let readiness = Readiness { reporter, service_names: grpc_service_names.into() };
    readiness.set(false).await;
    Ok(Bound { listener, addr, readiness, routes: Routes::new(health), health: None })
}

impl Bound {
    /// The bound address (the real port when port 0 was asked for).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// Serves `routes` until `shutdown` completes. Then it reports NOT_SERVING at once but goes
    /// on answering for `drain_delay`, while load balancers and Kubernetes endpoints notice and
    /// send new calls elsewhere; then it stops accepting connections and lets in-flight calls
    /// finish (at most `shutdown_grace`).
    pub async fn serve(
        self,
        options: ServeOptions,
        add_services: impl FnOnce(Routes) -> Routes,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Bound { listener, readiness, routes, health, .. } = self;
        // TLS when `KEYSHARE_TLS_CERT` is set (and mTLS with `KEYSHARE_TLS_CLIENT_CA`); the
        // files were checked when the configuration was read.
        let tls = options.config.tls.server_config().map_err(|e| ServeError::Tls(e.to_string()))?;
        // Advertise only this server's services (the ones it was bound for) and health; the
        // descriptor sets hold every Keyshare API and the google.rpc error details, so grpcurl
        // can print ErrorInfo and BadRequest.
        let reflection = || {
            readiness
                .service_names
                .iter()
                .fold(tonic_reflection::server::Builder::configure(), |builder, name| builder.with_service_name(*name))
                .with_service_name("grpc.health.v1.Health")
                .register_encoded_file_descriptor_set(keyshare_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(keyshare_proto::EXT_AUTHZ_FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .build_v1()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        let reflection_v1alpha = reflection()
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
            .build_v1alpha()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        let routes = add_services(routes).add_service(reflection_v1).add_service(reflection_v1alpha);

        let observe = ObserveLayer { metrics: options.metrics.clone(), untraced: options.untraced_methods };
        if options.ready_on_start {
            readiness.set(true).await;
        }
        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        let drain_readiness = readiness.clone();
        let drain_delay = options.config.drain_delay;
        let signal = async move {
            shutdown.await;
            // Health checkers see NOT_SERVING while calls are still answered: a load balancer
            // that has not noticed yet still gets answers rather than refused connections.
            drain_readiness.set(false).await;
            if !drain_delay.is_zero() {
                tracing::info!(
                    drain_delay_secs = drain_delay.as_secs_f64(),
                    "shutting down: not serving, still answering"
                );
                tokio::time::sleep(drain_delay).await;
            }
            tracing::info!("shutting down: draining in-flight calls");
            let _ = stopping_tx.send(());
        };
        // The two stacks make routers of different types; each is served the same way.
        macro_rules! serve_router {
            ($router:expr) => {{
                let router = $router;
                let server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> = match tls {
                    Some(tls) => Box::pin(
                        router.serve_with_incoming_shutdown(crate::tls::accept(incoming(listener), tls), signal),
                    ),
                    None => Box::pin(router.serve_with_incoming_shutdown(incoming(listener), signal)),
                };
                server
            }};
        }
        let server = match options.stack {
            Stack::Full => {
                let layers = ServiceBuilder::new()
                    .layer(SanitizeRequestIdLayer)
                    .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                    .layer(PropagateRequestIdLayer::x_request_id())
                    .layer(observe)
                    .layer(GlobalConcurrencyLimitLayer::new(options.config.max_concurrent_calls))
                    .layer(AuthLayer::new(options.verifier.clone()));
                serve_router!(Server::builder().timeout(options.config.call_timeout).layer(layers).add_routes(routes))
            }
            Stack::Checks => {
                let layers = ServiceBuilder::new()
                    .layer(SanitizeRequestIdLayer)
                    .layer(PropagateRequestIdLayer::x_request_id())
                    .layer(observe);
                serve_router!(Server::builder().layer(layers).add_routes(routes))
            }
        };
        // Plaintext health (nothing but grpc.health.v1) for as long as the server runs.
        let health = health.map(|listener| {
            let service = tonic_health::server::HealthService::from_health_reporter(readiness.reporter.clone());
            let health = Server::builder()
                .add_service(tonic_health::pb::health_server::HealthServer::new(service))
                .serve_with_incoming(incoming(listener));
            AbortOnDrop(tokio::spawn(async move {
                if let Err(e) = health.await {
                    tracing::error!(error = %e, "the health listener failed");
                }
            }))
        });
        let grace = options.config.shutdown_grace;
        let drained = async move {
            if stopping_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let result = tokio::select! {
            result = server => result.map_err(|e| ServeError::Transport(e.to_string())),
            () = drained => {
                tracing::warn!(grace_secs = grace.as_secs(), "calls still running after the shutdown grace period");
                Ok(())
            }
        };
        drop(health);
        result
    }
}

/// Stops a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("transport: {0}")]
    Transport(String),
    #[error("{0}")]
    Tls(String),
}

/// What a service binary does: telemetry and configuration from the environment (a bad value
/// exits 2 naming the variable), start, serve until SIGTERM/SIGINT, exit 0 after a clean drain.
pub async fn run<C, E, F, Fut>(
    service: &'static str,
    config: impl FnOnce(&crate::config::Env) -> Result<C, crate::config::ConfigError>,
    start: F,
) -> std::process::ExitCode
where
    F: FnOnce(C, crate::clock::SharedClock, Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = Result<tokio::task::JoinHandle<Result<(), ServeError>>, E>>,
    E: std::fmt::Display,
{
    use std::process::ExitCode;
    let env = crate::config::Env::process();
    let prepared = crate::telemetry::init(service, &env).and_then(|guard| Ok((guard, config(&env)?)));
    let (_telemetry, config) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => {
            eprintln!("{service}: {e}");
            return ExitCode::from(2);
        }
    };
    let server = match start(config, std::sync::Arc::new(crate::clock::SystemClock), Box::pin(shutdown_signal())).await
    {
        Ok(server) => server,
        Err(e) => {
            tracing::error!(error = %e, "{service} could not start");
            return ExitCode::FAILURE;
        }
    };
    match server.await {
        Ok(Ok(())) => {
            tracing::info!("{service} stopped");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "{service} server failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!(error = %e, "{service} server task failed");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stopping only when killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("received SIGTERM"),
        _ = int.recv() => tracing::info!("received SIGINT"),
    }
}

/// Opens a span per call (parented on the caller's trace context), and records the call's
/// latency and status code when its response ends.
#[derive(Clone, Debug)]
struct ObserveLayer {
    metrics: Arc<Metrics>,
    untraced: &'static [&'static str],
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe { inner, metrics: self.metrics.clone(), untraced: self.untraced }
    }
}

#[derive(Clone, Debug)]
struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
    untraced: &'static [&'static str],
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Observe<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // The URI shares the request's buffer: keeping it for the metrics copies no path.
        let uri = request.uri().clone();
        let method = uri.path();
        let request_id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default();
        macro_rules! server_span {
            ($level:expr) => {
                tracing::span!(
                    $level,
                    "grpc.server",
                    otel.name = %method.trim_start_matches('/'),
                    otel.kind = "server",
                    rpc.system = "grpc",
                    rpc.method = %method,
                    request_id = %request_id,
                    caller = tracing::field::Empty,
                    rpc.grpc.status_code = tracing::field::Empty,
                )
            };
        }
        let span = if self.untraced.contains(&method) {
            server_span!(tracing::Level::DEBUG)
        } else {
            server_span!(tracing::Level::INFO)
        };
        if !span.is_disabled() {
            crate::telemetry::set_parent_from_headers(&span, request.headers());
        }
        let recorder = Recorder { metrics: self.metrics.clone(), uri, start: Instant::now(), span: span.clone() };
        let future = inner.call(request).instrument(span);
        Box::pin(async move {
            let response = future.await?;
            // Errors that end a call before any message put grpc-status in the headers;
            // everything else puts it in the trailers, seen when the body ends.
            let header_code = response.headers().get("grpc-status").map(grpc_code);
            let (parts, body) = response.into_parts();
            let mut body = ObservedBody { inner: body, recorder: Some(recorder) };
            if let Some(code) = header_code {
                body.finish(code);
            }
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

fn grpc_code(value: &http::HeaderValue) -> tonic::Code {
    value.to_str().ok().and_then(|s| s.parse::<i32>().ok()).map(tonic::Code::from_i32).unwrap_or(tonic::Code::Unknown)
}

struct Recorder {
    metrics: Arc<Metrics>,
    /// The call's URI; its path is the gRPC method.
    uri: http::Uri,
    start: Instant,
    span: tracing::Span,
}

impl Recorder {
    fn finish(self, code: tonic::Code) {
        // Unknown paths would give metrics unbounded label values.
        let method = if code == tonic::Code::Unimplemented { "unknown" } else { self.uri.path() };
        self.span.record("rpc.grpc.status_code", code as i32);
        self.metrics.record_call(method, code, self.start.elapsed().as_secs_f64());
    }
}

/// A response body that records its call when the trailers pass or the body is dropped.
struct ObservedBody<B> {
    inner: B,
    recorder: Option<Recorder>,
}

impl<B> ObservedBody<B> {
    fn finish(&mut self, code: tonic::Code) {
        if let Some(recorder) = self.recorder.take() {
            recorder.finish(code);
        }
    }
}

impl<B> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        // The client went away before the trailers were sent.
        self.finish(tonic::Code::Cancelled);
    }
}

impl<B: Body + Unpin> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(|t| t.get("grpc-status")).map(grpc_code) {
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(tonic::Code::Internal),
            Poll::Ready(None) => self.finish(tonic::Code::Ok),
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The longest `x-request-id` a client may choose.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Whether a client's request id is kept: 1 to [`MAX_REQUEST_ID_LEN`] visible ASCII characters.
fn acceptable_request_id(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= MAX_REQUEST_ID_LEN && value.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// Drops an `x-request-id` that is not acceptable (or given more than once), so the next layer
/// makes a fresh one.
#[derive(Clone, Copy, Debug)]
struct SanitizeRequestIdLayer;

impl<S> tower::Layer<S> for SanitizeRequestIdLayer {
    type Service = SanitizeRequestId<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SanitizeRequestId { inner }
    }
}

#[derive(Clone, Debug)]
struct SanitizeRequestId<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for SanitizeRequestId<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let values = request.headers().get_all("x-request-id");
        let mut iter = values.iter();
        let keep = matches!((iter.next(), iter.next()), (Some(value), None) if acceptable_request_id(value.as_bytes()));
        if !keep {
            request.headers_mut().remove("x-request-id");
        }
        self.inner.call(request)
    }
}

/// Accepted connections with Nagle's algorithm off. gRPC writes small frames on connections
/// that carry many calls at once (a gateway's to the authorizer); with Nagle on, a response
/// written while an earlier one is unacknowledged waits for the peer's delayed ACK.
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
