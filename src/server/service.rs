//! `grantagent.v1.GrantAgent`: wire types in, domain types out, one log line per call.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    agent::{Agent, unix_now},
    cert::{CertEnvironment, CertificateChain},
    grant::GrantParameters,
    proto::{
        KeyInfo, ListKeysRequest, ListKeysResponse, SignGrantRequest, SignGrantResponse,
        grant_agent_server::GrantAgent,
    },
};

use super::status::from_sign_error;

pub(crate) struct GrantAgentService {
    agent: Arc<Agent>,
}

impl GrantAgentService {
    pub(super) fn new(agent: Arc<Agent>) -> Self {
        GrantAgentService { agent }
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

#[tonic::async_trait]
impl GrantAgent for GrantAgentService {
    async fn sign_grant(
        &self,
        request: Request<SignGrantRequest>,
    ) -> Result<Response<SignGrantResponse>, Status> {
        let peer = request.remote_addr();
        let params: GrantParameters = request.into_inner().grant.unwrap_or_default().into();
        match self.agent.sign_grant(&params).await {
            Ok(grant) => {
                tracing::info!(
                    ?peer,
                    key = %grant.key,
                    client_id = %params.client_id,
                    scopes = %params.scopes.join(" "),
                    environment = %params.environment,
                    jti = %grant.jti,
                    expires_at = grant.expires_at,
                    "grant signed"
                );
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
                let status = from_sign_error(&error);
                tracing::warn!(
                    ?peer,
                    key = %params.key,
                    client_id = %params.client_id.escape_debug(),
                    code = ?status.code(),
                    error = %error,
                    "grant refused"
                );
                Err(status)
            }
        }
    }

    async fn list_keys(
        &self,
        _request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
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
