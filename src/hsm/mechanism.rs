//! How a token signs RS256/RS384/RS512. Tokens differ: SoftHSM has the combined
//! hash-and-sign mechanisms (`CKM_SHA256_RSA_PKCS` ...); opencryptoki's soft token and some
//! HSMs have only `CKM_RSA_PKCS`. Then the agent hashes in software and has the token sign
//! the DER `DigestInfo` (RFC 8017 section 9.2) with `CKM_RSA_PKCS`: the same signature
//! bytes, since PKCS#1 v1.5 signing is deterministic. The token is asked at start-up
//! (`C_GetMechanismList`), never assumed.

use cryptoki::{
    context::Pkcs11,
    mechanism::{Mechanism, MechanismType},
    object::ObjectHandle,
    session::Session,
    slot::Slot,
};
use rsa::{
    pkcs1v15::Pkcs1v15Sign,
    sha2::{Digest, Sha256, Sha384, Sha512},
};

use super::{FailedCall, HsmError};

/// The hash of an RSASSA-PKCS1-v1_5 signature: RS256, RS384 and RS512 in JWS terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

/// How one hash is signed on this token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SignPath {
    /// The token hashes and signs (`CKM_SHAxxx_RSA_PKCS`).
    InToken,
    /// The agent hashes; the token signs the DigestInfo with `CKM_RSA_PKCS`.
    DigestInfo,
}

impl SignPath {
    /// For the log: which mechanism the token is asked for.
    pub(crate) fn describe(self, hash: Hash) -> &'static str {
        match (self, hash) {
            (SignPath::InToken, Hash::Sha256) => "CKM_SHA256_RSA_PKCS",
            (SignPath::InToken, Hash::Sha384) => "CKM_SHA384_RSA_PKCS",
            (SignPath::InToken, Hash::Sha512) => "CKM_SHA512_RSA_PKCS",
            (SignPath::DigestInfo, Hash::Sha256) => "CKM_RSA_PKCS over a SHA-256 DigestInfo",
            (SignPath::DigestInfo, Hash::Sha384) => "CKM_RSA_PKCS over a SHA-384 DigestInfo",
            (SignPath::DigestInfo, Hash::Sha512) => "CKM_RSA_PKCS over a SHA-512 DigestInfo",
        }
    }
}

/// The path for each algorithm; `None` where the token can do neither.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mechanisms([Option<SignPath>; 3]);

impl Mechanisms {
    pub(super) fn detect(pkcs11: &Pkcs11, slot: Slot) -> Result<Self, HsmError> {
        let list = pkcs11
            .get_mechanism_list(slot)
            .map_err(FailedCall::of("C_GetMechanismList"))?;
        let raw = list.contains(&MechanismType::RSA_PKCS);
        let path = |combined: MechanismType| {
            if list.contains(&combined) {
                Some(SignPath::InToken)
            } else if raw {
                Some(SignPath::DigestInfo)
            } else {
                None
            }
        };
        Ok(Mechanisms([
            path(MechanismType::SHA256_RSA_PKCS),
            path(MechanismType::SHA384_RSA_PKCS),
            path(MechanismType::SHA512_RSA_PKCS),
        ]))
    }

    pub(super) fn path(&self, hash: Hash) -> Option<SignPath> {
        self.0[match hash {
            Hash::Sha256 => 0,
            Hash::Sha384 => 1,
            Hash::Sha512 => 2,
        }]
    }
}

/// The DER DigestInfo of `data` for `hash`: the rsa crate's prefix (the DER of the
/// AlgorithmIdentifier and the OCTET STRING header), then the digest.
fn digest_info(hash: Hash, data: &[u8]) -> Vec<u8> {
    let (padding, digest) = match hash {
        Hash::Sha256 => (Pkcs1v15Sign::new::<Sha256>(), Sha256::digest(data).to_vec()),
        Hash::Sha384 => (Pkcs1v15Sign::new::<Sha384>(), Sha384::digest(data).to_vec()),
        Hash::Sha512 => (Pkcs1v15Sign::new::<Sha512>(), Sha512::digest(data).to_vec()),
    };
    [&padding.prefix[..], &digest].concat()
}

/// Signs `data` on `session` the way `path` says.
pub(super) fn sign(
    session: &Session,
    key: ObjectHandle,
    hash: Hash,
    path: SignPath,
    data: &[u8],
) -> Result<Vec<u8>, FailedCall> {
    let result = match path {
        SignPath::InToken => {
            let mechanism = match hash {
                Hash::Sha256 => Mechanism::Sha256RsaPkcs,
                Hash::Sha384 => Mechanism::Sha384RsaPkcs,
                Hash::Sha512 => Mechanism::Sha512RsaPkcs,
            };
            session.sign(&mechanism, key, data)
        }
        SignPath::DigestInfo => session.sign(&Mechanism::RsaPkcs, key, &digest_info(hash, data)),
    };
    result.map_err(FailedCall::of("C_Sign"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DigestInfo is the DER of the AlgorithmIdentifier and the digest, checked here
    /// against an encoder.
    #[test]
    fn digest_info_is_the_der_encoding() {
        use der::{Encode, asn1::OctetString};
        use spki::{AlgorithmIdentifierOwned, ObjectIdentifier};
        for (hash, oid, len) in [
            (Hash::Sha256, "2.16.840.1.101.3.4.2.1", 32),
            (Hash::Sha384, "2.16.840.1.101.3.4.2.2", 48),
            (Hash::Sha512, "2.16.840.1.101.3.4.2.3", 64),
        ] {
            #[derive(der::Sequence)]
            struct DigestInfo {
                algorithm: AlgorithmIdentifierOwned,
                digest: OctetString,
            }
            let info = digest_info(hash, b"grant");
            let expected = DigestInfo {
                algorithm: AlgorithmIdentifierOwned {
                    oid: ObjectIdentifier::new_unwrap(oid),
                    parameters: Some(der::Any::null()),
                },
                digest: OctetString::new(&info[info.len() - len..]).expect("octets"),
            }
            .to_der()
            .expect("der");
            assert_eq!(info, expected);
        }
    }
}
