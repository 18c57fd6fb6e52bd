//! A client for a running agent, for scripts (`grant-agent client ...`) and tests: over a
//! Unix socket (`unix:/run/grant-agent.sock`), plain TCP on loopback (`127.0.0.1:50051`),
//! or mutual TLS (`host:port` with [`ClientTls`]). [`token_file`] keeps a file holding a
//! fresh access token, for tools that read their credential from a file.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

use crate::proto::grant_agent_client::GrantAgentClient;

pub mod token_file;

/// The caller's side of mutual TLS.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// CA bundle that the agent's certificate must chain to.
    pub ca: PathBuf,
    /// The caller's certificate (PEM).
    pub certificate: PathBuf,
    /// The caller's private key (PEM).
    pub key: PathBuf,
    /// Name to check in the agent's certificate; defaults to the host in the address.
    pub domain: Option<String>,
}

/// Why no connection was made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A TLS file could not be read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The address is not one a connection can be made to.
    #[error("--addr {addr}: not an address: {source}")]
    Address {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The agent could not be reached.
    #[error("--addr {addr}: cannot connect: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Connects to the agent at `addr`.
pub async fn connect(
    addr: &str,
    tls: Option<&ClientTls>,
) -> Result<GrantAgentClient<Channel>, ClientError> {
    Ok(GrantAgentClient::new(channel(addr, tls).await?))
}

/// Whether the agent at `addr` says `service` is SERVING (`grpc.health.v1`):
/// `grantagent.v1.GrantAgent` for readiness (its token is usable),
/// [`crate::server::LIVENESS_SERVICE`] for liveness (its process answers).
pub async fn serving(
    addr: &str,
    tls: Option<&ClientTls>,
    service: &str,
) -> Result<bool, ClientError> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let response = HealthClient::new(channel(addr, tls).await?)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await;
    Ok(matches!(response, Ok(r) if r.get_ref().status == 1))
}

async fn channel(addr: &str, tls: Option<&ClientTls>) -> Result<Channel, ClientError> {
    let fail = |source| ClientError::Connect {
        addr: addr.to_owned(),
        source,
    };
    let malformed = |source| ClientError::Address {
        addr: addr.to_owned(),
        source,
    };
    if let Some(path) = addr.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        // The URI is required by the API but unused: the connector opens the socket.
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(fail)?;
        return Ok(channel);
    }
    let channel = match tls {
        None => Endpoint::from_shared(format!("http://{addr}")).map_err(malformed)?,
        Some(tls) => {
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
            Endpoint::from_shared(format!("https://{addr}"))
                .map_err(malformed)?
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
                        .identity(Identity::from_pem(read(&tls.certificate)?, read(&tls.key)?))
                        .domain_name(tls.domain.clone().unwrap_or_else(|| {
                            host.trim_start_matches('[')
                                .trim_end_matches(']')
                                .to_owned()
                        })),
                )
                .map_err(fail)?
        }
    }
    .connect()
    .await
    .map_err(fail)?;
    Ok(channel)
}

fn read(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::File {
        path: path.display().to_string(),
        source,
    })
}
