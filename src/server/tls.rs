//! Mutual TLS for the TCP listener: the agent's certificate, the callers' CA, and a
//! client-certificate check that asks the policy as well as the CA.
//!
//! A certificate that chains to the CA but that no policy rule names fails the
//! handshake (the peer sees the alert `certificate_unknown`), so an unknown caller is
//! refused before it can open a single HTTP/2 stream. The error carries the caller's
//! identity as [`UnknownCaller`], which `conn` audits with the peer's address.

use std::{path::Path, sync::Arc};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use tokio_rustls::TlsAcceptor;

use crate::config::{IdentityField, Tls};

use super::{ServeError, caller::Caller, policy::Policy};

/// A verified certificate whose identities no policy rule names; the identity shown is
/// the caller's name as the audit gives it.
#[derive(Debug, thiserror::Error)]
#[error("caller {0} is not in the policy")]
pub(super) struct UnknownCaller(pub(super) String);

/// The TLS acceptor for `tls`, checking callers against `policy` (read at every
/// handshake, so a reload applies to the next connection).
pub(super) fn acceptor(tls: &Tls, policy: Arc<Policy>) -> Result<TlsAcceptor, ServeError> {
    let file_error = |path: &Path| {
        let path = path.display().to_string();
        move |error: rustls::pki_types::pem::Error| ServeError::TlsFile {
            path,
            source: std::io::Error::other(error.to_string()),
        }
    };
    let chain = CertificateDer::pem_file_iter(&tls.certificate)
        .map_err(file_error(&tls.certificate))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(file_error(&tls.certificate))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(file_error(&tls.key))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&tls.client_ca).map_err(file_error(&tls.client_ca))? {
        roots
            .add(ca.map_err(file_error(&tls.client_ca))?)
            .map_err(|error| ServeError::TlsConfig(format!("tls.client_ca: {error}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .build()
        .map_err(|error| ServeError::TlsConfig(format!("tls.client_ca: {error}")))?;
    let verifier = Arc::new(PolicyVerifier {
        inner,
        policy,
        field: tls.caller_identity,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| ServeError::TlsConfig(error.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|error| ServeError::TlsConfig(format!("tls.certificate / tls.key: {error}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The CA's verdict first, then the policy's.
struct PolicyVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    policy: Arc<Policy>,
    field: IdentityField,
}

impl std::fmt::Debug for PolicyVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyVerifier")
            .field("field", &self.field)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for PolicyVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let caller = Caller::certificate(end_entity.as_ref(), self.field);
        match self.policy.knows(&caller) {
            Ok(()) => Ok(verified),
            Err(_) => Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(UnknownCaller(caller.name().to_owned()))),
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
