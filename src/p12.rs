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

use std::fmt;

use cbc::cipher::{
    BlockCipherDecrypt, BlockModeDecrypt, InnerIvInit, KeyInit, block_padding::Pkcs7,
};
use der::{
    Decode, ErrorKind, Tag, TagNumber, Tagged,
    asn1::{AnyRef, ObjectIdentifier, OctetString},
};
use des::{TdesEde2, TdesEde3};
use hmac::{
    EagerHash, Hmac, Mac,
    digest::{Digest, FixedOutputReset, OutputSizeUser, block_api::BlockSizeUser},
};
use pkcs5::pbes2;
use pkcs12::{
    AuthenticatedSafe, CertBag, MacData,
    cms::{content_info::ContentInfo, encrypted_data::EncryptedData},
    kdf::{self, Pkcs12KeyType},
    pbe_params::{EncryptedPrivateKeyInfo, Pkcs12PbeParams},
    pfx::Pfx,
    safe_bag::SafeContents,
};
use rc2::Rc2;
use rsa::{
    pkcs1::{RsaPrivateKeyRef, RsaPublicKeyRef},
    pkcs8::PrivateKeyInfoRef,
};
use spki::AlgorithmIdentifierOwned;
use x509_cert::Certificate;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// The most key-derivation iterations one file may ask for, MAC and all bags together.
///
/// OpenSSL uses 2,048 per item; even a cautious exporter stays far below this. It bounds
/// the work a hostile file can cause to a few seconds.
pub const MAX_KDF_ITERATIONS: u64 = 10_000_000;

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
pub struct Pkcs12Contents {
    /// The RSA private key components (big-endian unsigned bytes, no leading zeros needed).
    pub key: RsaPrivateParts,
    /// DER certificates, the one whose public key matches the private key FIRST (the leaf),
    /// then the others ordered so that each one's issuer is the next one's subject where
    /// possible (intermediates, then root if present).
    pub chain: Vec<Vec<u8>>,
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
pub struct RsaPrivateParts {
    /// n.
    pub modulus: Vec<u8>,
    /// e.
    pub public_exponent: Vec<u8>,
    /// d.
    pub private_exponent: Vec<u8>,
    /// p.
    pub prime1: Vec<u8>,
    /// q.
    pub prime2: Vec<u8>,
    /// d mod (p - 1).
    pub exponent1: Vec<u8>,
    /// d mod (q - 1).
    pub exponent2: Vec<u8>,
    /// q⁻¹ mod p.
    pub coefficient: Vec<u8>,
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
    /// The file asks for more key-derivation work than [`MAX_KDF_ITERATIONS`].
    #[error(
        "the file asks for more than {MAX_KDF_ITERATIONS} key-derivation iterations; refusing to spend that long"
    )]
    TooManyIterations,
}

/// Reads a DER-encoded PKCS#12 file protected by `password`.
///
/// The MAC is verified before anything is decrypted. The file must hold exactly one
/// private key, it must be RSA, and one of the certificates must carry its public key.
pub fn read_pkcs12(data: &[u8], password: &str) -> Result<Pkcs12Contents, P12Error> {
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

/// The password in the two forms PKCS#12 uses: UTF-8 for PBES2, and for the MAC and the
/// PKCS#12 PBE schemes big-endian UTF-16 with a terminating zero character.
struct Password<'a> {
    utf8: &'a [u8],
    bmp: Zeroizing<Vec<u8>>,
}

fn bmp_password(password: &str) -> Zeroizing<Vec<u8>> {
    let mut bmp = Zeroizing::new(Vec::with_capacity(password.len() * 2 + 2));
    for unit in password.encode_utf16().chain([0]) {
        bmp.extend_from_slice(&unit.to_be_bytes());
    }
    bmp
}

/// What is left of [`MAX_KDF_ITERATIONS`] for this file.
struct Budget {
    left: u64,
}

impl Budget {
    /// Accounts for `times` derivations of `iterations` rounds each.
    fn spend(&mut self, iterations: i64, times: u64) -> Result<(), P12Error> {
        let Ok(rounds) = u64::try_from(iterations) else {
            return Err(P12Error::Malformed(format!(
                "iteration count {iterations} is negative"
            )));
        };
        if rounds == 0 {
            return Err(P12Error::Malformed("iteration count is zero".to_owned()));
        }
        let cost = rounds.saturating_mul(times);
        self.left = self
            .left
            .checked_sub(cost)
            .ok_or(P12Error::TooManyIterations)?;
        Ok(())
    }
}

/// Checks the PKCS#12 MAC (RFC 7292 appendix B key derivation, then HMAC).
fn mac_matches(
    mac: &MacData,
    bmp_password: &[u8],
    auth_safe: &[u8],
    budget: &mut Budget,
) -> Result<bool, P12Error> {
    let algorithm = mac.mac.algorithm.oid;
    let check = match algorithm {
        SHA1 => hmac_matches::<sha1::Sha1>,
        SHA224 => hmac_matches::<sha2::Sha224>,
        SHA256 => hmac_matches::<sha2::Sha256>,
        SHA384 => hmac_matches::<sha2::Sha384>,
        SHA512 => hmac_matches::<sha2::Sha512>,
        other => {
            return Err(P12Error::UnsupportedAlgorithm(format!(
                "MAC algorithm {other}"
            )));
        }
    };
    budget.spend(mac.iterations.into(), 1)?;
    Ok(check(
        bmp_password,
        mac.mac_salt.as_bytes(),
        mac.iterations,
        auth_safe,
        mac.mac.digest.as_bytes(),
    ))
}

fn hmac_matches<D>(password: &[u8], salt: &[u8], rounds: i32, data: &[u8], expected: &[u8]) -> bool
where
    D: Digest + FixedOutputReset + BlockSizeUser + EagerHash,
    Hmac<D>: KeyInit + Mac,
{
    let key = Zeroizing::new(kdf::derive_key::<D>(
        password,
        salt,
        Pkcs12KeyType::Mac,
        rounds,
        <D as OutputSizeUser>::output_size(),
    ));
    let Ok(mut mac) = <Hmac<D> as KeyInit>::new_from_slice(&key) else {
        return false;
    };
    mac.update(data);
    mac.verify_slice(expected).is_ok()
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

/// Decrypts a bag or a content with the password-based scheme `algorithm` names.
///
/// Every plaintext in a PKCS#12 file is a DER SEQUENCE (SafeContents or PrivateKeyInfo);
/// anything else means the key was wrong, which without a MAC is how a wrong password
/// shows, so it is reported as [`P12Error::DecryptionFailed`] rather than as garbage.
fn decrypt(
    algorithm: &AlgorithmIdentifierOwned,
    ciphertext: &[u8],
    secret: &Password<'_>,
    budget: &mut Budget,
) -> Result<Zeroizing<Vec<u8>>, P12Error> {
    let plaintext = decrypt_unchecked(algorithm, ciphertext, secret, budget)?;
    match AnyRef::from_der(&plaintext) {
        Ok(any) if any.tag() == Tag::Sequence => Ok(plaintext),
        _ => Err(P12Error::DecryptionFailed),
    }
}

fn decrypt_unchecked(
    algorithm: &AlgorithmIdentifierOwned,
    ciphertext: &[u8],
    secret: &Password<'_>,
    budget: &mut Budget,
) -> Result<Zeroizing<Vec<u8>>, P12Error> {
    let oid = algorithm.oid;
    let Some(params) = &algorithm.parameters else {
        return Err(P12Error::Malformed(format!(
            "encryption algorithm {oid} has no parameters"
        )));
    };
    if oid == pbes2::PBES2_OID {
        return pbes2_decrypt(params, ciphertext, secret, budget);
    }

    // The PKCS#12 PBE schemes (RFC 7292 appendix C): key and IV from the PKCS#12 KDF.
    let key_len = match oid {
        pkcs12::PKCS_12_PBE_WITH_SHAAND3_KEY_TRIPLE_DES_CBC => 24,
        pkcs12::PKCS_12_PBE_WITH_SHAAND2_KEY_TRIPLE_DES_CBC
        | pkcs12::PKCS_12_PBE_WITH_SHAAND128_BIT_RC2_CBC => 16,
        pkcs12::PKCS_12_PBEWITH_SHAAND40_BIT_RC2_CBC => 5,
        other => {
            return Err(P12Error::UnsupportedAlgorithm(format!(
                "encryption algorithm {other}"
            )));
        }
    };
    let params = params
        .decode_as::<Pkcs12PbeParams>()
        .map_err(|e| der_error("PBE parameters", e))?;
    budget.spend(params.iterations.into(), 2)?;
    let derive = |usage, len| {
        Zeroizing::new(kdf::derive_key::<sha1::Sha1>(
            &secret.bmp,
            params.salt.as_bytes(),
            usage,
            params.iterations,
            len,
        ))
    };
    let key = derive(Pkcs12KeyType::EncryptionKey, key_len);
    let iv = derive(Pkcs12KeyType::Iv, 8);
    let bad_key = |_| P12Error::Malformed("cipher key of the wrong length".to_owned());
    match oid {
        pkcs12::PKCS_12_PBE_WITH_SHAAND3_KEY_TRIPLE_DES_CBC => cbc_decrypt(
            TdesEde3::new_from_slice(&key).map_err(bad_key)?,
            &iv,
            ciphertext,
        ),
        pkcs12::PKCS_12_PBE_WITH_SHAAND2_KEY_TRIPLE_DES_CBC => cbc_decrypt(
            TdesEde2::new_from_slice(&key).map_err(bad_key)?,
            &iv,
            ciphertext,
        ),
        // RC2's effective key length is the key length in these two schemes.
        _ => cbc_decrypt(
            Rc2::new_with_eff_key_len(&key, key_len * 8),
            &iv,
            ciphertext,
        ),
    }
}

/// PBES2 (RFC 8018) with PBKDF2, as current exporters write it.
fn pbes2_decrypt(
    params: &der::Any,
    ciphertext: &[u8],
    secret: &Password<'_>,
    budget: &mut Budget,
) -> Result<Zeroizing<Vec<u8>>, P12Error> {
    let params = params
        .decode_as::<pbes2::Parameters>()
        .map_err(|e| der_error("PBES2 parameters", e))?;
    match &params.kdf {
        pbes2::Kdf::Pbkdf2(pbkdf2) => budget.spend(pbkdf2.iteration_count.into(), 1)?,
        // scrypt's memory cost is as much a risk as its time; no PKCS#12 exporter
        // in use for these certificates writes it.
        other => {
            return Err(P12Error::UnsupportedAlgorithm(format!(
                "key derivation {} (in PBES2)",
                other.oid()
            )));
        }
    }
    let mut buffer = Zeroizing::new(ciphertext.to_vec());
    let len = params
        .decrypt_in_place(secret.utf8, &mut buffer)
        .map_err(pkcs5_error)?
        .len();
    buffer.truncate(len);
    Ok(buffer)
}

fn cbc_decrypt<C: BlockCipherDecrypt>(
    cipher: C,
    iv: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, P12Error> {
    let decryptor = cbc::Decryptor::<C>::inner_iv_slice_init(cipher, iv)
        .map_err(|_| P12Error::Malformed("IV of the wrong length".to_owned()))?;
    let mut buffer = Zeroizing::new(ciphertext.to_vec());
    let len = decryptor
        .decrypt_padded::<Pkcs7>(&mut buffer)
        .map_err(|_| P12Error::DecryptionFailed)?
        .len();
    buffer.truncate(len);
    Ok(buffer)
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

/// Puts the certificate with the key's public key first, follows issuers from there, and
/// appends whatever is left in file order. Exact duplicates are dropped.
fn order_chain(key: &RsaPrivateParts, der: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, P12Error> {
    let mut rest: Vec<(Vec<u8>, Certificate)> = Vec::with_capacity(der.len());
    for cert_der in der {
        if rest.iter().any(|(seen, _)| *seen == cert_der) {
            continue;
        }
        let cert = Certificate::from_der(&cert_der).map_err(|e| {
            P12Error::Malformed(format!("a certificate in the file is not valid X.509: {e}"))
        })?;
        rest.push((cert_der, cert));
    }

    let leaf = rest
        .iter()
        .position(|(_, cert)| carries_key(cert, key))
        .ok_or(P12Error::NoCertificate)?;
    let mut chain = vec![rest.remove(leaf)];
    while let Some((_, last)) = chain.last() {
        let tbs = last.tbs_certificate();
        if tbs.issuer() == tbs.subject() {
            break;
        }
        let Some(next) = rest
            .iter()
            .position(|(_, cert)| cert.tbs_certificate().subject() == tbs.issuer())
        else {
            break;
        };
        chain.push(rest.remove(next));
    }
    chain.append(&mut rest);
    Ok(chain.into_iter().map(|(der, _)| der).collect())
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

fn pkcs5_error(error: pkcs5::Error) -> P12Error {
    match error {
        pkcs5::Error::DecryptFailed => P12Error::DecryptionFailed,
        pkcs5::Error::UnsupportedAlgorithm { oid } => {
            P12Error::UnsupportedAlgorithm(format!("{oid} (in PBES2)"))
        }
        other => P12Error::Malformed(format!("bad PBES2 encryption: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use der::Encode;
    use tempfile::TempDir;

    use super::*;
    use crate::testing::{openssl, run_openssl};

    const PASSWORD: &str = "Virksomhet-2024!";

    fn read(dir: &Path, name: &str) -> Vec<u8> {
        std::fs::read(dir.join(name)).expect("read fixture")
    }

    /// A self-signed RSA-2048 certificate and key: `key.pem`, `cert.pem`.
    fn self_signed(dir: &Path) {
        let _ = openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
                "-subj",
                "/CN=Test Virksomhet",
                "-days",
                "2",
            ],
        );
    }

    /// `openssl pkcs12 -export` of `key.pem` + `cert.pem` with extra options, to `out`.
    fn export(dir: &Path, out: &str, extra: &[&str]) -> Vec<u8> {
        let pass = format!("pass:{PASSWORD}");
        let mut args = vec![
            "pkcs12", "-export", "-inkey", "key.pem", "-in", "cert.pem", "-out", out, "-passout",
            &pass,
        ];
        args.extend_from_slice(extra);
        let _ = openssl(dir, &args);
        read(dir, out)
    }

    fn modulus(dir: &Path, key: &str) -> Vec<u8> {
        let out = String::from_utf8(openssl(dir, &["rsa", "-in", key, "-modulus", "-noout"]))
            .expect("utf-8");
        let hex = out.trim().strip_prefix("Modulus=").expect("Modulus= line");
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn cert_der(dir: &Path, pem: &str) -> Vec<u8> {
        openssl(dir, &["x509", "-in", pem, "-outform", "der"])
    }

    /// The algorithms `openssl pkcs12 -info` reports, to be sure the fixture is what the
    /// test claims it is.
    fn info(dir: &Path, file: &str) -> String {
        let pass = format!("pass:{PASSWORD}");
        let output = run_openssl(
            dir,
            &[
                "pkcs12", "-info", "-legacy", "-noout", "-in", file, "-passin", &pass,
            ],
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    fn assert_reads_self_signed(dir: &Path, p12: &[u8]) {
        let contents = read_pkcs12(p12, PASSWORD).expect("read PKCS#12");
        assert_eq!(contents.key.modulus, modulus(dir, "key.pem"));
        assert_eq!(contents.key.public_exponent, [1, 0, 1]);
        assert_eq!(contents.chain, vec![cert_der(dir, "cert.pem")]);
        assert_key_consistent(&contents.key);
    }

    /// n = p·q and the CRT parts agree with d, checked with the `rsa` crate.
    fn assert_key_consistent(parts: &RsaPrivateParts) {
        use rsa::{BoxedUint, PrivateKey};
        let uint = |b: &[u8]| {
            BoxedUint::from_be_slice(b, u32::try_from(b.len() * 8).expect("bits")).expect("uint")
        };
        let key = PrivateKey::from_components(
            uint(&parts.modulus),
            uint(&parts.public_exponent),
            uint(&parts.private_exponent),
            vec![uint(&parts.prime1), uint(&parts.prime2)],
        )
        .expect("RSA key from components");
        key.validate().expect("consistent RSA key");
    }

    #[test]
    fn reads_openssl3_default_export() {
        let dir = TempDir::new().expect("temp dir");
        self_signed(dir.path());
        let p12 = export(dir.path(), "modern.p12", &[]);
        let info = info(dir.path(), "modern.p12");
        assert!(info.contains("MAC: sha256"), "{info}");
        assert!(info.contains("PBES2, PBKDF2, AES-256-CBC"), "{info}");
        assert_reads_self_signed(dir.path(), &p12);
    }

    #[test]
    fn reads_legacy_export() {
        let dir = TempDir::new().expect("temp dir");
        self_signed(dir.path());
        let p12 = export(dir.path(), "legacy.p12", &["-legacy"]);
        let info = info(dir.path(), "legacy.p12");
        assert!(info.contains("MAC: sha1"), "{info}");
        assert!(info.contains("pbeWithSHA1And40BitRC2-CBC"), "{info}");
        assert!(info.contains("pbeWithSHA1And3-KeyTripleDES-CBC"), "{info}");
        assert_reads_self_signed(dir.path(), &p12);
    }

    #[test]
    fn reads_other_encryption_choices() {
        let dir = TempDir::new().expect("temp dir");
        self_signed(dir.path());
        let cases: &[(&[&str], &str)] = &[
            (&["-certpbe", "NONE"], "PKCS7 Data\nCertificate bag"),
            (
                &["-keypbe", "PBE-SHA1-3DES", "-certpbe", "PBE-SHA1-3DES"],
                "Encrypted data: pbeWithSHA1And3-KeyTripleDES-CBC",
            ),
            (
                &[
                    "-legacy",
                    "-keypbe",
                    "PBE-SHA1-2DES",
                    "-certpbe",
                    "PBE-SHA1-RC2-128",
                ],
                "pbeWithSHA1And2-KeyTripleDES-CBC",
            ),
            (&["-keypbe", "NONE", "-certpbe", "NONE"], "Key bag"),
            (
                &["-keypbe", "AES-128-CBC", "-macalg", "sha512"],
                "MAC: sha512",
            ),
            (&["-keypbe", "DES-EDE3-CBC"], "PBES2, PBKDF2, DES-EDE3-CBC"),
            (&["-nomac"], "PBES2"),
        ];
        for (options, expect) in cases {
            let p12 = export(dir.path(), "variant.p12", options);
            let info = info(dir.path(), "variant.p12");
            assert!(info.contains(expect), "{options:?}: {info}");
            assert_reads_self_signed(dir.path(), &p12);
        }
    }

    #[test]
    fn empty_password() {
        let dir = TempDir::new().expect("temp dir");
        self_signed(dir.path());
        for extra in [&[][..], &["-legacy"][..]] {
            let mut args = vec![
                "pkcs12", "-export", "-inkey", "key.pem", "-in", "cert.pem", "-out", "e.p12",
                "-passout", "pass:",
            ];
            args.extend_from_slice(extra);
            let _ = openssl(dir.path(), &args);
            let contents = read_pkcs12(&read(dir.path(), "e.p12"), "").expect("read");
            assert_eq!(contents.key.modulus, modulus(dir.path(), "key.pem"));
        }
    }

    #[test]
    fn empty_password_given_as_no_password() {
        // Some exporters key the MAC with an empty password without the terminating zero
        // character ("no password"); OpenSSL accepts both, and so does this reader.
        let dir = TempDir::new().expect("temp dir");
        let d = dir.path();
        self_signed(d);
        let _ = openssl(
            d,
            &[
                "pkcs12", "-export", "-keypbe", "NONE", "-certpbe", "NONE", "-inkey", "key.pem",
                "-in", "cert.pem", "-out", "n.p12", "-passout", "pass:",
            ],
        );
        let mut pfx = Pfx::from_der(&read(d, "n.p12")).expect("parse");
        let auth_safe = pfx
            .auth_safe
            .content
            .decode_as::<OctetString>()
            .expect("octets");
        let mac = pfx.mac_data.as_mut().expect("MAC");
        assert_eq!(mac.mac.algorithm.oid, SHA256);
        let key = kdf::derive_key::<sha2::Sha256>(
            &[],
            mac.mac_salt.as_bytes(),
            Pkcs12KeyType::Mac,
            mac.iterations,
            32,
        );
        let mut hmac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key).expect("key");
        hmac.update(auth_safe.as_bytes());
        mac.mac.digest = OctetString::new(hmac.finalize().into_bytes().to_vec()).expect("mac");
        let p12 = pfx.to_der().expect("encode");

        let contents = read_pkcs12(&p12, "").expect("read");
        assert_eq!(contents.key.modulus, modulus(d, "key.pem"));
        let err = read_pkcs12(&p12, "x").expect_err("wrong password accepted");
        assert!(matches!(err, P12Error::WrongPassword), "{err:?}");
    }

    /// Root → intermediate → leaf.
    fn ca_chain(dir: &Path) {
        let _ = openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "root.key",
                "-out",
                "root.pem",
                "-subj",
                "/CN=Test Root CA",
                "-days",
                "3",
            ],
        );
        let ca_ext = "ca.ext";
        std::fs::write(
            dir.join(ca_ext),
            "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
        )
        .expect("write ext");
        sign(
            dir,
            "inter",
            "/CN=Test Issuing CA",
            "root",
            Some(ca_ext),
            "2",
        );
        sign(dir, "leaf", "/CN=Test Virksomhet", "inter", None, "3");
    }

    fn sign(dir: &Path, name: &str, subject: &str, ca: &str, ext: Option<&str>, serial: &str) {
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        let _ = openssl(
            dir,
            &[
                "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr,
                "-subj", subject,
            ],
        );
        let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-set_serial",
            serial,
            "-days",
            "2",
            "-out",
            &pem,
        ];
        if let Some(ext) = ext {
            args.extend_from_slice(&["-extfile", ext]);
        }
        let _ = openssl(dir, &args);
    }

    #[test]
    fn chain_is_leaf_then_issuers() {
        let dir = TempDir::new().expect("temp dir");
        let dir = dir.path();
        ca_chain(dir);
        let pass = format!("pass:{PASSWORD}");
        let (leaf, inter, root) = (
            cert_der(dir, "leaf.pem"),
            cert_der(dir, "inter.pem"),
            cert_der(dir, "root.pem"),
        );

        // Leaf + its issuing CA, as in the task: [leaf, ca].
        let _ = openssl(
            dir,
            &[
                "pkcs12",
                "-export",
                "-inkey",
                "leaf.key",
                "-in",
                "leaf.pem",
                "-certfile",
                "inter.pem",
                "-out",
                "two.p12",
                "-passout",
                &pass,
            ],
        );
        let contents = read_pkcs12(&read(dir, "two.p12"), PASSWORD).expect("read");
        assert_eq!(contents.key.modulus, modulus(dir, "leaf.key"));
        assert_eq!(contents.chain, vec![leaf.clone(), inter.clone()]);

        // The whole chain, handed to openssl root first. OpenSSL 3.0 then stores
        // [leaf, root, intermediate]; the reader must still give leaf, intermediate, root.
        let mut bundle = read(dir, "root.pem");
        bundle.extend(read(dir, "inter.pem"));
        bundle.extend(read(dir, "leaf.pem"));
        std::fs::write(dir.join("bundle.pem"), bundle).expect("write bundle");
        let _ = openssl(
            dir,
            &[
                "pkcs12",
                "-export",
                "-legacy",
                "-inkey",
                "leaf.key",
                "-in",
                "bundle.pem",
                "-out",
                "three.p12",
                "-passout",
                &pass,
            ],
        );
        let contents = read_pkcs12(&read(dir, "three.p12"), PASSWORD).expect("read");
        assert_eq!(contents.chain, vec![leaf, inter, root]);
    }

    #[test]
    fn wrong_password() {
        let dir = TempDir::new().expect("temp dir");
        self_signed(dir.path());
        for extra in [&[][..], &["-legacy"][..]] {
            let p12 = export(dir.path(), "w.p12", extra);
            for wrong in ["wrong", "", "virksomhet-2024!", "Virksomhet-2024!\n", "🔑"] {
                let err = read_pkcs12(&p12, wrong).expect_err("wrong password accepted");
                assert!(
                    matches!(err, P12Error::WrongPassword),
                    "{extra:?} {wrong:?}: {err:?}"
                );
            }
        }
        let err = read_pkcs12(&export(dir.path(), "w.p12", &[]), "x").expect_err("wrong");
        assert_eq!(
            err.to_string(),
            "wrong password, or the file is damaged (the PKCS#12 integrity check failed)"
        );

        // Without a MAC the password is only found wrong when decryption fails.
        for extra in [
            &["-nomac"][..],
            &["-nomac", "-legacy"][..],
            &["-nomac", "-certpbe", "AES-256-CBC"][..],
        ] {
            let p12 = export(dir.path(), "nomac.p12", extra);
            for wrong in ["wrong", "", "Virksomhet-2024"] {
                let err = read_pkcs12(&p12, wrong).expect_err("wrong password accepted");
                assert!(
                    matches!(err, P12Error::DecryptionFailed),
                    "{extra:?} {wrong:?}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let dir = TempDir::new().expect("temp dir");
        self_signed(dir.path());
        for extra in [&[][..], &["-legacy"][..]] {
            let p12 = export(dir.path(), "c.p12", extra);
            for len in [0, 1, 2, 4, 16, 100, p12.len() / 2, p12.len() - 1] {
                assert!(
                    read_pkcs12(&p12[..len], PASSWORD).is_err(),
                    "truncated to {len}"
                );
            }
            let mut longer = p12.clone();
            longer.push(0);
            assert!(read_pkcs12(&longer, PASSWORD).is_err(), "trailing byte");
            for i in (0..p12.len()).step_by(3) {
                let mut flipped = p12.clone();
                flipped[i] ^= 0x5a;
                // Every byte is either structure or covered by the MAC.
                assert!(read_pkcs12(&flipped, PASSWORD).is_err(), "byte {i} flipped");
            }
        }

        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..300 {
            let len = usize::try_from(next() % 600).expect("small");
            let mut bytes: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
            if round % 2 == 0 && bytes.len() > 4 {
                // Look like a DER SEQUENCE so the parser gets further in.
                bytes[0] = 0x30;
                bytes[1] = 0x82;
            }
            assert!(read_pkcs12(&bytes, PASSWORD).is_err());
        }

        // Absurd lengths.
        for bytes in [
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff, 0x02, 0x01, 0x03][..],
            &[0x30, 0x88, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..],
            &[0x30, 0x80, 0x02, 0x01, 0x03, 0x00, 0x00][..],
        ] {
            assert!(read_pkcs12(bytes, PASSWORD).is_err());
        }
    }

    #[test]
    fn huge_iteration_counts_are_refused_quickly() {
        let dir = TempDir::new().expect("temp dir");
        self_signed(dir.path());
        let p12 = export(dir.path(), "i.p12", &[]);

        // MAC iterations.
        let mut pfx = Pfx::from_der(&p12).expect("parse");
        if let Some(mac) = pfx.mac_data.as_mut() {
            mac.iterations = i32::MAX;
        }
        let hostile = pfx.to_der().expect("encode");
        let start = std::time::Instant::now();
        let err = read_pkcs12(&hostile, PASSWORD).expect_err("accepted");
        assert!(matches!(err, P12Error::TooManyIterations), "{err:?}");
        assert!(start.elapsed().as_secs() < 2);

        // PBKDF2 iterations in a file without a MAC.
        let p12 = export(dir.path(), "i.p12", &["-nomac", "-certpbe", "AES-256-CBC"]);
        let pfx = Pfx::from_der(&p12).expect("parse");
        let auth_safe = pfx
            .auth_safe
            .content
            .decode_as::<OctetString>()
            .expect("octets");
        let mut safes = AuthenticatedSafe::from_der(auth_safe.as_bytes()).expect("safes");
        for content in &mut safes {
            if content.content_type != ID_ENCRYPTED_DATA {
                continue;
            }
            let mut encrypted = content.content.decode_as::<EncryptedData>().expect("enc");
            let alg = &mut encrypted.enc_content_info.content_enc_alg;
            let mut params = alg
                .parameters
                .as_ref()
                .expect("params")
                .decode_as::<pbes2::Parameters>()
                .expect("pbes2");
            if let pbes2::Kdf::Pbkdf2(pbkdf2) = &mut params.kdf {
                pbkdf2.iteration_count = u32::MAX;
            }
            alg.parameters = Some(der::Any::encode_from(&params).expect("any"));
            content.content = der::Any::encode_from(&encrypted).expect("any");
        }
        let auth_safe = OctetString::new(safes.to_der().expect("encode")).expect("octets");
        let pfx = Pfx {
            version: pfx.version,
            auth_safe: ContentInfo {
                content_type: ID_DATA,
                content: der::Any::encode_from(&auth_safe).expect("any"),
            },
            mac_data: None,
        };
        let start = std::time::Instant::now();
        let err = read_pkcs12(&pfx.to_der().expect("encode"), PASSWORD).expect_err("accepted");
        assert!(matches!(err, P12Error::TooManyIterations), "{err:?}");
        assert!(start.elapsed().as_secs() < 2);
    }

    #[test]
    fn ec_key_is_not_rsa() {
        let dir = TempDir::new().expect("temp dir");
        let d = dir.path();
        let _ = openssl(
            d,
            &[
                "ecparam",
                "-genkey",
                "-name",
                "prime256v1",
                "-out",
                "key.pem",
            ],
        );
        let _ = openssl(
            d,
            &[
                "req", "-x509", "-new", "-key", "key.pem", "-out", "cert.pem", "-subj", "/CN=EC",
                "-days", "2",
            ],
        );
        let p12 = export(d, "ec.p12", &[]);
        let err = read_pkcs12(&p12, PASSWORD).expect_err("EC key accepted");
        assert!(matches!(err, P12Error::NotRsa), "{err:?}");
        assert!(
            err.to_string()
                .contains("Maskinporten only accepts RSA (RS256/RS384/RS512)"),
            "{err}"
        );
    }

    /// One PFX without a MAC holding the contents of all `files` (each made with `-nomac`).
    fn merge_without_mac(files: &[Vec<u8>]) -> Vec<u8> {
        let mut safes: Vec<ContentInfo> = Vec::new();
        for file in files {
            let pfx = Pfx::from_der(file).expect("parse");
            assert!(pfx.mac_data.is_none(), "merge files made with -nomac");
            let octets = pfx
                .auth_safe
                .content
                .decode_as::<OctetString>()
                .expect("octets");
            safes.extend(AuthenticatedSafe::from_der(octets.as_bytes()).expect("safes"));
        }
        let octets = OctetString::new(safes.to_der().expect("encode")).expect("octets");
        let pfx = Pfx {
            version: pkcs12::pfx::Version::V3,
            auth_safe: ContentInfo {
                content_type: ID_DATA,
                content: der::Any::encode_from(&octets).expect("any"),
            },
            mac_data: None,
        };
        pfx.to_der().expect("encode")
    }

    #[test]
    fn key_and_certificate_problems() {
        let dir = TempDir::new().expect("temp dir");
        let d = dir.path();
        self_signed(d);
        let _ = openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "other.key",
                "-out",
                "other.pem",
                "-subj",
                "/CN=Other",
                "-days",
                "2",
            ],
        );
        let pass = format!("pass:{PASSWORD}");
        let make = |out: &str, args: &[&str]| {
            let mut all = vec![
                "pkcs12", "-export", "-nomac", "-out", out, "-passout", &pass,
            ];
            all.extend_from_slice(args);
            let _ = openssl(d, &all);
            read(d, out)
        };
        let key_only = make("k.p12", &["-nocerts", "-inkey", "key.pem"]);
        let other_key_only = make("ok.p12", &["-nocerts", "-inkey", "other.key"]);
        let other_cert_only = make("oc.p12", &["-nokeys", "-in", "other.pem"]);
        let cert_only = make("c.p12", &["-nokeys", "-in", "cert.pem"]);

        let err = read_pkcs12(&cert_only, PASSWORD).expect_err("no key");
        assert!(matches!(err, P12Error::NoKey), "{err:?}");
        let err = read_pkcs12(&key_only, PASSWORD).expect_err("no certificate");
        assert!(matches!(err, P12Error::NoCertificate), "{err:?}");
        let mixed = merge_without_mac(&[key_only.clone(), other_cert_only.clone()]);
        let err = read_pkcs12(&mixed, PASSWORD).expect_err("someone else's certificate");
        assert!(matches!(err, P12Error::NoCertificate), "{err:?}");
        let two = merge_without_mac(&[key_only.clone(), other_key_only, cert_only.clone()]);
        let err = read_pkcs12(&two, PASSWORD).expect_err("two keys");
        assert!(matches!(err, P12Error::MultipleKeys), "{err:?}");

        // An unrelated certificate stays in the chain, after the leaf.
        let extra = merge_without_mac(&[other_cert_only, key_only, cert_only]);
        let contents = read_pkcs12(&extra, PASSWORD).expect("read");
        assert_eq!(
            contents.chain,
            vec![cert_der(d, "cert.pem"), cert_der(d, "other.pem")]
        );
    }

    #[test]
    fn debug_does_not_print_key_values() {
        let dir = TempDir::new().expect("temp dir");
        self_signed(dir.path());
        let p12 = export(dir.path(), "d.p12", &[]);
        let contents = read_pkcs12(&p12, PASSWORD).expect("read");
        let shown = format!("{contents:?}");
        assert!(shown.contains("modulus_bits: 2048"), "{shown}");
        let prime_start = format!("{:?}", &contents.key.prime1[..3]);
        let prime_start = prime_start.trim_matches(['[', ']']);
        assert!(!shown.contains(prime_start), "{shown}");
    }
}
