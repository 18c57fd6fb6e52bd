//! Token administration for the key management commands: generate a key pair in the
//! token, request a certificate for it, import the issued certificate, move an existing
//! PKCS#12 key into the token, print a JWK for `kid` registration, and list what the
//! token holds.
//!
//! Keys are made in the token or moved into it, never out: every command here works with
//! object handles and public values only.

use std::str::FromStr;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use der::{Decode, EncodePem, pem::LineEnding};
use sha2::{Digest, Sha256};
use x509_cert::{builder::Builder, name::Name, request::RequestBuilder};

pub use crate::p12::P12Error;
use crate::{
    cert::{CertError, CertificateChain, escape_rfc4514},
    config::{Config, ConfigError, KeyLocator},
    grant::{Algorithm, is_organization_number},
    hex,
    hsm::{
        HsmError, MIN_RSA_BITS, ObjectHandle, RsaKeyParts, Token, TokenKey, TokenSigner, read_pin,
        rsa_public_key,
    },
};

/// Why a key management command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The config could not be read.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The token refused.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// A certificate is malformed or unusable.
    #[error(transparent)]
    Certificate(#[from] CertError),
    /// A key with the label exists already.
    #[error(
        "--label: a key labelled {0:?} exists already; choose a new label (renewal uses a new key)"
    )]
    Exists(String),
    /// The certificate is for another key.
    #[error(
        "FILE: no certificate in the file has the public key of the key labelled {0:?}; import the certificate issued for this key's CSR"
    )]
    Mismatch(String),
    /// The key already has a different certificate.
    #[error(
        "--label: the key {0:?} already has a different certificate; a renewed certificate belongs to a new key (grant-agent key generate, then key csr)"
    )]
    DifferentCertificate(String),
    /// A bad command-line value.
    #[error("{flag}: {problem}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The PKCS#12 file could not be read.
    #[error("FILE: {0}")]
    P12(#[from] P12Error),
    /// A request or JWK could not be built.
    #[error("cannot build the {what}: {detail}")]
    Build {
        /// What.
        what: &'static str,
        /// Why.
        detail: String,
    },
}

/// Opens and logs in to the token named in the config's `[pkcs11]` section.
pub fn open_token(config: &std::path::Path) -> Result<Token, AdminError> {
    let settings = Config::load_token_settings(config)?;
    let pin = read_pin(&settings.pin)?;
    Ok(Token::open(&settings, &pin, Default::default())?)
}

/// Generates an RSA key pair of `bits` in the token under a new label and a random id.
pub fn generate(token: &Token, label: &str, bits: u64) -> Result<TokenKey, AdminError> {
    ensure_new_label(token, label)?;
    let id = uuid::Uuid::new_v4();
    Ok(token.generate_rsa_key(label, &id.as_bytes()[..8], bits)?)
}

/// A PKCS#10 request for a SEID 2.0 virksomhetssertifikat (`C=NO`,
/// `organizationIdentifier=NTRNO-<orgnr>`, `O` and `CN` = the organisation name),
/// signed inside the token with SHA-256. Returns PEM.
pub fn csr(
    token: &Token,
    label: &str,
    org_number: &str,
    org_name: &str,
) -> Result<String, AdminError> {
    if !is_organization_number(org_number) {
        return Err(AdminError::Invalid {
            flag: "--org-number",
            problem: format!("{org_number:?} is not nine digits with a valid check digit"),
        });
    }
    if org_name.trim().is_empty()
        || org_name.chars().count() > 64
        || org_name.chars().any(char::is_control)
    {
        return Err(AdminError::Invalid {
            flag: "--org-name",
            problem: "must be 1 to 64 printable characters".into(),
        });
    }
    let key = token.find_key(&KeyLocator::Label(label.to_owned()))?;
    let name = escape_rfc4514(org_name);
    let subject = Name::from_str(&format!(
        "CN={name},O={name},2.5.4.97=NTRNO-{org_number},C=NO"
    ))
    .map_err(|e| build("certificate request", &e))?;
    let signer = TokenSigner::new(token, &key)?;
    let request = RequestBuilder::new(subject)
        .map_err(|e| build("certificate request", &e))?
        .build::<_, rsa::pkcs1v15::Signature>(&signer)
        .map_err(|e| build("certificate request", &e))?;
    request
        .to_pem(LineEnding::LF)
        .map_err(|e| build("certificate request", &e))
}

/// Stores an issued certificate (and the chain in the same file) next to its key.
/// Certificates already stored are skipped, so a repeated import changes nothing.
/// Returns the chain as stored, leaf first, and how many objects were written.
pub fn import_certificate(
    token: &Token,
    label: &str,
    pem: &[u8],
) -> Result<(CertificateChain, usize), AdminError> {
    let key = token.find_key(&KeyLocator::Label(label.to_owned()))?;
    let all: Vec<Vec<u8>> = CertificateChain::from_pem(pem)?
        .der()
        .map(<[u8]>::to_vec)
        .collect();
    let chain = match CertificateChain::for_key(all, &key.public_key_der) {
        Err(CertError::NoLeaf) => return Err(AdminError::Mismatch(label.to_owned())),
        other => other?,
    };
    chain.allows_signing()?;
    let stored = match token.certificates_der(&key) {
        Ok(stored) => stored,
        Err(HsmError::CertificateNotFound(_)) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let leaf = chain.der().next().unwrap_or_default();
    if let Ok(existing) = CertificateChain::for_key(stored.clone(), &key.public_key_der)
        && existing.der().next() != Some(leaf)
    {
        return Err(AdminError::DifferentCertificate(label.to_owned()));
    }
    let written = store_chain(token, label, &key.id, &chain, &stored)?;
    Ok((chain, written.len()))
}

/// Stores each certificate of `chain` not in `stored` with the key's id: the leaf under
/// `label`, the others as "`label` chain N". On failure removes what it wrote.
fn store_chain(
    token: &Token,
    label: &str,
    id: &[u8],
    chain: &CertificateChain,
    stored: &[Vec<u8>],
) -> Result<Vec<ObjectHandle>, AdminError> {
    let mut written = Vec::new();
    for (i, (der, subject)) in chain.der().zip(chain.subjects_der()).enumerate() {
        if stored.iter().any(|s| s == der) {
            continue;
        }
        let object_label = if i == 0 {
            label.to_owned()
        } else {
            format!("{label} chain {i}")
        };
        match token.store_certificate(&object_label, id, der, &subject) {
            Ok(handle) => written.push(handle),
            Err(e) => {
                undo(token, written);
                return Err(e.into());
            }
        }
    }
    Ok(written)
}

/// Removes objects an unfinished import wrote, so the token is left as it was.
fn undo(token: &Token, objects: Vec<ObjectHandle>) {
    for object in objects {
        let _ = token.destroy_object(object);
    }
}

/// Moves the RSA key and chain of a PKCS#12 file into the token under a new label: the key
/// sensitive and never extractable. Everything is read and checked before anything is
/// written, and a failure while writing removes what was written.
pub fn import_p12(
    token: &Token,
    label: &str,
    data: &[u8],
    password: &str,
) -> Result<(TokenKey, CertificateChain), AdminError> {
    ensure_new_label(token, label)?;
    let contents = crate::p12::read_pkcs12(data, password)?;
    let key = &contents.key;
    let (bits, public_key_der) =
        rsa_public_key(&key.modulus, &key.public_exponent).map_err(|e| build("public key", &e))?;
    if bits < MIN_RSA_BITS {
        return Err(AdminError::Invalid {
            flag: "FILE",
            problem: format!(
                "the key is RSA-{bits}; Maskinporten needs {MIN_RSA_BITS} bits or more"
            ),
        });
    }
    let chain = CertificateChain::for_key(contents.chain.clone(), &public_key_der)?;
    chain.allows_signing()?;

    let id = uuid::Uuid::new_v4();
    let id = &id.as_bytes()[..8];
    let parts = RsaKeyParts {
        modulus: &key.modulus,
        public_exponent: &key.public_exponent,
        private_exponent: &key.private_exponent,
        prime1: &key.prime1,
        prime2: &key.prime2,
        exponent1: &key.exponent1,
        exponent2: &key.exponent2,
        coefficient: &key.coefficient,
    };
    let (private, public) = token.import_rsa_key(label, id, &parts)?;
    drop(contents);
    let written = match store_chain(token, label, id, &chain, &[]) {
        Ok(written) => written,
        Err(e) => {
            undo(token, vec![private, public]);
            return Err(e);
        }
    };
    match token.find_key(&KeyLocator::Label(label.to_owned())) {
        Ok(imported) if imported.public_key_der == public_key_der => Ok((imported, chain)),
        other => {
            undo(token, [vec![private, public], written].concat());
            Err(match other {
                Err(e) => e.into(),
                Ok(_) => build("key", &"the token holds a different key after the import"),
            })
        }
    }
}

/// The key's public half as a JWK for registering on a Maskinporten client. The `kid`
/// defaults to the RFC 7638 thumbprint, which is stable and unique per key.
pub fn jwk(
    key: &TokenKey,
    algorithm: Algorithm,
    kid: Option<&str>,
) -> Result<serde_json::Value, AdminError> {
    let public = rsa::pkcs1::RsaPublicKey::<der::asn1::UintRef<'_>>::from_der(&key.public_key_der)
        .map_err(|e| build("JWK", &e))?;
    let (modulus, exponent) = (public.modulus.as_bytes(), public.public_exponent.as_bytes());
    let thumbprint = thumbprint(modulus, exponent);
    Ok(serde_json::json!({
        "kty": "RSA",
        "use": "sig",
        "alg": algorithm.jws_name(),
        "kid": kid.unwrap_or(&thumbprint),
        "n": URL_SAFE_NO_PAD.encode(modulus),
        "e": URL_SAFE_NO_PAD.encode(exponent),
    }))
}

/// The RFC 7638 thumbprint of an RSA key (base64url SHA-256 of its canonical JWK), the
/// kid that stays the same for the same key wherever it is computed: here for
/// `key jwk`, and in the local Maskinporten for a registered key without a kid.
pub fn thumbprint(modulus: &[u8], exponent: &[u8]) -> String {
    let n = URL_SAFE_NO_PAD.encode(modulus);
    let e = URL_SAFE_NO_PAD.encode(exponent);
    URL_SAFE_NO_PAD.encode(Sha256::digest(
        format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#).as_bytes(),
    ))
}

/// What `key list` prints: every private key, its protection and its certificate.
pub fn list(token: &Token, now: i64) -> Result<String, AdminError> {
    use std::fmt::Write;
    let mut out = String::new();
    let keys = token.private_keys()?;
    if keys.is_empty() {
        out.push_str("no private keys in the token (grant-agent key generate makes one)\n");
    }
    for key in keys {
        let kind = key.rsa.as_ref().map_or_else(
            || "not a usable RSA key".to_owned(),
            |k| format!("RSA-{}", k.bits),
        );
        let protection = match (key.sensitive, key.extractable, key.never_extractable) {
            (true, false, true) => "sensitive, never extractable",
            (true, false, false) => {
                "sensitive, not extractable (imported: it existed outside the token before)"
            }
            (true, true, _) => "sensitive but EXTRACTABLE",
            (false, _, _) => "NOT SENSITIVE: the token reveals this key",
        };
        let _ = writeln!(
            out,
            "key {:?} (id {}): {kind}, {protection}",
            key.label,
            hex::encode(&key.id)
        );
        let chain = key.rsa.as_ref().and_then(|rsa| {
            let ders = token.certificates_der(rsa).ok()?;
            CertificateChain::for_key(ders, &rsa.public_key_der).ok()
        });
        let Some(chain) = chain else {
            let _ = writeln!(
                out,
                "  certificate: none (grant-agent key csr, then cert import)"
            );
            continue;
        };
        let (not_before, not_after) = chain.validity();
        let _ = writeln!(out, "  subject:     {}", chain.subject());
        let _ = writeln!(out, "  issuer:      {}", chain.issuer());
        let _ = writeln!(
            out,
            "  org number:  {}",
            chain
                .organization_number()
                .unwrap_or_else(|| "none found".into())
        );
        let environment = chain.environment();
        let _ = writeln!(
            out,
            "  environment: {}{}",
            environment.name(),
            if environment == crate::cert::CertEnvironment::Unknown {
                " (issuer not known: set certificate_environment on the key in the config)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "  valid:       {} to {} ({})",
            crate::agent::rfc3339(not_before),
            crate::agent::rfc3339(not_after),
            if now > not_after {
                "EXPIRED".to_owned()
            } else if now < not_before {
                "not valid yet".to_owned()
            } else {
                format!("{} days left", (not_after - now) / 86_400)
            }
        );
        let _ = writeln!(out, "  sha256:      {}", chain.leaf_sha256_hex());
        if chain.der().count() > 1 {
            let _ = writeln!(out, "  chain:       {} certificates", chain.der().count());
        }
    }
    Ok(out)
}

/// A new key needs a usable label that no key in the token has yet.
fn ensure_new_label(token: &Token, label: &str) -> Result<(), AdminError> {
    check_label(label)?;
    match token.find_key(&KeyLocator::Label(label.to_owned())) {
        Err(HsmError::KeyNotFound(_)) => Ok(()),
        Ok(_) | Err(HsmError::KeyAmbiguous { .. }) => Err(AdminError::Exists(label.to_owned())),
        Err(e) => Err(e.into()),
    }
}

fn check_label(label: &str) -> Result<(), AdminError> {
    if label.is_empty() || label.len() > 128 || label.chars().any(char::is_control) {
        return Err(AdminError::Invalid {
            flag: "--label",
            problem: "must be 1 to 128 printable characters".into(),
        });
    }
    Ok(())
}

fn build(what: &'static str, detail: &dyn std::fmt::Display) -> AdminError {
    AdminError::Build {
        what,
        detail: detail.to_string(),
    }
}
