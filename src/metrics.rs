//! Prometheus metrics, served on their own address (`[metrics] listen`) so scraping needs
//! no caller identity and never shares a port with grants.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `grant_agent_grants_total` | counter | `key`, `outcome` (signed, denied, refused, busy, failed) |
//! | `grant_agent_sign_seconds` | histogram | time from a free session to a signed grant |
//! | `grant_agent_queue_wait_seconds` | histogram | time waiting for a session |
//! | `grant_agent_queue_depth` | gauge | requests waiting for a session now |
//! | `grant_agent_sessions_busy` | gauge | sessions signing now (of `grant_agent_sessions`) |
//! | `grant_agent_pkcs11_errors_total` | counter | `class` (session, handle, login, device, token, other: what mends it), `rv` (the PKCS#11 return value): every failed call while signing, checking or recovering, including those the agent mended without the caller noticing; never overload |
//! | `grant_agent_certificate_expiry_seconds` | gauge | `key`, `certificate_sha256`: seconds until notAfter |
//! | `grant_agent_revocation_last_good_timestamp_seconds` | gauge | `key`, `certificate_sha256`: when OCSP or the CRL last said good (Unix time); absent before the first good answer |
//! | `grant_agent_certificate_revoked` | gauge | `key`, `certificate_sha256`: 1 once a verified answer said revoked (the key no longer signs) |
//! | `grant_agent_serving` | gauge | 1 when the token is usable, 0 while it is being recovered |
//! | `grant_agent_recoveries_total` | counter | times the token was found gone |
//! | `grant_agent_last_recovery_seconds` | gauge | how long the last recovery took, token gone to serving again |
//! | `grant_agent_tokens_total` | counter | `key`, `outcome` (issued, cached, denied, refused, busy, failed) |
//!
//! Outcome `busy` is overload, not failure: the session queue was full or the caller's
//! deadline could not be met with the queue ahead. It is neither `failed` nor a PKCS#11
//! error, so alerts on a failing token stay quiet under load.
//! | `grant_agent_token_cache_total` | counter | `result` (hit, miss): cache lookups |
//! | `grant_agent_token_upstream_seconds` | histogram | `status`: one POST to the token endpoint |
//! | `grant_agent_connections` | gauge | gRPC connections past their handshake, open now |
//! | `grant_agent_connections_refused_total` | counter | `reason`: unknown_caller, tls, handshake_timeout, evicted, per_peer, idle (closed for idling) |
//! | `grant_agent_requests_refused_total` | counter | `reason`: refused before the message was read (unknown_caller, content_type, too_large, busy, request_timeout, malformed) |
//! | `grant_agent_audit_dropped_total` | counter | `reason`: audit lines lost (queue_full: the writer's queue was full or closed; write_failed: the write or flush failed) |
//! | `grant_agent_tls_reloads_total` | counter | `outcome` (ok, failed): `[tls]` files read again after SIGHUP or a change; failed keeps the old ones |
//! | `grant_agent_tls_certificate_not_after_seconds` | gauge | `certificate_sha256`: notAfter (Unix time) of the TLS certificate new handshakes get |
//!
//! Values that describe the present (queue, sessions, expiry) are read when scraped.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::agent::{Agent, unix_now};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrantLabels {
    key: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    class: &'static str,
    rv: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsCertificateLabels {
    certificate_sha256: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabels {
    key: String,
    certificate_sha256: String,
}

/// The agent's metrics. Cheap to update from any thread.
pub(crate) struct Metrics {
    registry: Registry,
    grants: Family<GrantLabels, Counter>,
    sign_seconds: Histogram,
    queue_wait_seconds: Histogram,
    queue_depth: Gauge,
    sessions_busy: Gauge,
    sessions: Gauge,
    pkcs11_errors: Family<ErrorLabels, Counter>,
    certificate_expiry: Family<CertificateLabels, Gauge>,
    revocation_last_good: Family<CertificateLabels, Gauge>,
    certificate_revoked: Family<CertificateLabels, Gauge>,
    serving: Gauge,
    recoveries: Counter,
    last_recovery_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// The agent's PKCS#11 errors already added to `pkcs11_errors`.
    errors_counted: std::sync::Mutex<std::collections::BTreeMap<(&'static str, String), u64>>,
    tokens: Family<GrantLabels, Counter>,
    token_cache: Family<CacheLabels, Counter>,
    token_upstream: Family<UpstreamLabels, Histogram>,
    connections: Gauge,
    connections_refused: Family<ReasonLabels, Counter>,
    requests_refused: Family<ReasonLabels, Counter>,
    audit_dropped: Family<ReasonLabels, Counter>,
    tls_reloads: Family<OutcomeLabels, Counter>,
    tls_not_after: Family<TlsCertificateLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub(crate) fn new() -> Self {
        let buckets = [
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
        ];
        let mut metrics = Metrics {
            registry: Registry::with_prefix("grant_agent"),
            grants: Family::default(),
            sign_seconds: Histogram::new(buckets),
            queue_wait_seconds: Histogram::new(buckets),
            queue_depth: Gauge::default(),
            sessions_busy: Gauge::default(),
            sessions: Gauge::default(),
            pkcs11_errors: Family::default(),
            certificate_expiry: Family::default(),
            revocation_last_good: Family::default(),
            certificate_revoked: Family::default(),
            serving: Gauge::default(),
            recoveries: Counter::default(),
            last_recovery_seconds: Gauge::default(),
            errors_counted: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            tokens: Family::default(),
            token_cache: Family::default(),
            token_upstream: Family::new_with_constructor(|| {
                Histogram::new([0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0])
            }),
            connections: Gauge::default(),
            connections_refused: Family::default(),
            requests_refused: Family::default(),
            audit_dropped: Family::default(),
            tls_reloads: Family::default(),
            tls_not_after: Family::default(),
        };
        let mut registry = std::mem::take(&mut metrics.registry);
        metrics.register_signing(&mut registry);
        metrics.register_tokens_and_connections(&mut registry);
        metrics.registry = registry;
        metrics
    }

    /// Registers the metrics of grants, the session pool and the token's health.
    fn register_signing(&self, registry: &mut Registry) {
        registry.register(
            "grants",
            "Grant decisions by key and outcome",
            self.grants.clone(),
        );
        registry.register(
            "sign_seconds",
            "Time from a free session to a signed grant",
            self.sign_seconds.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time waiting for a PKCS#11 session",
            self.queue_wait_seconds.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for a PKCS#11 session",
            self.queue_depth.clone(),
        );
        registry.register(
            "sessions_busy",
            "PKCS#11 sessions signing now",
            self.sessions_busy.clone(),
        );
        registry.register(
            "sessions",
            "PKCS#11 sessions in the pool",
            self.sessions.clone(),
        );
        registry.register(
            "pkcs11_errors",
            "Failed PKCS#11 calls by return value",
            self.pkcs11_errors.clone(),
        );
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until the certificate's notAfter",
            self.certificate_expiry.clone(),
        );
        registry.register(
            "revocation_last_good_timestamp_seconds",
            "When OCSP or the CRL last said good for the certificate (Unix time)",
            self.revocation_last_good.clone(),
        );
        registry.register(
            "certificate_revoked",
            "1 when a verified OCSP or CRL answer said the certificate is revoked (the key no longer signs)",
            self.certificate_revoked.clone(),
        );
        registry.register(
            "serving",
            "1 when the token is usable, 0 while it is being recovered",
            self.serving.clone(),
        );
        registry.register(
            "recoveries",
            "Times the token was found gone",
            self.recoveries.clone(),
        );
        registry.register(
            "last_recovery_seconds",
            "How long the last recovery took, from the token found gone to serving again",
            self.last_recovery_seconds.clone(),
        );
    }

    /// Registers the metrics of access tokens and of the gRPC connections and requests.
    fn register_tokens_and_connections(&self, registry: &mut Registry) {
        registry.register(
            "tokens",
            "Access token decisions by key and outcome",
            self.tokens.clone(),
        );
        registry.register(
            "token_cache",
            "Access token cache lookups by result",
            self.token_cache.clone(),
        );
        registry.register(
            "token_upstream_seconds",
            "Time of one token endpoint request, by HTTP status or failure",
            self.token_upstream.clone(),
        );
        registry.register(
            "connections",
            "gRPC connections past their handshake, open now",
            self.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused or closed by the agent's limits, by reason",
            self.connections_refused.clone(),
        );
        registry.register(
            "requests_refused",
            "GrantAgent requests refused before their message was read, by reason",
            self.requests_refused.clone(),
        );
        registry.register(
            "audit_dropped",
            "Audit lines lost: not queued (queue_full) or not written (write_failed)",
            self.audit_dropped.clone(),
        );
        registry.register(
            "tls_reloads",
            "Reloads of the [tls] files by outcome (ok, failed: the old ones kept)",
            self.tls_reloads.clone(),
        );
        registry.register(
            "tls_certificate_not_after_seconds",
            "notAfter (Unix time) of the TLS certificate new handshakes get",
            self.tls_not_after.clone(),
        );
    }

    /// Counts a decision.
    pub(crate) fn grant(&self, key: &str, outcome: &'static str) {
        let _ = self
            .grants
            .get_or_create(&GrantLabels {
                key: key.to_owned(),
                outcome,
            })
            .inc();
    }

    /// Records a signed grant's queue wait and signing time.
    pub(crate) fn signed(&self, queued: Duration, signing: Duration) {
        self.queue_wait_seconds.observe(queued.as_secs_f64());
        self.sign_seconds.observe(signing.as_secs_f64());
    }

    /// Counts an access token decision.
    pub(crate) fn token(&self, key: &str, outcome: &'static str) {
        let _ = self
            .tokens
            .get_or_create(&GrantLabels {
                key: key.to_owned(),
                outcome,
            })
            .inc();
    }

    /// Counts a cache lookup.
    pub(crate) fn token_cache(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        let _ = self
            .token_cache
            .get_or_create(&CacheLabels { result })
            .inc();
    }

    /// Records one request to a token endpoint.
    pub(crate) fn token_upstream(&self, status: String, took: Duration) {
        self.token_upstream
            .get_or_create(&UpstreamLabels { status })
            .observe(took.as_secs_f64());
    }

    /// Counts a connection past its handshake.
    pub(crate) fn connection_opened(&self) {
        let _ = self.connections.inc();
    }

    /// Counts a connection's end.
    pub(crate) fn connection_closed(&self) {
        let _ = self.connections.dec();
    }

    /// Counts a connection refused or closed by a limit.
    pub(crate) fn connection_refused(&self, reason: &'static str) {
        let _ = self
            .connections_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a request refused before its message was read.
    pub(crate) fn request_refused(&self, reason: &'static str) {
        let _ = self
            .requests_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// The counter of audit lines lost for `reason` (`queue_full`, `write_failed`), for
    /// the audit writer to keep.
    pub(crate) fn audit_dropped(&self, reason: &'static str) -> Counter {
        self.audit_dropped
            .get_or_create(&ReasonLabels { reason })
            .clone()
    }

    /// Counts a reload of the `[tls]` files: `ok` or `failed`.
    pub(crate) fn tls_reload(&self, outcome: &'static str) {
        let _ = self
            .tls_reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Records the TLS certificate now served: its SHA-256 (hex) and notAfter.
    pub(crate) fn tls_certificate(&self, certificate_sha256: String, not_after: i64) {
        self.tls_not_after.clear();
        let _ = self
            .tls_not_after
            .get_or_create(&TlsCertificateLabels { certificate_sha256 })
            .set(not_after);
    }

    /// The text exposition, with the present-tense values read from `agent` now.
    pub(crate) fn render(&self, agent: &Agent) -> String {
        let load = agent.load().unwrap_or(crate::hsm::PoolLoad {
            size: 0,
            busy: 0,
            waiting: 0,
        });
        let _ = self
            .queue_depth
            .set(i64::try_from(load.waiting).unwrap_or(i64::MAX));
        let _ = self
            .sessions_busy
            .set(i64::try_from(load.busy).unwrap_or(i64::MAX));
        let _ = self
            .sessions
            .set(i64::try_from(load.size).unwrap_or(i64::MAX));
        let _ = self.serving.set(i64::from(*agent.serving().borrow()));
        let _ = self
            .recoveries
            .inc_by(agent.recoveries().saturating_sub(self.recoveries.get()));
        if let Some(last) = agent.last_recovery() {
            let _ = self.last_recovery_seconds.set(last.as_secs_f64());
        }
        {
            let mut counted = match self.errors_counted.lock() {
                Ok(counted) => counted,
                Err(poisoned) => poisoned.into_inner(),
            };
            for (class, rv, total) in agent.pkcs11_errors() {
                let seen = counted.entry((class, rv.clone())).or_insert(0);
                let _ = self
                    .pkcs11_errors
                    .get_or_create(&ErrorLabels { class, rv })
                    .inc_by(total.saturating_sub(*seen));
                *seen = total;
            }
        }
        self.certificate_expiry.clear();
        self.revocation_last_good.clear();
        self.certificate_revoked.clear();
        let now = unix_now();
        for report in agent.report(now) {
            let labels = CertificateLabels {
                key: report.name,
                certificate_sha256: report.certificate_sha256,
            };
            // A registered `kid` key's not_after expires it too (empty sha256).
            if report.not_after != 0 {
                let _ = self
                    .certificate_expiry
                    .get_or_create(&labels)
                    .set(report.not_after - now);
            }
            if labels.certificate_sha256.is_empty() {
                continue;
            }
            let _ = self
                .certificate_revoked
                .get_or_create(&labels)
                .set(i64::from(report.revocation_status == "revoked"));
            if report.revocation_last_good > 0 {
                let _ = self
                    .revocation_last_good
                    .get_or_create(&labels)
                    .set(report.revocation_last_good);
            }
        }
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    agent: Arc<Agent>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = metrics.render(&agent);
            async move {
                (
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The address metrics were bound to, for the start-up line.
pub(crate) fn describe(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}
