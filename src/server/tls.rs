//! Mutual TLS for the TCP listener: the agent's certificate, the callers' CA, and a
//! client-certificate check that asks the policy as well as the CA.
//!
//! A certificate that chains to the CA but that no policy rule names fails the
//! handshake (the peer sees the alert `certificate_unknown`), so an unknown caller is
//! refused before it can open a single HTTP/2 stream. The error carries the caller's
//! identity as [`UnknownCaller`], which `conn` audits with the peer's address.
//!
//! The files can change while the agent runs (`material`): each handshake takes the
//! configuration current at that moment.

mod material;

pub(super) use material::TlsMaterial;

use std::{path::Path, sync::Arc};

use crate::config::{IdentityField, Tls};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use super::{ServeError, caller::Caller, policy::Policy};

/// A verified certificate whose identities no policy rule names; the identity shown is
/// the caller's name as the audit gives it.
#[derive(Debug, thiserror::Error)]
#[error("caller {0} is not in the policy")]
pub(super) struct UnknownCaller(pub(super) String);

/// The server side of mutual TLS as read from the `[tls]` files at one moment, with the
/// facts of its certificate for the log and the metrics.
pub(super) struct Loaded {
    /// What a handshake uses.
    pub(super) config: Arc<rustls::ServerConfig>,
    /// The leaf's SHA-256, hex.
    pub(super) sha256: String,
    /// The leaf's subject, RFC 4514.
    pub(super) subject: String,
    /// The leaf's notAfter, Unix seconds.
    pub(super) not_after: i64,
}

/// Reads the `[tls]` files and builds the server configuration, checking callers against
/// `policy` (read at every handshake, so a policy reload applies to the next connection).
/// Every error names the file and why it cannot be used, because a reload that fails is
/// seen only in the log.
pub(super) fn load(tls: &Tls, policy: Arc<Policy>) -> Result<Loaded, ServeError> {
    let chain = read_certificates(&tls.certificate)?;
    let leaf = crate::cert::CertificateChain::from_der(
        chain.iter().map(|c| c.as_ref().to_vec()).collect(),
    )
    .map_err(|error| invalid("tls.certificate", &tls.certificate, &error))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| file_error(&tls.key, &e))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certificates(&tls.client_ca)? {
        roots
            .add(ca)
            .map_err(|error| invalid("tls.client_ca", &tls.client_ca, &error))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .build()
        .map_err(|error| invalid("tls.client_ca", &tls.client_ca, &error))?;
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
        .map_err(|error| {
            ServeError::TlsConfig(format!(
                "tls.key {} does not go with tls.certificate {}: {error}",
                tls.key.display(),
                tls.certificate.display()
            ))
        })?;
    // h2 for gRPC; http/1.1 for JSON API clients that do not speak HTTP/2.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Loaded {
        config: Arc::new(config),
        sha256: leaf.leaf_sha256_hex(),
        subject: leaf.subject(),
        not_after: leaf.validity().1,
    })
}

/// Every certificate in the PEM file at `path`; none is an error, so an empty or
/// truncated file is never taken for a chain.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, ServeError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, &e))?;
    if certificates.is_empty() {
        return Err(ServeError::TlsFile {
            path: path.display().to_string(),
            source: std::io::Error::other("no PEM CERTIFICATE in the file"),
        });
    }
    Ok(certificates)
}

fn file_error(path: &Path, error: &rustls::pki_types::pem::Error) -> ServeError {
    ServeError::TlsFile {
        path: path.display().to_string(),
        source: std::io::Error::other(error.to_string()),
    }
}

fn invalid(key: &str, path: &Path, error: &dyn std::fmt::Display) -> ServeError {
    ServeError::TlsConfig(format!("{key} {}: {error}", path.display()))
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
