//! W3C trace context (`traceparent`, `tracestate`): taken from a request's headers,
//! carried across the token cache's single flight, and sent to the token endpoint.
//!
//! Every function here returns at once when no exporter runs ([`exporting`] is false),
//! so an agent without `[tracing]` neither parses nor sends trace headers.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Set once, when the OTLP exporter starts; never unset.
static EXPORTING: AtomicBool = AtomicBool::new(false);

pub(super) fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// Whether spans are exported: callers record trace-only attributes only then, so the
/// log layer does not format them into every request's log context.
pub(crate) fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Makes `span` continue the caller's trace when `headers` carry a W3C `traceparent`
/// (and `tracestate`). For gRPC, pass the request's metadata (`MetadataMap::as_ref`:
/// gRPC metadata is the HTTP/2 header map); for plain HTTP, the request's headers. Call
/// before the span is first entered; later the span has its trace already.
pub(crate) fn adopt_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    if !exporting() || span.is_disabled() || !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    // Fails only for a span already started or not traced: it keeps the trace it has.
    let _ = span.set_parent(parent);
}

/// Makes `span` a child of `parent` in the trace without holding `parent` open, for
/// work that outlives the request that started it (a token fetch shared by waiters).
pub(crate) fn follow(span: &tracing::Span, parent: &tracing::Span) {
    if !exporting() || span.is_disabled() {
        return;
    }
    // As in adopt_parent: only a started or untraced span refuses a parent.
    let _ = span.set_parent(parent.context());
}

/// Adds `span`'s `traceparent` (and `tracestate`) to an outgoing request's `headers`.
pub(crate) fn inject(span: &tracing::Span, headers: &mut http::HeaderMap) {
    if !exporting() || span.is_disabled() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeadersMut(headers));
}

/// Reads trace headers.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes trace headers; a value that is not a valid header is left out.
struct HeadersMut<'a>(&'a mut http::HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        let name = http::HeaderName::from_bytes(key.as_bytes());
        let value = http::HeaderValue::from_str(&value);
        if let (Ok(name), Ok(value)) = (name, value) {
            let _ = self.0.insert(name, value);
        }
    }
}
