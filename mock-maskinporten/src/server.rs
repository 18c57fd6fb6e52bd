//! The HTTP side: routes, OAuth2 JSON responses, switchable faults and counters.
//!
//! Responses carry only what a client may see: the refusal's description with a fresh
//! trace id, which the log line also carries. Neither the log nor a response ever
//! holds an assertion or an access token.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use axum::{
    Extension, Router,
    body::Bytes,
    extract::State,
    http::{
        HeaderMap, HeaderValue, StatusCode,
        header::{CACHE_CONTROL, CONTENT_TYPE, PRAGMA},
    },
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};

use grant_agent::{
    agent::unix_now,
    maskinporten::{ERROR_URI_BASE, JWT_BEARER},
};

use crate::{
    accept::ConnectionAbort,
    config::WellKnown,
    refusal::{MpCode, Refusal, invalid_request},
    token::TokenSigner,
    verify::Verifier,
};

/// The longest delay fault, so a typo cannot hang a CI job for hours.
const MAX_FAULT_DELAY_MS: u64 = 600_000;

/// The shared state behind every route.
pub(super) struct Mock {
    verifier: Verifier,
    signer: TokenSigner,
    issuer: String,
    token_lifetime_seconds: u32,
    stats: Stats,
    fault: Mutex<Option<Fault>>,
}

/// Counters since start, as `/mock/stats` shows them.
#[derive(Default)]
struct Stats {
    token_requests: AtomicU64,
    tokens_issued: AtomicU64,
    refused: AtomicU64,
    faults: AtomicU64,
    /// The W3C `traceparent` header of the latest token request ("" without one), so
    /// tests can see the agent's trace reach the token endpoint.
    last_traceparent: Mutex<String>,
}

/// What a fault does to a token request.
#[derive(Debug, Clone, Copy)]
enum FaultAction {
    /// Answer with this status and an OAuth2 error body.
    Status(StatusCode),
    /// Wait, then handle the request normally.
    Delay(Duration),
    /// Close the connection without a response.
    Drop,
}

/// The active fault and how many more requests it hits (`None`: until cleared).
struct Fault {
    action: FaultAction,
    remaining: Option<u32>,
}

/// `POST /mock/faults` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    mode: FaultMode,
    status: Option<u16>,
    delay_ms: Option<u64>,
    count: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum FaultMode {
    Status,
    Delay,
    Drop,
}

impl Mock {
    /// State for a server whose issuer is `issuer`.
    pub(super) fn new(
        verifier: Verifier,
        signer: TokenSigner,
        issuer: String,
        token_lifetime_seconds: u32,
    ) -> Self {
        Mock {
            verifier,
            signer,
            issuer,
            token_lifetime_seconds,
            stats: Stats::default(),
            fault: Mutex::new(None),
        }
    }

    /// Keeps the request's W3C `traceparent` ("" without one) for `/mock/stats`.
    fn note_traceparent(&self, headers: &HeaderMap) {
        let traceparent = headers
            .get("traceparent")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        traceparent.clone_into(
            &mut self
                .stats
                .last_traceparent
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
    }

    /// The fault for the next token request, counting it down.
    fn next_fault(&self) -> Option<FaultAction> {
        let mut slot = self.fault.lock().unwrap_or_else(PoisonError::into_inner);
        let fault = slot.as_mut()?;
        let action = fault.action;
        if let Some(remaining) = &mut fault.remaining {
            *remaining = remaining.saturating_sub(1);
            if *remaining == 0 {
                *slot = None;
            }
        }
        Some(action)
    }
}

/// All routes, sharing `mock`; the metadata at the well-known paths `well_known` names
/// (any other is 404, as at an issuer that does not publish it).
pub(super) fn router(mock: Arc<Mock>, well_known: WellKnown) -> Router {
    let mut router = Router::new()
        .route("/token", post(token))
        .route("/jwks", get(jwks))
        .route("/mock/stats", get(stats))
        .route("/mock/faults", post(set_fault).delete(clear_fault));
    if well_known.rfc8414() {
        router = router.route("/.well-known/oauth-authorization-server", get(metadata));
    }
    if well_known.openid() {
        router = router.route("/.well-known/openid-configuration", get(metadata));
    }
    router.with_state(mock)
}

async fn token(
    State(mock): State<Arc<Mock>>,
    Extension(connection): Extension<ConnectionAbort>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _ = mock.stats.token_requests.fetch_add(1, Relaxed);
    mock.note_traceparent(&headers);
    if let Some(action) = mock.next_fault() {
        let _ = mock.stats.faults.fetch_add(1, Relaxed);
        tracing::info!(fault = ?action, "mock-maskinporten: injecting a fault");
        match action {
            FaultAction::Status(status) => return fault_response(status),
            FaultAction::Delay(delay) => tokio::time::sleep(delay).await,
            FaultAction::Drop => {
                connection.abort();
                // The connection task drops this request with the connection.
                return std::future::pending().await;
            }
        }
    }
    let verdict = if is_form(&headers) {
        mock.verifier.verify(&body, unix_now())
    } else {
        Err(invalid_request(format!(
            "send grant_type={JWT_BEARER} and assertion as application/x-www-form-urlencoded"
        )))
    };
    let granted = match verdict {
        Ok(granted) => granted,
        Err(refusal) => return refused(&mock, &refusal),
    };
    let issued = mock.signer.issue(
        &mock.issuer,
        &granted,
        mock.token_lifetime_seconds,
        unix_now(),
    );
    match issued {
        Ok(access_token) => {
            let _ = mock.stats.tokens_issued.fetch_add(1, Relaxed);
            let scope = granted.scopes.join(" ");
            tracing::info!(
                client_id = %granted.client_id,
                outcome = "issued",
                scope = %scope,
                "mock-maskinporten: token request"
            );
            token_json(
                StatusCode::OK,
                &json!({
                    "access_token": access_token,
                    "token_type": "Bearer",
                    "expires_in": mock.token_lifetime_seconds,
                    "scope": scope,
                }),
            )
        }
        Err(e) => {
            tracing::error!(
                client_id = %granted.client_id,
                error = %e,
                "mock-maskinporten: cannot sign an access token"
            );
            token_json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({
                    "error": "server_error",
                    "error_description": with_trace_id("the mock could not sign the access token"),
                }),
            )
        }
    }
}

/// Whether the request's body is a form, as RFC 6749 asks of a token request.
fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

fn refused(mock: &Mock, refusal: &Refusal) -> Response {
    let _ = mock.stats.refused.fetch_add(1, Relaxed);
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    tracing::info!(
        client_id = refusal.client_id.as_deref().unwrap_or("-"),
        outcome = "refused",
        error = refusal.error.as_str(),
        mp_code = refusal.code.map_or("-", MpCode::as_str),
        reason = %refusal.description,
        trace_id = %trace_id,
        "mock-maskinporten: token request"
    );
    let mut body = json!({
        "error": refusal.error.as_str(),
        "error_description": format!("{} (trace_id: {trace_id})", refusal.description),
    });
    if let Some(code) = refusal.code {
        body["error_uri"] = Value::from(format!("{ERROR_URI_BASE}{}", code.as_str()));
    }
    token_json(StatusCode::BAD_REQUEST, &body)
}

fn fault_response(status: StatusCode) -> Response {
    let error = if status == StatusCode::SERVICE_UNAVAILABLE {
        "temporarily_unavailable"
    } else {
        "server_error"
    };
    let description = format!("fault injected by the mock (HTTP {})", status.as_u16());
    token_json(
        status,
        &json!({"error": error, "error_description": with_trace_id(&description)}),
    )
}

fn with_trace_id(description: &str) -> String {
    format!(
        "{description} (trace_id: {})",
        uuid::Uuid::new_v4().simple()
    )
}

/// A token endpoint response, which must not be cached (RFC 6749 section 5.1).
fn token_json(status: StatusCode, body: &Value) -> Response {
    let mut response = json_response(status, body);
    let headers = response.headers_mut();
    let _ = headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let _ = headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body.to_string(),
    )
        .into_response()
}

async fn jwks(State(mock): State<Arc<Mock>>) -> Response {
    json_response(StatusCode::OK, mock.signer.jwks())
}

async fn metadata(State(mock): State<Arc<Mock>>) -> Response {
    let endpoint = |path: &str| {
        if mock.issuer.ends_with('/') {
            format!("{}{path}", mock.issuer)
        } else {
            format!("{}/{path}", mock.issuer)
        }
    };
    json_response(
        StatusCode::OK,
        &json!({
            "issuer": mock.issuer,
            "token_endpoint": endpoint("token"),
            "jwks_uri": endpoint("jwks"),
            "grant_types_supported": [JWT_BEARER],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS256", "RS384", "RS512"],
        }),
    )
}

async fn stats(State(mock): State<Arc<Mock>>) -> Response {
    let s = &mock.stats;
    json_response(
        StatusCode::OK,
        &json!({
            "token_requests": s.token_requests.load(Relaxed),
            "tokens_issued": s.tokens_issued.load(Relaxed),
            "refused": s.refused.load(Relaxed),
            "faults": s.faults.load(Relaxed),
            "last_traceparent": *s.last_traceparent.lock().unwrap_or_else(PoisonError::into_inner),
        }),
    )
}

async fn set_fault(State(mock): State<Arc<Mock>>, body: Bytes) -> Response {
    let fault = match parse_fault(&body) {
        Ok(fault) => fault,
        Err(problem) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": "invalid_request", "error_description": problem}),
            );
        }
    };
    let mut echo = match fault.action {
        FaultAction::Status(status) => json!({"mode": "status", "status": status.as_u16()}),
        FaultAction::Delay(delay) => json!({"mode": "delay", "delay_ms": delay.as_millis()}),
        FaultAction::Drop => json!({"mode": "drop"}),
    };
    echo["count"] = Value::from(fault.remaining.unwrap_or(0));
    tracing::info!(fault = %echo, "mock-maskinporten: fault set");
    *mock.fault.lock().unwrap_or_else(PoisonError::into_inner) = Some(fault);
    json_response(StatusCode::OK, &echo)
}

async fn clear_fault(State(mock): State<Arc<Mock>>) -> StatusCode {
    *mock.fault.lock().unwrap_or_else(PoisonError::into_inner) = None;
    tracing::info!("mock-maskinporten: faults cleared");
    StatusCode::NO_CONTENT
}

/// Reads a fault body; the error says what to fix.
fn parse_fault(body: &[u8]) -> Result<Fault, String> {
    const USAGE: &str =
        r#"send {"mode": "status"|"delay"|"drop", "status": 503, "delay_ms": 2000, "count": 3}"#;
    let request: FaultRequest =
        serde_json::from_slice(body).map_err(|e| format!("{e}; {USAGE}"))?;
    let action = match (request.mode, request.status, request.delay_ms) {
        (FaultMode::Status, status, None) => {
            let code = status.unwrap_or(503);
            match StatusCode::from_u16(code) {
                Ok(status) if (400..=599).contains(&code) => FaultAction::Status(status),
                _ => {
                    return Err(format!(
                        "status {code} is not an error status; use 400 to 599"
                    ));
                }
            }
        }
        (FaultMode::Delay, None, Some(ms)) if ms <= MAX_FAULT_DELAY_MS => {
            FaultAction::Delay(Duration::from_millis(ms))
        }
        (FaultMode::Delay, None, Some(ms)) => {
            return Err(format!(
                "delay_ms {ms} is too long; use at most {MAX_FAULT_DELAY_MS}"
            ));
        }
        (FaultMode::Delay, None, None) => return Err("mode \"delay\" needs delay_ms".into()),
        (FaultMode::Drop, None, None) => FaultAction::Drop,
        (_, Some(_), _) => return Err("status applies only to mode \"status\"".into()),
        (_, _, Some(_)) => return Err("delay_ms applies only to mode \"delay\"".into()),
    };
    Ok(Fault {
        action,
        remaining: request.count.filter(|n| *n > 0),
    })
}
