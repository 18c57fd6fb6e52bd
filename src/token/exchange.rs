//! One conversation with a token endpoint: the HTTPS client, endpoint discovery, the POST
//! of one grant, and reading Maskinporten's answer. Retries are the caller's business
//! (each retry needs a new grant, which only the agent can sign).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::{
    config::{EnvironmentConfig, TokenEndpoint, TokenSettings, endpoint_problem},
    fetch::{describe, read_limited},
    maskinporten, telemetry,
};

use super::{AccessToken, OAuthError, TokenError, lock};

/// Larger answers are not a token endpoint's and are cut off unread.
const MAX_ANSWER: usize = 64 * 1024;

/// Why the HTTPS client could not be set up (at start-up).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `token.ca_file` could not be read or holds no certificate.
    #[error("token.ca_file {path}: {problem}")]
    CaFile {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// The TLS or proxy settings were refused.
    #[error("token: cannot set up the HTTPS client: {0}")]
    Client(String),
}

/// What went wrong with one POST, before retries are decided.
#[derive(Debug)]
pub(super) enum Failure {
    /// A 4xx answer: the grant or the client is wrong, and a retry would fail the same way.
    Refused { status: u16, oauth: OAuthError },
    /// A 5xx answer: Maskinporten is unwell; a retry (with a new grant) may work.
    Server {
        status: u16,
        oauth: Option<OAuthError>,
    },
    /// No answer: connection refused or reset, TLS failure, a truncated body.
    Network(String),
    /// The deadline passed while waiting.
    Timeout,
    /// A 2xx answer without a usable token.
    BadAnswer(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused { status, oauth } => write!(f, "HTTP {status}: {oauth}"),
            Failure::Server {
                status,
                oauth: Some(oauth),
            } => write!(f, "HTTP {status}: {oauth}"),
            Failure::Server {
                status,
                oauth: None,
            } => write!(f, "HTTP {status}"),
            Failure::Network(detail) => write!(f, "{detail}"),
            Failure::Timeout => write!(f, "no answer before the deadline"),
            Failure::BadAnswer(detail) => write!(f, "{detail}"),
        }
    }
}

impl Failure {
    /// Whether another try (with a new grant) may succeed.
    pub(super) fn retryable(&self) -> bool {
        matches!(self, Failure::Server { .. } | Failure::Network(_))
    }

    pub(super) fn into_error(self, attempts: u32) -> TokenError {
        match self {
            Failure::Refused { status, oauth } => TokenError::Refused {
                status,
                oauth,
                attempts,
            },
            Failure::Server { status, oauth } => TokenError::Upstream {
                detail: match oauth {
                    Some(oauth) => format!("HTTP {status}: {oauth}"),
                    None => format!("HTTP {status}"),
                },
                attempts,
            },
            Failure::Network(detail) => TokenError::Upstream { detail, attempts },
            Failure::Timeout => TokenError::Deadline { attempts },
            Failure::BadAnswer(detail) => TokenError::BadAnswer(detail),
        }
    }
}

/// The HTTPS client and the endpoints found by discovery.
pub(super) struct Exchange {
    http: reqwest::Client,
    discovered: Mutex<HashMap<String, Arc<str>>>,
}

impl Exchange {
    pub(super) fn new(settings: &TokenSettings) -> Result<Self, SetupError> {
        Ok(Exchange {
            http: http_client(settings)?,
            discovered: Mutex::new(HashMap::new()),
        })
    }

    /// The token endpoint of `environment`, discovering it the first time if configured so.
    pub(super) async fn endpoint(
        &self,
        environment: &EnvironmentConfig,
        deadline: Instant,
    ) -> Result<Arc<str>, TokenError> {
        let issuer = match &environment.token_endpoint {
            TokenEndpoint::Url(url) => return Ok(Arc::from(url.as_str())),
            TokenEndpoint::Discover => environment.audience.as_str(),
        };
        if let Some(found) = lock(&self.discovered).get(issuer) {
            return Ok(Arc::clone(found));
        }
        let found: Arc<str> = Arc::from(self.discover(issuer, deadline).await?);
        tracing::info!(issuer, token_endpoint = %found, "discovered the token endpoint");
        let _ = lock(&self.discovered).insert(issuer.to_owned(), Arc::clone(&found));
        Ok(found)
    }

    /// The issuer's metadata: RFC 8414's `oauth-authorization-server` document, or, when
    /// that is absent (404 or 410), OpenID Connect Discovery's `openid-configuration`
    /// (all Skyporten publishes). Any other failure of the first (a 5xx, no answer) is
    /// reported rather than skipped: it says nothing about whether the document exists,
    /// and the next request discovers again. Either document's `issuer` must be exactly
    /// the one asked about (RFC 8414 section 3.3, OpenID Connect Discovery section 4.3),
    /// and its `token_endpoint` must pass the same checks as a configured one.
    async fn discover(&self, issuer: &str, deadline: Instant) -> Result<String, TokenError> {
        #[derive(Deserialize)]
        struct Metadata {
            issuer: String,
            token_endpoint: String,
        }
        let fail = |detail: String| TokenError::Discovery {
            issuer: issuer.to_owned(),
            detail,
        };
        let mut absent = Vec::new();
        for document in WELL_KNOWN {
            let url = well_known_url(issuer, document).map_err(fail)?;
            let (status, body) = tokio::time::timeout_at(deadline.into(), async {
                let response = self.http.get(&url).send().await.map_err(describe)?;
                let status = response.status();
                let body = read_limited(response, MAX_ANSWER).await?;
                Ok::<_, String>((status, body))
            })
            .await
            .map_err(|_| fail(format!("no answer from {url} before the deadline")))?
            .map_err(fail)?;
            if matches!(status.as_u16(), 404 | 410) {
                absent.push(url);
                continue;
            }
            if !status.is_success() {
                return Err(fail(format!("{url} answered HTTP {}", status.as_u16())));
            }
            let metadata: Metadata = serde_json::from_slice(&body)
                .map_err(|e| fail(format!("{url} is not authorization server metadata: {e}")))?;
            if metadata.issuer != issuer {
                return Err(fail(format!(
                    "{url} names issuer {:?}, not {issuer:?}; the environment's issuer must be \
                     exactly the metadata's, as the grant's aud must",
                    metadata.issuer
                )));
            }
            if let Some(problem) = endpoint_problem(&metadata.token_endpoint) {
                return Err(fail(format!("token_endpoint: {problem}")));
            }
            return Ok(metadata.token_endpoint);
        }
        Err(fail(format!(
            "no metadata: neither {} exists",
            absent.join(" nor ")
        )))
    }

    /// POSTs one grant and reads the answer, all before `deadline`, in a `token_exchange`
    /// span whose W3C `traceparent` goes with the POST when traces are exported.
    pub(super) async fn post(
        &self,
        endpoint: &str,
        assertion: &str,
        deadline: Instant,
    ) -> Result<AccessToken, Failure> {
        use tracing::{Instrument, field::Empty};
        let span = tracing::trace_span!(
            "token_exchange",
            otel.kind = "client",
            otel.status_code = Empty,
            http.request.method = "POST",
            http.response.status_code = Empty,
        );
        // Empty (and not allocated) unless traces are exported.
        let mut trace_headers = reqwest::header::HeaderMap::new();
        telemetry::inject(&span, &mut trace_headers);
        let answer = self
            .exchange(endpoint, assertion, deadline, trace_headers)
            .instrument(span.clone())
            .await;
        match &answer {
            Ok((status, _)) => {
                let _ = span.record("http.response.status_code", status);
            }
            Err(_) => {
                let _ = span.record("otel.status_code", "ERROR");
            }
        }
        let (status, body) = answer?;
        if !(200..=299).contains(&status) {
            let _ = span.record("otel.status_code", "ERROR");
        }
        read_answer(status, &body)
    }

    /// The POST itself: the status and the body, read with a size limit.
    async fn exchange(
        &self,
        endpoint: &str,
        assertion: &str,
        deadline: Instant,
        trace_headers: reqwest::header::HeaderMap,
    ) -> Result<(u16, Zeroizing<Vec<u8>>), Failure> {
        let exchange = async {
            let response = self
                .http
                .post(endpoint)
                .headers(trace_headers)
                .header(reqwest::header::ACCEPT, "application/json")
                .form(&[
                    ("grant_type", maskinporten::JWT_BEARER),
                    ("assertion", assertion),
                ])
                .send()
                .await
                .map_err(|e| Failure::Network(describe(e)))?;
            let status = response.status().as_u16();
            // Holds the token on success: wiped when dropped.
            let body = Zeroizing::new(
                read_limited(response, MAX_ANSWER)
                    .await
                    .map_err(Failure::Network)?,
            );
            Ok((status, body))
        };
        tokio::time::timeout_at(deadline.into(), exchange)
            .await
            .map_err(|_| Failure::Timeout)?
    }
}

/// What an answer says: a token (2xx), a refusal (4xx) or a server failure.
fn read_answer(status: u16, body: &[u8]) -> Result<AccessToken, Failure> {
    match status {
        200..=299 => parse_token(body),
        400..=499 => Err(Failure::Refused {
            status,
            oauth: parse_error(body).unwrap_or_else(|| OAuthError {
                error: String::new(),
                description: format!(
                    "HTTP {status} without an OAuth2 error body{}",
                    snippet(body)
                ),
                uri: String::new(),
            }),
        }),
        _ => Err(Failure::Server {
            status,
            oauth: parse_error(body),
        }),
    }
}

/// The metadata documents discovery reads, in order.
const WELL_KNOWN: [&str; 2] = ["oauth-authorization-server", "openid-configuration"];

/// Where `document` is for `issuer`. RFC 8414 puts the well-known segment between the
/// host and the issuer's path; OpenID Connect Discovery appends it to the issuer. For a
/// host-only issuer both are `{issuer without its trailing slash}/.well-known/{document}`.
fn well_known_url(issuer: &str, document: &str) -> Result<String, String> {
    if document == "openid-configuration" {
        return Ok(format!(
            "{}/.well-known/{document}",
            issuer.trim_end_matches('/')
        ));
    }
    let mut url =
        reqwest::Url::parse(issuer).map_err(|e| format!("{issuer:?} is not a URL: {e}"))?;
    let path = url.path().trim_end_matches('/').to_owned();
    url.set_path(&format!("/.well-known/{document}{path}"));
    url.set_query(None);
    url.set_fragment(None);
    Ok(url.into())
}

fn parse_token(body: &[u8]) -> Result<AccessToken, Failure> {
    #[derive(Deserialize)]
    struct Answer {
        access_token: String,
        token_type: Option<String>,
        expires_in: Option<serde_json::Value>,
        scope: Option<String>,
    }
    let answer: Answer = serde_json::from_slice(body)
        .map_err(|_| Failure::BadAnswer("the answer is not a token response".into()))?;
    if answer.access_token.is_empty() {
        return Err(Failure::BadAnswer(
            "the answer's access_token is empty".into(),
        ));
    }
    // Read, never assumed: Maskinporten sets the lifetime per client.
    let expires_in = match &answer.expires_in {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .filter(|&s| s > 0)
    .ok_or_else(|| Failure::BadAnswer("the answer has no positive expires_in".into()))?;
    Ok(AccessToken::new(
        Zeroizing::new(answer.access_token),
        answer.token_type.unwrap_or_else(|| "Bearer".into()),
        answer.scope.unwrap_or_default(),
        Duration::from_secs(expires_in),
    ))
}

fn parse_error(body: &[u8]) -> Option<OAuthError> {
    #[derive(Deserialize)]
    struct Answer {
        error: String,
        error_description: Option<String>,
        error_uri: Option<String>,
    }
    let answer: Answer = serde_json::from_slice(body).ok()?;
    Some(OAuthError {
        error: answer.error,
        description: answer.error_description.unwrap_or_default(),
        uri: answer.error_uri.unwrap_or_default(),
    })
}

/// The start of a non-JSON body (a proxy's error page), printable characters only.
fn snippet(body: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    if text.trim().is_empty() {
        String::new()
    } else {
        format!(": {:?}", text.trim())
    }
}

/// HTTPS on rustls with ring (the provider tonic uses; no OpenSSL, no aws-lc build),
/// trusting the system's roots, the Mozilla roots (for images without a CA bundle) and
/// `ca_file`. No redirects: a token endpoint that redirects is misconfigured, and
/// following it would send the grant somewhere not configured.
/// The revocation checks (OCSP, CRLs) use the same client, so the same proxy and roots.
pub(crate) fn http_client(settings: &TokenSettings) -> Result<reqwest::Client, SetupError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    tracing::debug!(system_roots = added, "token endpoint trust anchors loaded");
    if let Some(path) = &settings.ca_file {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let ca_error = |problem: String| SetupError::CaFile {
            path: path.display().to_string(),
            problem,
        };
        let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| ca_error(format!("not PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(ca_error("holds no certificate".into()));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| ca_error(format!("unusable certificate: {e}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError::Client(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];

    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("grant-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(proxy) = &settings.proxy {
        let proxy = reqwest::Proxy::all(proxy.as_str())
            .map_err(|e| SetupError::Client(format!("token.proxy: {e}")))?
            .no_proxy(
                settings
                    .no_proxy
                    .as_deref()
                    .and_then(reqwest::NoProxy::from_string),
            );
        builder = builder.proxy(proxy);
    }
    builder.build().map_err(|e| SetupError::Client(describe(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_answer_is_read_not_assumed() {
        let token = parse_token(
            br#"{"access_token":"abc","token_type":"Bearer","expires_in":119,"scope":"a:b c:d"}"#,
        )
        .expect("token");
        assert_eq!(token.lifetime, Duration::from_secs(119));
        assert_eq!(token.scope, "a:b c:d");
        for body in [
            &br#"{"access_token":"abc","token_type":"Bearer"}"#[..],
            br#"{"access_token":"abc","expires_in":0}"#,
            br#"{"access_token":"","expires_in":10}"#,
            b"<html>proxy</html>",
        ] {
            assert!(matches!(parse_token(body), Err(Failure::BadAnswer(_))));
        }
    }

    #[test]
    fn well_known_urls_for_issuers_with_and_without_a_slash_or_a_path() {
        for issuer in [
            "https://sky.maskinporten.no",
            "https://sky.maskinporten.no/",
        ] {
            assert_eq!(
                well_known_url(issuer, "oauth-authorization-server").as_deref(),
                Ok("https://sky.maskinporten.no/.well-known/oauth-authorization-server")
            );
            assert_eq!(
                well_known_url(issuer, "openid-configuration").as_deref(),
                Ok("https://sky.maskinporten.no/.well-known/openid-configuration")
            );
        }
        // An issuer with a path: RFC 8414 inserts, OpenID Connect appends.
        assert_eq!(
            well_known_url("https://as.example/tenant/", "oauth-authorization-server").as_deref(),
            Ok("https://as.example/.well-known/oauth-authorization-server/tenant")
        );
        assert_eq!(
            well_known_url("https://as.example/tenant", "openid-configuration").as_deref(),
            Ok("https://as.example/tenant/.well-known/openid-configuration")
        );
        assert_eq!(
            well_known_url("http://127.0.0.1:9000/", "oauth-authorization-server").as_deref(),
            Ok("http://127.0.0.1:9000/.well-known/oauth-authorization-server")
        );
        assert!(well_known_url("not a url", "oauth-authorization-server").is_err());
    }

    #[test]
    fn errors_keep_all_three_fields() {
        let e = parse_error(
            br#"{"error":"invalid_grant","error_description":"Invalid assertion (trace_id: 0af)","error_uri":"https://docs.digdir.no/maskinporten/errors/MP-130"}"#,
        )
        .expect("oauth error");
        assert_eq!(e.error, "invalid_grant");
        assert_eq!(e.description, "Invalid assertion (trace_id: 0af)");
        assert_eq!(e.mp_code(), Some("MP-130"));
        assert_eq!(parse_error(b"oops"), None);
        assert_eq!(
            snippet(b"\n<html>\x07Bad gateway</html>"),
            ": \"<html>Bad gateway</html>\""
        );
    }
}
