//! The virksomhetssertifikat: parsing the chain, and the facts the agent needs from it
//! (subject, issuer, organisation number, validity, fingerprint, public key).
//!
//! Certificates come from outside (a PEM file or a token object) and are parsed with
//! `x509-cert`; malformed input is an error, never a panic.

use std::time::{SystemTime, UNIX_EPOCH};

use der::{Decode, Encode, asn1::ObjectIdentifier};
use sha2::{Digest, Sha256};
use x509_cert::{
    Certificate,
    ext::pkix::{CertificatePolicies, KeyUsage, KeyUsages},
};

use crate::grant::is_organization_number;

/// commonName (2.5.4.3).
const COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
/// organizationIdentifier (2.5.4.97): SEID 2.0 puts `NTRNO-<orgnr>` here.
const ORGANIZATION_IDENTIFIER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.97");
/// serialNumber (2.5.4.5): SEID 1 puts the bare organisation number here.
const SERIAL_NUMBER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.5");
/// organizationName (2.5.4.10): older SEID 1 certificates end it with " - <orgnr>".
const ORGANIZATION: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.10");
/// rsaEncryption, the only key type Maskinporten's RS256/384/512 can use.
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// Whether a certificate is for Maskinporten's test or production environment.
/// Maskinporten refuses production certificates in test and test certificates in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertEnvironment {
    /// A test certificate (Buypass "Test4", Commfides "TEST" issuers).
    Test,
    /// A production certificate.
    Production,
    /// An issuer not in `ISSUERS`; the config must say which it is.
    Unknown,
}

impl CertEnvironment {
    /// "test", "prod" or "unknown", as in the config and ListKeys.
    pub fn name(self) -> &'static str {
        match self {
            CertEnvironment::Test => "test",
            CertEnvironment::Production => "prod",
            CertEnvironment::Unknown => "unknown",
        }
    }
}

/// How an issuer is recognised.
#[derive(Debug)]
pub(crate) enum IssuerMatch {
    /// The issuer DN contains both strings (case-sensitive).
    DnContainsBoth(&'static str, &'static str),
    /// The issuer's CN is exactly this.
    CommonName(&'static str),
    /// A certificate policy OID starts with this arc.
    PolicyArc(&'static str),
}

/// The issuers the agent knows, first match wins. Test rules come first because test
/// issuer names extend production ones ("Buypass Class 3 Test4 CA G2 ST Business"). Buypass
/// test and production SEID 2 certificates share policy OIDs, so for Buypass the DN is the
/// signal; Commfides marks test issuers with "TEST" and a test policy arc. To add an issuer,
/// add a row here and a test.
pub(crate) const ISSUERS: [(IssuerMatch, CertEnvironment); 8] = [
    (
        IssuerMatch::DnContainsBoth("Buypass", "Test4"),
        CertEnvironment::Test,
    ),
    (
        IssuerMatch::DnContainsBoth("Commfides", "TEST"),
        CertEnvironment::Test,
    ),
    (
        IssuerMatch::PolicyArc("2.16.578.1.29.913"),
        CertEnvironment::Test,
    ),
    (
        IssuerMatch::CommonName("Buypass Class 3 CA 3"),
        CertEnvironment::Production,
    ),
    (
        IssuerMatch::CommonName("Buypass Class 3 CA G2 ST Business"),
        CertEnvironment::Production,
    ),
    (
        IssuerMatch::CommonName("Buypass Class 3 CA G2 HT Business"),
        CertEnvironment::Production,
    ),
    (
        IssuerMatch::CommonName("Commfides Legal Person - G3"),
        CertEnvironment::Production,
    ),
    (
        IssuerMatch::CommonName("CPN Enterprise SHA256 CLASS 3"),
        CertEnvironment::Production,
    ),
];

const PEM_BEGIN: &str = "-----BEGIN CERTIFICATE-----";

/// A certificate that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A root certificate cannot serve as a trust anchor.
    #[error("not usable as a trusted root: {0}")]
    Root(String),
    /// The bytes are not a certificate.
    #[error("not a valid X.509 certificate: {0}")]
    Parse(#[source] der::Error),
    /// The PEM file holds no certificate.
    #[error("no certificate found (expected PEM \"-----BEGIN CERTIFICATE-----\" blocks)")]
    Empty,
    /// No certificate holds the key's public key.
    #[error("no certificate matches the key's public key")]
    NoLeaf,
    /// The key usage extension does not allow signatures.
    #[error(
        "the certificate's key usage allows neither digitalSignature nor nonRepudiation; order a signing (not an encryption) certificate"
    )]
    KeyUsage,
    /// The key in the certificate is not RSA.
    #[error(
        "the certificate's key is not RSA ({0}); Maskinporten accepts only RS256, RS384 and RS512"
    )]
    NotRsa(String),
}

/// Indices of `certificates` in chain order from `leaf`: each next one the issuer of the
/// one before, until no issuer is there or a self-signed certificate ends the chain. The
/// token and PKCS#12 files both hold a key's certificates unordered; this recovers the
/// chain.
pub(crate) fn chain_order(certificates: &[Certificate], leaf: usize) -> Vec<usize> {
    let mut order = vec![leaf];
    loop {
        let last = certificates[order[order.len() - 1]].tbs_certificate();
        if last.issuer() == last.subject() {
            return order;
        }
        match (0..certificates.len()).find(|i| {
            !order.contains(i) && certificates[*i].tbs_certificate().subject() == last.issuer()
        }) {
            Some(next) => order.push(next),
            None => return order,
        }
    }
}

/// A certificate chain, leaf first, kept both parsed and as the DER that goes into `x5c`.
#[derive(Debug, Clone)]
pub struct CertificateChain {
    certificates: Vec<Certificate>,
    der: Vec<Vec<u8>>,
}

impl CertificateChain {
    /// Parses DER certificates, leaf first.
    pub fn from_der(der: Vec<Vec<u8>>) -> Result<Self, CertError> {
        if der.is_empty() {
            return Err(CertError::Empty);
        }
        let certificates = der
            .iter()
            .map(|d| Certificate::from_der(d).map_err(CertError::Parse))
            .collect::<Result<_, _>>()?;
        Ok(CertificateChain { certificates, der })
    }

    /// Parses DER certificates in any order and puts them in chain order: the one whose
    /// public key is `public_key_der` (PKCS#1) first, then each certificate's issuer. The
    /// token stores a key's certificates as unordered objects; this recovers the chain.
    pub(crate) fn for_key(der: Vec<Vec<u8>>, public_key_der: &[u8]) -> Result<Self, CertError> {
        let mut pool = Self::from_der(der)?;
        let leaf = pool
            .certificates
            .iter()
            .position(|c| {
                c.tbs_certificate()
                    .subject_public_key_info()
                    .subject_public_key
                    .raw_bytes()
                    == public_key_der
            })
            .ok_or(CertError::NoLeaf)?;
        let order = chain_order(&pool.certificates, leaf);
        // Certificates that are not part of the chain are left out of x5c.
        let certificates = order
            .iter()
            .map(|i| pool.certificates[*i].clone())
            .collect();
        let der = order
            .iter()
            .map(|i| std::mem::take(&mut pool.der[*i]))
            .collect();
        Ok(CertificateChain { certificates, der })
    }

    /// Parses a PEM chain, leaf first.
    pub(crate) fn from_pem(pem: &[u8]) -> Result<Self, CertError> {
        if !pem
            .windows(PEM_BEGIN.len())
            .any(|w| w == PEM_BEGIN.as_bytes())
        {
            return Err(CertError::Empty);
        }
        let certificates = Certificate::load_pem_chain(pem).map_err(CertError::Parse)?;
        if certificates.is_empty() {
            return Err(CertError::Empty);
        }
        let der = certificates
            .iter()
            .map(|c| c.to_der().map_err(CertError::Parse))
            .collect::<Result<_, _>>()?;
        Ok(CertificateChain { certificates, der })
    }

    /// DER of every certificate, leaf first: the `x5c` content.
    pub fn der(&self) -> impl Iterator<Item = &[u8]> {
        self.der.iter().map(Vec::as_slice)
    }

    /// DER of every certificate's subject name, in chain order (PKCS#11 wants `CKA_SUBJECT`).
    pub(crate) fn subjects_der(&self) -> Vec<Vec<u8>> {
        self.certificates
            .iter()
            .map(|c| c.tbs_certificate().subject().to_der().unwrap_or_default())
            .collect()
    }

    fn leaf(&self) -> &Certificate {
        &self.certificates[0]
    }

    /// Lowercase hex SHA-256 of the leaf's DER, as `openssl x509 -fingerprint -sha256` shows it
    /// (without colons).
    pub fn leaf_sha256_hex(&self) -> String {
        crate::hex::encode(&Sha256::digest(&self.der[0]))
    }

    /// The leaf's subject in RFC 4514 form.
    pub fn subject(&self) -> String {
        rfc4514(self.leaf().tbs_certificate().subject())
    }

    /// The leaf's issuer in RFC 4514 form.
    pub fn issuer(&self) -> String {
        rfc4514(self.leaf().tbs_certificate().issuer())
    }

    /// Validity of the leaf as Unix seconds: (not before, not after).
    pub(crate) fn validity(&self) -> (i64, i64) {
        let v = self.leaf().tbs_certificate().validity();
        (
            unix(v.not_before.to_system_time()),
            unix(v.not_after.to_system_time()),
        )
    }

    /// The organisation number, from the SEID 2.0 `organizationIdentifier` (`NTRNO-` +
    /// nine digits), else the SEID 1 `serialNumber`, else an `O` ending in " - " and nine digits.
    /// Only numbers with a valid check digit count.
    pub fn organization_number(&self) -> Option<String> {
        let subject = self.leaf().tbs_certificate().subject();
        let values = |oid: ObjectIdentifier| {
            subject
                .iter()
                .filter(move |atv| atv.oid == oid)
                .filter_map(|atv| directory_string(&atv.value))
        };
        let seid2 = values(ORGANIZATION_IDENTIFIER)
            .filter_map(|v| v.strip_prefix("NTRNO-").map(str::to_owned));
        let seid1 = values(SERIAL_NUMBER);
        let old_o = values(ORGANIZATION)
            .filter_map(|v| v.rsplit_once(" - ").map(|(_, n)| n.trim().to_owned()));
        seid2
            .chain(seid1)
            .chain(old_o)
            .find(|n| is_organization_number(n))
    }

    /// Test or production, from the leaf's issuer (see `ISSUERS`).
    pub fn environment(&self) -> CertEnvironment {
        let tbs = self.leaf().tbs_certificate();
        let issuer_dn = rfc4514(tbs.issuer());
        let issuer_cn: Vec<String> = tbs
            .issuer()
            .iter()
            .filter(|atv| atv.oid == COMMON_NAME)
            .filter_map(|atv| directory_string(&atv.value))
            .collect();
        let policies: Vec<String> = match tbs.get_extension::<CertificatePolicies>() {
            Ok(Some((_, policies))) => policies
                .0
                .iter()
                .map(|p| p.policy_identifier.to_string())
                .collect(),
            _ => Vec::new(),
        };
        ISSUERS
            .iter()
            .find(|(rule, _)| match rule {
                IssuerMatch::DnContainsBoth(a, b) => issuer_dn.contains(a) && issuer_dn.contains(b),
                IssuerMatch::CommonName(cn) => issuer_cn.iter().any(|c| c == cn),
                IssuerMatch::PolicyArc(arc) => policies
                    .iter()
                    .any(|p| p == arc || p.starts_with(&format!("{arc}."))),
            })
            .map_or(CertEnvironment::Unknown, |(_, env)| *env)
    }

    /// Whether the leaf may sign: its key usage, when present, must include
    /// digitalSignature or nonRepudiation (Buypass and Commfides use either).
    pub(crate) fn allows_signing(&self) -> Result<(), CertError> {
        match self.leaf().tbs_certificate().get_extension::<KeyUsage>() {
            Ok(None) => Ok(()),
            Ok(Some((_, usage)))
                if usage.0.contains(KeyUsages::DigitalSignature)
                    || usage.0.contains(KeyUsages::NonRepudiation) =>
            {
                Ok(())
            }
            Ok(Some(_)) => Err(CertError::KeyUsage),
            Err(e) => Err(CertError::Parse(e)),
        }
    }

    /// The leaf's RSA public key as PKCS#1 `RSAPublicKey` DER, which is canonical: two
    /// keys are equal exactly when these bytes are.
    pub fn rsa_public_key_der(&self) -> Result<&[u8], CertError> {
        let spki = self.leaf().tbs_certificate().subject_public_key_info();
        if spki.algorithm.oid != RSA_ENCRYPTION {
            return Err(CertError::NotRsa(spki.algorithm.oid.to_string()));
        }
        Ok(spki.subject_public_key.raw_bytes())
    }
}

/// The names in a caller's client certificate that the policy can match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ClientCertificate {
    /// subjectAltName URIs (e.g. SPIFFE ids).
    pub(crate) uris: Vec<String>,
    /// subjectAltName DNS names.
    pub(crate) dns_names: Vec<String>,
    /// The subject's common name.
    pub(crate) common_name: Option<String>,
}

impl ClientCertificate {
    /// Reads the names from a DER certificate (already verified by the TLS layer).
    pub(crate) fn parse(der: &[u8]) -> Result<Self, CertError> {
        use x509_cert::ext::pkix::{SubjectAltName, name::GeneralName};
        let certificate = Certificate::from_der(der).map_err(CertError::Parse)?;
        let tbs = certificate.tbs_certificate();
        let mut names = ClientCertificate {
            common_name: tbs
                .subject()
                .iter()
                .filter(|atv| atv.oid == COMMON_NAME)
                .find_map(|atv| directory_string(&atv.value)),
            ..ClientCertificate::default()
        };
        if let Some((_, san)) = tbs
            .get_extension::<SubjectAltName>()
            .map_err(CertError::Parse)?
        {
            for name in san.0 {
                match name {
                    GeneralName::UniformResourceIdentifier(uri) => names.uris.push(uri.to_string()),
                    GeneralName::DnsName(dns) => names.dns_names.push(dns.to_string()),
                    _ => {}
                }
            }
        }
        Ok(names)
    }
}

/// Short names for the attributes seen in Buypass and Commfides certificates; others are
/// shown as dotted OIDs, as RFC 4514 allows.
const ATTRIBUTE_NAMES: [(&str, &str); 9] = [
    ("2.5.4.3", "CN"),
    ("2.5.4.5", "serialNumber"),
    ("2.5.4.6", "C"),
    ("2.5.4.7", "L"),
    ("2.5.4.8", "ST"),
    ("2.5.4.10", "O"),
    ("2.5.4.11", "OU"),
    ("2.5.4.97", "organizationIdentifier"),
    ("1.2.840.113549.1.9.1", "emailAddress"),
];

/// A distinguished name in RFC 4514 string form (last RDN first). x509-cert's own
/// `Display` shows `organizationIdentifier`, the SEID 2.0 attribute operators look for,
/// as hex; this shows it as text.
pub(crate) fn rfc4514(name: &x509_cert::name::Name) -> String {
    let mut rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    let oid = atv.oid.to_string();
                    let key = ATTRIBUTE_NAMES
                        .iter()
                        .find(|(o, _)| *o == oid)
                        .map_or(oid.as_str(), |(_, n)| n);
                    let value = match directory_string(&atv.value) {
                        Some(text) => escape_rfc4514(&text),
                        None => format!(
                            "#{}",
                            atv.value
                                .to_der()
                                .map_or_else(|_| String::new(), |d| crate::hex::encode(&d))
                        ),
                    };
                    format!("{key}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.reverse();
    rdns.join(",")
}

/// Escapes a value for an RFC 4514 distinguished name string.
pub(crate) fn escape_rfc4514(value: &str) -> String {
    let last = value.chars().count().saturating_sub(1);
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Reads the string types a DirectoryString may use in the names we care about.
fn directory_string(value: &der::Any) -> Option<String> {
    use der::asn1::{PrintableStringRef, Utf8StringRef};
    Utf8StringRef::try_from(value)
        .map(|s| s.as_str().to_owned())
        .or_else(|_| PrintableStringRef::try_from(value).map(|s| s.as_str().to_owned()))
        .ok()
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests;
mod trust;

pub use trust::{ChainStatus, Judged, Root, TrustStore};
