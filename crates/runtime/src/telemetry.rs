//! Logs and traces: tracing to stdout, OpenTelemetry over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and W3C trace context carried in gRPC metadata both
//! ways (read by the server layer, written by [`traced`] and [`TraceInterceptor`] on clients).

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::env::{ConfigError, Env};

/// Log targets capped at `info` because their debug output can carry secrets.
const SECRET_BEARING_TARGETS: &[&str] =
    &["tokio_postgres=info", "lettre=info", "h2=info", "hyper=info", "hyper_util=info", "tonic=info", "tower=info"];

/// Keeps the trace exporter alive; flushes pending spans when dropped.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("flushing traces failed: {e}");
        }
    }
}

/// Installs the process-wide subscriber. Safe to call more than once (tests start several
/// services in one process): later calls keep the first subscriber.
pub fn init(service: &'static str, env: &Env) -> Result<TelemetryGuard, ConfigError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let mut filter = EnvFilter::try_new(env.get("RUST_LOG").unwrap_or_else(|| "info".into()))
        .map_err(|e| ConfigError::new("RUST_LOG", e.to_string()))?;
    // These crates log statement parameters, SMTP exchanges or HTTP/2 frames at debug level,
    // which would put tokens, password hashes and mail bodies in the log. Secrets never reach
    // a log at any level, so they are capped whatever RUST_LOG says.
    for quiet in SECRET_BEARING_TARGETS {
        filter = filter.add_directive(quiet.parse().map_err(|_| ConfigError::new("RUST_LOG", "internal directive"))?);
    }
    let json = match env.get("KEYSHARE_LOG_FORMAT").as_deref() {
        None | Some("text") => false,
        Some("json") => true,
        Some(_) => {
            return Err(ConfigError::new("KEYSHARE_LOG_FORMAT", "must be text or json"));
        }
    };
    let fmt = if json {
        tracing_subscriber::fmt::layer().json().with_current_span(true).boxed()
    } else {
        // Colour only for a person at a terminal: in a file, escape codes break `grep`.
        use std::io::IsTerminal as _;
        tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal()).boxed()
    };

    let mut guard = TelemetryGuard::default();
    let otel = match env.get("OTEL_EXPORTER_OTLP_ENDPOINT") {
        None => None,
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| ConfigError::new("OTEL_EXPORTER_OTLP_ENDPOINT", e.to_string()))?;
            let service_name = env.get("OTEL_SERVICE_NAME").unwrap_or_else(|| format!("keyshare-{service}"));
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service_name).build())
                .build();
            let tracer = provider.tracer(service);
            opentelemetry::global::set_tracer_provider(provider.clone());
            guard.provider = Some(provider);
            Some(tracing_opentelemetry::layer().with_tracer(tracer))
        }
    };
    // A second init in the same process keeps the first subscriber; that is fine.
    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init();
    Ok(guard)
}

/// Sets the parent of `span` from W3C trace context in incoming HTTP/2 headers.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    let context =
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&HeaderExtractor(headers)));
    let _ = span.set_parent(context);
}

/// A request whose metadata carries the current span's trace context.
pub fn traced<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    inject(request.metadata_mut());
    request
}

/// Writes the current span's trace context into outgoing gRPC metadata.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata))
    });
}

/// Client interceptor that adds trace context to every call.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceInterceptor;

impl tonic::service::Interceptor for TraceInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        inject(request.metadata_mut());
        Ok(request)
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}
