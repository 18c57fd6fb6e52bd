//! A local Maskinporten for tests and CI: a token endpoint that checks JWT grants the
//! way Maskinporten does and answers with the same JSON, so the agent, and the services
//! that use it, can be tested end to end without network access or a registered client.
//!
//! It issues RS256 access tokens signed with its own key, published at `/jwks`, and can
//! be told to fail (an error status, a delay, a dropped connection) so retry logic can be
//! tested too.
//!
//! # Endpoints
//! - `POST /token`: form `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer` and
//!   `assertion=<JWT>`. 200 with `access_token`, `token_type`, `expires_in`, `scope`; or
//!   400 with `error`, `error_description` (ending in `(trace_id: <32 hex>)`) and, for the
//!   cases Maskinporten documents, `error_uri` naming the MP code (see the table below).
//! - `GET /jwks`: the access-token signing key.
//! - `GET /.well-known/oauth-authorization-server`: RFC 8414 metadata; with `well_known =
//!   "openid-configuration"` only `GET /.well-known/openid-configuration` (the same
//!   document, as Skyporten publishes it), with `"both"` both.
//! - `GET /mock/stats`: `{"token_requests", "tokens_issued", "refused", "faults"}` since
//!   start, and `last_traceparent`: the W3C `traceparent` header of the latest token
//!   request (`""` without one).
//! - `POST /mock/faults`: `{"mode": "status"|"delay"|"drop", "status": 503, "delay_ms":
//!   2000, "count": 3}` applies to the next `count` token requests (0 or absent: until
//!   cleared). `status` answers with that status (400 to 599, default 503) and an OAuth2
//!   error body; `delay` waits, then answers normally; `drop` closes the connection
//!   without a response. `DELETE /mock/faults` clears it.
//!
//! # Configuration
//! ```toml
//! # issuer = "http://127.0.0.1:9000/"  # default: http(s)://<bound address>/; aud must match
//! token_lifetime_seconds = 120          # expires_in of access tokens (1 to 86400)
//! well_known = "oauth-authorization-server"  # or "openid-configuration", "both"
//! certificates = "test"                 # "test": refuse production certificates; "prod"; "any"
//! ca = "test-ca.pem"                    # trust anchors for x5c; without it x5c is refused
//! signing_key = "mock-token-key.pem"    # PKCS#8 RSA key for access tokens; generated if absent
//!
//! [[clients]]
//! client_id = "0f5e1a5b-7a53-4e3c-9c1e-6b8d2a9f0c11"
//! scopes = ["test:read", "test:*"]      # exact names, or "prefix:*"
//! organization_number = "991825827"     # the x5c certificate must name it (MP-122)
//! consumer_orgs = ["974760673"]         # allowed consumer_org values (else MP-251)
//! [[clients.keys]]                      # registered keys for kid grants
//! jwk = "client-key.jwk.json"           # one RSA JWK, as `grant-agent key jwk` prints it
//! kid = "my-key"                        # default: the JWK's kid, else its RFC 7638 thumbprint
//! expires_at = 2027-01-01T00:00:00Z     # after it: MP-121
//! ```
//! Relative paths resolve against the config file's folder.
//!
//! # Checks, in Maskinporten's order
//! The first failing check answers; `error_uri` is
//! `https://docs.digdir.no/maskinporten/errors/<MP code>` when there is a code.
//!
//! | Check (in order)                                  | error                    | MP code |
//! |---------------------------------------------------|--------------------------|---------|
//! | body not `application/x-www-form-urlencoded`      | `invalid_request`        |         |
//! | `grant_type` missing                              | `invalid_request`        |         |
//! | `grant_type` not the jwt-bearer URN               | `unsupported_grant_type` |         |
//! | `assertion` missing                               | `invalid_request`        |         |
//! | not a compact JWS; bad `alg`; not one of x5c, kid | `invalid_grant`          |         |
//! | a claim Maskinporten does not know                | `invalid_grant`          |         |
//! | `iss` is no configured client                     | `invalid_client`         | MP-100  |
//! | `aud` is not the issuer                           | `invalid_grant`          | MP-110  |
//! | x5c malformed                                     | `invalid_grant`          | MP-123  |
//! | the JWS signature fails with the x5c certificate  | `invalid_grant`          | MP-124  |
//! | x5c chain broken, expired, not to a `ca` anchor   | `invalid_grant`          | MP-120  |
//! | certificate from the wrong environment            | `invalid_grant`          | MP-124  |
//! | certificate organisation is not the client's      | `invalid_grant`          | MP-122  |
//! | kid not registered on the client                  | `invalid_grant`          |         |
//! | registered key expired                            | `invalid_grant`          | MP-121  |
//! | signature fails with the registered key           | `invalid_grant`          |         |
//! | `iat` off by more than 10 s, `exp` passed, or `exp - iat > 120` | `invalid_grant` | MP-130 |
//! | `jti` missing                                     | `invalid_grant`          |         |
//! | `jti` used before                                 | `invalid_grant`          | MP-012  |
//! | a scope the client may not get                    | `invalid_scope`          | MP-200  |
//! | no scope                                          | `invalid_scope`          | MP-201  |
//! | `consumer_org` without a delegation               | `invalid_scope`          | MP-251  |
//! | `authorization_details` / `resource` malformed    | `invalid_request`        |         |
//!
//! A `jti` is spent once the grant's signature and times have passed, even if a later
//! check refuses the grant.
//!
//! # Modules
//! Each imports only those listed before it (and the agent's library), so none is part
//! of a circle:
//! - `refusal`: the OAuth2 errors and MP codes a refused request answers with.
//! - `jws`: the assertion's form parameters, compact JWS and RSA signature; the RFC 7638
//!   thumbprint.
//! - `x5c`: the certificate path of an x5c grant.
//! - `error`: [`MockError`], why the mock cannot start.
//! - `config`: [`MockConfig`], read and checked before any port is bound.
//! - `verify`: the checks, in Maskinporten's order.
//! - `token`: the access tokens the mock issues, and its signing key.
//! - `accept`: accepting HTTP(S) connections and shutting down.
//! - `server`: the routes, counters and fault injection.
//!
//! The `mock-maskinporten` binary is a thin `main` over [`MockServer`]. The agent itself
//! carries none of this: it is a crate of its own so the agent's release binary has no
//! test server in it.

mod accept;
mod config;
mod error;
mod jws;
mod refusal;
mod server;
mod token;
mod verify;
mod x5c;

#[cfg(test)]
mod tests;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc};

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub use config::MockConfig;
pub use error::MockError;
use token::TokenSigner;
use verify::Verifier;

/// A bound mock, ready to [`serve`](MockServer::serve).
///
/// Binding and serving are separate so a caller (or test) can learn the address and
/// issuer, e.g. of port 0, before the first request can arrive.
pub struct MockServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    issuer: String,
    tls: Option<TlsAcceptor>,
    app: axum::Router,
}

impl MockServer {
    /// Binds `listen` (port 0 allowed); with `tls` = Some((cert_pem_path, key_pem_path))
    /// serves HTTPS.
    ///
    /// Without a configured `signing_key` this generates an RSA-2048 key first, which
    /// takes a moment (on a blocking thread).
    pub async fn bind(
        mut config: MockConfig,
        listen: SocketAddr,
        tls: Option<(PathBuf, PathBuf)>,
    ) -> Result<MockServer, MockError> {
        let tls = match tls {
            None => None,
            Some((cert, key)) => Some(accept::tls_acceptor(&cert, &key)?),
        };
        let signer = match config.signing_key.take() {
            Some(key) => TokenSigner::new(key),
            None => tokio::task::spawn_blocking(TokenSigner::generate)
                .await
                .map_err(|e| MockError::KeyGeneration(e.to_string()))?
                .map_err(|e| MockError::KeyGeneration(e.to_string()))?,
        };
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| MockError::Bind {
                addr: listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| MockError::Bind {
            addr: listen,
            source,
        })?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let issuer = config
            .issuer
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{local_addr}/"));
        let lifetime = config.token_lifetime_seconds;
        let well_known = config.well_known;
        let verifier = Verifier::new(config, issuer.clone());
        let mock = server::Mock::new(verifier, signer, issuer.clone(), lifetime);
        Ok(MockServer {
            listener,
            local_addr,
            issuer,
            tls,
            app: server::router(Arc::new(mock), well_known),
        })
    }

    /// The issuer URL: what grants must carry as `aud`, and the base of the endpoints.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then gives open requests a few seconds to
    /// finish. Failed accepts (e.g. out of file descriptors) are logged and retried, so
    /// this returns `Ok` once shut down.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        accept::run(self.listener, self.tls, self.app, shutdown).await
    }
}
