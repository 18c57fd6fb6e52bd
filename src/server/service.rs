//! `grantagent.v1.GrantAgent`: identify the caller, check the policy, sign or fetch a
//! token, audit.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tonic::{Request, Response, Status};

use crate::{
    agent::{Agent, SignError, unix_now},
    grant::{AuthorizationDetails, GrantParameters, ValidGrant},
    metrics::Metrics,
    proto::{
        GetAccessTokenRequest, GetAccessTokenResponse, KeyInfo, ListKeysRequest, ListKeysResponse,
        SignGrantRequest, SignGrantResponse, grant_agent_server::GrantAgent,
    },
    token::{GrantAudit, GrantSpent, Origin, TokenError, TokenService},
};

use super::{
    audit::{AuditLog, CachedAnswer, Decision, Receipt},
    caller::{Caller, Peer},
    policy::{Ask, Policy},
    status::{self, Failure, Outcome, code_name},
    trace::{self, Method},
};

#[derive(Clone)]
pub(crate) struct GrantAgentService {
    agent: Arc<Agent>,
    tokens: Arc<TokenService>,
    policy: Arc<Policy>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    overload: Arc<OverloadLog>,
}

impl GrantAgentService {
    pub(super) fn new(
        agent: Arc<Agent>,
        tokens: Arc<TokenService>,
        policy: Arc<Policy>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
    ) -> Self {
        GrantAgentService {
            agent,
            tokens,
            policy,
            audit,
            metrics,
            overload: Arc::new(OverloadLog::default()),
        }
    }
}

/// Who asked for what (defaults resolved), as every audit line of a request says it.
struct Head {
    request_id: String,
    caller: Arc<Caller>,
    peer: Arc<str>,
    key: String,
    environment: String,
    /// The `type` of each authorization_details entry (empty when there are none, or the
    /// field is invalid), read once for the policy and the audit line.
    authorization_types: Vec<String>,
    deadline: Option<std::time::Instant>,
}

/// A request that passed identification, validation and the policy.
struct Admitted {
    head: Head,
    grant: ValidGrant,
}

/// What the audit line says of the result.
#[derive(Default)]
struct Detail<'a> {
    status: Option<&'a Status>,
    certificate_sha256: &'a str,
    jti: &'a str,
    expires_at: Option<i64>,
}

impl GrantAgentService {
    fn record(
        &self,
        audit: &'static str,
        at: &Head,
        params: &GrantParameters,
        outcome: &'static str,
        result: &Detail<'_>,
    ) -> Receipt {
        trace::note_outcome(outcome);
        if audit == "token" {
            self.metrics.token(&at.key, outcome);
        } else {
            self.metrics.grant(&at.key, outcome);
        }
        self.audit.record(&Decision {
            audit,
            request_id: &at.request_id,
            time: crate::agent::rfc3339(unix_now()),
            caller: at.caller.name(),
            peer: &at.peer,
            ask: ask(&at.key, &at.environment, &at.authorization_types, params),
            certificate_sha256: result.certificate_sha256,
            jti: result.jti,
            expires_at: result.expires_at,
            attempt: None,
            outcome,
            code: code_name(result.status.map_or(tonic::Code::Ok, Status::code)),
            reason: result.status.map_or("", Status::message),
        })
    }

    /// Audits and counts a request that ends without a result, and gives back the status
    /// to send.
    fn refuse(
        &self,
        audit: &'static str,
        at: &Head,
        params: &GrantParameters,
        failure: Failure,
    ) -> Status {
        let Failure { status, outcome } = failure;
        // Refused either way: the receipt is only worth waiting for before an answer.
        let _ = self.record(
            audit,
            at,
            params,
            outcome.label(),
            &Detail {
                status: Some(&status),
                ..Detail::default()
            },
        );
        status
    }

    /// Identifies the caller, resolves the defaults, validates the request and checks the
    /// policy, in that order: a caller no rule names is denied whatever it sent; a known
    /// caller's bad input is refused (`INVALID_ARGUMENT` naming the field, or `NOT_FOUND`
    /// for a key) even where the policy would deny it, and does not count against its rate.
    /// A refusal is audited and returned as the status to send.
    fn admit<T>(
        &self,
        audit: &'static str,
        request: Request<T>,
        grant: impl FnOnce(&mut T) -> Option<GrantParameters>,
        request_id: String,
    ) -> Result<(Admitted, T), Status> {
        let Peer {
            caller,
            address: peer,
        } = peer(&request);
        let deadline = grpc_deadline(&request);
        let mut message = request.into_inner();
        let params = grant(&mut message).unwrap_or_default();
        // The policy judges what will really be used, so resolve the defaults first.
        let keys = self.agent.keys();
        let mut head = Head {
            request_id,
            caller,
            peer,
            key: keys.key_name(&params.key).to_owned(),
            environment: keys.environment_name(&params.environment).to_owned(),
            authorization_types: Vec::new(),
            deadline,
        };
        trace::note_caller(head.caller.name());
        if let Err(refusal) = self.policy.knows(&head.caller) {
            head.authorization_types = authorization_types(&params);
            let failure = status::refusal(&refusal);
            return Err(self.refuse(audit, &head, &params, failure));
        }
        let grant = match ValidGrant::new(params) {
            Ok(grant) => grant,
            Err(rejected) => {
                let failure = status::sign_failure(&SignError::Invalid(rejected.invalid));
                return Err(self.refuse(audit, &head, &rejected.params, failure));
            }
        };
        head.authorization_types = grant
            .authorization_details()
            .map(|d| d.types().into_iter().map(str::to_owned).collect())
            .unwrap_or_default();
        if let Err(error) = keys.check_names(&grant) {
            let failure = status::sign_failure(&error);
            return Err(self.refuse(audit, &head, grant.params(), failure));
        }
        let params = grant.params();
        trace::note_request(&head.key, &params.client_id, &head.environment);
        let ask = ask(
            &head.key,
            &head.environment,
            &head.authorization_types,
            params,
        );
        let policy = tracing::trace_span!("policy", grant_agent.decision = tracing::field::Empty);
        let decision = policy.in_scope(|| self.policy.authorize(&head.caller, &ask));
        let _ = policy.record(
            "grant_agent.decision",
            decision.as_ref().map_or("denied", |()| "allowed"),
        );
        if let Err(refusal) = decision {
            let failure = status::refusal(&refusal);
            return Err(self.refuse(audit, &head, params, failure));
        }
        Ok((Admitted { head, grant }, message))
    }

    /// SignGrant inside the request's span: identify, validate, authorize, sign, audit.
    async fn sign(
        &self,
        request: Request<SignGrantRequest>,
        request_id: String,
    ) -> Result<Response<SignGrantResponse>, Status> {
        let started = std::time::Instant::now();
        let (at, _) = self.admit("grant", request, |m| m.grant.take(), request_id)?;
        match self.agent.sign_grant(&at.grant, at.head.deadline).await {
            Ok(grant) => {
                self.metrics
                    .signed(grant.queued, started.elapsed().saturating_sub(grant.queued));
                let receipt = self.record(
                    "grant",
                    &at.head,
                    at.grant.params(),
                    "signed",
                    &Detail {
                        certificate_sha256: &grant.certificate_sha256,
                        jti: &grant.jti,
                        expires_at: Some(grant.expires_at),
                        status: None,
                    },
                );
                // With fail_closed, a grant the trail does not hold is not answered.
                receipt
                    .written()
                    .await
                    .map_err(|error| status::from_audit(&error))?;
                Ok(Response::new(SignGrantResponse {
                    assertion: grant.assertion,
                    jti: grant.jti,
                    issued_at: grant.issued_at,
                    expires_at: grant.expires_at,
                    algorithm: grant.algorithm.jws_name().to_owned(),
                    key: grant.key,
                    certificate_sha256: grant.certificate_sha256,
                }))
            }
            Err(error) => {
                let failure = status::sign_failure(&error);
                self.note_sign_failure(&error, failure.outcome);
                Err(self.refuse("grant", &at.head, at.grant.params(), failure))
            }
        }
    }

    /// Logs a signing error as its [`Outcome`] asks: overload (`busy`) only in
    /// [`OverloadLog`]'s summary; the token's fault (`failed`) at once. Its PKCS#11 return
    /// value, if any, is counted where it happened (the agent's ErrorCounts), with the
    /// errors the agent mended.
    fn note_sign_failure(&self, error: &SignError, outcome: Outcome) {
        match outcome {
            Outcome::Busy => self.overload.refused(),
            Outcome::Failed => tracing::error!(error = %error, "signing failed"),
            Outcome::Denied | Outcome::Refused => {}
        }
    }

    /// GetAccessToken inside the request's span: identify, authorize, cache or exchange, audit.
    async fn token(
        &self,
        request: Request<GetAccessTokenRequest>,
        request_id: String,
    ) -> Result<Response<GetAccessTokenResponse>, Status> {
        let (at, message) = self.admit("token", request, |m| m.grant.take(), request_id)?;
        match self
            .tokens
            .get(&at.grant, message.force_refresh, at.head.deadline, || {
                Origin {
                    request_id: at.head.request_id.clone(),
                    caller: at.head.caller.name().to_owned(),
                    peer: at.head.peer.to_string(),
                    key: at.head.key.clone(),
                    environment: at.head.environment.clone(),
                    authorization_types: at.head.authorization_types.clone(),
                }
            })
            .await
        {
            Ok(issued) => {
                let token = &issued.token;
                let outcome = if issued.from_cache {
                    "cached"
                } else {
                    "issued"
                };
                if issued.from_cache && self.audit.summary_interval().is_some() {
                    trace::note_outcome(outcome);
                    self.metrics.token(&at.head.key, outcome);
                    self.audit.count_cached(&CachedAnswer {
                        caller: at.head.caller.name(),
                        key: &at.head.key,
                        client_id: &at.grant.params().client_id,
                        scopes: &at.grant.params().scopes,
                        environment: &at.head.environment,
                        jti: &token.grant_jti,
                    });
                } else {
                    let receipt = self.record(
                        "token",
                        &at.head,
                        at.grant.params(),
                        outcome,
                        &Detail {
                            expires_at: Some(token.expires_at),
                            jti: &token.grant_jti,
                            certificate_sha256: &token.certificate_sha256,
                            ..Detail::default()
                        },
                    );
                    // With fail_closed, a token the trail does not hold is not answered.
                    receipt
                        .written()
                        .await
                        .map_err(|error| status::from_audit(&error))?;
                }
                Ok(Response::new(GetAccessTokenResponse {
                    access_token: token.access_token.to_string(),
                    token_type: token.token_type.clone(),
                    expires_at: token.expires_at,
                    scope: token.scope.clone(),
                    from_cache: issued.from_cache,
                }))
            }
            Err(error) => {
                let failure = status::token_failure(&error);
                if let TokenError::Sign(sign) = &*error {
                    self.note_sign_failure(sign, failure.outcome);
                }
                if failure.outcome == Outcome::Failed {
                    tracing::error!(error = %error, "no access token");
                }
                Err(self.refuse("token", &at.head, at.grant.params(), failure))
            }
        }
    }
}

/// Audits every grant a token fetch signs (`"audit":"token_grant"`), with its jti,
/// certificate and which try it was, and what the token endpoint made of it: a fetch
/// outlives the callers that wait for it, so its grants are audited where they are spent.
pub(super) fn grant_audit(audit: Arc<AuditLog>) -> GrantAudit {
    Arc::new(move |spent: &GrantSpent<'_>| {
        let params = spent.request.params();
        let origin = spent.origin;
        // Spent already: Maskinporten has the grant, so there is no answer to withhold.
        let _ = audit.record(&Decision {
            audit: "token_grant",
            request_id: &origin.request_id,
            time: crate::agent::rfc3339(unix_now()),
            caller: &origin.caller,
            peer: &origin.peer,
            ask: ask(
                &origin.key,
                &origin.environment,
                &origin.authorization_types,
                params,
            ),
            certificate_sha256: &spent.grant.certificate_sha256,
            jti: &spent.grant.jti,
            expires_at: Some(spent.grant.expires_at),
            attempt: Some(spent.attempt),
            outcome: spent.outcome,
            code: "",
            reason: &spent.reason,
        });
    })
}

/// The request as the policy judges it and the audit line records it, from its resolved
/// key and environment, its authorization_details types and the caller's parameters.
fn ask<'a>(
    key: &'a str,
    environment: &'a str,
    authorization_types: &'a [String],
    params: &'a GrantParameters,
) -> Ask<'a> {
    Ask {
        key,
        client_id: &params.client_id,
        scopes: &params.scopes,
        environment,
        resources: &params.resources,
        consumer_org: &params.consumer_org,
        authorization_types,
        pid: !params.pid.is_empty(),
        iss_onbehalfof: &params.iss_onbehalfof,
    }
}

/// The `type` of each authorization_details entry, for the audit line of a request that is
/// not validated (empty when the field is invalid).
fn authorization_types(params: &GrantParameters) -> Vec<String> {
    AuthorizationDetails::parse(&params.authorization_details_json)
        .ok()
        .flatten()
        .map(|d| d.types().into_iter().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Refusals for overload (a full session queue, a deadline the queue cannot meet) are many
/// at once and say nothing new each: each is audited and counted (outcome `busy`), but the
/// log gets at most one WARN line a second, with the count since the previous line.
#[derive(Default)]
struct OverloadLog {
    /// Refusals not yet in a log line.
    pending: AtomicU64,
    /// A summary task is running (it logs each second while refusals keep coming).
    armed: AtomicBool,
}

/// How often the overload summary may be logged.
const OVERLOAD_LOG_EVERY: Duration = Duration::from_secs(1);

impl OverloadLog {
    /// Counts one refusal; the first after a quiet second is logged at once, the rest in
    /// the next second's line. Call within a tokio runtime.
    fn refused(self: &Arc<Self>) {
        let _ = self.pending.fetch_add(1, Ordering::AcqRel);
        if self.armed.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self.flush();
        let log = Arc::clone(self);
        drop(tokio::spawn(async move {
            loop {
                tokio::time::sleep(OVERLOAD_LOG_EVERY).await;
                if log.flush() {
                    continue;
                }
                log.armed.store(false, Ordering::Release);
                // A refusal that came between the flush and the store found the task
                // still running: take it on rather than leave it unlogged.
                if log.pending.load(Ordering::Acquire) == 0
                    || log.armed.swap(true, Ordering::AcqRel)
                {
                    break;
                }
            }
        }));
    }

    /// Logs the refusals not yet logged; false when there were none.
    fn flush(&self) -> bool {
        let refused = self.pending.swap(0, Ordering::AcqRel);
        if refused > 0 {
            tracing::warn!(
                refused,
                "overloaded: refused requests because the session queue was full or their deadline could not be met (outcome busy)"
            );
        }
        refused > 0
    }
}

/// The connection's caller and address (set by `conn`), and a mark for the gate that the
/// request reached its handler, which audits it from here on.
fn peer<T>(request: &Request<T>) -> Peer {
    if let Some(reached) = request.extensions().get::<super::Reached>() {
        reached.mark();
    }
    request
        .extensions()
        .get::<Peer>()
        .cloned()
        .unwrap_or_else(|| Peer::new(Caller::plain(false), ""))
}

/// The caller's deadline from the `grpc-timeout` header ("100m" = 100 ms), if it sent one.
fn grpc_deadline<T>(request: &Request<T>) -> Option<std::time::Instant> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => std::time::Duration::from_secs(amount.saturating_mul(3600)),
        "M" => std::time::Duration::from_secs(amount.saturating_mul(60)),
        "S" => std::time::Duration::from_secs(amount),
        "m" => std::time::Duration::from_millis(amount),
        "u" => std::time::Duration::from_micros(amount),
        "n" => std::time::Duration::from_nanos(amount),
        _ => return None,
    };
    std::time::Instant::now().checked_add(timeout)
}

/// Runs `handle` with a new request id inside the request's span (continuing the
/// caller's trace), and records on the span the code the caller gets.
async fn traced<T, R, F>(
    method: Method,
    request: Request<T>,
    handle: impl FnOnce(Request<T>, String) -> F,
) -> Result<R, Status>
where
    F: Future<Output = Result<R, Status>>,
{
    use tracing::Instrument;
    let request_id = crate::grant::random_uuid().simple().to_string();
    let span = trace::request_span(
        method,
        &request_id,
        request.metadata().as_ref(),
        request.extensions().get(),
    );
    let answer = handle(request, request_id).instrument(span.clone()).await;
    trace::note_code(
        &span,
        answer
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok),
    );
    answer
}

#[tonic::async_trait]
impl GrantAgent for GrantAgentService {
    async fn sign_grant(
        &self,
        request: Request<SignGrantRequest>,
    ) -> Result<Response<SignGrantResponse>, Status> {
        traced(Method::SignGrant, request, |r, id| self.sign(r, id)).await
    }

    async fn get_access_token(
        &self,
        request: Request<GetAccessTokenRequest>,
    ) -> Result<Response<GetAccessTokenResponse>, Status> {
        traced(Method::GetAccessToken, request, |r, id| self.token(r, id)).await
    }

    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        let Peer { caller, .. } = peer(&request);
        self.policy
            .knows(&caller)
            .map_err(|refusal| status::refusal(&refusal).status)?;
        let infos = self
            .agent
            .report(unix_now())
            .into_iter()
            .map(|r| KeyInfo {
                name: r.name,
                algorithm: r.algorithm.to_owned(),
                subject: r.subject,
                issuer: r.issuer,
                organization_number: r.organization_number,
                not_before: r.not_before,
                not_after: r.not_after,
                certificate_sha256: r.certificate_sha256,
                is_default: r.is_default,
                environment: r.environment.to_owned(),
                days_to_expiry: r.days_to_expiry,
                expires_soon: r.expires_soon,
                active: r.active,
                kid: r.kid,
                chain_status: r.chain_status.to_owned(),
                chain_detail: r.chain_detail,
                revocation_status: r.revocation_status.to_owned(),
                revocation_checked_at: r.revocation_checked_at,
                revocation_last_good: r.revocation_last_good,
                revoked_at: r.revoked_at,
                revocation_reason: r.revocation_reason.to_owned(),
                revocation_detail: r.revocation_detail,
            })
            .collect();
        Ok(Response::new(ListKeysResponse { keys: infos }))
    }
}
