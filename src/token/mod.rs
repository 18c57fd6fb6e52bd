//! Access tokens: sign a grant, exchange it at the environment's token endpoint, cache the
//! token, and explain Maskinporten's refusals.
//!
//! `TokenService::get` is what `GetAccessToken` calls. A fresh cached token is returned
//! at once. Otherwise one request per cache entry (single flight) signs a grant and POSTs
//! it; network failures and 5xx answers are retried with exponential backoff and jitter
//! while the caller's deadline allows, each try with a newly signed grant, because
//! Maskinporten refuses a `jti` it has seen. 4xx answers are never retried: the same
//! grant parameters would be refused again.

mod cache;
mod exchange;

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use zeroize::Zeroizing;

pub use exchange::SetupError;
pub(crate) use exchange::http_client;

use crate::{
    agent::{Agent, SignError, SignedGrant, unix_now},
    config::TokenSettings,
    grant::{AuthorizationDetails, ValidGrant},
    maskinporten,
    metrics::Metrics,
    telemetry,
};

use cache::{CacheKey, Flight, Lookup, TokenCache};
use exchange::Exchange;

/// An access token from Maskinporten.
pub(crate) struct AccessToken {
    /// The bearer token. A secret: never logged, wiped from memory when dropped.
    pub(crate) access_token: Zeroizing<String>,
    /// As sent, normally "Bearer".
    pub(crate) token_type: String,
    /// The scopes granted, space-separated.
    pub(crate) scope: String,
    /// Unix seconds: when the answer arrived plus `expires_in`.
    pub(crate) expires_at: i64,
    /// The `jti` of the grant this token was bought with, for the audit of every answer
    /// it serves.
    pub(crate) grant_jti: String,
    /// SHA-256 of the certificate that signed that grant (empty for a `kid` key).
    pub(crate) certificate_sha256: String,
    /// `expires_in` as Maskinporten sent it.
    lifetime: Duration,
    /// On tokio's clock, the monotonic clock that paused-time tests control.
    received: tokio::time::Instant,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("token_type", &self.token_type)
            .field("scope", &self.scope)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl AccessToken {
    fn new(
        access_token: Zeroizing<String>,
        token_type: String,
        scope: String,
        lifetime: Duration,
    ) -> Self {
        AccessToken {
            access_token,
            token_type,
            scope,
            expires_at: unix_now().saturating_add(i64::try_from(lifetime.as_secs()).unwrap_or(0)),
            grant_jti: String::new(),
            certificate_sha256: String::new(),
            lifetime,
            received: tokio::time::Instant::now(),
        }
    }

    /// `setting`, but at most a quarter of the lifetime, so that short-lived tokens are
    /// still cached and refreshed ahead.
    fn capped(&self, setting: Duration) -> Duration {
        setting.min(self.lifetime / 4)
    }

    /// When the token stops being handed out.
    fn stale_at(&self, margin: Duration) -> tokio::time::Instant {
        self.received + self.lifetime - self.capped(margin)
    }
}

/// An OAuth2 error answer (RFC 6749 section 5.2), as Maskinporten sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OAuthError {
    /// e.g. `invalid_grant`; empty when the answer had no OAuth2 body.
    pub(crate) error: String,
    /// Maskinporten's explanation, with its `trace_id` for their support.
    pub(crate) description: String,
    /// A link to the error's documentation, ending in the MP code.
    pub(crate) uri: String,
}

impl fmt::Display for OAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.error.is_empty(), self.description.is_empty()) {
            (false, false) => write!(f, "{}: {}", self.error, self.description)?,
            (false, true) => write!(f, "{}", self.error)?,
            (true, _) => write!(f, "{}", self.description)?,
        }
        if !self.uri.is_empty() {
            write!(f, " (error_uri {})", self.uri)?;
        }
        Ok(())
    }
}

impl OAuthError {
    /// The Maskinporten error code (`MP-130`), from `error_uri` or else the description.
    pub(crate) fn mp_code(&self) -> Option<&str> {
        [self.uri.as_str(), self.description.as_str()]
            .into_iter()
            .find_map(maskinporten::find_error_code)
    }

    /// What to do about it, for the codes we know.
    pub(crate) fn hint(&self) -> Option<&'static str> {
        maskinporten::error_hint(self.mp_code()?)
    }
}

/// Why no access token was returned.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TokenError {
    /// The grant could not be signed.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// Maskinporten refused (4xx); never retried.
    #[error("Maskinporten refused the grant (HTTP {status}): {oauth}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The OAuth2 error, intact.
        oauth: OAuthError,
        /// Tries made.
        attempts: u32,
    },
    /// Maskinporten could not be reached or failed (5xx), on every try.
    #[error("the token endpoint failed after {attempts} tries: {detail}")]
    Upstream {
        /// The last failure.
        detail: String,
        /// Tries made.
        attempts: u32,
    },
    /// The deadline passed before a token came back.
    #[error("no access token before the deadline ({})", tried(*attempts))]
    Deadline {
        /// Tries started by this request; 0 when it waited for another request's.
        attempts: u32,
    },
    /// The environment's token endpoint could not be discovered.
    #[error("discovering the token endpoint of {issuer} failed: {detail}")]
    Discovery {
        /// The issuer asked.
        issuer: String,
        /// What went wrong.
        detail: String,
    },
    /// The token endpoint said yes but sent no usable token.
    #[error("the token endpoint answered without a usable token: {0}")]
    BadAnswer(String),
}

fn tried(attempts: u32) -> String {
    match attempts {
        0 => "waited for the same request from another caller".to_owned(),
        1 => "1 try".to_owned(),
        n => format!("{n} tries"),
    }
}

/// A token for a request, and whether the request caused a call to Maskinporten.
#[derive(Debug)]
pub(crate) struct Issued {
    /// The token, shared with the cache.
    pub(crate) token: Arc<AccessToken>,
    /// True when no call to Maskinporten was made for this request.
    pub(crate) from_cache: bool,
}

/// Checks that the HTTPS client for `settings` can be set up (the CA file reads, the proxy
/// parses), as `grant-agent check` does before a restart.
pub fn check_settings(settings: &TokenSettings) -> Result<(), SetupError> {
    Exchange::new(settings).map(drop)
}

/// Who asked for the fetch of a token: named in the audit lines of the grants the fetch
/// signs (a fetch serves everyone who joins it; these are the request that started it).
#[derive(Debug, Clone, Default)]
pub(crate) struct Origin {
    /// The starting request's id.
    pub(crate) request_id: String,
    /// Its caller.
    pub(crate) caller: String,
    /// Its peer address.
    pub(crate) peer: String,
    /// The key name, resolved.
    pub(crate) key: String,
    /// The environment name, resolved.
    pub(crate) environment: String,
    /// The `type` of each authorization_details entry.
    pub(crate) authorization_types: Vec<String>,
}

/// One grant a fetch signed, and what the token endpoint made of it.
#[derive(Debug)]
pub(crate) struct GrantSpent<'a> {
    /// Who started the fetch.
    pub(crate) origin: &'a Origin,
    /// The request the grant was made for.
    pub(crate) request: &'a ValidGrant,
    /// The grant (its jti, certificate, expiry; never log its assertion).
    pub(crate) grant: &'a SignedGrant,
    /// 1 for the first try of the fetch.
    pub(crate) attempt: u32,
    /// `issued`, `refused` (Maskinporten said no) or `failed` (no usable answer).
    pub(crate) outcome: &'static str,
    /// What the token endpoint answered, when it was not a token.
    pub(crate) reason: String,
}

/// Where a fetch reports each grant it signed: every grant is audited with its `jti`,
/// retries included, whether or not any caller is still waiting.
pub(crate) type GrantAudit = Arc<dyn Fn(&GrantSpent<'_>) + Send + Sync>;

/// Access tokens for every caller: cache, single flight, exchange, retries.
pub(crate) struct TokenService {
    agent: Arc<Agent>,
    audit: GrantAudit,
    exchange: Exchange,
    cache: TokenCache,
    settings: TokenSettings,
    metrics: Arc<Metrics>,
}

impl TokenService {
    /// Sets up the HTTPS client (trust anchors, proxy) and an empty cache.
    pub(crate) fn new(
        agent: Arc<Agent>,
        settings: &TokenSettings,
        metrics: Arc<Metrics>,
        audit: GrantAudit,
    ) -> Result<Self, SetupError> {
        Ok(TokenService {
            agent,
            audit,
            exchange: Exchange::new(settings)?,
            cache: TokenCache::new(
                settings.cache_entries,
                settings.expiry_margin,
                settings.refresh_ahead,
            ),
            settings: settings.clone(),
            metrics,
        })
    }

    /// An access token for a validated request, from the cache unless `force_refresh` or
    /// it is not fresh, within `deadline` (the configured timeout when `None`). `origin`
    /// is called only when this request starts a fetch.
    pub(crate) async fn get(
        self: &Arc<Self>,
        grant: &ValidGrant,
        force_refresh: bool,
        deadline: Option<Instant>,
        origin: impl FnOnce() -> Origin,
    ) -> Result<Issued, Arc<TokenError>> {
        let deadline =
            answer_by(deadline.unwrap_or_else(|| Instant::now() + self.settings.timeout));
        let key = self.cache_key(grant);
        let rx = match self.cache.lookup(&key, force_refresh) {
            Lookup::Fresh(token, refresh) => {
                self.metrics.token_cache(true);
                if let Some(flight) = refresh {
                    tracing::debug!("refreshing a cached token ahead of expiry");
                    self.fly(flight, grant.clone(), self.flight_budget(), origin());
                }
                return Ok(Issued {
                    token,
                    from_cache: true,
                });
            }
            Lookup::Wait(rx) => {
                self.metrics.token_cache(true);
                let outcome = cache::wait(rx, deadline)
                    .await
                    .ok_or_else(|| Arc::new(TokenError::Deadline { attempts: 0 }))?;
                return outcome.map(|token| Issued {
                    token,
                    from_cache: true,
                });
            }
            Lookup::Fetch(flight, rx) => {
                self.metrics.token_cache(false);
                self.fly(flight, grant.clone(), self.flight_budget(), origin());
                rx
            }
        };
        // A caller without a deadline of its own has the flight's budget, and the flight
        // reports how far it got just before that: give its report a moment to arrive
        // rather than answer "deadline" without the detail.
        let outcome = cache::wait(rx, deadline + REPORT_MARGIN / 2)
            .await
            .ok_or_else(|| Arc::new(TokenError::Deadline { attempts: 1 }))?;
        outcome.map(|token| Issued {
            token,
            from_cache: false,
        })
    }

    /// When a flight starting now must end: `token.timeout_seconds` from now, whoever
    /// started it. A flight is shared: the caller that happened to start it, with perhaps
    /// the shortest deadline of all, must not cut it short for the others, who each wait
    /// within their own deadline; and a flight that lands after every caller left still
    /// fills the cache (its grant's jti is spent either way).
    fn flight_budget(&self) -> Instant {
        answer_by(Instant::now() + self.settings.timeout)
    }

    /// Runs a flight in its own task, so that it lands even if its caller gives up. In a
    /// trace the flight (`token_fetch`) is a child of the request that started it, which
    /// it does not keep open: waiters and a refresh ahead return before it lands.
    fn fly(self: &Arc<Self>, flight: Flight, grant: ValidGrant, deadline: Instant, origin: Origin) {
        use tracing::Instrument;
        let span = tracing::trace_span!(parent: None, "token_fetch");
        telemetry::follow(&span, &tracing::Span::current());
        let service = Arc::clone(self);
        drop(tokio::spawn(
            async move {
                let outcome = service
                    .fetch(&grant, deadline, &origin)
                    .await
                    .map(Arc::new)
                    .map_err(Arc::new);
                service.cache.land(flight, outcome);
            }
            .instrument(span),
        ));
    }

    /// Signs and exchanges grants until one gives a token, a refusal, or the tries or the
    /// deadline run out.
    async fn fetch(
        &self,
        request: &ValidGrant,
        deadline: Instant,
        origin: &Origin,
    ) -> Result<AccessToken, TokenError> {
        let keys = self.agent.keys();
        let (_, environment) = keys
            .environment(&request.params().environment)
            .map_err(SignError::from)?;
        let endpoint = self.exchange.endpoint(environment, deadline).await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let grant = self.agent.sign_grant(request, Some(deadline)).await?;
            let started = Instant::now();
            let result = self
                .exchange
                .post(&endpoint, &grant.assertion, deadline)
                .await;
            self.metrics
                .token_upstream(outcome_label(&result), started.elapsed());
            (self.audit)(&GrantSpent {
                origin,
                request,
                grant: &grant,
                attempt,
                outcome: match &result {
                    Ok(_) => "issued",
                    Err(exchange::Failure::Refused { .. }) => "refused",
                    Err(_) => "failed",
                },
                reason: result
                    .as_ref()
                    .err()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            });
            let failure = match result {
                Ok(mut token) => {
                    tracing::info!(
                        jti = %grant.jti,
                        attempt,
                        expires_in = token.lifetime.as_secs(),
                        "access token issued"
                    );
                    token.grant_jti = grant.jti;
                    token.certificate_sha256 = grant.certificate_sha256;
                    return Ok(token);
                }
                Err(failure) => failure,
            };
            let pause = backoff(attempt);
            if !failure.retryable()
                || attempt >= self.settings.attempts
                || Instant::now() + pause >= deadline
            {
                tracing::warn!(jti = %grant.jti, attempt, failure = %failure, "token request failed");
                return Err(failure.into_error(attempt));
            }
            tracing::warn!(
                jti = %grant.jti,
                attempt,
                failure = %failure,
                retry_in_ms = pause.as_millis(),
                "token request failed; retrying with a new grant"
            );
            tokio::time::sleep(pause).await;
        }
    }

    /// The cache key. The request was validated when it became a [`ValidGrant`], so an
    /// invalid request never reaches the cache, even when an equal valid one was cached.
    fn cache_key(&self, grant: &ValidGrant) -> CacheKey {
        let keys = self.agent.keys();
        let params = grant.params();
        let authorization_details = grant
            .authorization_details()
            .map(AuthorizationDetails::canonical)
            .unwrap_or_default();
        let sorted = |values: &[String]| {
            let mut values = values.to_vec();
            values.sort();
            values
        };
        CacheKey {
            key: keys.key_name(&params.key).to_owned(),
            client_id: params.client_id.clone(),
            scopes: sorted(&params.scopes),
            resources: sorted(&params.resources),
            consumer_org: params.consumer_org.clone(),
            environment: keys.environment_name(&params.environment).to_owned(),
            authorization_details,
            pid_sha256: if params.pid.is_empty() {
                Vec::new()
            } else {
                <sha2::Sha256 as sha2::Digest>::digest(params.pid.as_bytes()).to_vec()
            },
            iss_onbehalfof: params.iss_onbehalfof.clone(),
        }
    }
}

/// The label for the upstream metric: the HTTP status, or what stopped an answer.
fn outcome_label(result: &Result<AccessToken, exchange::Failure>) -> String {
    use exchange::Failure;
    match result {
        Ok(_) => "200".into(),
        Err(Failure::Refused { status, .. } | Failure::Server { status, .. }) => status.to_string(),
        Err(Failure::Network(_)) => "network".into(),
        Err(Failure::Timeout) => "timeout".into(),
        Err(Failure::BadAnswer(_)) => "bad_answer".into(),
    }
}

/// A mutex's guard, also after a panic elsewhere (the data are plain maps, always whole).
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Time kept back from the caller's deadline, so that the answer (with what went wrong)
/// reaches the caller before it gives up on its own.
const REPORT_MARGIN: Duration = Duration::from_millis(100);

/// The caller's deadline less [`REPORT_MARGIN`] (less only half of what is left when
/// little is).
fn answer_by(deadline: Instant) -> Instant {
    let left = deadline.saturating_duration_since(Instant::now());
    deadline - REPORT_MARGIN.min(left / 2)
}

/// Exponential from 200 ms, capped at 3 s, with jitter between half and all of it so that
/// many agents do not retry in step.
fn backoff(attempt: u32) -> Duration {
    let full = Duration::from_millis(200)
        .saturating_mul(1 << attempt.saturating_sub(1).min(4))
        .min(Duration::from_secs(3));
    full.mul_f64(rand::random_range(0.5..=1.0))
}

#[cfg(test)]
mod tests;
