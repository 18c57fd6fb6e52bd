//! Health: the `grpc.health.v1` service every listener serves, and the health port
//! (`[health] listen`) that serves nothing else.
//!
//! The health port exists for Kubernetes' native gRPC probe (`grpc: {port: …}`), which
//! cannot present a client certificate and so cannot probe the mutual-TLS port. It is
//! plaintext HTTP/2 (h2c) and reveals only what health says on every listener: whether
//! the token is usable (service `""` and `grantagent.v1.GrantAgent`, readiness) and
//! whether the process answers ([`LIVENESS_SERVICE`], liveness). Any other method is
//! UNIMPLEMENTED there. Its connections go through the same accept loop as the gRPC
//! listeners, with caps of their own ([`HEALTH_CONNECTIONS`]), so a flood of probes
//! cannot take connections from callers.

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, sync::watch};
use tonic::service::Routes;
use tonic_health::{
    ServingStatus,
    server::{HealthReporter, HealthService},
};

use crate::{config::Limits, metrics::Metrics, proto};

use super::{
    LIVENESS_SERVICE, MAX_PROBE_BYTES, ServeError,
    audit::AuditLog,
    conn::{self, Connections, Listener},
    service::GrantAgentService,
};

/// Connections the health port holds at once: probes open one, ask, and close it.
const HEALTH_CONNECTIONS: usize = 16;

/// Connections one peer (a node's kubelet) may hold on the health port.
const HEALTH_CONNECTIONS_PER_PEER: usize = 8;

type Grants = proto::grant_agent_server::GrantAgentServer<GrantAgentService>;

/// The `grpc.health.v1` service, shared by every listener and the health port.
pub(super) type Health = tonic_health::pb::health_server::HealthServer<HealthService>;

/// The health service, SERVING for liveness from start to shutdown and, for readiness,
/// following `serving`: NOT_SERVING while the token is being recovered. Statuses are set
/// before it is returned, so a probe never sees UNKNOWN.
pub(super) async fn service(serving: watch::Receiver<bool>) -> Health {
    let health = HealthReporter::new();
    let service = Health::new(HealthService::from_health_reporter(health.clone()));
    health.set_serving::<Grants>().await;
    health
        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    let _follow = tokio::spawn(follow(health, serving));
    service.max_decoding_message_size(MAX_PROBE_BYTES)
}

/// Sets readiness (`""` and the GrantAgent service) to what `serving` says, until the
/// agent is gone.
async fn follow(health: HealthReporter, mut serving: watch::Receiver<bool>) {
    while serving.changed().await.is_ok() {
        let status = if *serving.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
        health
            .set_service_status(<Grants as tonic::server::NamedService>::NAME, status)
            .await;
    }
}

/// The health port, bound and not yet serving.
pub(super) struct HealthPort {
    listener: TcpListener,
    connections: Arc<Connections>,
    routes: Routes,
}

impl HealthPort {
    /// Binds `addr` for `health` alone, with the agent's connection limits capped to
    /// [`HEALTH_CONNECTIONS`]; the address it got.
    pub(super) async fn bind(
        addr: SocketAddr,
        health: Health,
        limits: Limits,
        audit: &Arc<AuditLog>,
        metrics: &Arc<Metrics>,
    ) -> Result<(Self, SocketAddr), ServeError> {
        let (listener, local) = super::bind_tcp(addr, "[health] listen").await?;
        let limits = Limits {
            max_connections: limits.max_connections.min(HEALTH_CONNECTIONS),
            max_connections_per_peer: limits
                .max_connections_per_peer
                .min(HEALTH_CONNECTIONS_PER_PEER),
            max_unauthenticated: limits.max_unauthenticated.min(HEALTH_CONNECTIONS),
            ..limits
        };
        // The receiver tells when every connection has closed; shutdown waits only for
        // the gRPC listeners' requests, not for probes.
        let (connections, _all_closed) = Connections::new(
            limits,
            crate::process::open_files_limit(),
            Arc::clone(audit),
            Arc::clone(metrics),
        );
        let port = HealthPort {
            listener,
            connections,
            routes: Routes::new(health).prepare(),
        };
        Ok((port, local))
    }

    /// Serves health on the port until `stopped` changes.
    pub(super) async fn serve(self, stopped: watch::Receiver<bool>) {
        conn::serve(
            Listener::Plain(self.listener, false),
            self.connections,
            self.routes,
            stopped,
        )
        .await;
    }
}

/// The health port's address in the form `on_ready` reports it.
pub(super) fn describe(addr: SocketAddr) -> String {
    format!("http://{addr} (grpc.health.v1)")
}
