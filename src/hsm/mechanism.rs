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
use sha2::{Digest, Sha256, Sha384, Sha512};

use super::HsmError;
use crate::grant::Algorithm;

/// How one algorithm is signed on this token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignPath {
    /// The token hashes and signs (`CKM_SHAxxx_RSA_PKCS`).
    InToken,
    /// The agent hashes; the token signs the DigestInfo with `CKM_RSA_PKCS`.
    DigestInfo,
}

impl SignPath {
    /// For the log: which mechanism the token is asked for.
    pub fn describe(self, algorithm: Algorithm) -> &'static str {
        match (self, algorithm) {
            (SignPath::InToken, Algorithm::Rs256) => "CKM_SHA256_RSA_PKCS",
            (SignPath::InToken, Algorithm::Rs384) => "CKM_SHA384_RSA_PKCS",
            (SignPath::InToken, Algorithm::Rs512) => "CKM_SHA512_RSA_PKCS",
            (SignPath::DigestInfo, Algorithm::Rs256) => "CKM_RSA_PKCS over a SHA-256 DigestInfo",
            (SignPath::DigestInfo, Algorithm::Rs384) => "CKM_RSA_PKCS over a SHA-384 DigestInfo",
            (SignPath::DigestInfo, Algorithm::Rs512) => "CKM_RSA_PKCS over a SHA-512 DigestInfo",
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
            .map_err(HsmError::call("C_GetMechanismList"))?;
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

    pub(super) fn path(&self, algorithm: Algorithm) -> Option<SignPath> {
        self.0[match algorithm {
            Algorithm::Rs256 => 0,
            Algorithm::Rs384 => 1,
            Algorithm::Rs512 => 2,
        }]
    }
}

/// DER of `DigestInfo { digestAlgorithm, digest }` up to the digest, per hash.
const SHA256_PREFIX: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];
const SHA384_PREFIX: [u8; 19] = [
    0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05,
    0x00, 0x04, 0x30,
];
const SHA512_PREFIX: [u8; 19] = [
    0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05,
    0x00, 0x04, 0x40,
];

/// The DER DigestInfo of `data` for `algorithm`'s hash.
fn digest_info(algorithm: Algorithm, data: &[u8]) -> Vec<u8> {
    let (prefix, digest): (&[u8], Vec<u8>) = match algorithm {
        Algorithm::Rs256 => (&SHA256_PREFIX, Sha256::digest(data).to_vec()),
        Algorithm::Rs384 => (&SHA384_PREFIX, Sha384::digest(data).to_vec()),
        Algorithm::Rs512 => (&SHA512_PREFIX, Sha512::digest(data).to_vec()),
    };
    [prefix, &digest].concat()
}

/// Signs `data` on `session` the way `path` says.
pub(super) fn sign(
    session: &Session,
    key: ObjectHandle,
    algorithm: Algorithm,
    path: SignPath,
    data: &[u8],
) -> Result<Vec<u8>, HsmError> {
    let result = match path {
        SignPath::InToken => {
            let mechanism = match algorithm {
                Algorithm::Rs256 => Mechanism::Sha256RsaPkcs,
                Algorithm::Rs384 => Mechanism::Sha384RsaPkcs,
                Algorithm::Rs512 => Mechanism::Sha512RsaPkcs,
            };
            session.sign(&mechanism, key, data)
        }
        SignPath::DigestInfo => {
            session.sign(&Mechanism::RsaPkcs, key, &digest_info(algorithm, data))
        }
    };
    result.map_err(HsmError::call("C_Sign"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prefixes are the DER of the AlgorithmIdentifier and the OCTET STRING header,
    /// checked here against an encoder rather than trusted as magic numbers.
    #[test]
    fn digest_info_is_the_der_encoding() {
        use der::{Encode, asn1::OctetString};
        use spki::{AlgorithmIdentifierOwned, ObjectIdentifier};
        for (algorithm, oid, len) in [
            (Algorithm::Rs256, "2.16.840.1.101.3.4.2.1", 32),
            (Algorithm::Rs384, "2.16.840.1.101.3.4.2.2", 48),
            (Algorithm::Rs512, "2.16.840.1.101.3.4.2.3", 64),
        ] {
            #[derive(der::Sequence)]
            struct DigestInfo {
                algorithm: AlgorithmIdentifierOwned,
                digest: OctetString,
            }
            let info = digest_info(algorithm, b"grant");
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
