//! Connections: accept, admit within the limits, serve HTTP/2 (gRPC and JSON) or HTTP/1.1
//! (JSON), close.
//!
//! The agent runs its own accept loop instead of tonic's, because every resource a peer
//! can make it hold before it is known needs a bound here ([`Limits`]):
//!
//! - a permit of `max_connections` is taken before `accept`, so the agent never has more
//!   connections than it can afford file descriptors for;
//! - `max_connections_per_peer` per IP address (TCP) or uid (Unix socket);
//! - a connection is *unauthenticated* until its TLS handshake is done and its first
//!   bytes (the HTTP/2 preface, or an HTTP/1.1 request line) have arrived, within
//!   `handshake_timeout`. At most `max_unauthenticated` are;
//!   when one more arrives, or `accept` runs out of file descriptors, the oldest is
//!   closed. Junk that never speaks therefore cannot keep a real caller out;
//! - on mutual TLS a certificate that no policy rule names fails the handshake, so an
//!   unknown caller never gets to send HTTP/2 at all (audited, rate-limited);
//! - HTTP/2 settings bound streams, windows and header lists; a connection without a
//!   call in flight for `idle_timeout` gets a GOAWAY; PINGs drop vanished peers;
//! - `accept` errors for lack of descriptors back off instead of spinning, logged once
//!   per interval with a count.
//!
//! Each request carries the connection's [`Peer`](super::caller::Peer) as an extension.

mod frames;
mod handle;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch},
};
use tokio_rustls::TlsAcceptor;
use tonic::service::Routes;

use crate::{
    config::{IdentityField, Limits},
    metrics::Metrics,
};

use super::{
    audit::{AuditLog, Refused},
    caller::Caller,
    tls::TlsMaterial,
};

/// Descriptors kept back from the connection cap for the token, the audit file, the
/// metrics listener and the token endpoint's connections.
const RESERVED_FILES: u64 = 64;

/// How often a repeated listener problem (no descriptors, refusals) is logged.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How a listener's peers are met.
pub(super) enum Listener {
    /// TCP with mutual TLS: callers by their certificate; each handshake takes the
    /// material current when its connection is accepted.
    Tls(TcpListener, Arc<TlsMaterial>, IdentityField),
    /// Plain TCP on loopback: every caller `anonymous` when `insecure`.
    Plain(TcpListener, bool),
    /// The Unix socket: callers by uid and gid.
    Unix(UnixListener),
}

/// What one peer is counted as for `max_connections_per_peer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PeerKey {
    Ip(IpAddr),
    Uid(u32),
}

/// State shared by every listener of one agent.
pub(super) struct Connections {
    limits: Limits,
    total: Arc<Semaphore>,
    per_peer: Mutex<HashMap<PeerKey, usize>>,
    pending: Mutex<Pending>,
    h2: http2::Builder<TokioExecutor>,
    h1: http1::Builder,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    /// Held as long as any listener or connection holds this state: the server waits on
    /// the receiver, which ends when the last of them is gone.
    _done: mpsc::Sender<()>,
}

/// Unauthenticated connections, oldest first; dropping a sender closes its connection.
#[derive(Default)]
struct Pending {
    next: u64,
    waiting: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Connections {
    /// Sizes the connection cap to the open-files limit (`open_files`), so `accept`
    /// runs out of connection permits before it runs out of descriptors.
    pub(super) fn new(
        mut limits: Limits,
        open_files: u64,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, mpsc::Receiver<()>) {
        let affordable = usize::try_from(open_files.saturating_sub(RESERVED_FILES))
            .unwrap_or(usize::MAX)
            .max(1);
        if limits.max_connections > affordable {
            tracing::warn!(
                configured = limits.max_connections,
                open_files,
                using = affordable,
                "limits.max_connections is more than the open-files limit allows; raise LimitNOFILE to serve more"
            );
            limits.max_connections = affordable;
        }
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        let _ = h2
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .initial_stream_window_size(limits.window_bytes)
            .initial_connection_window_size(limits.connection_window_bytes)
            .adaptive_window(false)
            .max_header_list_size(limits.max_header_list_bytes)
            .max_pending_accept_reset_streams(limits.max_pending_resets)
            .max_local_error_reset_streams(limits.max_pending_resets)
            // Answers are a few KiB; a peer that stops reading holds no more than this.
            .max_send_buf_size(64 * 1024)
            .keep_alive_interval(limits.keepalive_interval)
            .keep_alive_timeout(limits.keepalive_interval);
        let h1 = http1_builder(&limits);
        let (done, all_done) = mpsc::channel(1);
        let connections = Connections {
            limits,
            total: Arc::new(Semaphore::new(limits.max_connections)),
            per_peer: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending::default()),
            h2,
            h1,
            audit,
            metrics,
            _done: done,
        };
        (Arc::new(connections), all_done)
    }

    /// The limits in force (the connection cap as clamped).
    pub(super) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Closes the oldest unauthenticated connection; false when there is none.
    fn evict_oldest(&self) -> bool {
        let evicted = lock(&self.pending).waiting.pop_first().is_some();
        if evicted {
            self.metrics.connection_refused("evicted");
        }
        evicted
    }

    /// A connection permit; when all are taken, the oldest unauthenticated connection
    /// makes room.
    async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = Arc::clone(&self.total).try_acquire_owned() {
            return Some(permit);
        }
        let _ = self.evict_oldest();
        Arc::clone(&self.total).acquire_owned().await.ok()
    }

    fn enter_peer(self: &Arc<Self>, key: PeerKey) -> Option<PeerSlot> {
        let mut counts = lock(&self.per_peer);
        let count = counts.entry(key).or_insert(0);
        if *count >= self.limits.max_connections_per_peer {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            connections: Arc::clone(self),
            key,
        })
    }

    fn enter_pending(self: &Arc<Self>) -> (PendingSlot, oneshot::Receiver<()>) {
        let (evict, evicted) = oneshot::channel();
        // One lock for the check, the eviction and the entry, so listeners accepting at
        // once never hold more than the limit between them.
        let (id, made_room) = {
            let mut pending = lock(&self.pending);
            let made_room = pending.waiting.len() >= self.limits.max_unauthenticated
                && pending.waiting.pop_first().is_some();
            let id = pending.next;
            pending.next += 1;
            let _ = pending.waiting.insert(id, evict);
            (id, made_room)
        };
        if made_room {
            self.metrics.connection_refused("evicted");
        }
        (
            PendingSlot {
                connections: Arc::clone(self),
                id,
            },
            evicted,
        )
    }
}

/// HTTP/1.1 for the JSON API, bounded as HTTP/2 is: the request head within
/// `request_timeout` (which also closes a keep-alive connection idle that long) and at
/// most `max_header_list_bytes` (hyper's floor is 8 KiB); no upgrades.
fn http1_builder(limits: &Limits) -> http1::Builder {
    let mut h1 = http1::Builder::new();
    let _ = h1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_timeout)
        .max_buf_size(
            usize::try_from(limits.max_header_list_bytes)
                .unwrap_or(usize::MAX)
                .max(8 * 1024),
        )
        .keep_alive(true)
        .half_close(false);
    h1
}

/// The guard, also after a panic elsewhere: the data behind these locks stays whole.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// One connection counted against its peer's cap while it lives.
struct PeerSlot {
    connections: Arc<Connections>,
    key: PeerKey,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.connections.per_peer);
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                let _ = counts.remove(&self.key);
            }
        }
    }
}

/// One connection in the unauthenticated set while it lives there.
struct PendingSlot {
    connections: Arc<Connections>,
    id: u64,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let _ = lock(&self.connections.pending).waiting.remove(&self.id);
    }
}

/// Counts `accept` failures for lack of descriptors and logs them once per interval.
struct Starved {
    since_log: u64,
    logged: Option<Instant>,
    backoff: Duration,
}

impl Starved {
    fn new() -> Self {
        Starved {
            since_log: 0,
            logged: None,
            backoff: Duration::ZERO,
        }
    }

    /// Records one failure and gives how long to wait before the next `accept`.
    fn failed(&mut self, error: &std::io::Error) -> Duration {
        self.since_log += 1;
        if self.logged.is_none_or(|at| at.elapsed() >= LOG_INTERVAL) {
            tracing::error!(
                %error,
                failures = self.since_log,
                "cannot accept connections: out of file descriptors; closing unauthenticated connections and backing off"
            );
            self.logged = Some(Instant::now());
            self.since_log = 0;
        }
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
        self.backoff
    }

    fn accepted(&mut self) {
        self.backoff = Duration::ZERO;
    }
}

fn out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
            || code == rustix::io::Errno::NOBUFS.raw_os_error()
            || code == rustix::io::Errno::NOMEM.raw_os_error()
    )
}

/// Accepts connections on `listener` until `stop`, each served on a task of its own.
/// Returns once no more are accepted; the connections end through `stop` too.
pub(super) async fn serve(
    listener: Listener,
    connections: Arc<Connections>,
    routes: Routes,
    mut stop: watch::Receiver<bool>,
) {
    let mut starved = Starved::new();
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => return,
            permit = connections.permit() => match permit {
                Some(permit) => permit,
                None => return,
            },
        };
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => return,
            accepted = accept(&listener) => accepted,
        };
        let (io, key, peer) = match accepted {
            Ok(accepted) => {
                starved.accepted();
                accepted
            }
            Err(error) if out_of_descriptors(&error) => {
                drop(permit);
                // Closing the oldest unauthenticated connection frees a descriptor at
                // once; only when there is none to close does the loop wait.
                if !connections.evict_oldest() {
                    let wait = starved.failed(&error);
                    tokio::time::sleep(wait).await;
                } else {
                    let _ = starved.failed(&error);
                    tokio::task::yield_now().await;
                }
                continue;
            }
            Err(error) => {
                // The peer left between SYN and accept, and the like: that connection's
                // problem, not the listener's.
                tracing::debug!(%error, "accept failed");
                continue;
            }
        };
        let Some(slot) = connections.enter_peer(key) else {
            connections.metrics.connection_refused("per_peer");
            refuse_connection(
                &connections,
                &peer,
                "",
                "busy",
                format!(
                    "more than {} connections from this peer",
                    connections.limits.max_connections_per_peer
                ),
            );
            continue;
        };
        let connection = Arc::clone(&connections);
        let routes = routes.clone();
        let stop = stop.clone();
        let _task = tokio::spawn(async move {
            let _permit = permit;
            let _slot = slot;
            connection.handle(io, peer, routes, stop).await;
        });
    }
}

/// An accepted connection before its handshake.
enum Accepted {
    Tls(TcpStream, TlsAcceptor, IdentityField),
    Plain(TcpStream, bool),
    Unix(UnixStream, Caller),
}

async fn accept(listener: &Listener) -> std::io::Result<(Accepted, PeerKey, String)> {
    match listener {
        Listener::Tls(tcp, tls, field) => {
            let (stream, address) = tcp.accept().await?;
            let _ = stream.set_nodelay(true);
            let key = PeerKey::Ip(address.ip());
            Ok((
                Accepted::Tls(stream, tls.acceptor(), *field),
                key,
                address.to_string(),
            ))
        }
        Listener::Plain(tcp, insecure) => {
            let (stream, address) = tcp.accept().await?;
            // Without TCP_NODELAY, Nagle and delayed ACKs add ~40 ms to every small
            // request/response pair (measured: p50 44 ms at concurrency 1).
            let _ = stream.set_nodelay(true);
            Ok((
                Accepted::Plain(stream, *insecure),
                PeerKey::Ip(address.ip()),
                address.to_string(),
            ))
        }
        Listener::Unix(unix) => {
            let (stream, _) = unix.accept().await?;
            let cred = stream.peer_cred()?;
            Ok((
                Accepted::Unix(stream, Caller::unix(cred.uid(), cred.gid())),
                PeerKey::Uid(cred.uid()),
                "unix".to_owned(),
            ))
        }
    }
}

fn refuse_connection(
    connections: &Connections,
    peer: &str,
    caller: &str,
    outcome: &'static str,
    reason: String,
) {
    connections.audit.refused(Refused {
        audit: "connection",
        time: crate::agent::rfc3339(crate::agent::unix_now()),
        caller,
        peer,
        outcome,
        code: "",
        reason,
        suppressed: 0,
    });
}
