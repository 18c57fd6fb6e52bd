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

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tonic::service::Routes;
use tonic_health::{
    ServingStatus,
    server::{HealthReporter, HealthService},
};

use crate::{
    agent::{Agent, unix_now},
    config::Limits,
    metrics::Metrics,
    proto,
};

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
/// following the agent's `serving`: NOT_SERVING while the token is being recovered. Each
/// key has a service name of its own, [`KEY_SERVICE_PREFIX`] and its name, SERVING only
/// while the token is usable and the key has a version valid now and not revoked.
/// Statuses are set before it is returned, so a probe never sees UNKNOWN.
pub(super) async fn service(agent: Arc<Agent>) -> Health {
    let health = HealthReporter::new();
    let service = Health::new(HealthService::from_health_reporter(health.clone()));
    health.set_serving::<Grants>().await;
    health
        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    let mut keys_health = health.clone();
    let keys = set_keys(&mut keys_health, &agent, Vec::new()).await;
    let _follow = tokio::spawn(follow(health, agent.serving()));
    let _keys = tokio::spawn(follow_keys(keys_health, agent, keys));
    service.max_decoding_message_size(MAX_PROBE_BYTES)
}

/// What comes before a key's name in its health service name: `key/default`.
pub const KEY_SERVICE_PREFIX: &str = "key/";

/// How often the keys' health is read again when nothing else changes it: a certificate
/// that expires, or a renewal that becomes valid, shows within this.
const KEY_HEALTH_EVERY: Duration = Duration::from_secs(30);

/// Sets each key's status; removes the names of keys a reload took away (`before`).
/// Returns the names set.
async fn set_keys(health: &mut HealthReporter, agent: &Agent, before: Vec<String>) -> Vec<String> {
    let up = *agent.serving().borrow();
    let now = unix_now();
    let names = agent.key_names();
    for name in before.iter().filter(|n| !names.contains(n)) {
        health
            .clear_service_status(&format!("{KEY_SERVICE_PREFIX}{name}"))
            .await;
    }
    for name in &names {
        let status = if up && agent.key_usable(name, now) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health
            .set_service_status(&format!("{KEY_SERVICE_PREFIX}{name}"), status)
            .await;
    }
    names
}

/// Keeps the keys' statuses current: on a change of the token's state or of a
/// revocation, and every [`KEY_HEALTH_EVERY`].
async fn follow_keys(mut health: HealthReporter, agent: Arc<Agent>, mut names: Vec<String>) {
    let mut serving = agent.serving();
    let mut revocations = agent.revocation().changes();
    loop {
        tokio::select! {
            changed = serving.changed() => if changed.is_err() { return },
            changed = revocations.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(KEY_HEALTH_EVERY) => {}
        }
        names = set_keys(&mut health, &agent, names).await;
    }
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
