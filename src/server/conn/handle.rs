//! One accepted connection, from its handshake to its close: the TLS handshake or the
//! caller's uid, the first bytes (the HTTP/2 preface, or an HTTP/1.1 request line for the
//! JSON API), then HTTP with an idle timer until the peer leaves, the connection idles out
//! or the server stops.

use std::{
    pin::{Pin, pin},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes};
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpStream, UnixStream},
    sync::watch,
};
use tonic::service::Routes;
use tower::ServiceExt;

use crate::server::{
    caller::{Caller, Peer},
    tls::UnknownCaller,
};

use super::{Accepted, Connections, frames::SmallFrames, lock, refuse_connection};

/// The HTTP/2 connection preface every client sends first (RFC 9113, 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a connection's first four bytes start an HTTP/1.1 request line: a method is
/// upper-case letters (RFC 9110's, and newer ones such as QUERY), then a space. The JSON
/// API is POST; any other method gets its 405 from the router rather than a silent
/// close, so a client learns what it did wrong. hyper then parses the rest, within its
/// bounds.
fn starts_http1(start: &[u8; 4]) -> bool {
    let letters = start.iter().take_while(|b| b.is_ascii_uppercase()).count();
    letters >= 3 && start[letters..].iter().all(|&b| b == b' ') && start != &PREFACE[..4]
}

impl Connections {
    /// Handshake (within the timeout, evictable), then HTTP/2 until the peer leaves, the
    /// connection idles out or the server stops.
    pub(super) async fn handle(
        self: Arc<Self>,
        accepted: Accepted,
        address: String,
        routes: Routes,
        mut stop: watch::Receiver<bool>,
    ) {
        let (slot, evicted) = self.enter_pending();
        let handshake = tokio::time::timeout(
            self.limits.handshake_timeout,
            self.handshake(accepted, &address),
        );
        let admitted = tokio::select! {
            _ = evicted => return,
            // A stopping agent does not wait for handshakes.
            _ = stop.wait_for(|stop| *stop) => return,
            admitted = handshake => admitted,
        };
        drop(slot);
        match admitted {
            Err(_elapsed) => self.metrics.connection_refused("handshake_timeout"),
            Ok(None) => {}
            Ok(Some(Admitted::Tls(io, caller, protocol))) => {
                let peer = Peer::new(caller, &address);
                self.run(io, protocol, peer, routes, stop).await;
            }
            Ok(Some(Admitted::Tcp(io, caller, protocol))) => {
                let peer = Peer::new(caller, &address);
                self.run(io, protocol, peer, routes, stop).await;
            }
            Ok(Some(Admitted::Unix(io, caller, protocol))) => {
                let peer = Peer::new(caller, &address);
                self.run(io, protocol, peer, routes, stop).await;
            }
        }
    }

    /// TLS (with the caller check in the certificate verifier), then the first bytes.
    async fn handshake(&self, accepted: Accepted, address: &str) -> Option<Admitted> {
        match accepted {
            Accepted::Tls(stream, tls, field) => {
                let stream = match tls.accept(stream).into_fallible().await {
                    Ok(stream) => stream,
                    Err((error, stream)) => {
                        self.handshake_failed(&error, address);
                        linger(stream).await;
                        return None;
                    }
                };
                let caller = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map_or_else(
                        || Caller::plain(false),
                        |leaf| Caller::certificate(leaf.as_ref(), field),
                    );
                let (io, protocol) = sniff(stream).await?;
                Some(Admitted::Tls(Box::new(io), caller, protocol))
            }
            Accepted::Plain(stream, insecure) => {
                let (io, protocol) = sniff(stream).await?;
                Some(Admitted::Tcp(io, Caller::plain(insecure), protocol))
            }
            Accepted::Unix(stream, caller) => {
                let (io, protocol) = sniff(stream).await?;
                Some(Admitted::Unix(io, caller, protocol))
            }
        }
    }

    fn handshake_failed(&self, error: &std::io::Error, address: &str) {
        let unknown = error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .and_then(|e| match e {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
                    other.0.downcast_ref::<UnknownCaller>()
                }
                _ => None,
            });
        match unknown {
            Some(UnknownCaller(caller)) => {
                self.metrics.connection_refused("unknown_caller");
                refuse_connection(
                    self,
                    address,
                    caller,
                    "denied",
                    format!("caller {caller} is not in the policy; refused at the TLS handshake"),
                );
            }
            None => {
                self.metrics.connection_refused("tls");
                tracing::debug!(%error, peer = address, "TLS handshake failed");
            }
        }
    }

    /// Serves HTTP/2 or HTTP/1.1 on an admitted connection.
    async fn run<I>(
        &self,
        io: I,
        protocol: Protocol,
        peer: Peer,
        routes: Routes,
        stop: watch::Receiver<bool>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let calls = Arc::clone(&activity);
        let service =
            tower::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
                let _ = request.extensions_mut().insert(peer.clone());
                let call = Call::enter(&calls);
                let routes = routes.clone();
                async move {
                    let response = routes.oneshot(request).await;
                    drop(call);
                    response.map(|response| response.map(SmallFrames::new))
                }
            });
        self.metrics.connection_opened();
        let service = TowerToHyperService::new(service);
        match protocol {
            Protocol::Http2 => {
                let connection = self.h2.serve_connection(TokioIo::new(io), service);
                self.drive(connection, |c| c.graceful_shutdown(), &activity, stop)
                    .await;
            }
            Protocol::Http1 => {
                let connection = self.h1.serve_connection(TokioIo::new(io), service);
                self.drive(connection, |c| c.graceful_shutdown(), &activity, stop)
                    .await;
            }
        }
        self.metrics.connection_closed();
    }

    /// Runs a connection until it ends; the server's stop and the idle timer close it
    /// gracefully (a GOAWAY on HTTP/2; on HTTP/1.1, after the request in flight).
    async fn drive<C: Future<Output = Result<(), hyper::Error>>>(
        &self,
        connection: C,
        shut: impl Fn(Pin<&mut C>),
        activity: &Activity,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut connection = pin!(connection);
        let mut closing = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "connection ended");
                    }
                    break;
                }
                _ = stop.wait_for(|stop| *stop), if !closing => {
                    shut(connection.as_mut());
                    closing = true;
                }
                () = activity.idle(self.limits.idle_timeout), if !closing => {
                    self.metrics.connection_refused("idle");
                    shut(connection.as_mut());
                    closing = true;
                }
            }
        }
    }
}

/// Closes a connection whose TLS handshake failed so that the peer reads the alert: with
/// TLS 1.3 a client sends its first request before it learns that its certificate was
/// refused, and closing with that request unread would reset the connection, and the
/// client would see "connection reset" instead of the alert. So: send FIN after the
/// alert, then read (and drop) what the peer sent until it closes too, within a second.
async fn linger(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let _ = stream.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 4096];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// A connection past its handshake, with its caller and the HTTP version it speaks.
enum Admitted {
    Tls(
        Box<Rewind<tokio_rustls::server::TlsStream<TcpStream>>>,
        Caller,
        Protocol,
    ),
    Tcp(Rewind<TcpStream>, Caller, Protocol),
    Unix(Rewind<UnixStream>, Caller, Protocol),
}

/// The HTTP version a connection's first bytes announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// gRPC, and the JSON API from HTTP/2 clients.
    Http2,
    /// The JSON API from HTTP/1.1 clients (curl, scripts, JVM and .NET clients).
    Http1,
}

/// Reads the first bytes and gives the stream back with them unread: the HTTP/2 preface,
/// or the start of an HTTP/1.1 POST or GET. Anything else (TLS on a plain port, junk)
/// closes the connection, as does a peer that stops before its first bytes (the caller
/// bounds the wait by the handshake timeout).
async fn sniff<I: AsyncRead + Unpin>(mut io: I) -> Option<(Rewind<I>, Protocol)> {
    let mut start = [0u8; 4];
    let _ = io.read_exact(&mut start).await.ok()?;
    if starts_http1(&start) {
        let rewound = Rewind {
            prefix: Bytes::copy_from_slice(&start),
            inner: io,
        };
        return Some((rewound, Protocol::Http1));
    }
    let mut rest = [0u8; PREFACE.len() - 4];
    if start[..] != PREFACE[..4]
        || io.read_exact(&mut rest).await.is_err()
        || rest[..] != PREFACE[4..]
    {
        return None;
    }
    let rewound = Rewind {
        prefix: Bytes::from_static(PREFACE),
        inner: io,
    };
    Some((rewound, Protocol::Http2))
}

/// A stream that first replays bytes already read from it.
pub(super) struct Rewind<I> {
    prefix: Bytes,
    inner: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    /// Not vectored, whatever the stream can do: h2 then copies DATA frames under 1024
    /// bytes into its buffer (see [`super::frames`]), so an answer leaves in one write.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// Calls in flight on one connection, and when the last one ended.
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn new() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        }
    }

    /// Completes once the connection has had no call in flight for `timeout`.
    async fn idle(&self, timeout: Duration) {
        loop {
            let quiet = lock(&self.last).elapsed();
            if self.in_flight.load(Ordering::Acquire) == 0 && quiet >= timeout {
                return;
            }
            tokio::time::sleep(
                timeout
                    .saturating_sub(quiet)
                    .max(Duration::from_millis(100)),
            )
            .await;
        }
    }
}

/// One call in flight; ends (and marks the connection active) when dropped.
struct Call(Arc<Activity>);

impl Call {
    fn enter(activity: &Arc<Activity>) -> Self {
        let _ = activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Call(Arc::clone(activity))
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        *lock(&self.0.last) = Instant::now();
        let _ = self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_told_from_the_http2_preface_and_junk() {
        for start in [b"POST", b"GET ", b"PUT ", b"DELE", b"QUER", b"HEAD"] {
            assert!(starts_http1(start), "{start:?}");
        }
        for start in [
            b"PRI ",
            b"post",
            b"\x16\x03\x01\x02",
            b"GE T",
            b"AB  ",
            b"    ",
        ] {
            assert!(!starts_http1(start), "{start:?}");
        }
    }
}
