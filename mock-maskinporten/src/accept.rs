//! The accept loop: TCP, optionally TLS, then HTTP/1.1 via hyper, one task per
//! connection, so a slow or stuck client never holds up another.
//!
//! The loop is ours rather than `axum::serve` because the `drop` fault needs to close a
//! connection without any response, which only the code that owns the connection can do:
//! each connection gets a [`ConnectionAbort`] that the token handler can pull.

use std::{future::Future, io, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use axum::{Extension, Router};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;

use crate::MockError;

/// Longest a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may finish after shutdown before they are cut off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Lets a request handler close its connection without answering.
#[derive(Clone)]
pub(super) struct ConnectionAbort(Arc<Notify>);

impl ConnectionAbort {
    /// Closes the connection this request came on; no response is sent.
    pub(super) fn abort(&self) {
        self.0.notify_one();
    }
}

/// A TLS acceptor for a PEM certificate chain and key, offering HTTP/1.1 by ALPN. Uses
/// ring explicitly, so it works whatever process-wide provider is (or is not) installed.
pub(super) fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, MockError> {
    let tls_error = |path: &Path, problem: String| MockError::Tls {
        file: path.display().to_string(),
        problem,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls_error(cert, format!("cannot read the certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(tls_error(
            cert,
            "holds no \"-----BEGIN CERTIFICATE-----\" block".into(),
        ));
    }
    let private_key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| tls_error(key, format!("cannot read the private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|e| tls_error(key, format!("does not fit the certificate: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` on `listener` until `shutdown` completes, then lets open requests finish
/// for a moment.
pub(super) async fn run(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let (tls, app, stopping) = (tls.clone(), app.clone(), stopping.clone());
                    let _ = connections.spawn(accept(stream, peer, tls, app, stopping));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "mock-maskinporten: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    let _ = stop.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!("mock-maskinporten: closing connections still open after the grace period");
    }
    Ok(())
}

/// Completes the TLS handshake, if any, within [`HANDSHAKE_TIMEOUT`], then serves the
/// connection.
async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    app: Router,
    stopping: watch::Receiver<bool>,
) {
    let Some(acceptor) = tls else {
        return serve_connection(stream, app, stopping).await;
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => serve_connection(stream, app, stopping).await,
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "mock-maskinporten: TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "mock-maskinporten: TLS handshake timed out"),
    }
}

/// Serves HTTP on one connection until the client closes it, the handler aborts it, or
/// the server stops (gracefully: the request in flight is answered first).
async fn serve_connection<I>(io: I, app: Router, mut stopping: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let abort = Arc::new(Notify::new());
    let service = TowerToHyperService::new(app.layer(Extension(ConnectionAbort(abort.clone()))));
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut graceful = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "mock-maskinporten: connection error");
                }
                return;
            }
            // Dropping the connection closes the socket with no response written.
            () = abort.notified() => return,
            _ = stopping.changed(), if !graceful => {
                graceful = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}
