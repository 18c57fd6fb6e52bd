//! The gRPC front: the `grantagent.v1.GrantAgent` service, the standard health service
//! and server reflection (so `grpcurl` works without the .proto), on a TCP listener with
//! mutual TLS (or plain on loopback with `insecure`) and/or a Unix socket.
//!
//! Every GrantAgent call is tied to a caller identity proven by the transport
//! (`caller`), checked against the policy (`policy`) and recorded in the audit log
//! (`audit`). Health and reflection are open: they reveal nothing secret and
//! orchestrators probe them without credentials.

mod audit;
mod caller;
mod conn;
mod gate;
mod health;
mod http;
mod policy;
mod reload;
mod service;
mod status;
mod tls;
mod trace;

use std::{
    future::Future,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{
    net::{TcpListener, UnixListener},
    sync::{mpsc, watch},
};
use tonic::service::Routes;

use crate::{
    agent::Agent,
    config::{Config, RevocationSettings},
    metrics::Metrics,
    proto,
    revocation::Checker,
};
use audit::AuditLog;
use conn::{Connections, Listener};
pub(crate) use gate::Reached;
use gate::{Door, Gate};
use policy::Policy;
use reload::Reload;
use service::GrantAgentService;

/// How long in-flight requests may run after SIGTERM before the agent stops anyway.
pub(crate) const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The health service name that says only whether the agent's process answers: SERVING
/// from start to shutdown, whatever its token does. For liveness probes, which must not
/// restart an agent whose token is away (a restart would run C_Login again, and with a
/// wrong PIN count towards locking the token). Readiness asks `grantagent.v1.GrantAgent`.
pub const LIVENESS_SERVICE: &str = "grant-agent.liveness";

pub use health::KEY_SERVICE_PREFIX;

/// Largest health or reflection request: they are a service name or a symbol, and are
/// open to any peer that reaches a listener.
const MAX_PROBE_BYTES: usize = 4 * 1024;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not be set up.
    #[error("cannot listen on {what}: {source}")]
    Listen {
        /// The address or socket path.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS files do not make a usable server configuration.
    #[error("tls: {0}")]
    TlsConfig(String),
    /// A TLS file could not be read, or holds no usable PEM.
    #[error("tls: {path}: {source}")]
    TlsFile {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The audit log could not be opened.
    #[error("audit.file {path}: {source}")]
    Audit {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTPS client for the token endpoint could not be set up.
    #[error(transparent)]
    Token(#[from] crate::token::SetupError),
    /// Reflection could not load the descriptor set (a build problem).
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Sets up the listeners of `config`, reports their addresses to `on_ready` in the form
/// `grant-agent client --addr` takes ("127.0.0.1:50051", "unix:/run/grant-agent.sock";
/// port 0 picks a free port), and serves
/// until `shutdown` completes; in-flight calls finish first. On SIGHUP, `config_path` is
/// read again and keys and policy are replaced (a bad file changes nothing).
pub async fn run(
    agent: Arc<Agent>,
    config: &Config,
    config_path: Option<PathBuf>,
    on_ready: impl FnOnce(&[String]),
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let server = Server::bind(agent, config, config_path).await?;
    server.serve(on_ready, shutdown).await;
    Ok(())
}

/// The agent with its listeners bound and its services built, nothing accepted yet: what
/// `run` has between binding and serving, as mini-redis's `Listener` is.
struct Server {
    agent: Arc<Agent>,
    policy: Arc<Policy>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    connections: Arc<Connections>,
    /// Completes once every connection has closed.
    all_closed: mpsc::Receiver<()>,
    routes: Routes,
    listeners: Vec<Listener>,
    metrics_listener: Option<TcpListener>,
    /// `[health] listen`: health alone, plaintext.
    health_port: Option<health::HealthPort>,
    /// In the form `on_ready` reports them.
    endpoints: Vec<String>,
    /// Removed when serving stops.
    socket_path: Option<PathBuf>,
    reload: Option<Reload>,
    /// The TCP listener's TLS files, reloaded while serving.
    tls: Option<Arc<tls::TlsMaterial>>,
    /// Revocation checks on a timer, unless `[revocation] enabled = false`.
    revocation: Option<(Checker, RevocationSettings)>,
}

impl Server {
    /// Opens the audit log, builds the services and binds the GrantAgent listeners, the
    /// metrics listener and the health port of `config`, in that order; the first
    /// failure is returned.
    async fn bind(
        agent: Arc<Agent>,
        config: &Config,
        config_path: Option<PathBuf>,
    ) -> Result<Self, ServeError> {
        let access = &config.access;
        if access.insecure {
            tracing::warn!(
                "insecure = true: plain TCP on loopback, every local process may call as `anonymous`"
            );
        }
        if access.policy.is_empty() {
            tracing::warn!("the policy has no rules: every grant request will be refused");
        }
        let metrics = Arc::new(Metrics::new());
        let audit = open_audit(access, &metrics)?;
        let policy = Arc::new(Policy::new(&access.policy));
        let revocation = check_revocation(&agent, config).await?;
        let health = health::service(Arc::clone(&agent)).await;
        let (connections, all_closed, routes) =
            services(&agent, config, &policy, &audit, &metrics, health.clone()).await?;
        let (listeners, mut endpoints, tls) = bind_listeners(access, &policy, &metrics).await?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => {
                let (listener, local) = bind_tcp(addr, "[metrics] listen").await?;
                endpoints.push(crate::metrics::describe(local));
                Some(listener)
            }
            None => None,
        };
        let health_port = match config.health_listen {
            Some(addr) => {
                let limits = *connections.limits();
                let (port, local) =
                    health::HealthPort::bind(addr, health, limits, &audit, &metrics).await?;
                endpoints.push(health::describe(local));
                Some(port)
            }
            None => None,
        };
        Ok(Server {
            agent,
            policy,
            audit,
            metrics,
            connections,
            all_closed,
            routes,
            listeners,
            metrics_listener,
            health_port,
            endpoints,
            socket_path: access.unix_socket.as_ref().map(|s| s.path.clone()),
            reload: config_path.map(|path| Reload {
                path,
                access: config.access.clone(),
                token: config.token.clone(),
                limits: config.limits,
            }),
            tls,
            revocation,
        })
    }

    /// Accepts on every listener, reports the endpoints to `on_ready` and serves until
    /// `shutdown` completes; then stops accepting and gives in-flight requests
    /// `SHUTDOWN_GRACE` to finish.
    async fn serve(self, on_ready: impl FnOnce(&[String]), shutdown: impl Future<Output = ()>) {
        let (stop, stopped) = watch::channel(false);
        let servers: Vec<_> = self
            .listeners
            .into_iter()
            .map(|listener| {
                tokio::spawn(conn::serve(
                    listener,
                    Arc::clone(&self.connections),
                    self.routes.clone(),
                    stopped.clone(),
                ))
            })
            .collect();
        drop(self.connections);
        if let Some(listener) = self.metrics_listener {
            let done = wait(stopped.clone());
            let (metrics, agent) = (self.metrics, Arc::clone(&self.agent));
            let _metrics = tokio::spawn(async move {
                if let Err(error) = crate::metrics::serve(listener, metrics, agent, done).await {
                    tracing::error!(%error, "the metrics listener failed");
                }
            });
        }
        if let Some(reload) = self.reload
            && let Some(hangup) = hangup()
        {
            let _reload = tokio::spawn(reload::reload_on_hangup(
                Arc::clone(&self.agent),
                Arc::clone(&self.policy),
                reload,
                hangup,
            ));
        }
        if let Some(port) = self.health_port {
            let _health = tokio::spawn(port.serve(stopped.clone()));
        }
        if let Some(tls) = self.tls {
            let _tls = tokio::spawn(tls.watch(stopped.clone(), hangup()));
        }
        if let Some((checker, settings)) = self.revocation {
            let agent = Arc::clone(&self.agent);
            let _revocation = tokio::spawn(agent.watch_revocation(checker, settings));
        }
        spawn_summaries(&self.audit, &stopped);
        tracing::info!(endpoints = %self.endpoints.join(", "), "listening");
        on_ready(&self.endpoints);

        shutdown.await;
        let _ = stop.send(true);
        for server in servers {
            if let Err(error) = server.await {
                tracing::error!(%error, "a listener task failed");
            }
        }
        // In-flight requests get a bounded time to finish; an HSM that hangs must not keep
        // the process from stopping.
        let mut all_closed = self.all_closed;
        if tokio::time::timeout(SHUTDOWN_GRACE, all_closed.recv())
            .await
            .is_err()
        {
            tracing::warn!(
                seconds = SHUTDOWN_GRACE.as_secs(),
                "requests still in flight after the shutdown grace period; stopping anyway"
            );
        }
        if let Some(path) = self.socket_path {
            let _ = std::fs::remove_file(path);
        }
        // The cached answers counted since the last summary are audited too.
        self.audit.write_cached_summaries();
        // Everything queued is written before the process ends.
        self.audit.close();
        tracing::info!("stopped serving");
    }
}

/// Opens the audit log `access` names (none: stderr), with its writer thread.
fn open_audit(
    access: &crate::config::Access,
    metrics: &Metrics,
) -> Result<Arc<AuditLog>, ServeError> {
    let settings = audit::AuditSettings {
        cached: access.audit_cached,
        fail_closed: access.audit_fail_closed,
    };
    let audit =
        AuditLog::open(access.audit_file.as_deref(), settings, metrics).map_err(|source| {
            ServeError::Audit {
                path: access
                    .audit_file
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                source,
            }
        })?;
    Ok(Arc::new(audit))
}

/// The revocation checker on the token exchange's HTTP client (its proxy and roots), after
/// a first check of every certificate: a revoked one never signs, not even in the first
/// seconds. `None` with `[revocation] enabled = false`.
async fn check_revocation(
    agent: &Agent,
    config: &Config,
) -> Result<Option<(Checker, RevocationSettings)>, ServeError> {
    let settings = config.revocation;
    if !settings.enabled {
        tracing::warn!("[revocation] enabled = false: a revoked certificate would go on signing");
        agent.revocation_not_checked("[revocation] enabled = false");
        return Ok(None);
    }
    let checker = Checker::new(crate::token::http_client(&config.token)?, settings.timeout);
    agent.check_revocation(&checker, settings.good_for).await;
    Ok(Some((checker, settings)))
}

/// Checks every certificate's revocation once, as the server does before serving, for
/// `grant-agent cert check`.
pub async fn check_certificates(agent: &Agent, config: &Config) -> Result<(), ServeError> {
    check_revocation(agent, config).await.map(|_| ())
}

/// The token exchange, the GrantAgent service behind its gate, health and reflection,
/// and the connection table with its limits; the receiver completes once every
/// connection has closed.
async fn services(
    agent: &Arc<Agent>,
    config: &Config,
    policy: &Arc<Policy>,
    audit: &Arc<AuditLog>,
    metrics: &Arc<Metrics>,
    health: health::Health,
) -> Result<(Arc<Connections>, mpsc::Receiver<()>, Routes), ServeError> {
    let tokens = Arc::new(crate::token::TokenService::new(
        Arc::clone(agent),
        &config.token,
        Arc::clone(metrics),
        service::grant_audit(Arc::clone(audit)),
    )?);
    let service = GrantAgentService::new(
        Arc::clone(agent),
        tokens,
        Arc::clone(policy),
        Arc::clone(audit),
        Arc::clone(metrics),
    );
    let (connections, all_closed) = Connections::new(
        config.limits,
        crate::process::open_files_limit(),
        Arc::clone(audit),
        Arc::clone(metrics),
    );
    let limits = *connections.limits();
    tracing::info!(
        max_connections = limits.max_connections,
        per_peer = limits.max_connections_per_peer,
        streams = limits.max_concurrent_streams,
        "connection limits"
    );
    // One door for gRPC and JSON: the budget of buffered request bytes is shared.
    let door = Door::new(
        Arc::clone(policy),
        Arc::clone(audit),
        Arc::clone(metrics),
        limits.max_buffered_request_bytes,
        limits.request_timeout,
    );
    let api = http::HttpApi::new(service.clone(), door.clone());
    let gate = Gate::new(
        proto::grant_agent_server::GrantAgentServer::new(service)
            .max_decoding_message_size(crate::config::MAX_REQUEST_BYTES),
        door,
    );
    let routes = routes(gate, health, api)?;
    Ok((connections, all_closed, routes))
}

/// Binds the TCP listener (with its TLS acceptor, or plain when `insecure`) and the Unix
/// socket that `access` names, with their endpoints in the form `on_ready` reports and
/// the TLS material to keep current.
async fn bind_listeners(
    access: &crate::config::Access,
    policy: &Arc<Policy>,
    metrics: &Arc<Metrics>,
) -> Result<(Vec<Listener>, Vec<String>, Option<Arc<tls::TlsMaterial>>), ServeError> {
    let mut endpoints = Vec::new();
    let mut listeners = Vec::new();
    let mut material = None;
    if let Some(addr) = access.listen {
        let listen_error = |source| ServeError::Listen {
            what: format!("{addr} (set `listen` in the config)"),
            source,
        };
        let tcp = TcpListener::bind(addr).await.map_err(listen_error)?;
        let local = tcp.local_addr().map_err(listen_error)?;
        let listener = match &access.tls {
            Some(tls) => {
                let loaded = tls::TlsMaterial::load(tls, Arc::clone(policy), Arc::clone(metrics))?;
                material = Some(Arc::clone(&loaded));
                Listener::Tls(tcp, loaded, tls.caller_identity)
            }
            None => Listener::Plain(tcp, access.insecure),
        };
        listeners.push(listener);
        endpoints.push(local.to_string());
    }
    if let Some(socket) = &access.unix_socket {
        let unix = bind_socket(&socket.path, socket.mode).map_err(|source| ServeError::Listen {
            what: format!(
                "{} (set `unix_socket` in the config)",
                socket.path.display()
            ),
            source,
        })?;
        listeners.push(Listener::Unix(unix));
        endpoints.push(format!("unix:{}", socket.path.display()));
    }
    Ok((listeners, endpoints, material))
}

/// Binds a TCP listener at `addr`, which the config's `key` set; the address it got.
async fn bind_tcp(addr: SocketAddr, key: &str) -> Result<(TcpListener, SocketAddr), ServeError> {
    let listen_error = |source| ServeError::Listen {
        what: format!("{addr} (set {key} in the config)"),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(listen_error)?;
    let local = listener.local_addr().map_err(listen_error)?;
    Ok((listener, local))
}

/// Writes the audit's summaries of cached answers at its interval, if it has one, until
/// `stopped` changes.
fn spawn_summaries(audit: &Arc<AuditLog>, stopped: &watch::Receiver<bool>) {
    if let Some(every) = audit.summary_interval() {
        let audit = Arc::clone(audit);
        let mut done = stopped.clone();
        let _summaries = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let _ = tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => audit.write_cached_summaries(),
                    _ = done.changed() => return,
                }
            }
        });
    }
}

/// Binds the Unix socket with its final mode before anyone can reach it: bound inside a
/// fresh folder only the agent can enter, given `mode`, then renamed into place. Binding
/// at the final path and changing the mode after would leave a moment in which the
/// umask decides who may connect.
fn bind_socket(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    remove_stale_socket(path)?;
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let private = parent.join(format!(".grant-agent-{}", uuid::Uuid::new_v4().simple()));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("socket");
    let bound = UnixListener::bind(&staged).and_then(|listener| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    bound
}

/// GrantAgent (behind its gate), `health`, reflection and the JSON API.
fn routes(
    grants: Gate<proto::grant_agent_server::GrantAgentServer<GrantAgentService>>,
    health: health::Health,
    api: http::HttpApi,
) -> Result<Routes, ServeError> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?
        .max_decoding_message_size(MAX_PROBE_BYTES);
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?
        .max_decoding_message_size(MAX_PROBE_BYTES);
    let grpc = Routes::new(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(grants);
    let router = api.route(grpc.into_axum_router()).fallback(http::not_found);
    Ok(Routes::from(router).prepare())
}

/// A socket file left by an agent that did not stop cleanly would make bind fail; remove
/// it, but never a file that is not a socket.
fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "a file that is not a socket is in the way",
        )),
        Err(_) => Ok(()),
    }
}

async fn wait(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
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

/// A listener for SIGHUP, registered now: SIGHUP's default action ends the process, so
/// the listeners must exist before `on_ready` announces the agent (and `--pid-file`
/// tells tools such as spiffe-helper where to send it). `None`, with a warning, where
/// the signal cannot be listened for: then a reload means a restart.
fn hangup() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    signal(SignalKind::hangup())
        .map_err(|error| tracing::warn!(%error, "cannot listen for SIGHUP; reload by restarting"))
        .ok()
}
