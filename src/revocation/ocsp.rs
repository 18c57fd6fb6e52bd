//! OCSP (RFC 6960): the request for one certificate, and the checks a response must pass
//! before its status is believed.
//!
//! The messages are x509-ocsp's types, on der 0.7 and x509-cert 0.2 (the crate's own
//! versions); the agent's certificates are x509-cert 0.3, so the two meet as DER bytes.
//!
//! A response is believed only when all of these hold: it is a successful basic response;
//! it is signed by the issuer itself or by a responder certificate the issuer signed for
//! OCSP signing (valid at `now`); it has a SingleResponse for exactly our CertID; a nonce
//! in it is ours; and it is fresh (thisUpdate and producedAt not ahead of `now` by more
//! than [`SKEW`], nextUpdate not behind it, and without nextUpdate or our nonce, thisUpdate
//! no older than [`STALE`]).

use std::time::Duration;

use der_07::{
    Decode as _, Encode as _,
    asn1::{Any, ObjectIdentifier, OctetString},
};
use rustls_pki_types::{CertificateDer, UnixTime};
use sha1::{Digest, Sha1};
use x509_cert_02::{Certificate as Certificate02, ext::Extension, serial_number::SerialNumber};
use x509_ocsp::{
    BasicOcspResponse, CertId, CertStatus, OcspRequest, OcspResponse, OcspResponseStatus, Request,
    ResponderId, SingleResponse, TbsRequest, Version,
};

use super::signed::{Issuer, PublicKey, signed_part, time_text, unix};
use super::{Reason, Status};

/// id-sha1 (1.3.14.3.2.26), the CertID hash every responder understands (RFC 5019).
const SHA1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.14.3.2.26");
/// id-pkix-ocsp-nonce (1.3.6.1.5.5.7.48.1.2).
const NONCE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.1.2");
/// id-pkix-ocsp-basic (1.3.6.1.5.5.7.48.1.1), the only response type there is.
const BASIC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.1.1");
/// id-kp-OCSPSigning (1.3.6.1.5.5.7.3.9), as the DER contents webpki takes.
const OCSP_SIGNING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x09];
/// Nonce length: RFC 8954 asks for 32 octets at most and recommends 32.
const NONCE_LEN: usize = 32;
/// How far ahead of our clock a responder's may be: thisUpdate and producedAt up to five
/// minutes in the future are clock skew, not a forgery.
pub(super) const SKEW: i64 = 300;
/// How old a response without nextUpdate may be when it does not echo our nonce: it
/// proves nothing about the present beyond its thisUpdate.
pub(super) const STALE: i64 = 3600;

/// The phrase every signer failure starts with.
const WRONG_KEY: &str =
    "response signed by a key that is neither the issuer's nor a responder it delegated";

/// One certificate's OCSP request, and what its response must match.
#[derive(Debug, Clone)]
pub(super) struct Query {
    /// The DER OCSPRequest, sent as the POST body.
    pub(super) body: Vec<u8>,
    nonce: Vec<u8>,
    cert_id: CertId,
}

/// What a verified response says.
#[derive(Debug, Clone)]
pub(super) struct Verdict {
    pub(super) status: Status,
    pub(super) this_update: i64,
    pub(super) next_update: Option<i64>,
}

/// The request for `leaf_serial` (its DER INTEGER) issued by `issuer`: a SHA-1 CertID
/// and a fresh random nonce.
pub(super) fn query(leaf_serial: &[u8], issuer: &Issuer<'_>) -> Result<Query, String> {
    let failed = |e: der_07::Error| format!("the OCSP request cannot be built: {e}");
    let cert_id = CertId {
        hash_algorithm: x509_cert_02::spki::AlgorithmIdentifierOwned {
            oid: SHA1,
            parameters: Some(Any::null()),
        },
        issuer_name_hash: OctetString::new(Sha1::digest(&issuer.subject).to_vec())
            .map_err(failed)?,
        issuer_key_hash: OctetString::new(Sha1::digest(issuer.key.bits()).to_vec())
            .map_err(failed)?,
        serial_number: SerialNumber::from_der(leaf_serial).map_err(failed)?,
    };
    let nonce: [u8; NONCE_LEN] = rand::random();
    let request = OcspRequest {
        tbs_request: TbsRequest {
            version: Version::V1,
            requestor_name: None,
            request_list: vec![Request {
                req_cert: cert_id.clone(),
                single_request_extensions: None,
            }],
            request_extensions: Some(vec![nonce_extension(&nonce).map_err(failed)?]),
        },
        optional_signature: None,
    };
    Ok(Query {
        body: request.to_der().map_err(failed)?,
        nonce: nonce.to_vec(),
        cert_id,
    })
}

/// The nonce extension (RFC 8954): an OCTET STRING holding the nonce's OCTET STRING.
fn nonce_extension(nonce: &[u8]) -> der_07::Result<Extension> {
    Ok(Extension {
        extn_id: NONCE,
        critical: false,
        extn_value: OctetString::new(OctetString::new(nonce)?.to_der()?)?,
    })
}

/// Checks a responder's answer to `query` as the module doc says, judged at `now`.
pub(super) fn verify(
    body: &[u8],
    query: &Query,
    issuer: &Issuer<'_>,
    now: i64,
) -> Result<Verdict, String> {
    let (basic, signed) = basic(body)?;
    let signer = signer(&basic, issuer, now)?;
    let algorithm = basic
        .signature_algorithm
        .to_der()
        .map_err(|e| format!("unreadable signature algorithm: {e}"))?;
    let signature = basic
        .signature
        .as_bytes()
        .ok_or("the response's signature is not a whole number of bytes")?;
    signer
        .verify(&algorithm, &signed, signature)
        .map_err(|problem| format!("response signature refused: {problem}"))?;
    let single = single(&basic, query)?;
    let echoed = nonce_echoed(&basic, query)?;
    fresh(&basic, single, echoed, now)
}

/// The BasicOCSPResponse in a successful OCSPResponse, and the bytes its signature
/// covers.
fn basic(body: &[u8]) -> Result<(BasicOcspResponse, Vec<u8>), String> {
    let response = OcspResponse::from_der(body)
        .map_err(|e| format!("the answer is not an OCSP response: {e}"))?;
    if response.response_status != OcspResponseStatus::Successful {
        return Err(format!(
            "the responder answered {}",
            status_name(response.response_status)
        ));
    }
    let bytes = response
        .response_bytes
        .ok_or("a successful OCSP response without responseBytes")?;
    if bytes.response_type != BASIC {
        return Err(format!(
            "response type {} is not id-pkix-ocsp-basic",
            bytes.response_type
        ));
    }
    let der = bytes.response.as_bytes();
    let basic = BasicOcspResponse::from_der(der)
        .map_err(|e| format!("unreadable basic OCSP response: {e}"))?;
    let signed = signed_part(der).map_err(|e| format!("unreadable tbsResponseData: {e}"))?;
    Ok((basic, signed.to_vec()))
}

/// RFC 6960's names of the response statuses.
fn status_name(status: OcspResponseStatus) -> &'static str {
    match status {
        OcspResponseStatus::Successful => "successful",
        OcspResponseStatus::MalformedRequest => "malformedRequest",
        OcspResponseStatus::InternalError => "internalError",
        OcspResponseStatus::TryLater => "tryLater",
        OcspResponseStatus::SigRequired => "sigRequired",
        OcspResponseStatus::Unauthorized => "unauthorized",
    }
}

/// The key the response must be signed with: the issuer's when the ResponderID names the
/// issuer, else that of the certificate in `certs` the ResponderID names, once webpki has
/// checked it is the issuer's, valid at `now`, and for OCSP signing.
fn signer(basic: &BasicOcspResponse, issuer: &Issuer<'_>, now: i64) -> Result<PublicKey, String> {
    let responder = &basic.tbs_response_data.responder_id;
    if names(responder, &issuer.subject, issuer.key.bits()) {
        return Ok(issuer.key.clone());
    }
    for cert in basic.certs.iter().flatten() {
        let tbs = &cert.tbs_certificate;
        let subject = tbs.subject.to_der().map_err(|e| e.to_string())?;
        let key = subject_key(cert)?;
        if names(responder, &subject, key.bits()) {
            delegated(cert, issuer, now)?;
            return Ok(key);
        }
    }
    Err(WRONG_KEY.into())
}

/// Whether the ResponderID names the certificate with this subject and key.
fn names(responder: &ResponderId, subject: &[u8], key_bits: &[u8]) -> bool {
    match responder {
        ResponderId::ByName(name) => name.to_der().is_ok_and(|der| der == subject),
        ResponderId::ByKey(hash) => hash.as_bytes() == Sha1::digest(key_bits).as_slice(),
    }
}

/// The public key of an x509-cert 0.2 certificate, through its DER.
fn subject_key(cert: &Certificate02) -> Result<PublicKey, String> {
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| e.to_string())?;
    let spki = <x509_cert::spki::SubjectPublicKeyInfoOwned as der::Decode>::from_der(&spki)
        .map_err(|e| e.to_string())?;
    PublicKey::of(&spki)
}

/// A delegated responder: signed by the issuer, valid at `now`, with id-kp-OCSPSigning.
fn delegated(cert: &Certificate02, issuer: &Issuer<'_>, now: i64) -> Result<(), String> {
    let refused = |problem: String| format!("{WRONG_KEY} (responder certificate: {problem})");
    let der = cert.to_der().map_err(|e| refused(e.to_string()))?;
    let anchor_der = CertificateDer::from(issuer.der);
    let anchor = webpki::anchor_from_trusted_cert(&anchor_der)
        .map_err(|e| refused(format!("the issuer is not usable as an anchor: {e}")))?;
    let der = CertificateDer::from(der.as_slice());
    let responder = webpki::EndEntityCert::try_from(&der).map_err(|e| refused(format!("{e:?}")))?;
    let time = UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(now).unwrap_or(0)));
    let _path = responder
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            time,
            webpki::KeyUsage::required(OCSP_SIGNING),
            None,
            None,
        )
        .map_err(|e| refused(chain_problem(&e)))?;
    Ok(())
}

/// webpki's refusal of a responder certificate, in words for the common cases.
fn chain_problem(error: &webpki::Error) -> String {
    match error {
        webpki::Error::UnknownIssuer => "not issued by the certificate's issuer".into(),
        webpki::Error::RequiredEkuNotFoundContext(_) => {
            "not for OCSP signing (no id-kp-OCSPSigning)".into()
        }
        webpki::Error::CertExpired { .. } => "expired".into(),
        webpki::Error::CertNotValidYet { .. } => "not valid yet".into(),
        other => format!("{other:?}"),
    }
}

/// The SingleResponse for our CertID: same hash algorithm, both hashes and the serial.
fn single<'b>(basic: &'b BasicOcspResponse, query: &Query) -> Result<&'b SingleResponse, String> {
    let ours = &query.cert_id;
    basic
        .tbs_response_data
        .responses
        .iter()
        .find(|single| {
            let id = &single.cert_id;
            id.hash_algorithm.oid == ours.hash_algorithm.oid
                && id.issuer_name_hash == ours.issuer_name_hash
                && id.issuer_key_hash == ours.issuer_key_hash
                && id.serial_number == ours.serial_number
        })
        .ok_or_else(|| "the response is not about this certificate (no matching CertID)".into())
}

/// Whether the response carries our nonce; a response carrying another nonce is a replay.
fn nonce_echoed(basic: &BasicOcspResponse, query: &Query) -> Result<bool, String> {
    let Some(extension) = basic
        .tbs_response_data
        .response_extensions
        .iter()
        .flatten()
        .find(|e| e.extn_id == NONCE)
    else {
        return Ok(false);
    };
    let nonce = OctetString::from_der(extension.extn_value.as_bytes())
        .map_err(|e| format!("unreadable response nonce: {e}"))?;
    if nonce.as_bytes() == query.nonce.as_slice() {
        Ok(true)
    } else {
        Err("the response's nonce is not the request's (a replayed response)".into())
    }
}

/// The freshness rules of the module doc, then the status.
fn fresh(
    basic: &BasicOcspResponse,
    single: &SingleResponse,
    echoed: bool,
    now: i64,
) -> Result<Verdict, String> {
    let produced_at = unix(basic.tbs_response_data.produced_at.0.to_unix_duration());
    let this_update = unix(single.this_update.0.to_unix_duration());
    let next_update = single.next_update.map(|t| unix(t.0.to_unix_duration()));
    if produced_at > now.saturating_add(SKEW) {
        return Err(format!(
            "response producedAt {} is in the future",
            time_text(produced_at)
        ));
    }
    if this_update > now.saturating_add(SKEW) {
        return Err(format!(
            "response thisUpdate {} is in the future",
            time_text(this_update)
        ));
    }
    match next_update {
        Some(next) if next < now => {
            return Err(format!("response expired (nextUpdate {})", time_text(next)));
        }
        None if !echoed && this_update < now.saturating_sub(STALE) => {
            return Err(format!(
                "stale response (thisUpdate {}, without nextUpdate or our nonce)",
                time_text(this_update)
            ));
        }
        _ => {}
    }
    let status = match single.cert_status {
        CertStatus::Good(_) => Status::Good,
        CertStatus::Unknown(_) => Status::Unknown,
        CertStatus::Revoked(info) => Status::Revoked {
            at: unix(info.revocation_time.0.to_unix_duration()),
            reason: info
                .revocation_reason
                .and_then(|r| Reason::from_code(r as u32)),
        },
    };
    Ok(Verdict {
        status,
        this_update,
        next_update,
    })
}
