//! `grantagent.v1.GrantAgent`: wire types in, domain types out, one log line per call.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    agent::Agent,
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
        let keys = self
            .agent
            .keys()
            .map(|key| {
                let chain = key.chain();
                let (not_before, not_after) = chain.validity();
                KeyInfo {
                    name: key.name().to_owned(),
                    algorithm: key.algorithm().jws_name().to_owned(),
                    subject: chain.subject(),
                    issuer: chain.issuer(),
                    organization_number: chain.organization_number().unwrap_or_default(),
                    not_before,
                    not_after,
                    certificate_sha256: key.certificate_sha256().to_owned(),
                    is_default: key.name() == self.agent.default_key(),
                }
            })
            .collect();
        Ok(Response::new(ListKeysResponse { keys }))
    }
}
