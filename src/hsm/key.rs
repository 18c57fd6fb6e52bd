//! Finding keys and their certificates in the token.

use cryptoki::{
    object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle},
    session::Session,
};
use der::{Encode, asn1::UintRef};

use super::KeyLocator;
use super::{FailedCall, HsmError, Token};
use crate::hex;

/// Smallest RSA modulus Maskinporten (and we) accept.
pub(crate) const MIN_RSA_BITS: usize = 2048;

/// The size in bits of a big-endian RSA modulus (leading zero bytes already stripped).
fn rsa_bits(modulus: &[u8]) -> usize {
    modulus.len() * 8 - modulus.first().map_or(0, |b| b.leading_zeros() as usize)
}

/// An RSA public key's size in bits and its PKCS#1 `RSAPublicKey` DER, from the big-endian
/// modulus and exponent a token or a PKCS#12 file holds (leading zero bytes allowed). The
/// DER is canonical, so a key read from the token and one read from a file compare byte
/// for byte.
pub(crate) fn rsa_public_key(modulus: &[u8], exponent: &[u8]) -> der::Result<(usize, Vec<u8>)> {
    let modulus = UintRef::new(modulus)?;
    let bits = rsa_bits(modulus.as_bytes());
    let der = rsa::pkcs1::RsaPublicKey {
        modulus,
        public_exponent: UintRef::new(exponent)?,
    }
    .to_der()?;
    Ok((bits, der))
}

/// A private key in the token: a handle and public facts, never key material.
#[derive(Debug, Clone)]
pub struct TokenKey {
    /// The private key object.
    pub(crate) handle: ObjectHandle,
    /// Its `CKA_ID`, which ties it to its certificate object.
    pub id: Vec<u8>,
    /// The public key as PKCS#1 `RSAPublicKey` DER (canonical, so comparable byte for byte).
    pub(crate) public_key_der: Vec<u8>,
    /// Modulus size.
    pub bits: usize,
    /// How it was found, to find it again where its handle is not valid.
    pub(crate) locator: KeyLocator,
}

impl TokenKey {
    /// The key as signing uses it: its handle, and how to find it again in a session
    /// where that handle is not valid (handles are per session on some HSMs).
    pub(crate) fn key_ref(&self) -> KeyRef {
        KeyRef {
            handle: self.handle,
            locator: std::sync::Arc::new(self.locator.clone()),
        }
    }
}

/// A private key as the pool's sessions use it. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct KeyRef {
    /// The handle found when the key was loaded; valid in every session on most tokens.
    pub(crate) handle: ObjectHandle,
    pub(super) locator: std::sync::Arc<KeyLocator>,
}

impl Token {
    /// Finds exactly one RSA private key by label or id and reads its public half.
    pub fn find_key(&self, locator: &KeyLocator) -> Result<TokenKey, HsmError> {
        let locator = locator.clone();
        self.pool
            .run_blocking(move |session| find_key(session, &locator))
    }

    /// Reads the DER of every certificate object that shares the key's `CKA_ID` (the leaf
    /// and any intermediates imported with it), in no particular order.
    pub(crate) fn certificates_der(&self, key: &TokenKey) -> Result<Vec<Vec<u8>>, HsmError> {
        let id = key.id.clone();
        self.pool
            .run_blocking(move |session| certificates_der(session, &id))
    }
}

pub(super) fn find_key(session: &Session, locator: &KeyLocator) -> Result<TokenKey, HsmError> {
    let what = locator.to_string();
    let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
    template.push(match locator {
        KeyLocator::Label(label) => Attribute::Label(label.as_bytes().to_vec()),
        KeyLocator::Id(id) => Attribute::Id(id.clone()),
    });
    let handles = session
        .find_objects(&template)
        .map_err(FailedCall::of("C_FindObjects"))?;
    let handle = match handles.as_slice() {
        [] => return Err(HsmError::KeyNotFound(what)),
        [one] => *one,
        many => {
            return Err(HsmError::KeyAmbiguous {
                what,
                count: many.len(),
            });
        }
    };
    let attributes = session
        .get_attributes(
            handle,
            &[
                AttributeType::KeyType,
                AttributeType::Id,
                AttributeType::Modulus,
                AttributeType::PublicExponent,
            ],
        )
        .map_err(FailedCall::of("C_GetAttributeValue"))?;
    let (mut key_type, mut id, mut modulus, mut exponent) = (None, Vec::new(), None, None);
    for attribute in attributes {
        match attribute {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::Id(v) => id = v,
            Attribute::Modulus(v) => modulus = Some(v),
            Attribute::PublicExponent(v) => exponent = Some(v),
            _ => {}
        }
    }
    let unusable = |problem: String| HsmError::UnusableKey {
        what: locator.to_string(),
        problem,
    };
    if key_type != Some(KeyType::RSA) {
        return Err(unusable(match key_type {
            Some(t) => format!("a {t} key, not RSA"),
            None => "of unknown type".into(),
        }));
    }
    let (Some(modulus), Some(exponent)) = (modulus, exponent) else {
        return Err(unusable(
            "missing CKA_MODULUS or CKA_PUBLIC_EXPONENT".into(),
        ));
    };
    let (bits, public_key_der) = rsa_public_key(&modulus, &exponent)
        .map_err(|e| unusable(format!("a bad public key ({e})")))?;
    if bits < MIN_RSA_BITS {
        return Err(unusable(format!("RSA-{bits}")));
    }
    Ok(TokenKey {
        handle,
        id,
        public_key_der,
        bits,
        locator: locator.clone(),
    })
}

fn certificates_der(session: &Session, id: &[u8]) -> Result<Vec<Vec<u8>>, HsmError> {
    let handles = session
        .find_objects(&[
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::Id(id.to_vec()),
        ])
        .map_err(FailedCall::of("C_FindObjects"))?;
    let mut ders = Vec::with_capacity(handles.len());
    for handle in handles {
        let values = session
            .get_attributes(handle, &[AttributeType::Value])
            .map_err(FailedCall::of("C_GetAttributeValue"))?;
        ders.extend(values.into_iter().filter_map(|v| match v {
            Attribute::Value(der) => Some(der),
            _ => None,
        }));
    }
    if ders.is_empty() {
        return Err(HsmError::CertificateNotFound(hex::encode(id)));
    }
    Ok(ders)
}

/// A private key object as `key list` shows it.
#[derive(Debug, Clone)]
pub(crate) struct KeyObject {
    /// `CKA_LABEL`.
    pub(crate) label: String,
    /// `CKA_ID`.
    pub(crate) id: Vec<u8>,
    /// The RSA key's public facts, when it is an RSA key of a usable size.
    pub(crate) rsa: Option<TokenKey>,
    /// `CKA_SENSITIVE`: the token never reveals the value.
    pub(crate) sensitive: bool,
    /// `CKA_EXTRACTABLE`: the token would wrap it out.
    pub(crate) extractable: bool,
    /// `CKA_NEVER_EXTRACTABLE`: it was never extractable, so it never existed outside a
    /// token (false for an imported key).
    pub(crate) never_extractable: bool,
}

impl Token {
    /// Every private key object in the token, with its protection attributes.
    pub(crate) fn private_keys(&self) -> Result<Vec<KeyObject>, HsmError> {
        self.pool.run_blocking(move |session| {
            let handles = session
                .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
                .map_err(FailedCall::of("C_FindObjects"))?;
            let mut keys = Vec::with_capacity(handles.len());
            for handle in handles {
                let attributes = session
                    .get_attributes(
                        handle,
                        &[
                            AttributeType::Label,
                            AttributeType::Id,
                            AttributeType::Sensitive,
                            AttributeType::Extractable,
                            AttributeType::NeverExtractable,
                        ],
                    )
                    .map_err(FailedCall::of("C_GetAttributeValue"))?;
                let mut key = KeyObject {
                    label: String::new(),
                    id: Vec::new(),
                    rsa: None,
                    sensitive: false,
                    extractable: true,
                    never_extractable: false,
                };
                for attribute in attributes {
                    match attribute {
                        Attribute::Label(l) => key.label = String::from_utf8_lossy(&l).into_owned(),
                        Attribute::Id(id) => key.id = id,
                        Attribute::Sensitive(v) => key.sensitive = v,
                        Attribute::Extractable(v) => key.extractable = v,
                        Attribute::NeverExtractable(v) => key.never_extractable = v,
                        _ => {}
                    }
                }
                key.rsa = find_key(session, &KeyLocator::Id(key.id.clone())).ok();
                keys.push(key);
            }
            Ok(keys)
        })
    }
}
