//! The gate in front of `grantagent.v1.GrantAgent`: what is checked before a request's
//! message is read, and the reading itself, within bounds.
//!
//! In order, each refusal audited (rate-limited) and counted:
//!
//! | check | refusal |
//! |---|---|
//! | the connection's caller is named by some policy rule | `PERMISSION_DENIED`, body never read |
//! | `content-type` is `application/grpc[+proto]` | HTTP 415 with `INVALID_ARGUMENT` |
//! | the length prefix is at most [`MAX_REQUEST_BYTES`] | `RESOURCE_EXHAUSTED` (the gRPC spec's code for a message over the limit) |
//! | the message fits in `limits.max_buffered_request_bytes` with every other call's | `RESOURCE_EXHAUSTED`, outcome `busy` |
//! | the whole message arrives within `limits.request_timeout` | `DEADLINE_EXCEEDED` |
//! | exactly one message, complete | `INVALID_ARGUMENT` |
//! | the message decodes (checked by tonic after the gate) | `INVALID_ARGUMENT` (tonic says INTERNAL) |
//!
//! The buffered bytes are held against the budget until tonic has taken them, so the
//! request bytes the agent holds at once are bounded by the budget, not by the number
//! of callers.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Status, body::Body, server::NamedService};
use tower::{Service, ServiceExt};

use crate::{config::MAX_REQUEST_BYTES, metrics::Metrics};

use super::{
    audit::{AuditLog, Refused},
    caller::{Caller, Peer},
    policy::Policy,
};

/// Set by the service when a request reaches its handler; a failure without it came
/// from before the handler (decoding), and the gate audits it.
#[derive(Clone, Default)]
pub(crate) struct Reached(Arc<AtomicBool>);

impl Reached {
    /// Marks the request as handled by the service, which audits it from then on.
    pub(crate) fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// What every request passes before its message is read, over gRPC ([`Gate`]) and HTTP
/// (`http`) alike: the caller check, the shared budget of buffered request bytes, the
/// time a request may take to arrive, and the audit of a refusal.
#[derive(Clone)]
pub(super) struct Door {
    policy: Arc<Policy>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    budget: Arc<Semaphore>,
    pub(super) request_timeout: Duration,
}

impl Door {
    pub(super) fn new(
        policy: Arc<Policy>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
        budget_bytes: usize,
        request_timeout: Duration,
    ) -> Self {
        Door {
            policy,
            audit,
            metrics,
            budget: Arc::new(Semaphore::new(budget_bytes)),
            request_timeout,
        }
    }

    /// The policy the door checks callers against.
    pub(super) fn policy(&self) -> &Policy {
        &self.policy
    }

    /// A caller no policy rule names is refused before its body is read.
    pub(super) fn knows(&self, peer: &Peer) -> Result<(), Stop> {
        self.policy.knows(&peer.caller).map_err(|refusal| Stop {
            label: "unknown_caller",
            outcome: "denied",
            status: Status::permission_denied(refusal.to_string()),
        })
    }

    /// Takes `bytes` more of the budget, adding them to `held`; refused when the budget
    /// is spent (other callers hold it).
    pub(super) fn hold(
        &self,
        held: &mut Option<OwnedSemaphorePermit>,
        bytes: usize,
    ) -> Result<(), Stop> {
        let permits = u32::try_from(bytes).unwrap_or(u32::MAX);
        let more = Arc::clone(&self.budget)
            .try_acquire_many_owned(permits)
            .map_err(|_| Stop {
                label: "busy",
                outcome: "busy",
                status: Status::resource_exhausted(
                    "the agent is reading too many requests at once; try again",
                ),
            })?;
        match held {
            Some(permit) => permit.merge(more),
            None => *held = Some(more),
        }
        Ok(())
    }

    /// The refusal for a request whose message did not arrive within `request_timeout`.
    pub(super) fn too_slow(&self) -> Stop {
        Stop {
            label: "request_timeout",
            outcome: "refused",
            status: Status::deadline_exceeded(format!(
                "the request message did not arrive within {} s",
                self.request_timeout.as_secs()
            )),
        }
    }

    /// Counts and audits a refusal of `call` ("grant", "token", ...).
    pub(super) fn refuse(&self, call: &'static str, peer: &Peer, stop: &Stop) {
        self.metrics.request_refused(stop.label);
        self.audit.refused(Refused {
            audit: call,
            time: crate::agent::rfc3339(crate::agent::unix_now()),
            caller: peer.caller.name(),
            peer: &peer.address,
            outcome: stop.outcome,
            code: super::status::code_name(stop.status.code()),
            reason: stop.status.message().to_owned(),
            suppressed: 0,
        });
    }
}

/// The gate around the generated server `S`.
#[derive(Clone)]
pub(super) struct Gate<S> {
    inner: S,
    door: Door,
}

impl<S> Gate<S> {
    pub(super) fn new(inner: S, door: Door) -> Self {
        Gate { inner, door }
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Gate<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send + 'static>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let gate = self.clone();
        Box::pin(async move { Ok(gate.pass(request).await) })
    }
}

/// Why the gate refused, in one place: the reason's metric label, the audit outcome and
/// the code the caller gets.
pub(super) struct Stop {
    pub(super) label: &'static str,
    pub(super) outcome: &'static str,
    pub(super) status: Status,
}

impl Stop {
    pub(super) fn invalid(label: &'static str, message: String) -> Self {
        Stop {
            label,
            outcome: "refused",
            status: Status::invalid_argument(message),
        }
    }
}

impl<S> Gate<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Clone,
{
    async fn pass(self, request: http::Request<Body>) -> http::Response<Body> {
        let call = call_name(request.uri().path());
        let peer = request
            .extensions()
            .get::<Peer>()
            .cloned()
            .unwrap_or_else(|| Peer::new(Caller::plain(false), ""));
        let (mut parts, body) = request.into_parts();
        let message = match self.admit(&parts, &peer, body).await {
            Ok(message) => message,
            Err(stop) => {
                let wrong_type = stop.label == "content_type";
                self.door.refuse(call, &peer, &stop);
                let mut response = stop.status.into_http::<Body>();
                if wrong_type {
                    // gRPC over HTTP/2: a server SHOULD answer 415, so that a client
                    // that is not gRPC does not take the error for a success.
                    *response.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
                }
                return response;
            }
        };
        let reached = Reached::default();
        let _ = parts.extensions.insert(reached.clone());
        let request = http::Request::from_parts(parts, Body::new(message));
        let Ok(response) = self.inner.clone().oneshot(request).await;
        if reached.0.load(Ordering::Acquire) {
            return response;
        }
        // The handler never saw the request: tonic refused it while decoding.
        match Status::from_header_map(response.headers()) {
            Some(status) if status.code() != Code::Ok => {
                let stop = if status.code() == Code::Internal {
                    Stop::invalid(
                        "malformed",
                        format!(
                            "the request is not a valid {call} message: {}",
                            status.message()
                        ),
                    )
                } else {
                    Stop {
                        label: "malformed",
                        outcome: "refused",
                        status,
                    }
                };
                self.door.refuse(call, &peer, &stop);
                stop.status.into_http::<Body>()
            }
            _ => response,
        }
    }

    /// Everything before the message is decoded; gives the message, held against the
    /// budget.
    async fn admit(
        &self,
        parts: &http::request::Parts,
        peer: &Peer,
        body: Body,
    ) -> Result<Buffered, Stop> {
        self.door.knows(peer)?;
        let (content_type, media) = content_type(&parts.headers);
        if !matches!(media, "application/grpc" | "application/grpc+proto") {
            return Err(Stop::invalid(
                "content_type",
                format!("content-type {content_type:?} is not application/grpc"),
            ));
        }
        match tokio::time::timeout(self.door.request_timeout, self.read(body)).await {
            Ok(read) => read,
            Err(_elapsed) => Err(self.door.too_slow()),
        }
    }

    /// Reads one length-prefixed gRPC message, refusing an oversized one from its prefix.
    async fn read(&self, mut body: Body) -> Result<Buffered, Stop> {
        let mut buffer = BytesMut::new();
        let mut expected = None;
        let mut permit = None;
        loop {
            let frame = match body.frame().await {
                None => break,
                Some(Err(status)) => {
                    return Err(Stop::invalid(
                        "malformed",
                        format!("the request body failed: {}", status.message()),
                    ));
                }
                Some(Ok(frame)) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buffer.extend_from_slice(&data);
            if expected.is_none() && buffer.len() >= 5 {
                let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]);
                let length = usize::try_from(length).unwrap_or(usize::MAX);
                if length > MAX_REQUEST_BYTES {
                    return Err(Stop {
                        label: "too_large",
                        outcome: "refused",
                        status: Status::resource_exhausted(format!(
                            "the request message is {length} bytes, more than the {MAX_REQUEST_BYTES} allowed"
                        )),
                    });
                }
                let total = length + 5;
                self.door.hold(&mut permit, total)?;
                buffer.reserve(total.saturating_sub(buffer.len()));
                expected = Some(total);
            }
            if let Some(total) = expected
                && buffer.len() > total
            {
                return Err(Stop::invalid(
                    "malformed",
                    "the request holds more than one message".to_owned(),
                ));
            }
        }
        match (expected, permit) {
            (Some(total), Some(permit)) if buffer.len() == total => Ok(Buffered {
                data: Some(buffer.freeze()),
                permit: Some(permit),
            }),
            _ => Err(Stop::invalid(
                "malformed",
                "the request ended before its message did".to_owned(),
            )),
        }
    }
}

/// A request's `content-type` as sent ("" without one), and its media type without
/// parameters (`application/json` of `application/json; charset=utf-8`).
pub(super) fn content_type(headers: &http::HeaderMap) -> (&str, &str) {
    let sent = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    (sent, sent.split(';').next().unwrap_or("").trim())
}

/// The audit's name for a GrantAgent method.
fn call_name(path: &str) -> &'static str {
    match path.rsplit('/').next() {
        Some("SignGrant") => "grant",
        Some("GetAccessToken") => "token",
        Some("ListKeys") => "keys",
        _ => "call",
    }
}

/// A request message read whole, holding its share of the budget until tonic takes it.
struct Buffered {
    data: Option<Bytes>,
    permit: Option<OwnedSemaphorePermit>,
}

impl http_body::Body for Buffered {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let data = self.data.take();
        self.permit = None;
        Poll::Ready(data.map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;

    use super::*;

    #[test]
    fn calls_are_named_for_the_audit() {
        assert_eq!(call_name("/grantagent.v1.GrantAgent/SignGrant"), "grant");
        assert_eq!(
            call_name("/grantagent.v1.GrantAgent/GetAccessToken"),
            "token"
        );
        assert_eq!(call_name("/grantagent.v1.GrantAgent/ListKeys"), "keys");
        assert_eq!(call_name("/grantagent.v1.GrantAgent/Other"), "call");
    }

    #[tokio::test]
    async fn the_budget_is_held_until_the_message_is_taken() {
        let budget = Arc::new(Semaphore::new(10));
        let permit = Arc::clone(&budget).try_acquire_many_owned(8).unwrap();
        let mut body = Buffered {
            data: Some(Bytes::from_static(b"12345678")),
            permit: Some(permit),
        };
        assert_eq!(budget.available_permits(), 2);
        assert_eq!(body.size_hint().exact(), Some(8));
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"12345678"));
        assert_eq!(budget.available_permits(), 10);
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }
}
