//! Chain validation: does the key's certificate chain lead to a root the agent trusts for
//! the certificate's environment, as Maskinporten checks it against its issuers?
//!
//! Path building is rustls-webpki's (the verifier rustls itself uses), not ours. Roots are
//! the ones shipped here ([`shipped_roots`]) and the ones the operator configures under
//! `[trust]`, per environment: Buypass and Commfides test roots for test certificates,
//! their production roots for production ones.
//!
//! Extended key usage is not a purpose Maskinporten checks for a grant's signature, so a
//! path is accepted whatever EKUs its certificates carry ([`AnyPurpose`]); the key usage
//! (digitalSignature or nonRepudiation) is checked when the chain is loaded.

use std::time::Duration;

use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime, pem::PemObject};
use sha2::{Digest, Sha256};
use x509_cert::Certificate;

use super::{CertEnvironment, CertError, CertificateChain, rfc4514};

/// The roots that ship with the agent: those that can be obtained and checked here. Each
/// is a PEM file in `src/cert/roots/` (README.md there cites the source) with its SHA-256,
/// checked by a test and again when the roots are read.
const SHIPPED: [(&str, &[u8], &str); 1] = [(
    "Buypass Class 3 Root CA",
    include_bytes!("roots/buypass-class-3-root-ca.pem"),
    "edf7ebbca27a2a384d387b7d4010c666e2edb4843e4c29b4ae1d5b9332e6b24d",
)];

/// A trusted root certificate and where it came from.
#[derive(Debug, Clone)]
pub struct Root {
    der: Vec<u8>,
    subject: String,
    sha256: String,
    origin: String,
}

impl Root {
    /// Every certificate of a PEM file, each a root; `origin` says where it came from
    /// (the file, or "shipped") in status lines.
    pub(crate) fn from_pem(pem: &[u8], origin: &str) -> Result<Vec<Root>, CertError> {
        let ders = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| CertError::Empty)?;
        if ders.is_empty() {
            return Err(CertError::Empty);
        }
        ders.into_iter()
            .map(|der| Root::from_der(der.to_vec(), origin))
            .collect()
    }

    fn from_der(der: Vec<u8>, origin: &str) -> Result<Root, CertError> {
        let certificate = <Certificate as der::Decode>::from_der(&der).map_err(CertError::Parse)?;
        // webpki takes as an anchor only what it can read as one (a v3 certificate).
        let _anchor = webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
            .map_err(|e| CertError::Root(format!("{e:?}")))?;
        Ok(Root {
            subject: rfc4514(certificate.tbs_certificate().subject()),
            sha256: crate::hex::encode(&Sha256::digest(&der)),
            der,
            origin: origin.to_owned(),
        })
    }

    /// The root's subject, RFC 4514.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Lowercase hex SHA-256 of the root's DER.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// "shipped", or the file it was read from.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

/// The shipped production roots.
pub(crate) fn shipped_roots() -> Vec<Root> {
    SHIPPED
        .iter()
        .filter_map(|(name, pem, sha256)| {
            let roots = Root::from_pem(pem, "shipped").ok()?;
            let root = roots.into_iter().next()?;
            // A build whose file does not match its pinned digest trusts nothing from it.
            (root.sha256 == *sha256).then_some(root).or_else(|| {
                tracing::error!(
                    root = name,
                    "a shipped root does not match its SHA-256; not trusted"
                );
                None
            })
        })
        .collect()
}

/// Where a chain leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainStatus {
    /// It leads to a trusted root.
    Valid {
        /// The root's subject.
        root: String,
    },
    /// It leads to no root trusted for its environment (or none is configured for it).
    Untrusted {
        /// Which roots were tried, and what to do.
        detail: String,
    },
    /// A certificate on the path is broken: a bad signature, expired, or not a CA.
    Invalid {
        /// What is wrong.
        detail: String,
    },
}

impl ChainStatus {
    /// "valid", "untrusted" or "invalid", as ListKeys and `cert check` say it.
    pub fn name(&self) -> &'static str {
        match self {
            ChainStatus::Valid { .. } => "valid",
            ChainStatus::Untrusted { .. } => "untrusted",
            ChainStatus::Invalid { .. } => "invalid",
        }
    }

    /// The root reached, or what is wrong.
    pub fn detail(&self) -> String {
        match self {
            ChainStatus::Valid { root } => format!("leads to {root}"),
            ChainStatus::Untrusted { detail } | ChainStatus::Invalid { detail } => detail.clone(),
        }
    }
}

/// The roots trusted for test and for production certificates.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    test: Vec<Root>,
    production: Vec<Root>,
}

/// A chain judged: its status and, when known, the certificate that issued the leaf (the
/// revocation check needs it: OCSP and CRLs are signed by the issuer).
#[derive(Debug, Clone)]
pub struct Judged {
    /// Where the chain leads.
    pub status: ChainStatus,
    /// DER of the leaf's issuer: the chain's second certificate, or the root that issued
    /// the leaf directly.
    pub issuer: Option<Vec<u8>>,
}

impl TrustStore {
    /// The shipped production roots plus the configured ones.
    pub(crate) fn new(test: Vec<Root>, production: Vec<Root>) -> TrustStore {
        let mut all = shipped_roots();
        all.extend(production);
        TrustStore {
            test,
            production: all,
        }
    }

    /// The roots for `environment`; both lists for an issuer of unknown environment.
    pub fn roots(&self, environment: CertEnvironment) -> Vec<&Root> {
        match environment {
            CertEnvironment::Test => self.test.iter().collect(),
            CertEnvironment::Production => self.production.iter().collect(),
            CertEnvironment::Unknown => self.test.iter().chain(&self.production).collect(),
        }
    }

    /// Validates `chain` (leaf first, then intermediates) at `now` (Unix seconds) up to a
    /// root trusted for `environment`.
    pub fn judge(
        &self,
        chain: &CertificateChain,
        environment: CertEnvironment,
        now: i64,
    ) -> Judged {
        let ders: Vec<&[u8]> = chain.der().collect();
        let second = ders.get(1).map(|d| d.to_vec());
        let roots = self.roots(environment);
        let setting = match environment {
            CertEnvironment::Test => "[trust] test_roots",
            _ => "[trust] prod_roots",
        };
        let status = |status| Judged {
            status,
            issuer: second.clone(),
        };
        if roots.is_empty() {
            return status(ChainStatus::Untrusted {
                detail: format!(
                    "no root is trusted for {} certificates; add the issuer's root to {setting} (docs/operations.md, \"Adding an issuer\")",
                    environment.name()
                ),
            });
        }
        match verify(&ders, &roots, now) {
            Ok((root, direct)) => Judged {
                status: ChainStatus::Valid {
                    root: root.subject.clone(),
                },
                issuer: if direct {
                    Some(root.der.clone())
                } else {
                    second
                },
            },
            Err(webpki::Error::UnknownIssuer) => status(ChainStatus::Untrusted {
                detail: format!(
                    "the chain (issuer {}) leads to no root trusted for {} certificates (trusted: {}); if the issuer is genuine, add its root to {setting}, or add the missing intermediate to the certificate",
                    chain.issuer(),
                    environment.name(),
                    roots
                        .iter()
                        .map(|r| r.subject.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            }),
            Err(e) => status(ChainStatus::Invalid {
                detail: describe(&e),
            }),
        }
    }
}

/// Builds a path from the leaf (`ders[0]`) through the other certificates to one of
/// `roots` at `now`; returns the root reached and whether it issued the leaf directly.
fn verify<'r>(
    ders: &[&[u8]],
    roots: &[&'r Root],
    now: i64,
) -> Result<(&'r Root, bool), webpki::Error> {
    let root_ders: Vec<CertificateDer<'_>> = roots
        .iter()
        .map(|r| CertificateDer::from(r.der.as_slice()))
        .collect();
    // Root::from_der made sure each reads as an anchor, so the two lists pair up.
    let anchors = root_ders
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<Vec<TrustAnchor<'_>>, _>>()?;
    let leaf = CertificateDer::from(*ders.first().ok_or(webpki::Error::BadDer)?);
    let intermediates: Vec<CertificateDer<'_>> =
        ders[1..].iter().map(|d| CertificateDer::from(*d)).collect();
    let time = UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(now).unwrap_or(0)));
    let ee = webpki::EndEntityCert::try_from(&leaf)?;
    let path = ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &intermediates,
        time,
        AnyPurpose,
        None,
        None,
    )?;
    let anchor = path.anchor();
    let direct = path.intermediate_certificates().next().is_none();
    let root = anchors
        .iter()
        .position(|a| {
            a.subject == anchor.subject
                && a.subject_public_key_info == anchor.subject_public_key_info
        })
        .map(|i| roots[i])
        .ok_or(webpki::Error::UnknownIssuer)?;
    Ok((root, direct))
}

/// webpki's refusal in an operator's words.
fn describe(error: &webpki::Error) -> String {
    match error {
        webpki::Error::InvalidSignatureForPublicKey => {
            "a signature on the path does not verify: a certificate is not signed by the one above it".to_owned()
        }
        webpki::Error::CertExpired { .. } => "a certificate on the path has expired".to_owned(),
        webpki::Error::CertNotValidYet { .. } => "a certificate on the path is not valid yet".to_owned(),
        webpki::Error::CaUsedAsEndEntity => {
            "the leaf is a CA certificate (basicConstraints cA=TRUE), not an end-entity one".to_owned()
        }
        webpki::Error::EndEntityUsedAsCa => {
            "an intermediate on the path is not a CA certificate".to_owned()
        }
        other => format!("the chain does not validate: {other:?}"),
    }
}

/// Accepts every extended key usage: Maskinporten does not check one for grants.
struct AnyPurpose;

impl webpki::ExtendedKeyUsageValidator for AnyPurpose {
    fn validate(&self, _: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
