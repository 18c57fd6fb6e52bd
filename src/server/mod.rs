//! The gRPC front: the `grantagent.v1.GrantAgent` service, the standard health service
//! and server reflection (so `grpcurl` works without the .proto), on one listener.

mod service;
mod status;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::{agent::Agent, config::Config, proto};
use service::GrantAgentService;

/// Largest request accepted, far above any valid grant request (see `grant` for the
/// per-field limits), so an oversized message is refused before it is parsed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address could not be bound.
    #[error(
        "cannot listen on {addr}: {source}; is another process using the port? (set `listen` in the config)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reflection could not load the descriptor set (a build problem).
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The HTTP/2 server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds `addr`, reports the bound address to `on_ready` (port 0 picks a free port), and
/// serves `agent` until `shutdown` completes; in-flight calls finish first.
pub async fn run(
    agent: Arc<Agent>,
    addr: SocketAddr,
    on_ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let bind = |source| ServeError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind)?;
    let local = listener.local_addr().map_err(bind)?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<proto::grant_agent_server::GrantAgentServer<GrantAgentService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let grants = proto::grant_agent_server::GrantAgentServer::new(GrantAgentService::new(agent))
        .max_decoding_message_size(MAX_REQUEST_BYTES);

    tracing::info!(%local, "listening");
    on_ready(local);
    Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(grants)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    tracing::info!("stopped serving");
    Ok(())
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM, the signals operators and init systems send.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                let _ = s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown requested");
}

/// Reloads the config on SIGHUP: new keys, certificates, environments and default key take
/// effect for the next request; in-flight requests finish with the old set. A config that
/// fails to load or validate is logged and the running keys are kept.
pub async fn reload_on_hangup(agent: Arc<Agent>, path: PathBuf, listen: SocketAddr) {
    let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::warn!("cannot listen for SIGHUP; reload by restarting");
        return;
    };
    while hangup.recv().await.is_some() {
        let agent = Arc::clone(&agent);
        let file = path.clone();
        let result = tokio::task::spawn_blocking(move || {
            let config = Config::load(&file).map_err(|e| e.to_string())?;
            agent.reload(&config).map_err(|e| e.to_string())?;
            Ok::<_, String>(config)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        match result {
            Ok(config) => {
                let versions = config.keys.len();
                tracing::info!(config = %path.display(), versions, "reloaded");
                if config.listen != listen {
                    tracing::warn!(listen = %config.listen, "`listen` changed; restart the agent to apply it");
                }
            }
            Err(error) => {
                tracing::error!(config = %path.display(), %error, "reload failed; keeping the running keys");
            }
        }
    }
}
