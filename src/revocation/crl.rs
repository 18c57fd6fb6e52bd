//! CRLs (RFC 5280 §5): the fallback when no OCSP responder gives a verified answer.
//!
//! A CRL is believed only when it is issued under the leaf's issuer name, signed with the
//! issuer's key, its thisUpdate is not ahead of `now` by more than the OCSP skew, and it
//! has a nextUpdate that is not behind `now`. A CRL without nextUpdate has no end to its
//! validity and could be replayed forever, so it is refused. DER and PEM are both read.

use der::{Decode, Encode};
use x509_cert::{crl::CertificateList, ext::pkix::CrlReason};

use super::ocsp::SKEW;
use super::signed::{Issuer, signed_part, time_text, unix};
use super::{Reason, Status};

/// reasonCode (2.5.29.21), the CRL entry extension saying why.
const REASON_CODE: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("2.5.29.21");
/// The PEM label of a CRL.
const PEM_LABEL: &[u8] = b"-----BEGIN X509 CRL-----";

/// What a verified CRL says about one serial.
#[derive(Debug, Clone)]
pub(super) struct Verdict {
    pub(super) status: Status,
    pub(super) this_update: i64,
    pub(super) next_update: i64,
}

/// Checks the CRL in `body` as the module doc says, judged at `now`, and looks up
/// `serial` (the leaf's DER INTEGER) in it.
pub(super) fn verify(
    body: &[u8],
    serial: &[u8],
    issuer: &Issuer<'_>,
    now: i64,
) -> Result<Verdict, String> {
    let der = if body.trim_ascii_start().starts_with(PEM_LABEL) {
        let text = std::str::from_utf8(body).map_err(|_| "a PEM CRL that is not text")?;
        let (label, der) = der::pem::decode_vec(text.trim().as_bytes())
            .map_err(|e| format!("unreadable PEM CRL: {e}"))?;
        if label != "X509 CRL" {
            return Err(format!("a PEM {label:?}, not an X509 CRL"));
        }
        der
    } else {
        body.to_vec()
    };
    let crl = CertificateList::from_der(&der).map_err(|e| format!("not a CRL: {e}"))?;
    let tbs = &crl.tbs_cert_list;
    let crl_issuer = tbs.issuer.to_der().map_err(|e| e.to_string())?;
    if crl_issuer != issuer.subject {
        return Err(format!(
            "the CRL is issued by \"{}\", not by the certificate's issuer",
            tbs.issuer
        ));
    }
    let algorithm = crl
        .signature_algorithm
        .to_der()
        .map_err(|e| format!("unreadable signature algorithm: {e}"))?;
    let signature = crl
        .signature
        .as_bytes()
        .ok_or("the CRL's signature is not a whole number of bytes")?;
    let signed = signed_part(&der).map_err(|e| format!("unreadable tbsCertList: {e}"))?;
    issuer
        .key
        .verify(&algorithm, signed, signature)
        .map_err(|problem| format!("CRL signature refused: {problem}"))?;
    let this_update = unix(tbs.this_update.to_unix_duration());
    if this_update > now.saturating_add(SKEW) {
        return Err(format!(
            "CRL thisUpdate {} is in the future",
            time_text(this_update)
        ));
    }
    let next_update = tbs
        .next_update
        .map(|t| unix(t.to_unix_duration()))
        .ok_or("the CRL has no nextUpdate")?;
    if next_update < now {
        return Err(format!(
            "expired CRL (nextUpdate {})",
            time_text(next_update)
        ));
    }
    Ok(Verdict {
        status: status_of(&crl, serial)?,
        this_update,
        next_update,
    })
}

/// The serial's entry: revoked with its date and reasonCode, or good when absent.
fn status_of(crl: &CertificateList, serial: &[u8]) -> Result<Status, String> {
    for entry in crl.tbs_cert_list.revoked_certificates.iter().flatten() {
        let entry_serial = entry.serial_number.to_der().map_err(|e| e.to_string())?;
        if entry_serial != serial {
            continue;
        }
        let reason = match entry
            .crl_entry_extensions
            .iter()
            .flatten()
            .find(|e| e.extn_id == REASON_CODE)
        {
            Some(extension) => {
                let reason = CrlReason::from_der(extension.extn_value.as_bytes())
                    .map_err(|e| format!("unreadable reasonCode: {e}"))?;
                Reason::from_code(reason as u32)
            }
            None => None,
        };
        return Ok(Status::Revoked {
            at: unix(entry.revocation_date.to_unix_duration()),
            reason,
        });
    }
    Ok(Status::Good)
}
