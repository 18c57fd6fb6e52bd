//! Putting things into a token: initialising it, generating a key pair inside it, storing a
//! certificate next to its key, and signing certificates with a token key.
//!
//! Generated private keys are `CKA_SENSITIVE` and not `CKA_EXTRACTABLE`: the token will
//! never export them, not even wrapped.

use std::path::Path;

use cryptoki::{
    mechanism::Mechanism,
    object::{Attribute, CertificateType, KeyType, ObjectClass, ObjectHandle},
    session::{Session, UserType},
    types::AuthPin,
};
use der::{Any, asn1::ObjectIdentifier};
use rsa::{pkcs1::DecodeRsaPublicKey, pkcs1v15, sha2::Sha256};
use spki::{AlgorithmIdentifierOwned, DynSignatureAlgorithmIdentifier};

use super::{
    FailedCall, Hash, HsmError, KeyLocator, KeyRef, SignPath, Token, TokenKey, key::find_key, load,
    slots,
};

/// sha256WithRSAEncryption, what the token's CKM_SHA256_RSA_PKCS produces.
const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");

/// Initialises the first uninitialised token of `module` with `label`, sets its user PIN,
/// and finalizes the module again. Returns an error when no free slot exists.
pub(crate) fn init_token(
    module: &Path,
    label: &str,
    so_pin: &AuthPin,
    user_pin: &AuthPin,
) -> Result<(), HsmError> {
    let pkcs11 = load(module)?;
    let result = (|| {
        let slots = pkcs11
            .get_slots_with_token()
            .map_err(FailedCall::of("C_GetSlotList"))?;
        let mut free = None;
        for slot in slots {
            if !slots::token_info(module, slot)?.token_initialized() {
                free = Some(slot);
                break;
            }
        }
        let slot = free.ok_or_else(|| HsmError::TokenNotFound {
            label: format!("labelled \"{label}\""),
            present: "no uninitialised token to initialise".into(),
        })?;
        pkcs11
            .init_token(slot, so_pin, label)
            .map_err(FailedCall::of("C_InitToken"))?;
        let session = pkcs11
            .open_rw_session(slot)
            .map_err(FailedCall::of("C_OpenSession"))?;
        session
            .login(UserType::So, Some(so_pin))
            .map_err(FailedCall::of("C_Login"))?;
        session
            .init_pin(user_pin)
            .map_err(FailedCall::of("C_InitPIN"))?;
        Ok(session.logout().map_err(FailedCall::of("C_Logout"))?)
    })();
    let finalized = pkcs11
        .finalize()
        .map_err(|e| FailedCall::of("C_Finalize")(e).into());
    result.and(finalized)
}

impl Token {
    /// A read-write session to put objects into the token (the signing pool's sessions are
    /// read-only).
    fn rw_session(&self) -> Result<Session, HsmError> {
        self.pkcs11
            .open_rw_session(self.slot)
            .map_err(|e| FailedCall::of("C_OpenSession")(e).into())
    }

    /// Generates an RSA key pair inside the token. The private key is sensitive, never
    /// extractable, and usable only for signing.
    pub(crate) fn generate_rsa_key(
        &self,
        label: &str,
        id: &[u8],
        bits: u64,
    ) -> Result<TokenKey, HsmError> {
        let session = self.rw_session()?;
        let common = [
            Attribute::Token(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ];
        let mut public = vec![
            Attribute::Verify(true),
            Attribute::ModulusBits(bits.into()),
            Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
            Attribute::Private(false),
        ];
        public.extend_from_slice(&common);
        let mut private = private_key_protection().to_vec();
        private.extend_from_slice(&common);
        let _ = session
            .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
            .map_err(FailedCall::of("C_GenerateKeyPair"))?;
        find_key(&session, &KeyLocator::Id(id.to_vec()))
    }

    /// Creates an RSA key pair in the token from key parts brought in from outside (a
    /// PKCS#12 file): the private key sensitive, never extractable and sign-only, like a
    /// generated one. Returns the handles (private, public) so a failed import can be undone.
    pub(crate) fn import_rsa_key(
        &self,
        label: &str,
        id: &[u8],
        parts: &RsaKeyParts<'_>,
    ) -> Result<(ObjectHandle, ObjectHandle), HsmError> {
        let session = self.rw_session()?;
        let common = [
            Attribute::Token(true),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
            Attribute::Modulus(parts.modulus.to_vec()),
            Attribute::PublicExponent(parts.public_exponent.to_vec()),
        ];
        let mut private = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
        private.extend(private_key_protection());
        private.extend([
            Attribute::PrivateExponent(parts.private_exponent.to_vec()),
            Attribute::Prime1(parts.prime1.to_vec()),
            Attribute::Prime2(parts.prime2.to_vec()),
            Attribute::Exponent1(parts.exponent1.to_vec()),
            Attribute::Exponent2(parts.exponent2.to_vec()),
            Attribute::Coefficient(parts.coefficient.to_vec()),
        ]);
        private.extend_from_slice(&common);
        let created = session.create_object(&private);
        // The template held copies of the secret parts; wipe them whatever happened.
        for attribute in &mut private {
            if let Attribute::PrivateExponent(v)
            | Attribute::Prime1(v)
            | Attribute::Prime2(v)
            | Attribute::Exponent1(v)
            | Attribute::Exponent2(v)
            | Attribute::Coefficient(v) = attribute
            {
                zeroize::Zeroize::zeroize(v);
            }
        }
        let private = created.map_err(FailedCall::of("C_CreateObject"))?;
        let mut public = vec![
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Private(false),
            Attribute::Verify(true),
        ];
        public.extend_from_slice(&common);
        match session.create_object(&public) {
            Ok(public) => Ok((private, public)),
            Err(e) => {
                let _ = session.destroy_object(private);
                Err(FailedCall::of("C_CreateObject")(e).into())
            }
        }
    }

    /// Stores a DER certificate as a token object with the key's `CKA_ID` and a label, so
    /// `certificate = "token"` finds it.
    pub(crate) fn store_certificate(
        &self,
        label: &str,
        id: &[u8],
        der: &[u8],
        subject_der: &[u8],
    ) -> Result<ObjectHandle, HsmError> {
        let session = self.rw_session()?;
        session
            .create_object(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::CertificateType(CertificateType::X_509),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id.to_vec()),
                Attribute::Subject(subject_der.to_vec()),
                Attribute::Value(der.to_vec()),
            ])
            .map_err(|e| FailedCall::of("C_CreateObject")(e).into())
    }
}

impl Token {
    /// Deletes an object this process created, to undo a half-finished import.
    pub(crate) fn destroy_object(&self, object: ObjectHandle) -> Result<(), HsmError> {
        let session = self.rw_session()?;
        session
            .destroy_object(object)
            .map_err(|e| FailedCall::of("C_DestroyObject")(e).into())
    }
}

/// How every private key the agent puts in a token is protected, generated or imported:
/// sensitive (the token never reveals it), not extractable (never wrapped out), private
/// (only after login), and good for signing only. One definition, so the two ways in
/// cannot drift apart.
fn private_key_protection() -> [Attribute; 7] {
    [
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]
}

/// RSA private key parts to import, borrowed so the caller keeps (and wipes) the only copy.
#[derive(Clone, Copy)]
pub(crate) struct RsaKeyParts<'a> {
    /// n.
    pub(crate) modulus: &'a [u8],
    /// e.
    pub(crate) public_exponent: &'a [u8],
    /// d.
    pub(crate) private_exponent: &'a [u8],
    /// p.
    pub(crate) prime1: &'a [u8],
    /// q.
    pub(crate) prime2: &'a [u8],
    /// d mod (p-1).
    pub(crate) exponent1: &'a [u8],
    /// d mod (q-1).
    pub(crate) exponent2: &'a [u8],
    /// q^-1 mod p.
    pub(crate) coefficient: &'a [u8],
}

impl std::fmt::Debug for RsaKeyParts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RsaKeyParts { .. }")
    }
}

/// A token key seen as a `signature::Signer`, so `x509-cert`'s builders can sign
/// certificates and requests inside the token (sha256WithRSAEncryption).
pub(crate) struct TokenSigner<'a> {
    token: &'a Token,
    key: KeyRef,
    path: SignPath,
    verifying_key: pkcs1v15::VerifyingKey<Sha256>,
}

impl<'a> TokenSigner<'a> {
    /// Wraps `key` of `token`.
    pub(crate) fn new(token: &'a Token, key: &TokenKey) -> Result<Self, HsmError> {
        let public = rsa::PublicKey::from_pkcs1_der(&key.public_key_der).map_err(|e| {
            HsmError::UnusableKey {
                what: format!("handle {}", key.handle),
                problem: format!("unreadable as an RSA public key ({e})"),
            }
        })?;
        Ok(TokenSigner {
            token,
            key: key.key_ref(),
            path: token.sign_path(Hash::Sha256)?,
            verifying_key: pkcs1v15::VerifyingKey::new(public),
        })
    }
}

impl signature::Keypair for TokenSigner<'_> {
    type VerifyingKey = pkcs1v15::VerifyingKey<Sha256>;

    fn verifying_key(&self) -> Self::VerifyingKey {
        self.verifying_key.clone()
    }
}

impl DynSignatureAlgorithmIdentifier for TokenSigner<'_> {
    fn signature_algorithm_identifier(&self) -> spki::Result<AlgorithmIdentifierOwned> {
        Ok(AlgorithmIdentifierOwned {
            oid: SHA256_WITH_RSA,
            parameters: Some(Any::null()),
        })
    }
}

impl signature::Signer<pkcs1v15::Signature> for TokenSigner<'_> {
    fn try_sign(&self, msg: &[u8]) -> Result<pkcs1v15::Signature, signature::Error> {
        let signature = self
            .token
            .sign_blocking(self.key.clone(), Hash::Sha256, self.path, msg.to_vec())
            .map_err(signature::Error::from_source)?;
        pkcs1v15::Signature::try_from(signature.as_slice())
    }
}
