//! Reading a PKCS#12 file (.p12/.pfx) into its RSA private key and certificate chain.
//!
//! Norwegian CAs deliver the virksomhetssertifikat as a password-protected PKCS#12 file.
//! `grant-agent key import-p12` takes the key out of that file and creates it in the
//! PKCS#11 token as a sensitive, non-extractable object; PKCS#11 wants an RSA key as its
//! CRT components, so that is how [`read_pkcs12`] returns it, together with the
//! certificates as DER, leaf first.
//!
//! Formats read:
//! - OpenSSL 3 defaults: MAC with HMAC-SHA-256, certificates and key encrypted with PBES2
//!   (PBKDF2 with HMAC-SHA-256, AES-256-CBC). Other PBES2 variants work too: PBKDF2 with
//!   HMAC-SHA-1 or SHA-2, and AES-128/192/256-CBC, AES-GCM or DES-EDE3-CBC.
//! - The older PKCS#12 schemes (`openssl pkcs12 -legacy`, Windows "TripleDES-SHA1",
//!   older Java): MAC with HMAC-SHA-1, pbeWithSHAAnd40BitRC2-CBC, pbeWithSHAAnd128BitRC2-CBC,
//!   pbeWithSHAAnd3-KeyTripleDES-CBC and pbeWithSHAAnd2-KeyTripleDES-CBC.
//! - Unencrypted certificate bags (`-certpbe NONE`) and key bags (`-keypbe NONE`), and files
//!   without a MAC (`-nomac`).
//!
//! Not read: the public-key privacy and integrity modes (no password), RC4, scrypt, and files
//! in BER (indefinite-length) encoding rather than DER.
//!
//! The MAC is checked before anything is decrypted, so a wrong password is reported as
//! such instead of surfacing as garbage. Key derivation is bounded (see
//! [`MAX_KDF_ITERATIONS`]) so a hostile file cannot hang the process, and no input panics.
//! Parsing and cryptography come from RustCrypto crates (`pkcs12`, `pkcs5`, `cms`, `hmac`,
//! `des`, `rc2`, `cbc`); this module only ties them together.

mod decrypt;

use std::fmt;

use der::{
    Decode, ErrorKind, Tag, TagNumber, Tagged,
    asn1::{AnyRef, ObjectIdentifier, OctetString},
};
use pkcs12::{
    AuthenticatedSafe, CertBag,
    cms::{content_info::ContentInfo, encrypted_data::EncryptedData},
    pbe_params::EncryptedPrivateKeyInfo,
    pfx::Pfx,
    safe_bag::SafeContents,
};
use rsa::{
    pkcs1::{RsaPrivateKeyRef, RsaPublicKeyRef},
    pkcs8::PrivateKeyInfoRef,
};
use x509_cert::Certificate;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::cert::chain_order;

use decrypt::{Budget, Password, bmp_password, decrypt, mac_matches};

/// The most key-derivation iterations one file may ask for, MAC and all bags together.
///
/// OpenSSL uses 2,048 per item; even a cautious exporter stays far below this. It bounds
/// the work a hostile file can cause to a few seconds.
pub(crate) const MAX_KDF_ITERATIONS: u64 = 10_000_000;

/// The most certificates one file may hold. A virksomhetssertifikat file has three or
/// four; the bound keeps chain ordering (quadratic) cheap on hostile input.
const MAX_CERTIFICATES: usize = 256;

/// PKCS#7 `data` content type.
const ID_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
/// PKCS#7 `encryptedData` content type.
const ID_ENCRYPTED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.6");
/// rsaEncryption, the only key type Maskinporten's RS256/384/512 can use.
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
/// Digests the PKCS#12 MAC may use.
const SHA1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.14.3.2.26");
const SHA224: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.4");
const SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
const SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.3");

/// The contents of a PKCS#12 file: one RSA private key and its certificates.
pub(crate) struct Pkcs12Contents {
    /// The RSA private key components (big-endian unsigned bytes, no leading zeros needed).
    pub(crate) key: RsaPrivateParts,
    /// DER certificates, the one whose public key matches the private key FIRST (the leaf),
    /// then the others ordered so that each one's issuer is the next one's subject where
    /// possible (intermediates, then root if present).
    pub(crate) chain: Vec<Vec<u8>>,
}

impl fmt::Debug for Pkcs12Contents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs12Contents")
            .field("key", &self.key)
            .field("chain_len", &self.chain.len())
            .finish()
    }
}

/// RSA private key parts, wiped from memory on drop. `Debug` shows only the key size.
#[derive(Zeroize, ZeroizeOnDrop)]
pub(crate) struct RsaPrivateParts {
    /// n.
    pub(crate) modulus: Vec<u8>,
    /// e.
    pub(crate) public_exponent: Vec<u8>,
    /// d.
    pub(crate) private_exponent: Vec<u8>,
    /// p.
    pub(crate) prime1: Vec<u8>,
    /// q.
    pub(crate) prime2: Vec<u8>,
    /// d mod (p - 1).
    pub(crate) exponent1: Vec<u8>,
    /// d mod (q - 1).
    pub(crate) exponent2: Vec<u8>,
    /// q⁻¹ mod p.
    pub(crate) coefficient: Vec<u8>,
}

impl fmt::Debug for RsaPrivateParts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let significant = strip_zeros(&self.modulus);
        let bits = significant.first().map_or(0, |top| {
            significant.len() * 8 - usize::try_from(top.leading_zeros()).unwrap_or(0)
        });
        f.debug_struct("RsaPrivateParts")
            .field("modulus_bits", &bits)
            .finish_non_exhaustive()
    }
}

/// Why a PKCS#12 file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum P12Error {
    /// The MAC does not match: the password is wrong or the file was altered.
    #[error("wrong password, or the file is damaged (the PKCS#12 integrity check failed)")]
    WrongPassword,
    /// Decryption failed in a file whose MAC was absent or used another password.
    #[error("could not decrypt the file's contents: wrong password, or the file is damaged")]
    DecryptionFailed,
    /// The bytes are not a (DER-encoded) PKCS#12 file.
    #[error("not a PKCS#12 file: {0}")]
    Malformed(String),
    /// The file holds no private key.
    #[error("the file holds no private key")]
    NoKey,
    /// The file holds more than one private key, so which one to import is unclear.
    #[error(
        "the file holds more than one private key; export the one to import into a file of its own"
    )]
    MultipleKeys,
    /// The private key is not an RSA key.
    #[error("the private key is not RSA; Maskinporten only accepts RSA (RS256/RS384/RS512)")]
    NotRsa,
    /// No certificate carries the private key's public key.
    #[error("no certificate in the file matches the private key")]
    NoCertificate,
    /// The file uses an algorithm (named with its OID) that this reader does not support.
    #[error(
        "the file uses an unsupported algorithm: {0}; re-export it with `openssl pkcs12 -export` (AES-256-CBC)"
    )]
    UnsupportedAlgorithm(String),
    /// The file asks for more key-derivation work than `MAX_KDF_ITERATIONS`.
    #[error(
        "the file asks for more than {MAX_KDF_ITERATIONS} key-derivation iterations; refusing to spend that long"
    )]
    TooManyIterations,
}

/// Reads a DER-encoded PKCS#12 file protected by `password`.
///
/// The MAC is verified before anything is decrypted. The file must hold exactly one
/// private key, it must be RSA, and one of the certificates must carry its public key.
pub(crate) fn read_pkcs12(data: &[u8], password: &str) -> Result<Pkcs12Contents, P12Error> {
    let pfx = Pfx::from_der(data).map_err(|e| der_error("outer structure", e))?;
    if pfx.auth_safe.content_type != ID_DATA {
        return Err(P12Error::UnsupportedAlgorithm(format!(
            "integrity mode {} (only password integrity is supported)",
            pfx.auth_safe.content_type
        )));
    }
    let auth_safe = Zeroizing::new(
        pfx.auth_safe
            .content
            .decode_as::<OctetString>()
            .map_err(|e| der_error("authenticated safe", e))?
            .into_bytes()
            .into_vec(),
    );

    let mut budget = Budget {
        left: MAX_KDF_ITERATIONS,
    };
    let mut secret = Password {
        utf8: password.as_bytes(),
        bmp: bmp_password(password),
    };
    if let Some(mac) = &pfx.mac_data
        && !mac_matches(mac, &secret.bmp, &auth_safe, &mut budget)?
    {
        // Like OpenSSL, take an empty password to also mean "no password", which the
        // PKCS#12 KDF encodes differently (no terminating zero character).
        let empty = Zeroizing::new(Vec::new());
        if password.is_empty() && mac_matches(mac, &empty, &auth_safe, &mut budget)? {
            secret.bmp = empty;
        } else {
            return Err(P12Error::WrongPassword);
        }
    }

    let safes =
        AuthenticatedSafe::from_der(&auth_safe).map_err(|e| der_error("authenticated safe", e))?;
    let mut found = Found::default();
    for content in &safes {
        let contents = open_content(content, &secret, &mut budget)?;
        collect_bags(&contents, &secret, &mut budget, &mut found)?;
    }

    let key_der = match found.keys.len() {
        0 => return Err(P12Error::NoKey),
        1 => &found.keys[0],
        _ => return Err(P12Error::MultipleKeys),
    };
    let key = rsa_parts(key_der)?;
    let chain = order_chain(&key, found.certs)?;
    Ok(Pkcs12Contents { key, chain })
}

/// The SafeContents bytes inside one ContentInfo of the authenticated safe.
fn open_content(
    content: &ContentInfo,
    secret: &Password<'_>,
    budget: &mut Budget,
) -> Result<Zeroizing<Vec<u8>>, P12Error> {
    match content.content_type {
        ID_DATA => Ok(Zeroizing::new(
            content
                .content
                .decode_as::<OctetString>()
                .map_err(|e| der_error("data content", e))?
                .into_bytes()
                .into_vec(),
        )),
        ID_ENCRYPTED_DATA => {
            let encrypted = content
                .content
                .decode_as::<EncryptedData>()
                .map_err(|e| der_error("encrypted content", e))?;
            let info = &encrypted.enc_content_info;
            match &info.encrypted_content {
                Some(ciphertext) => {
                    decrypt(&info.content_enc_alg, ciphertext.as_bytes(), secret, budget)
                }
                None => Err(P12Error::Malformed(
                    "encrypted content without ciphertext".to_owned(),
                )),
            }
        }
        other => Err(P12Error::UnsupportedAlgorithm(format!(
            "content type {other} (only data and password-encrypted data are supported)"
        ))),
    }
}

/// Private keys (PKCS#8 DER) and certificates (DER) found in the bags, in file order.
#[derive(Default)]
struct Found {
    keys: Vec<Zeroizing<Vec<u8>>>,
    certs: Vec<Vec<u8>>,
}

fn collect_bags(
    contents: &[u8],
    secret: &Password<'_>,
    budget: &mut Budget,
    found: &mut Found,
) -> Result<(), P12Error> {
    let bags = SafeContents::from_der(contents).map_err(|e| der_error("safe contents", e))?;
    // Wrap every bag value at once: an unencrypted key bag is secret, and is then wiped
    // even when a later bag fails.
    let bags: Vec<_> = bags
        .into_iter()
        .map(|bag| (bag.bag_id, Zeroizing::new(bag.bag_value)))
        .collect();
    for (bag_id, value) in &bags {
        match *bag_id {
            pkcs12::PKCS_12_KEY_BAG_OID => {
                found.keys.push(Zeroizing::new(explicit_0(value)?.to_vec()));
            }
            pkcs12::PKCS_12_PKCS8_KEY_BAG_OID => {
                let info = EncryptedPrivateKeyInfo::from_der(explicit_0(value)?)
                    .map_err(|e| der_error("shrouded key bag", e))?;
                found.keys.push(decrypt(
                    &info.encryption_algorithm,
                    info.encrypted_data.as_bytes(),
                    secret,
                    budget,
                )?);
            }
            pkcs12::PKCS_12_CERT_BAG_OID => {
                let bag = CertBag::from_der(explicit_0(value)?)
                    .map_err(|e| der_error("certificate bag", e))?;
                if bag.cert_id == pkcs12::PKCS_12_X509_CERT_OID {
                    if found.certs.len() == MAX_CERTIFICATES {
                        return Err(P12Error::Malformed(format!(
                            "more than {MAX_CERTIFICATES} certificates"
                        )));
                    }
                    found.certs.push(bag.cert_value.into_bytes().into_vec());
                }
            }
            // CRLs, secrets and nested safe contents are of no use here.
            _ => {}
        }
    }
    Ok(())
}

/// The contents of a `[0] EXPLICIT` bag value.
fn explicit_0(tlv: &[u8]) -> Result<&[u8], P12Error> {
    let any = AnyRef::from_der(tlv).map_err(|e| der_error("bag value", e))?;
    let expected = Tag::ContextSpecific {
        constructed: true,
        number: TagNumber(0),
    };
    if any.tag() != expected {
        return Err(P12Error::Malformed(format!(
            "bag value has tag {} instead of [0]",
            any.tag()
        )));
    }
    Ok(any.value())
}

/// The CRT components of a PKCS#8 RSA private key.
fn rsa_parts(pkcs8: &[u8]) -> Result<RsaPrivateParts, P12Error> {
    let info = PrivateKeyInfoRef::try_from(pkcs8)
        .map_err(|e| P12Error::Malformed(format!("the private key is not valid PKCS#8: {e}")))?;
    if info.algorithm.oid != RSA_ENCRYPTION {
        return Err(P12Error::NotRsa);
    }
    let key = RsaPrivateKeyRef::from_der(info.private_key.as_bytes())
        .map_err(|e| P12Error::Malformed(format!("the RSA private key is not valid: {e}")))?;
    if key.other_prime_infos.is_some() {
        return Err(P12Error::UnsupportedAlgorithm(
            "multi-prime RSA key (more than two primes)".to_owned(),
        ));
    }
    Ok(RsaPrivateParts {
        modulus: key.modulus.as_bytes().to_vec(),
        public_exponent: key.public_exponent.as_bytes().to_vec(),
        private_exponent: key.private_exponent.as_bytes().to_vec(),
        prime1: key.prime1.as_bytes().to_vec(),
        prime2: key.prime2.as_bytes().to_vec(),
        exponent1: key.exponent1.as_bytes().to_vec(),
        exponent2: key.exponent2.as_bytes().to_vec(),
        coefficient: key.coefficient.as_bytes().to_vec(),
    })
}

/// Puts the certificate with the key's public key first, follows issuers from there
/// ([`chain_order`]), and appends whatever is left in file order. Exact duplicates are
/// dropped.
fn order_chain(key: &RsaPrivateParts, der: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, P12Error> {
    let mut unique: Vec<Vec<u8>> = Vec::with_capacity(der.len());
    let mut certificates = Vec::with_capacity(der.len());
    for cert_der in der {
        if unique.contains(&cert_der) {
            continue;
        }
        certificates.push(Certificate::from_der(&cert_der).map_err(|e| {
            P12Error::Malformed(format!("a certificate in the file is not valid X.509: {e}"))
        })?);
        unique.push(cert_der);
    }
    let leaf = certificates
        .iter()
        .position(|cert| carries_key(cert, key))
        .ok_or(P12Error::NoCertificate)?;
    let mut order = chain_order(&certificates, leaf);
    let rest: Vec<usize> = (0..unique.len()).filter(|i| !order.contains(i)).collect();
    order.extend(rest);
    Ok(order
        .into_iter()
        .map(|i| std::mem::take(&mut unique[i]))
        .collect())
}

/// Whether the certificate's public key is the public half of `key`.
fn carries_key(cert: &Certificate, key: &RsaPrivateParts) -> bool {
    let spki = cert.tbs_certificate().subject_public_key_info();
    if spki.algorithm.oid != RSA_ENCRYPTION {
        return false;
    }
    let Some(bytes) = spki.subject_public_key.as_bytes() else {
        return false;
    };
    RsaPublicKeyRef::from_der(bytes).is_ok_and(|public| {
        strip_zeros(public.modulus.as_bytes()) == strip_zeros(&key.modulus)
            && strip_zeros(public.public_exponent.as_bytes()) == strip_zeros(&key.public_exponent)
    })
}

fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// Maps a DER error: an unknown OID means an unsupported algorithm, anything else a
/// malformed file.
fn der_error(what: &str, error: der::Error) -> P12Error {
    match error.kind() {
        ErrorKind::OidUnknown { oid } => {
            P12Error::UnsupportedAlgorithm(format!("{oid} (in the {what})"))
        }
        _ => P12Error::Malformed(format!("bad {what}: {error}")),
    }
}

#[cfg(test)]
mod tests;
