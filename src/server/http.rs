//! The HTTP/JSON API beside gRPC, on the same listeners (HTTP/1.1 and HTTP/2, TLS and the
//! Unix socket), for services that have no gRPC stub: shell scripts, JVM, .NET and Node.
//!
//! `POST /api/v1/token` takes the request of NAV's token sidecar texas
//! (`identity_provider`, `target`, `resource`, `skip_cache`, `authorization_details`) plus
//! the fields a GetAccessToken request has beyond it; `POST /api/v1/grant` gives a signed
//! grant for callers that post to Maskinporten themselves. docs/openapi.yaml describes both.
//!
//! A request is turned into its gRPC message and handed to the same service method, so
//! identification, validation, policy, rate limit, cache and audit are the gRPC call's
//! own. Before that, the checks the gRPC gate makes ([`Door`]) are made here in JSON
//! terms: a caller no rule names is refused before its body is read; the body must be
//! JSON or a form (texas takes both), at most [`MAX_REQUEST_BYTES`], within the shared
//! budget, and arrive within `request_timeout`. Errors are OAuth2-style `{"error", "error_description"}` with the
//! HTTP status `status::http_status` gives the gRPC code; a refusal from Maskinporten
//! passes through with its own `error`, `error_description` and hint.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedSemaphorePermit;
use tonic::{Status, metadata::MetadataMap};
use tonic_types::StatusExt;

use crate::{
    agent::unix_now,
    config::MAX_REQUEST_BYTES,
    grant::GrantField,
    proto::{
        GetAccessTokenRequest, GrantParameters, SignGrantRequest, grant_agent_server::GrantAgent,
    },
};

use super::{
    caller::{Caller, Peer},
    gate::{Door, Stop, content_type},
    service::GrantAgentService,
    status,
    trace::HttpRoute,
};

type Body = axum::body::Body;
type Response = http::Response<Body>;

/// Where texas's token request is answered.
pub(super) const TOKEN_PATH: &str = "/api/v1/token";
/// Where a signed grant is answered.
pub(super) const GRANT_PATH: &str = "/api/v1/grant";

/// The one `identity_provider` the agent serves.
const IDENTITY_PROVIDER: &str = "maskinporten";

/// The JSON API: the GrantAgent service, and the door its gRPC calls pass.
#[derive(Clone)]
pub(super) struct HttpApi {
    service: GrantAgentService,
    door: Door,
}

impl HttpApi {
    pub(super) fn new(service: GrantAgentService, door: Door) -> Self {
        HttpApi { service, door }
    }

    /// Adds the API's routes to `router`; a path that is neither gRPC nor the API gets a
    /// JSON 404 (gRPC clients still get UNIMPLEMENTED).
    pub(super) fn route(self, router: axum::Router) -> axum::Router {
        use axum::routing::post;
        let token = self.clone();
        let grant = self;
        router
            .route(
                TOKEN_PATH,
                post(move |request: http::Request<Body>| async move {
                    token.answer(Call::Token, request).await
                }),
            )
            .route(
                GRANT_PATH,
                post(move |request: http::Request<Body>| async move {
                    grant.answer(Call::Grant, request).await
                }),
            )
    }

    /// One request, from the door to the JSON answer.
    async fn answer(&self, call: Call, request: http::Request<Body>) -> Response {
        let (parts, body) = request.into_parts();
        let peer = parts
            .extensions
            .get::<Peer>()
            .cloned()
            .unwrap_or_else(|| Peer::new(Caller::plain(false), ""));
        let read = match self.read(&parts.headers, &peer, body).await {
            Ok(read) => read,
            Err(stop) => return self.refuse(call, &peer, &stop),
        };
        let params = match self.parameters(&read.0, read.2, &peer) {
            Ok(params) => params,
            Err(stop) => return self.refuse(call, &peer, &stop),
        };
        drop(read);
        // The headers become the call's metadata: a `traceparent` continues the caller's
        // trace as it does over gRPC.
        let metadata = MetadataMap::from_headers(parts.headers);
        let mut extensions = parts.extensions;
        let _ = extensions.insert(HttpRoute(call.path()));
        match call {
            Call::Token => {
                let message = GetAccessTokenRequest {
                    grant: Some(params.grant),
                    force_refresh: params.skip_cache,
                };
                let request = tonic::Request::from_parts(metadata, extensions, message);
                match self.service.get_access_token(request).await {
                    Ok(answer) => token_answer(answer.into_inner()),
                    Err(status) => error_answer(&status),
                }
            }
            Call::Grant => {
                let message = SignGrantRequest {
                    grant: Some(params.grant),
                };
                let request = tonic::Request::from_parts(metadata, extensions, message);
                match self.service.sign_grant(request).await {
                    Ok(answer) => json(StatusCode::OK, &GrantAnswer::from(answer.into_inner())),
                    Err(status) => error_answer(&status),
                }
            }
        }
    }

    /// The caller check, the content type and the body, whole, within the size, the budget
    /// and `request_timeout`; the bytes hold their share of the budget until dropped.
    async fn read(
        &self,
        headers: &HeaderMap,
        peer: &Peer,
        body: Body,
    ) -> Result<(Bytes, Option<OwnedSemaphorePermit>, Format), Stop> {
        self.door.knows(peer)?;
        let (content_type, media) = content_type(headers);
        let format = if media.eq_ignore_ascii_case("application/json") {
            Format::Json
        } else if media.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            Format::Form
        } else {
            return Err(Stop::invalid(
                "content_type",
                format!(
                    "content-type {content_type:?} is neither application/json nor application/x-www-form-urlencoded"
                ),
            ));
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(length) = declared.filter(|&l| l > MAX_REQUEST_BYTES as u64) {
            return Err(too_large(length));
        }
        match tokio::time::timeout(self.door.request_timeout, self.read_body(body)).await {
            Ok(read) => read.map(|(bytes, held)| (bytes, held, format)),
            Err(_elapsed) => Err(self.door.too_slow()),
        }
    }

    async fn read_body(
        &self,
        mut body: Body,
    ) -> Result<(Bytes, Option<OwnedSemaphorePermit>), Stop> {
        let mut buffer = BytesMut::new();
        let mut held = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|error| {
                Stop::invalid("malformed", format!("the request body failed: {error}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if buffer.len() + data.len() > MAX_REQUEST_BYTES {
                return Err(too_large((buffer.len() + data.len()) as u64));
            }
            self.door.hold(&mut held, data.len())?;
            buffer.extend_from_slice(&data);
        }
        Ok((buffer.freeze(), held))
    }

    /// The request's grant parameters, or a refusal naming the field at fault.
    fn parameters(&self, body: &[u8], format: Format, peer: &Peer) -> Result<Parameters, Stop> {
        let request = format.parse(body)?;
        if request.identity_provider != IDENTITY_PROVIDER {
            return Err(Stop::invalid(
                "malformed",
                format!(
                    "identity_provider: this agent serves {IDENTITY_PROVIDER:?} only, not {:?}",
                    request.identity_provider
                ),
            ));
        }
        let client_id = match request.client_id {
            Some(client_id) => client_id,
            None => self
                .door
                .policy()
                .sole_client_id(&peer.caller)
                .ok_or_else(|| {
                    Stop::invalid(
                        "malformed",
                        "client_id: missing, and the caller's policy does not fix one client_id"
                            .to_owned(),
                    )
                })?,
        };
        let authorization_details_json = match request.authorization_details {
            None | Some(serde_json::Value::Null) => String::new(),
            // A form can only carry it as text; the grant's validation reads the text.
            Some(serde_json::Value::String(text)) => text,
            Some(details) => details.to_string(),
        };
        Ok(Parameters {
            grant: GrantParameters {
                key: request.key.unwrap_or_default(),
                client_id,
                scopes: request
                    .target
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect(),
                environment: request.environment.unwrap_or_default(),
                resources: request
                    .resource
                    .map(Resources::into_vec)
                    .unwrap_or_default(),
                consumer_org: request.consumer_org.unwrap_or_default(),
                lifetime_seconds: request.lifetime_seconds.unwrap_or_default(),
                authorization_details_json,
                pid: request.pid.unwrap_or_default(),
                iss_onbehalfof: request.iss_onbehalfof.unwrap_or_default(),
            },
            skip_cache: request.skip_cache.unwrap_or(false),
        })
    }

    /// Audits and counts a refusal made here, and answers it: with the status of its
    /// gRPC code, but HTTP's own status for what only HTTP has words for.
    fn refuse(&self, call: Call, peer: &Peer, stop: &Stop) -> Response {
        self.door.refuse(call.audit_name(), peer, stop);
        let http = match stop.label {
            "content_type" => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "too_large" => StatusCode::PAYLOAD_TOO_LARGE,
            "request_timeout" => StatusCode::REQUEST_TIMEOUT,
            _ => return error_answer(&stop.status),
        };
        let answer = ErrorAnswer {
            error: "invalid_request".to_owned(),
            error_description: stop.status.message().to_owned(),
            error_uri: None,
            hint: None,
        };
        json(http, &answer)
    }
}

/// How a request body is written.
#[derive(Debug, Clone, Copy)]
enum Format {
    Json,
    /// `application/x-www-form-urlencoded`, as `curl -d name=value` sends it.
    Form,
}

impl Format {
    /// The request in `body`, or a refusal naming the field at fault.
    fn parse(self, body: &[u8]) -> Result<JsonRequest, Stop> {
        match self {
            Format::Json => {
                let mut parsed = serde_json::Deserializer::from_slice(body);
                serde_path_to_error::deserialize(&mut parsed).map_err(|e| {
                    // A syntax error has no field to name.
                    let syntax = e.inner().is_syntax() || e.inner().is_eof();
                    let path = e.path().to_string();
                    malformed(syntax.then_some("the body is not JSON"), &path, e.inner())
                })
            }
            Format::Form => {
                let parsed = serde_urlencoded::Deserializer::new(form_urlencoded::parse(body));
                serde_path_to_error::deserialize(parsed)
                    .map_err(|e| malformed(None, &e.path().to_string(), e.inner()))
            }
        }
    }
}

/// The refusal of a body that does not parse: `what` when given, else the field's
/// path (serde_path_to_error says "." for the top level, as for a missing field, and
/// "?" before any field).
fn malformed(what: Option<&str>, path: &str, error: &dyn std::fmt::Display) -> Stop {
    let field = what.unwrap_or(if path == "." || path == "?" {
        "the body"
    } else {
        path
    });
    Stop::invalid("malformed", format!("{field}: {error}"))
}

/// The API's two calls.
#[derive(Debug, Clone, Copy)]
enum Call {
    Token,
    Grant,
}

impl Call {
    fn path(self) -> &'static str {
        match self {
            Call::Token => TOKEN_PATH,
            Call::Grant => GRANT_PATH,
        }
    }

    /// The audit's name for the call, as for its gRPC twin.
    fn audit_name(self) -> &'static str {
        match self {
            Call::Token => "token",
            Call::Grant => "grant",
        }
    }
}

fn too_large(length: u64) -> Stop {
    Stop {
        label: "too_large",
        outcome: "refused",
        status: Status::resource_exhausted(format!(
            "the request body is {length} bytes or more, more than the {MAX_REQUEST_BYTES} allowed"
        )),
    }
}

/// A request body, JSON or a form: texas's fields, then GetAccessToken's. Unknown fields
/// are refused by name, as Maskinporten refuses claims it does not list, so a misspelt
/// field is found.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    identity_provider: String,
    /// Scopes, space-separated.
    target: String,
    resource: Option<Resources>,
    /// texas allows null, meaning false.
    skip_cache: Option<bool>,
    /// Given as JSON (an array of objects), or as text holding that JSON (the only way
    /// a form can carry it); sent on as it is.
    authorization_details: Option<serde_json::Value>,
    client_id: Option<String>,
    key: Option<String>,
    environment: Option<String>,
    consumer_org: Option<String>,
    pid: Option<String>,
    iss_onbehalfof: Option<String>,
    lifetime_seconds: Option<u32>,
}

/// `resource` as texas takes it (one string) or as the grant carries it (a list).
#[derive(Deserialize)]
#[serde(untagged, expecting = "a string or an array of strings")]
enum Resources {
    One(String),
    Many(Vec<String>),
}

impl Resources {
    fn into_vec(self) -> Vec<String> {
        match self {
            Resources::One(one) => vec![one],
            Resources::Many(many) => many,
        }
    }
}

/// What a JSON request becomes.
struct Parameters {
    grant: GrantParameters,
    skip_cache: bool,
}

/// texas's answer, with the token's scope.
#[derive(Serialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: i64,
    token_type: String,
    scope: String,
}

fn token_answer(token: crate::proto::GetAccessTokenResponse) -> Response {
    let answer = TokenAnswer {
        expires_in: (token.expires_at - unix_now()).max(0),
        access_token: token.access_token,
        token_type: token.token_type,
        scope: token.scope,
    };
    let mut response = json(StatusCode::OK, &answer);
    // An access token must not be kept by caches between the agent and its caller.
    let _ = response.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}

/// SignGrant's answer, field for field.
#[derive(Serialize)]
struct GrantAnswer {
    assertion: String,
    jti: String,
    issued_at: i64,
    expires_at: i64,
    algorithm: String,
    key: String,
    certificate_sha256: String,
}

impl From<crate::proto::SignGrantResponse> for GrantAnswer {
    fn from(grant: crate::proto::SignGrantResponse) -> Self {
        GrantAnswer {
            assertion: grant.assertion,
            jti: grant.jti,
            issued_at: grant.issued_at,
            expires_at: grant.expires_at,
            algorithm: grant.algorithm,
            key: grant.key,
            certificate_sha256: grant.certificate_sha256,
        }
    }
}

/// An OAuth2-style error. Maskinporten's own fields pass through when it refused.
#[derive(Serialize)]
struct ErrorAnswer {
    error: String,
    error_description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_uri: Option<String>,
    /// Maskinporten's hint for the refusal (what to check in the client's setup).
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
}

/// The error answer for a gRPC status: the HTTP status from the one table, the field
/// names in the API's terms.
fn error_answer(status: &Status) -> Response {
    let details = status.get_error_details();
    let answer = match details.error_info() {
        Some(info) if info.domain == status::MASKINPORTEN_DOMAIN => {
            let field = |name: &str| info.metadata.get(name).filter(|v| !v.is_empty()).cloned();
            ErrorAnswer {
                error: info.reason.clone(),
                error_description: field("error_description").unwrap_or_default(),
                error_uri: field("error_uri"),
                hint: field("hint"),
            }
        }
        _ => ErrorAnswer {
            error: status::oauth_error(status.code()).to_owned(),
            error_description: json_terms(status.message()),
            error_uri: None,
            hint: None,
        },
    };
    let mut response = json(status::http_status(status.code()), &answer);
    if status.code() == tonic::Code::ResourceExhausted {
        // Over the rate, or the agent busy: both clear within a second.
        let _ = response
            .headers_mut()
            .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    }
    response
}

/// A validation message names the gRPC field (`grant.scopes[1]: ...`); the JSON API's
/// caller sent `target`, so the message names that.
fn json_terms(message: &str) -> String {
    const FIELDS: [(GrantField, &str); 9] = [
        (GrantField::ClientId, "client_id"),
        (GrantField::Scopes, "target"),
        (GrantField::Environment, "environment"),
        (GrantField::Resources, "resource"),
        (GrantField::ConsumerOrg, "consumer_org"),
        (GrantField::LifetimeSeconds, "lifetime_seconds"),
        (GrantField::AuthorizationDetails, "authorization_details"),
        (GrantField::Pid, "pid"),
        (GrantField::IssOnBehalfOf, "iss_onbehalfof"),
    ];
    for (field, name) in FIELDS {
        if let Some(rest) = message.strip_prefix(field.path())
            && (rest.starts_with(':') || rest.starts_with('['))
        {
            return format!("{name}{rest}");
        }
    }
    message.to_owned()
}

fn json(status: StatusCode, value: &impl Serialize) -> Response {
    // Serializing these plain structs cannot fail; an empty object is the fallback.
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = http::Response::new(Body::from(body));
    *response.status_mut() = status;
    let _ = response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// The answer for a path no route takes: UNIMPLEMENTED for gRPC, a JSON 404 otherwise.
pub(super) async fn not_found(request: http::Request<Body>) -> Response {
    if content_type(request.headers())
        .0
        .starts_with("application/grpc")
    {
        return Status::unimplemented("").into_http::<Body>();
    }
    let answer = ErrorAnswer {
        error: "not_found".to_owned(),
        error_description: format!(
            "no such path; the JSON API is POST {TOKEN_PATH} and POST {GRANT_PATH}"
        ),
        error_uri: None,
        hint: None,
    };
    json(StatusCode::NOT_FOUND, &answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_messages_name_the_json_fields() {
        assert_eq!(
            json_terms("grant.scopes[1]: not a scope"),
            "target[1]: not a scope"
        );
        assert_eq!(json_terms("grant.client_id: empty"), "client_id: empty");
        assert_eq!(
            json_terms("grant.authorization_details_json: not JSON"),
            "authorization_details: not JSON"
        );
        assert_eq!(json_terms("key foo is not known"), "key foo is not known");
    }

    #[test]
    fn forms_carry_the_same_fields() {
        let form = Format::Form
            .parse(b"identity_provider=maskinporten&target=a%3Ab+c%3Ad&resource=https%3A%2F%2Fx%2F&skip_cache=true&lifetime_seconds=60&authorization_details=%5B%7B%22type%22%3A%22t%22%7D%5D")
            .unwrap_or_else(|stop| panic!("{}", stop.status.message()));
        assert_eq!(form.target, "a:b c:d");
        assert_eq!(form.resource.unwrap().into_vec(), ["https://x/"]);
        assert_eq!(form.skip_cache, Some(true));
        assert_eq!(form.lifetime_seconds, Some(60));
        assert_eq!(
            form.authorization_details,
            Some(serde_json::Value::String(r#"[{"type":"t"}]"#.into()))
        );
        for (body, field) in [
            (
                &b"identity_provider=maskinporten&target=a&skip_cache=maybe"[..],
                "skip_cache",
            ),
            (
                b"identity_provider=maskinporten&target=a&lifetime_seconds=-1",
                "lifetime_seconds",
            ),
            (
                b"identity_provider=maskinporten&target=a&scopes=x",
                "scopes",
            ),
            (b"target=a", "identity_provider"),
        ] {
            let Err(stop) = Format::Form.parse(body) else {
                panic!("{field} accepted");
            };
            assert!(
                stop.status.message().contains(field),
                "{}",
                stop.status.message()
            );
        }
    }

    #[test]
    fn resource_is_one_string_or_a_list() {
        let one: JsonRequest = serde_json::from_str(
            r#"{"identity_provider":"maskinporten","target":"a:b","resource":"https://x/"}"#,
        )
        .unwrap();
        assert_eq!(one.resource.unwrap().into_vec(), ["https://x/"]);
        let many: JsonRequest = serde_json::from_str(
            r#"{"identity_provider":"maskinporten","target":"a:b","resource":["r1","r2"]}"#,
        )
        .unwrap();
        assert_eq!(many.resource.unwrap().into_vec(), ["r1", "r2"]);
    }
}
