//! `grantagent.v1.GrantAgent`: identify the caller, check the policy, sign, audit.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    agent::{Agent, SignError, unix_now},
    cert::{CertEnvironment, CertificateChain},
    grant::GrantParameters,
    hsm::HsmError,
    metrics::Metrics,
    proto::{
        KeyInfo, ListKeysRequest, ListKeysResponse, SignGrantRequest, SignGrantResponse,
        grant_agent_server::GrantAgent,
    },
};

use super::{
    audit::{AuditLog, Decision},
    caller::{Caller, Identification},
    policy::{Ask, Policy},
    status,
};

#[derive(Clone)]
pub(crate) struct GrantAgentService {
    agent: Arc<Agent>,
    policy: Arc<Policy>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    identification: Identification,
}

impl GrantAgentService {
    pub(super) fn new(
        agent: Arc<Agent>,
        policy: Arc<Policy>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
        identification: Identification,
    ) -> Self {
        GrantAgentService {
            agent,
            policy,
            audit,
            metrics,
            identification,
        }
    }
}

impl From<crate::proto::GrantParameters> for GrantParameters {
    fn from(p: crate::proto::GrantParameters) -> Self {
        GrantParameters {
            key: p.key,
            client_id: p.client_id,
            scopes: p.scopes,
            environment: p.environment,
            resources: p.resources,
            consumer_org: p.consumer_org,
            lifetime_seconds: p.lifetime_seconds,
        }
    }
}

/// What the audit line says about a request before the outcome is known.
struct Audited<'a> {
    request_id: &'a str,
    caller: &'a Caller,
    peer: String,
    params: &'a GrantParameters,
    key: &'a str,
    environment: &'a str,
}

impl GrantAgentService {
    fn record(
        &self,
        at: &Audited<'_>,
        outcome: &'static str,
        status: Option<&Status>,
        signed: Option<&crate::agent::SignedGrant>,
    ) {
        self.metrics.grant(at.key, outcome);
        self.audit.record(&Decision {
            audit: "grant",
            request_id: at.request_id,
            time: crate::agent::rfc3339(unix_now()),
            caller: at.caller.name(),
            peer: at.peer.clone(),
            key: at.key,
            certificate_sha256: signed.map_or("", |g| g.certificate_sha256.as_str()),
            client_id: &at.params.client_id,
            scopes: &at.params.scopes,
            environment: at.environment,
            resources: &at.params.resources,
            consumer_org: &at.params.consumer_org,
            jti: signed.map_or("", |g| g.jti.as_str()),
            expires_at: signed.map(|g| g.expires_at),
            outcome,
            code: format!("{:?}", status.map_or(tonic::Code::Ok, Status::code)),
            reason: status.map(|s| s.message().to_owned()).unwrap_or_default(),
        });
    }
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

impl GrantAgentService {
    /// SignGrant inside the request's span: identify, authorize, sign, audit.
    async fn sign(
        &self,
        request: Request<SignGrantRequest>,
        request_id: &str,
    ) -> Result<Response<SignGrantResponse>, Status> {
        let started = std::time::Instant::now();
        let caller = self.identification.identify(&request);
        let deadline = grpc_deadline(&request);
        let peer = request
            .remote_addr()
            .map_or_else(|| "unix".to_owned(), |a| a.to_string());
        let params: GrantParameters = request.into_inner().grant.unwrap_or_default().into();
        // The policy judges what will really be used, so resolve the defaults first.
        let keys = self.agent.keys();
        let key = if params.key.is_empty() {
            keys.default_key()
        } else {
            &params.key
        };
        let environment = match (params.environment.as_str(), keys.default_environment()) {
            ("", Some(default)) => default,
            (env, _) => env,
        };
        let audited = Audited {
            request_id,
            caller: &caller,
            peer,
            params: &params,
            key,
            environment,
        };
        let ask = Ask {
            key,
            client_id: &params.client_id,
            scopes: &params.scopes,
            environment,
            consumer_org: &params.consumer_org,
        };
        if let Err(refusal) = self.policy.authorize(&caller, &ask) {
            let status = status::from_refusal(&refusal);
            self.record(&audited, "denied", Some(&status), None);
            return Err(status);
        }
        match self.agent.sign_grant(&params, deadline).await {
            Ok(grant) => {
                self.metrics
                    .signed(grant.queued, started.elapsed().saturating_sub(grant.queued));
                self.record(&audited, "signed", None, Some(&grant));
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
                let status = status::from_sign_error(&error);
                let outcome = if let SignError::Hsm(hsm) = &error {
                    if let HsmError::Call { rv, .. } = hsm {
                        self.metrics.pkcs11_error(rv);
                    }
                    tracing::error!(error = %error, "signing failed");
                    "failed"
                } else {
                    "refused"
                };
                self.record(&audited, outcome, Some(&status), None);
                Err(status)
            }
        }
    }
}

#[tonic::async_trait]
impl GrantAgent for GrantAgentService {
    async fn sign_grant(
        &self,
        request: Request<SignGrantRequest>,
    ) -> Result<Response<SignGrantResponse>, Status> {
        use tracing::Instrument;
        let request_id = uuid::Uuid::new_v4().simple().to_string();
        let span = tracing::info_span!("sign_grant", request_id = %request_id);
        self.sign(request, &request_id).instrument(span).await
    }

    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        let caller = self.identification.identify(&request);
        self.policy
            .knows(&caller)
            .map_err(|refusal| status::from_refusal(&refusal))?;
        let keys = self.agent.keys();
        let now = unix_now();
        let window = i64::from(keys.expiry_warning_days) * 86_400;
        let infos = keys
            .versions()
            .map(|key| {
                let (not_before, not_after) = key.validity();
                let chain = key.chain();
                KeyInfo {
                    name: key.name().to_owned(),
                    algorithm: key.algorithm().jws_name().to_owned(),
                    subject: chain.map(CertificateChain::subject).unwrap_or_default(),
                    issuer: chain.map(CertificateChain::issuer).unwrap_or_default(),
                    organization_number: chain
                        .and_then(CertificateChain::organization_number)
                        .unwrap_or_default(),
                    not_before: not_before.unwrap_or_default(),
                    not_after: not_after.unwrap_or_default(),
                    certificate_sha256: key.certificate_sha256().to_owned(),
                    is_default: key.name() == keys.default_key(),
                    environment: key
                        .environment()
                        .map_or("", CertEnvironment::name)
                        .to_owned(),
                    days_to_expiry: not_after.map_or(0, |t| (t - now).div_euclid(86_400)),
                    expires_soon: not_after.is_some_and(|t| t - now <= window),
                    active: keys
                        .select(key.name(), now)
                        .is_ok_and(|active| std::ptr::eq(active, key)),
                    kid: key.kid().unwrap_or_default().to_owned(),
                }
            })
            .collect();
        Ok(Response::new(ListKeysResponse { keys: infos }))
    }
}
