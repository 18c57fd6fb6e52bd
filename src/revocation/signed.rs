//! What OCSP responses and CRLs share: the signed part taken as its original bytes, the
//! signature checked with rustls-webpki's algorithms, and times as text.
//!
//! The signed part is cut from the received bytes rather than re-encoded from the parsed
//! structure: a re-encoding is only equal to what was signed if the signer wrote strict
//! DER, and the check must not depend on that.

use der::{Decode, Encode, Header, Reader, SliceReader, asn1::ObjectIdentifier};
use rustls_pki_types::{AlgorithmIdentifier, SignatureVerificationAlgorithm};
use x509_cert::{Certificate, spki::SubjectPublicKeyInfoOwned};

/// sha1WithRSAEncryption (1.2.840.113549.1.1.5).
const SHA1_WITH_RSA: &str = "1.2.840.113549.1.1.5";
/// ecdsa-with-SHA1 (1.2.840.10045.4.1).
const ECDSA_WITH_SHA1: &str = "1.2.840.10045.4.1";
/// dsa-with-sha1 (1.2.840.10040.4.3).
const DSA_WITH_SHA1: &str = "1.2.840.10040.4.3";

/// A public key as webpki takes it: the algorithm identifier's contents (without the
/// SEQUENCE header, as webpki's `public_key_alg_id` holds them) and the subjectPublicKey
/// bits.
#[derive(Debug, Clone)]
pub(super) struct PublicKey {
    algorithm: Vec<u8>,
    bits: Vec<u8>,
}

impl PublicKey {
    /// The key of a certificate's SubjectPublicKeyInfo.
    pub(super) fn of(spki: &SubjectPublicKeyInfoOwned) -> Result<PublicKey, String> {
        let algorithm = spki
            .algorithm
            .to_der()
            .map_err(|e| format!("unreadable key algorithm: {e}"))?;
        let bits = spki
            .subject_public_key
            .as_bytes()
            .ok_or("the public key is not a whole number of bytes")?;
        Ok(PublicKey {
            algorithm: contents(&algorithm)?.to_vec(),
            bits: bits.to_vec(),
        })
    }

    /// The subjectPublicKey bits, which OCSP's key hashes are taken over.
    pub(super) fn bits(&self) -> &[u8] {
        &self.bits
    }

    /// Checks `signature` over `message` with this key. `algorithm` is the DER of the
    /// signature's AlgorithmIdentifier, with its SEQUENCE header. SHA-1 signatures are
    /// refused: SHA-1 collisions are practical, so a SHA-1 signature proves nothing.
    pub(super) fn verify(
        &self,
        algorithm: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), String> {
        let oid =
            first_oid(algorithm).map_err(|e| format!("unreadable signature algorithm: {e}"))?;
        let name = oid.to_string();
        if [SHA1_WITH_RSA, ECDSA_WITH_SHA1, DSA_WITH_SHA1].contains(&name.as_str()) {
            return Err(format!(
                "signed with SHA-1 ({name}), which is refused: SHA-1 signatures can be forged"
            ));
        }
        let wanted = contents(algorithm)?;
        let mut candidates = webpki::ALL_VERIFICATION_ALGS
            .iter()
            .filter(|alg| {
                same_id(alg.signature_alg_id(), wanted)
                    && same_id(alg.public_key_alg_id(), &self.algorithm)
            })
            .peekable();
        if candidates.peek().is_none() {
            return Err(format!(
                "signature algorithm {name} is not supported for this key"
            ));
        }
        let verified = candidates.any(|alg: &&dyn SignatureVerificationAlgorithm| {
            alg.verify_signature(&self.bits, message, signature).is_ok()
        });
        if verified {
            Ok(())
        } else {
            Err("the signature does not verify".into())
        }
    }
}

/// Whether webpki's identifier is these DER contents.
fn same_id(id: AlgorithmIdentifier, contents: &[u8]) -> bool {
    id.as_ref() == contents
}

/// The OID at the start of an AlgorithmIdentifier's DER.
fn first_oid(algorithm: &[u8]) -> der::Result<ObjectIdentifier> {
    let mut reader = SliceReader::new(algorithm)?;
    reader.sequence(|r| {
        let oid = ObjectIdentifier::decode(r)?;
        let rest = r.remaining_len();
        let _ = r.read_slice(rest)?;
        Ok(oid)
    })
}

/// The contents of one DER TLV, without its tag and length.
pub(super) fn contents(tlv: &[u8]) -> Result<&[u8], String> {
    let mut reader = SliceReader::new(tlv).map_err(|e| e.to_string())?;
    let header = Header::decode(&mut reader).map_err(|e| e.to_string())?;
    reader
        .read_slice(header.length())
        .map_err(|e| e.to_string())
}

/// The first element of a DER SEQUENCE as its original bytes: the `tbsResponseData` of a
/// BasicOCSPResponse, the `tbsCertList` of a CRL.
pub(super) fn signed_part(sequence: &[u8]) -> Result<&[u8], String> {
    let mut reader = SliceReader::new(sequence).map_err(|e| e.to_string())?;
    reader
        .sequence(|r| {
            let first = r.tlv_bytes()?;
            let rest = r.remaining_len();
            let _ = r.read_slice(rest)?;
            Ok::<_, der::Error>(first)
        })
        .map_err(|e| e.to_string())
}

/// The issuing CA, as both checks need it.
#[derive(Debug, Clone)]
pub(super) struct Issuer<'a> {
    /// The certificate's DER, for webpki's trust anchor.
    pub(super) der: &'a [u8],
    /// The subject Name's DER: what the leaf's issuer, a CRL's issuer and a byName
    /// ResponderID must equal.
    pub(super) subject: Vec<u8>,
    /// Its public key.
    pub(super) key: PublicKey,
}

impl<'a> Issuer<'a> {
    /// Reads the issuer certificate.
    pub(super) fn read(der: &'a [u8]) -> Result<Issuer<'a>, String> {
        let cert = Certificate::from_der(der)
            .map_err(|e| format!("the issuer certificate cannot be read: {e}"))?;
        let tbs = cert.tbs_certificate();
        Ok(Issuer {
            der,
            subject: tbs
                .subject()
                .to_der()
                .map_err(|e| format!("the issuer's subject cannot be encoded: {e}"))?,
            key: PublicKey::of(tbs.subject_public_key_info())?,
        })
    }
}

/// Unix seconds as RFC 3339 UTC ("2026-12-02T14:25:40Z"), for messages.
pub(super) fn time_text(unix: i64) -> String {
    u64::try_from(unix)
        .ok()
        .and_then(|secs| {
            der::DateTime::from_unix_duration(std::time::Duration::from_secs(secs)).ok()
        })
        .map_or_else(|| format!("{unix} (Unix time)"), |t| t.to_string())
}

/// Unix seconds of a duration since the epoch, saturating (ASN.1 times end in 9999).
pub(super) fn unix(since_epoch: std::time::Duration) -> i64 {
    i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signed_part_is_the_first_element_as_received() {
        // SEQUENCE { SEQUENCE { INTEGER 1 }, INTEGER 2 }
        let der = [0x30, 0x08, 0x30, 0x03, 0x02, 0x01, 0x01, 0x02, 0x01, 0x02];
        assert_eq!(signed_part(&der), Ok(&der[2..7]));
        assert!(signed_part(&[0x30, 0x05, 0x30]).is_err());
        assert!(signed_part(&[]).is_err());
    }

    #[test]
    fn times_read_as_rfc3339() {
        assert_eq!(time_text(0), "1970-01-01T00:00:00Z");
        assert_eq!(time_text(1_796_221_540), "2026-12-02T14:25:40Z");
        assert_eq!(time_text(-5), "-5 (Unix time)");
    }

    #[test]
    fn sha1_signatures_are_refused_by_name() {
        let key = PublicKey {
            algorithm: vec![],
            bits: vec![],
        };
        // SEQUENCE { OID 1.2.840.113549.1.1.5, NULL }
        let sha1_rsa = [
            0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05, 0x05,
            0x00,
        ];
        let error = key.verify(&sha1_rsa, b"m", b"s").unwrap_err();
        assert!(error.starts_with("signed with SHA-1"), "{error}");
    }
}
