//! Certificate path checks for `x5c` grants: each certificate signed by the next, the
//! last one a trust anchor from `ca` or signed by one, all within their validity now.
//!
//! This is what a test needs to tell a good chain from a broken one, not a full RFC 5280
//! validator: extensions (basic constraints, key usage, policies) and revocation are
//! not checked, which is fine for a mock that only ever sees test certificates.

use der::{Encode, asn1::ObjectIdentifier};
use rsa::{PublicKey, pkcs1::DecodeRsaPublicKey};
use x509_cert::Certificate;

use grant_agent::grant::Algorithm;

use crate::jws::rsa_signature_verifies;

/// rsaEncryption, the only issuer key type the mock verifies.
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
/// Certificate signature algorithms the mock verifies, with the digest each uses.
const SIGNATURE_ALGORITHMS: [(ObjectIdentifier, Algorithm); 3] = [
    (
        ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11"),
        Algorithm::Rs256,
    ),
    (
        ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.12"),
        Algorithm::Rs384,
    ),
    (
        ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.13"),
        Algorithm::Rs512,
    ),
];

/// Checks `chain` (leaf first) against `anchors` at `now` (Unix seconds); the error says
/// why, for the refusal's description.
pub(super) fn verify_path(
    chain: &[Certificate],
    anchors: &[Certificate],
    now: i64,
) -> Result<(), String> {
    let Some(last) = chain.last() else {
        return Err("x5c is empty".into());
    };
    if anchors.is_empty() {
        return Err(
            "the mock has no trust anchors; set `ca` in its config to the CA that issued the certificate"
                .into(),
        );
    }
    for (i, certificate) in chain.iter().enumerate() {
        within_validity(certificate, now).map_err(|why| format!("x5c[{i}] {why}"))?;
    }
    for (i, pair) in chain.windows(2).enumerate() {
        let (child, parent) = (&pair[0], &pair[1]);
        if child.tbs_certificate().issuer() != parent.tbs_certificate().subject() {
            return Err(format!(
                "x5c[{i}] was issued by \"{}\", but x5c[{}] is \"{}\"",
                child.tbs_certificate().issuer(),
                i + 1,
                parent.tbs_certificate().subject()
            ));
        }
        signed_by(child, parent).map_err(|why| format!("x5c[{i}]: {why}"))?;
    }
    if anchors.contains(last) {
        return Ok(());
    }
    let issuer = last.tbs_certificate().issuer();
    let mut failures = Vec::new();
    for anchor in anchors
        .iter()
        .filter(|a| a.tbs_certificate().subject() == issuer)
    {
        match signed_by(last, anchor).and_then(|()| within_validity(anchor, now)) {
            Ok(()) => return Ok(()),
            Err(why) => failures.push(why),
        }
    }
    let last_index = chain.len() - 1;
    if failures.is_empty() {
        Err(format!(
            "x5c[{last_index}] was issued by \"{issuer}\", which is not a trust anchor in the mock's `ca`"
        ))
    } else {
        Err(format!(
            "x5c[{last_index}] is not signed by the trust anchor \"{issuer}\": {}",
            failures.join("; ")
        ))
    }
}

fn within_validity(certificate: &Certificate, now: i64) -> Result<(), String> {
    let validity = certificate.tbs_certificate().validity();
    let seconds = |t: x509_cert::time::Time| {
        i64::try_from(t.to_unix_duration().as_secs()).unwrap_or(i64::MAX)
    };
    if now < seconds(validity.not_before) {
        return Err(format!("is not valid before {}", validity.not_before));
    }
    if now > seconds(validity.not_after) {
        return Err(format!("expired at {}", validity.not_after));
    }
    Ok(())
}

/// Whether `issuer`'s key made `certificate`'s signature.
fn signed_by(certificate: &Certificate, issuer: &Certificate) -> Result<(), String> {
    let oid = certificate.signature_algorithm().oid;
    let Some((_, algorithm)) = SIGNATURE_ALGORITHMS.iter().find(|(o, _)| *o == oid) else {
        return Err(format!(
            "signature algorithm {oid} is not supported (use sha256/384/512WithRSAEncryption)"
        ));
    };
    let spki = issuer.tbs_certificate().subject_public_key_info();
    if spki.algorithm.oid != RSA_ENCRYPTION {
        return Err(format!(
            "the issuer's key is {}, not RSA",
            spki.algorithm.oid
        ));
    }
    let key = PublicKey::from_pkcs1_der(spki.subject_public_key.raw_bytes())
        .map_err(|e| format!("the issuer's RSA key is unreadable ({e})"))?;
    let tbs = certificate
        .tbs_certificate()
        .to_der()
        .map_err(|e| format!("cannot re-encode the certificate ({e})"))?;
    if rsa_signature_verifies(*algorithm, &key, &tbs, certificate.signature().raw_bytes()) {
        Ok(())
    } else {
        Err("the signature does not verify with the issuer's key".into())
    }
}
