//! The request span of each GrantAgent call, for logs and traces, and what a trace
//! records of the request.
//!
//! Logs see the span with its `request_id` (the audit line's too, so a trace and its
//! audit line can be joined). Traces also get the caller, the key, the client_id, the
//! environment, the outcome and the gRPC code, recorded only while spans are exported
//! so the log layer never formats them. Never recorded: the pid, the
//! authorization_details, the assertion, the token or the PIN.

use tracing::{Span, field::Empty};

use crate::telemetry;

/// Set by the JSON API on the requests it hands to the service: their span says HTTP, not
/// gRPC, and names the path.
#[derive(Debug, Clone, Copy)]
pub(super) struct HttpRoute(pub(super) &'static str);

/// The RPCs with a request span.
#[derive(Clone, Copy)]
pub(super) enum Method {
    SignGrant,
    GetAccessToken,
}

/// One span definition for both methods: the fields are declared empty and recorded when
/// known (a span's fields are fixed when it is made).
macro_rules! request_span {
    ($name:literal, $request_id:expr) => {
        tracing::info_span!(
            $name,
            request_id = %$request_id,
            otel.kind = Empty,
            rpc.system = Empty,
            rpc.service = Empty,
            rpc.method = Empty,
            rpc.grpc.status_code = Empty,
            http.request.method = Empty,
            url.path = Empty,
            otel.status_code = Empty,
            grant_agent.caller = Empty,
            grant_agent.key = Empty,
            grant_agent.client_id = Empty,
            grant_agent.environment = Empty,
            grant_agent.outcome = Empty,
        )
    };
}

/// The span a request runs in, continuing the caller's trace when its `headers` (the
/// gRPC metadata, or the HTTP request's headers) carry a `traceparent`; `route` when the
/// request came through the JSON API.
pub(super) fn request_span(
    method: Method,
    request_id: &str,
    headers: &http::HeaderMap,
    route: Option<&HttpRoute>,
) -> Span {
    let (span, name) = match method {
        Method::SignGrant => (request_span!("sign_grant", request_id), "SignGrant"),
        Method::GetAccessToken => (
            request_span!("get_access_token", request_id),
            "GetAccessToken",
        ),
    };
    if telemetry::exporting() {
        let _ = span.record("otel.kind", "server");
        match route {
            Some(HttpRoute(path)) => {
                let _ = span
                    .record("http.request.method", "POST")
                    .record("url.path", *path);
            }
            None => {
                let _ = span
                    .record("rpc.system", "grpc")
                    .record("rpc.service", "grantagent.v1.GrantAgent")
                    .record("rpc.method", name);
            }
        }
        telemetry::adopt_parent(&span, headers);
    }
    span
}

/// Records the caller on the current request span: known before anything is checked.
pub(super) fn note_caller(caller: &str) {
    if telemetry::exporting() {
        let _ = Span::current().record("grant_agent.caller", caller);
    }
}

/// Records what a validated request asks for on the current request span.
pub(super) fn note_request(key: &str, client_id: &str, environment: &str) {
    if telemetry::exporting() {
        let _ = Span::current()
            .record("grant_agent.key", key)
            .record("grant_agent.client_id", client_id)
            .record("grant_agent.environment", environment);
    }
}

/// Records the request's outcome (the audit line's) on the current request span.
pub(super) fn note_outcome(outcome: &'static str) {
    if telemetry::exporting() {
        let _ = Span::current().record("grant_agent.outcome", outcome);
    }
}

/// Records the gRPC code the caller gets; anything but OK marks the span failed.
pub(super) fn note_code(span: &Span, code: tonic::Code) {
    if telemetry::exporting() {
        let _ = span.record("rpc.grpc.status_code", code as i64);
        if code != tonic::Code::Ok {
            let _ = span.record("otel.status_code", "ERROR");
        }
    }
}
