//! Prometheus metrics over HTTP (`GET /metrics` on `KEYSHARE_METRICS_ADDR`).
//!
//! Every service exports, prefixed `keyshare_` and labelled with `service`:
//! - `rpc_calls_total{method, code}`: finished calls by gRPC method and status code;
//! - `rpc_duration_seconds{method}`: call latency histogram;
//! - `db_pool_connections{state}`: pool `size`, `available` and `waiting`, read at scrape time.
//!
//! Services register their own metrics on [`Metrics::registry`] at start.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    state: &'static str,
}

type ScrapeHook = Box<dyn Fn() + Send + Sync>;

/// The service's metrics registry and the RPC metrics every service shares.
pub struct Metrics {
    registry: Mutex<Registry>,
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
    /// Handles into `calls` and `latency` by method, so a call of a method seen before records
    /// without building (allocating) its label set. Handles share the family's atomics.
    by_method: RwLock<HashMap<Box<str>, MethodMetrics>>,
    scrape_hooks: Mutex<Vec<ScrapeHook>>,
}

/// One method's latency histogram and its call counters, by status code as they appear.
struct MethodMetrics {
    latency: Histogram,
    calls: [Option<Counter>; CODES],
}

/// gRPC status codes, 0 (OK) to 16 (UNAUTHENTICATED).
const CODES: usize = 17;

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(service: &str) -> Arc<Self> {
        let mut registry = Registry::with_prefix_and_labels(
            "keyshare",
            [(std::borrow::Cow::Borrowed("service"), std::borrow::Cow::Owned(service.to_owned()))].into_iter(),
        );
        let calls = Family::<CallLabels, Counter>::default();
        registry.register("rpc_calls", "Finished gRPC calls by method and status code", calls.clone());
        let latency = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
        });
        registry.register("rpc_duration_seconds", "gRPC call latency", latency.clone());
        Arc::new(Self {
            registry: Mutex::new(registry),
            calls,
            latency,
            by_method: RwLock::default(),
            scrape_hooks: Mutex::new(Vec::new()),
        })
    }

    /// Registers more metrics. Call at start, not per request.
    pub fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `hook` before every scrape, to refresh gauges that are read rather than counted.
    pub fn on_scrape(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.scrape_hooks.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(Box::new(hook));
    }

    /// Exports the pool's size, idle connections and waiters.
    pub fn register_pool(&self, pool: deadpool_postgres::Pool) {
        let family = Family::<PoolLabels, Gauge>::default();
        self.registry().register("db_pool_connections", "Database pool connections by state", family.clone());
        self.on_scrape(move || {
            let status = pool.status();
            family.get_or_create(&PoolLabels { state: "size" }).set(status.size as i64);
            family.get_or_create(&PoolLabels { state: "available" }).set(status.available as i64);
            family.get_or_create(&PoolLabels { state: "waiting" }).set(status.waiting as i64);
            family.get_or_create(&PoolLabels { state: "max" }).set(status.max_size as i64);
        });
    }

    pub(crate) fn record_call(&self, method: &str, code: tonic::Code, seconds: f64) {
        let slot = (code as usize).min(CODES - 1);
        {
            let by_method = self.by_method.read().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(known) = by_method.get(method)
                && let Some(calls) = &known.calls[slot]
            {
                known.latency.observe(seconds);
                calls.inc();
                return;
            }
        }
        // First call of this method, or first with this code: make the series and keep handles.
        let mut by_method = self.by_method.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        let entry = by_method.entry(method.into()).or_insert_with(|| MethodMetrics {
            latency: self.latency.get_or_create(&MethodLabels { method: method.to_owned() }).clone(),
            calls: Default::default(),
        });
        let calls = entry.calls[slot].get_or_insert_with(|| {
            self.calls.get_or_create(&CallLabels { method: method.to_owned(), code: code_name(code) }).clone()
        });
        entry.latency.observe(seconds);
        calls.inc();
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        for hook in self.scrape_hooks.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).iter() {
            hook();
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry()) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// Serves `GET /metrics` on `listener` until the process ends.
    pub fn serve(self: &Arc<Self>, listener: TcpListener) {
        let metrics = self.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics listener accept failed");
                        continue;
                    }
                };
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                        let metrics = metrics.clone();
                        async move {
                            if request.uri().path() == "/metrics" {
                                http::Response::builder()
                                    .header(
                                        http::header::CONTENT_TYPE,
                                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                    )
                                    .body(Full::new(Bytes::from(metrics.encode())))
                            } else {
                                http::Response::builder()
                                    .status(http::StatusCode::NOT_FOUND)
                                    .body(Full::new(Bytes::from_static(b"not found\n")))
                            }
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }

    /// Binds `addr` (`KEYSHARE_METRICS_ADDR`) and serves; returns the bound address (useful
    /// with port 0).
    pub async fn bind_and_serve(self: &Arc<Self>, addr: SocketAddr) -> Result<SocketAddr, crate::start::StartError> {
        let bind_error = |source| crate::start::StartError::Bind { what: "KEYSHARE_METRICS_ADDR", source };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let local = listener.local_addr().map_err(bind_error)?;
        self.serve(listener);
        Ok(local)
    }
}

/// The `code` label: the status code's name as tonic spells it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_labels_are_the_codes_debug_names() {
        for number in 0..CODES as i32 {
            let code = tonic::Code::from_i32(number);
            assert_eq!(code_name(code), format!("{code:?}"));
        }
    }

    #[test]
    fn calls_are_counted_per_method_and_code() {
        let metrics = Metrics::new("test");
        metrics.record_call("/a.A/One", tonic::Code::Ok, 0.001);
        metrics.record_call("/a.A/One", tonic::Code::Ok, 0.002);
        metrics.record_call("/a.A/One", tonic::Code::NotFound, 0.003);
        metrics.record_call("/a.A/Two", tonic::Code::Ok, 0.004);
        let text = metrics.encode();
        for line in [
            r#"keyshare_rpc_calls_total{service="test",method="/a.A/One",code="Ok"} 2"#,
            r#"keyshare_rpc_calls_total{service="test",method="/a.A/One",code="NotFound"} 1"#,
            r#"keyshare_rpc_calls_total{service="test",method="/a.A/Two",code="Ok"} 1"#,
            r#"keyshare_rpc_duration_seconds_count{service="test",method="/a.A/One"} 3"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
    }
}
