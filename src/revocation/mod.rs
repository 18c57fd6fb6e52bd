//! Revocation: whether the CA has revoked a certificate, asked of its OCSP responders
//! (RFC 6960) and, when they give no verified answer, read from its CRLs (RFC 5280).
//!
//! The places come from the leaf itself: the OCSP responders of its Authority Information
//! Access (id-ad-ocsp) and the fullName URIs of its CRL distribution points, tried in the
//! certificate's order. Only `http://` and `https://` URLs are fetched; others (`ldap://`)
//! are reported as skipped. Requests go over the client the caller passes in (the token
//! exchange's, so the same proxy and trust roots), which follows no redirects.
//!
//! Every answer is checked before it is believed (see `ocsp` and `crl`): an unsigned,
//! wrongly signed, foreign, replayed or out-of-date answer counts as no answer, and the
//! next place is tried. What to do with the result (stop signing, warn) is the caller's
//! decision: this module only says what the CA says, or why it could not find out.
//!
//! Bounds: each request, connection to last byte, is limited by the checker's timeout;
//! an OCSP response is read up to [`MAX_OCSP_RESPONSE`] bytes and a CRL up to
//! [`MAX_CRL`] bytes, and a larger one is refused without being read further.

use std::{fmt, time::Duration};

use crate::fetch::{describe, read_limited};

use der::{Decode, Encode};
use x509_cert::{
    Certificate,
    ext::pkix::{
        AuthorityInfoAccessSyntax, CrlDistributionPoints,
        name::{DistributionPointName, GeneralName},
    },
};

mod crl;
mod ocsp;
mod reason;
mod signed;

pub use reason::Reason;
use signed::Issuer;

/// The largest OCSP response read (64 KiB): one certificate's status and a responder
/// certificate or two fit many times over.
pub const MAX_OCSP_RESPONSE: usize = 64 * 1024;
/// The largest CRL read (32 MiB): big public CAs' CRLs are a few MiB.
pub const MAX_CRL: usize = 32 * 1024 * 1024;

/// id-ad-ocsp (1.3.6.1.5.5.7.48.1), the AIA access method naming an OCSP responder.
const AD_OCSP: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.1");

/// Asks a certificate's CA whether the certificate is revoked.
///
/// Cheap to clone (the reqwest client is shared). Holds no state between checks: each
/// check builds a new request with a new nonce, and caching answers (until nextUpdate)
/// is the caller's.
#[derive(Debug, Clone)]
pub struct Checker {
    client: reqwest::Client,
    timeout: Duration,
}

/// A verified answer from the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// What the CA says.
    pub status: Status,
    /// Where it was said: OCSP or a CRL.
    pub source: Source,
    /// The responder's or CRL's URL.
    pub url: String,
    /// When the CA last knew this to be so (thisUpdate), Unix seconds.
    pub this_update: i64,
    /// When the CA will next say (nextUpdate), Unix seconds; a check before then learns
    /// nothing new. OCSP responses may leave it out; CRLs never do (one without it is refused).
    pub next_update: Option<i64>,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// An OCSP responder.
    Ocsp,
    /// A CRL.
    Crl,
}

impl Source {
    /// "ocsp" or "crl", for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            Source::Ocsp => "ocsp",
            Source::Crl => "crl",
        }
    }
}

/// A certificate's revocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not revoked.
    Good,
    /// Revoked at `at` (Unix seconds), for `reason` when the CA gave one.
    Revoked {
        /// The revocation time, Unix seconds.
        at: i64,
        /// The CA's reason code, when it gave one.
        reason: Option<Reason>,
    },
    /// The OCSP responder does not know the certificate, and no CRL could be read.
    Unknown,
}

/// No verified answer from any of the certificate's responders and CRLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoAnswer {
    /// Every place tried, in order, and why it gave no answer. Empty when the certificate
    /// names none.
    pub attempts: Vec<Attempt>,
}

/// One place that gave no verified answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The responder's or CRL's URL; empty when the certificates themselves could not be
    /// read.
    pub url: String,
    /// What went wrong ("connection refused", "response expired (nextUpdate ...)").
    pub problem: String,
}

impl fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.attempts.is_empty() {
            return f.write_str(
                "the certificate names no OCSP responder and no CRL distribution point",
            );
        }
        for (i, attempt) in self.attempts.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{attempt}")?;
        }
        Ok(())
    }
}

impl std::error::Error for NoAnswer {}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.url.is_empty() {
            f.write_str(&self.problem)
        } else {
            write!(f, "{}: {}", self.url, self.problem)
        }
    }
}

impl NoAnswer {
    /// A failure before any place was tried.
    fn before_asking(problem: String) -> NoAnswer {
        NoAnswer {
            attempts: vec![Attempt {
                url: String::new(),
                problem,
            }],
        }
    }
}

/// What the leaf says about itself: where to ask, and its serial (DER INTEGER).
#[derive(Debug)]
struct Leaf {
    ocsp: Vec<String>,
    crls: Vec<String>,
    serial: Vec<u8>,
}

impl Checker {
    /// `client` is the token exchange's HTTPS client (same proxy and roots, no
    /// redirects); `timeout` bounds each request from connecting to its last byte.
    pub fn new(client: reqwest::Client, timeout: Duration) -> Checker {
        Checker { client, timeout }
    }

    /// Asks the leaf's OCSP responders in order; on no verified answer, or an OCSP
    /// "unknown", its CRL distribution points. `issuer_der` is the certificate that
    /// issued the leaf. `now` is Unix seconds, the time responses are judged at (a
    /// parameter so that tests can judge a response later).
    ///
    /// An "unknown" is returned only when no CRL gives an answer either.
    pub async fn check(
        &self,
        leaf_der: &[u8],
        issuer_der: &[u8],
        now: i64,
    ) -> Result<Answer, NoAnswer> {
        let issuer = Issuer::read(issuer_der).map_err(NoAnswer::before_asking)?;
        let leaf = read_leaf(leaf_der, &issuer).map_err(NoAnswer::before_asking)?;
        let mut attempts = Vec::new();
        let mut unknown = None;
        for url in &leaf.ocsp {
            match self.ask_ocsp(url, &leaf, &issuer, now).await {
                Ok(answer) if answer.status == Status::Unknown => {
                    attempts.push(Attempt {
                        url: url.clone(),
                        problem: "the responder does not know the certificate".into(),
                    });
                    unknown = Some(answer);
                    break;
                }
                Ok(answer) => return Ok(answer),
                Err(problem) => attempts.push(Attempt {
                    url: url.clone(),
                    problem,
                }),
            }
        }
        for url in &leaf.crls {
            match self.read_crl(url, &leaf, &issuer, now).await {
                Ok(answer) => return Ok(answer),
                Err(problem) => attempts.push(Attempt {
                    url: url.clone(),
                    problem,
                }),
            }
        }
        unknown.ok_or(NoAnswer { attempts })
    }

    /// One OCSP responder's verified answer.
    async fn ask_ocsp(
        &self,
        url: &str,
        leaf: &Leaf,
        issuer: &Issuer<'_>,
        now: i64,
    ) -> Result<Answer, String> {
        fetchable(url)?;
        let query = ocsp::query(&leaf.serial, issuer)?;
        let request = self
            .client
            .post(url)
            .header(http::header::CONTENT_TYPE, "application/ocsp-request")
            .header(http::header::ACCEPT, "application/ocsp-response")
            .body(query.body.clone());
        let body = self.fetch(request, MAX_OCSP_RESPONSE).await?;
        let verdict = ocsp::verify(&body, &query, issuer, now)?;
        Ok(Answer {
            status: verdict.status,
            source: Source::Ocsp,
            url: url.to_owned(),
            this_update: verdict.this_update,
            next_update: verdict.next_update,
        })
    }

    /// One CRL's verified answer.
    async fn read_crl(
        &self,
        url: &str,
        leaf: &Leaf,
        issuer: &Issuer<'_>,
        now: i64,
    ) -> Result<Answer, String> {
        fetchable(url)?;
        let body = self.fetch(self.client.get(url), MAX_CRL).await?;
        let verdict = crl::verify(&body, &leaf.serial, issuer, now)?;
        Ok(Answer {
            status: verdict.status,
            source: Source::Crl,
            url: url.to_owned(),
            this_update: verdict.this_update,
            next_update: Some(verdict.next_update),
        })
    }

    /// Sends `request` and reads a 2xx answer's body of at most `limit` bytes, all
    /// within the timeout.
    async fn fetch(
        &self,
        request: reqwest::RequestBuilder,
        limit: usize,
    ) -> Result<Vec<u8>, String> {
        let exchange = async {
            let response = request.send().await.map_err(describe)?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("answered HTTP {}", status.as_u16()));
            }
            read_limited(response, limit).await
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {} ms", self.timeout.as_millis()))?
    }
}

/// Reads the leaf: its issuer must be `issuer` (else every CertID and CRL check would be
/// against the wrong CA), then its serial and where to ask.
fn read_leaf(der: &[u8], issuer: &Issuer<'_>) -> Result<Leaf, String> {
    let cert =
        Certificate::from_der(der).map_err(|e| format!("the certificate cannot be read: {e}"))?;
    let tbs = cert.tbs_certificate();
    let leaf_issuer = tbs.issuer().to_der().map_err(|e| e.to_string())?;
    if leaf_issuer != issuer.subject {
        return Err(format!(
            "the certificate is issued by \"{}\", not by the issuer certificate given",
            tbs.issuer()
        ));
    }
    let unreadable = |what: &str, e: der::Error| format!("unreadable {what} extension: {e}");
    let ocsp = tbs
        .get_extension::<AuthorityInfoAccessSyntax>()
        .map_err(|e| unreadable("Authority Information Access", e))?
        .map(|(_, aia)| aia.0)
        .unwrap_or_default()
        .into_iter()
        .filter(|access| access.access_method == AD_OCSP)
        .filter_map(|access| uri(&access.access_location))
        .collect();
    let crls = tbs
        .get_extension::<CrlDistributionPoints>()
        .map_err(|e| unreadable("CRL distribution points", e))?
        .map(|(_, points)| points.0)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|point| match point.distribution_point {
            Some(DistributionPointName::FullName(names)) => Some(names),
            _ => None,
        })
        .flatten()
        .filter_map(|name| uri(&name))
        .collect();
    Ok(Leaf {
        ocsp,
        crls,
        serial: tbs.serial_number().to_der().map_err(|e| e.to_string())?,
    })
}

/// A GeneralName's URI, if it is one.
fn uri(name: &GeneralName) -> Option<String> {
    match name {
        GeneralName::UniformResourceIdentifier(uri) => Some(uri.to_string()),
        _ => None,
    }
}

/// Only HTTP(S) is fetched: LDAP and file URLs name places the agent has no business
/// reading.
fn fetchable(url: &str) -> Result<(), String> {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        Ok(())
    } else {
        Err("skipped: only http:// and https:// URLs are fetched".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_answer_names_every_attempt() {
        let none = NoAnswer { attempts: vec![] };
        assert_eq!(
            none.to_string(),
            "the certificate names no OCSP responder and no CRL distribution point"
        );
        let two = NoAnswer {
            attempts: vec![
                Attempt {
                    url: "http://ocsp.example/".into(),
                    problem: "connection refused".into(),
                },
                Attempt {
                    url: "http://crl.example/ca.crl".into(),
                    problem: "answered HTTP 404".into(),
                },
            ],
        };
        assert_eq!(
            two.to_string(),
            "http://ocsp.example/: connection refused; http://crl.example/ca.crl: answered HTTP 404"
        );
    }

    #[test]
    fn only_http_urls_are_fetched() {
        assert!(fetchable("http://ocsp.example/").is_ok());
        assert!(fetchable("HTTPS://ocsp.example/").is_ok());
        assert_eq!(
            fetchable("ldap://ldap.example/cn=CA?certificateRevocationList"),
            Err("skipped: only http:// and https:// URLs are fetched".into())
        );
    }

    #[test]
    fn sources_have_label_names() {
        assert_eq!(Source::Ocsp.name(), "ocsp");
        assert_eq!(Source::Crl.name(), "crl");
    }
}
