//! The trace context a queued grant or removal keeps. A call usually runs inside the request
//! that queued it; when a peer was down, the retry worker runs it later, outside any request,
//! and the stored context puts it back in the trace of the request that queued it.

use std::collections::HashMap;

use opentelemetry::trace::TraceContextExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use uuid::Uuid;

/// W3C trace context (`traceparent`, `tracestate`); empty when the request was not traced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The current span's context.
    pub fn current() -> Self {
        let context = tracing::Span::current().context();
        let mut carrier = HashMap::<String, String>::new();
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.inject_context(&context, &mut carrier));
        Self {
            traceparent: carrier.remove("traceparent"),
            tracestate: carrier.remove("tracestate").filter(|state| !state.is_empty()),
        }
    }

    fn extract(&self) -> opentelemetry::Context {
        let carrier: HashMap<String, String> = [("traceparent", &self.traceparent), ("tracestate", &self.tracestate)]
            .into_iter()
            .filter_map(|(key, value)| Some((key.to_owned(), value.clone()?)))
            .collect();
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&carrier))
    }
}

/// The span a queued call runs in. Inside a request it is a child of that request; in the retry
/// worker it continues the trace of the request that queued the call. A call that another
/// request queued (a grant left over when access is revoked) is linked to that request.
pub fn call_span(invitation: Uuid, kind: &str, queued_by: &TraceContext) -> tracing::Span {
    let span = tracing::info_span!(
        "invitation.call",
        otel.name = %format!("invitation.{kind}"),
        invitation = %invitation,
        call = %kind,
    );
    let running = tracing::Span::current().context().span().span_context().clone();
    let queued = queued_by.extract();
    let queued_span = queued.span().span_context().clone();
    if !running.is_valid() {
        let _ = span.set_parent(queued);
    } else if queued_span.is_valid() && queued_span.trace_id() != running.trace_id() {
        span.add_link(queued_span);
    }
    span
}
