//! Revocation checks against real responders: a test CA made with the `openssl` CLI, a
//! running `openssl ocsp` responder, CRLs from `openssl ca -gencrl` served over HTTP, and
//! hostile answers from a local server. Good, revoked and unknown certificates; expired,
//! wrongly signed, replayed, garbage, oversized and never-coming answers; unreachable
//! places. No internet.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test that cannot go on should fail loudly"
)]

mod common;

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::ca::{Behaviour, HttpServer, Issued, TestCa, free_port};
use grant_agent::revocation::{Answer, Attempt, Checker, NoAnswer, Reason, Source, Status};

const DAY: i64 = 86_400;
const ISSUER: &str = "Test Issuing CA";

fn now() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    i64::try_from(since.as_secs()).expect("time")
}

/// A checker on a client built as the token exchange builds its own (rustls with ring,
/// no redirects), without proxies from the environment; `timeout` generous for a loaded
/// machine unless a test is about timeouts.
fn checker(timeout: Duration) -> Checker {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    Checker::new(client, timeout)
}

fn patient() -> Checker {
    checker(Duration::from_secs(30))
}

/// A URL nothing listens on.
fn closed_url(path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", free_port())
}

/// A CA, a CRL server serving its current CRL, and the CRL's URL.
async fn ca_with_crl() -> (TestCa, HttpServer, String) {
    let ca = TestCa::new(ISSUER);
    let crl = HttpServer::start(Behaviour::Serve(ca.crl(48))).await;
    let url = crl.url("/issuing.crl");
    (ca, crl, url)
}

async fn check(checker: &Checker, ca: &TestCa, leaf: &Issued, at: i64) -> Result<Answer, NoAnswer> {
    checker.check(&leaf.der, &ca.issuer_der, at).await
}

fn attempt(url: &str, problem: &str) -> Attempt {
    Attempt {
        url: url.to_owned(),
        problem: problem.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_certificate_is_good_by_a_delegated_responder() {
    let (ca, _crl, crl_url) = ca_with_crl().await;
    let leaf = ca.issue("good", &ca.ocsp_url(), &crl_url);
    let _responder = ca.responder(&ca.file("responder"), &["-ndays", "1"]);
    let t = now();
    let answer = check(&patient(), &ca, &leaf, t).await.expect("an answer");
    assert_eq!(answer.status, Status::Good);
    assert_eq!(answer.source, Source::Ocsp);
    assert_eq!(answer.url, ca.ocsp_url());
    assert!(
        (t - 600..=t + 300).contains(&answer.this_update),
        "{answer:?}"
    );
    let next = answer.next_update.expect("nextUpdate");
    assert!(
        (t + DAY - 600..=t + DAY + 600).contains(&next),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_certificate_is_good_by_the_ca_signing_itself() {
    let (ca, _crl, crl_url) = ca_with_crl().await;
    let leaf = ca.issue("good", &ca.ocsp_url(), &crl_url);
    let _responder = ca.responder(&ca.file("issuing"), &["-ndays", "1"]);
    let answer = check(&patient(), &ca, &leaf, now())
        .await
        .expect("an answer");
    assert_eq!((answer.status, answer.source), (Status::Good, Source::Ocsp));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_names_the_time_and_reason() {
    let ca = TestCa::new(ISSUER);
    let leaf = ca.issue("revoked", &ca.ocsp_url(), &closed_url("/issuing.crl"));
    let at = ca.revoke(&leaf, "keyCompromise");
    let _responder = ca.responder(&ca.file("responder"), &["-ndays", "1"]);
    let answer = check(&patient(), &ca, &leaf, now())
        .await
        .expect("an answer");
    assert_eq!(
        answer.status,
        Status::Revoked {
            at,
            reason: Some(Reason::KeyCompromise)
        }
    );
    assert_eq!(answer.source, Source::Ocsp);
    assert_eq!(Reason::KeyCompromise.name(), "keyCompromise");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_certificate_falls_to_the_crl() {
    let (ca, _crl, crl_url) = ca_with_crl().await;
    let leaf = ca.issue_unrecorded("stranger", &ca.ocsp_url(), &crl_url);
    let _responder = ca.responder(&ca.file("responder"), &["-ndays", "1"]);
    let answer = check(&patient(), &ca, &leaf, now())
        .await
        .expect("an answer");
    assert_eq!((answer.status, answer.source), (Status::Good, Source::Crl));
    assert_eq!(answer.url, crl_url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_stays_unknown_when_no_crl_answers() {
    let ca = TestCa::new(ISSUER);
    let leaf = ca.issue_unrecorded("stranger", &ca.ocsp_url(), &closed_url("/issuing.crl"));
    let _responder = ca.responder(&ca.file("responder"), &["-ndays", "1"]);
    let answer = check(&patient(), &ca, &leaf, now())
        .await
        .expect("an answer");
    assert_eq!(
        (answer.status, answer.source),
        (Status::Unknown, Source::Ocsp)
    );
}

/// Checks `leaf` and expects the CRL's answer: revoked at `at` for `reason`.
async fn crl_says_revoked(ca: &TestCa, leaf: &Issued, at: i64, reason: Reason) {
    let answer = check(&patient(), ca, leaf, now()).await.expect("an answer");
    assert_eq!(answer.source, Source::Crl);
    assert_eq!(
        answer.status,
        Status::Revoked {
            at,
            reason: Some(reason)
        }
    );
}

/// The OCSP attempt's problem, when the CRL is unreachable so the check ends without an
/// answer.
async fn ocsp_problem(checker: &Checker, ca: &TestCa, leaf: &Issued, at: i64) -> String {
    let no = check(checker, ca, leaf, at).await.expect_err("no answer");
    assert_eq!(no.attempts.len(), 2, "{no}");
    assert!(no.attempts[1].problem.contains("onnection refused"), "{no}");
    no.attempts[0].problem.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_response_is_refused() {
    let ca = TestCa::new(ISSUER);
    let leaf = ca.issue("good", &ca.ocsp_url(), &closed_url("/issuing.crl"));
    let _responder = ca.responder(&ca.file("responder"), &["-nmin", "1"]);
    let problem = ocsp_problem(&patient(), &ca, &leaf, now() + 2 * DAY).await;
    assert!(
        problem.starts_with("response expired (nextUpdate 20") && problem.ends_with("Z)"),
        "{problem}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_from_another_cas_responder_is_refused() {
    let ca = TestCa::new(ISSUER);
    let other = TestCa::new("Other CA");
    let leaf = ca.issue("good", &ca.ocsp_url(), &closed_url("/issuing.crl"));
    let _responder = ca.responder(&other.file("responder"), &["-ndays", "1"]);
    let problem = ocsp_problem(&patient(), &ca, &leaf, now()).await;
    assert_eq!(
        problem,
        "response signed by a key that is neither the issuer's nor a responder it delegated \
         (responder certificate: not issued by the certificate's issuer)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responder_certificate_not_for_ocsp_signing_is_refused() {
    let ca = TestCa::new(ISSUER);
    let leaf = ca.issue("good", &ca.ocsp_url(), &closed_url("/issuing.crl"));
    let _plain = ca.issue("plain", "", "");
    let _responder = ca.responder(&ca.file("plain"), &["-ndays", "1"]);
    let problem = ocsp_problem(&patient(), &ca, &leaf, now()).await;
    assert_eq!(
        problem,
        "response signed by a key that is neither the issuer's nor a responder it delegated \
         (responder certificate: not for OCSP signing (no id-kp-OCSPSigning))"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responder_certificate_judged_after_it_expired_is_refused() {
    let ca = TestCa::new(ISSUER);
    let leaf = ca.issue("good", &ca.ocsp_url(), &closed_url("/issuing.crl"));
    let _responder = ca.responder(&ca.file("responder"), &["-ndays", "60"]);
    let problem = ocsp_problem(&patient(), &ca, &leaf, now() + 40 * DAY).await;
    assert_eq!(
        problem,
        "response signed by a key that is neither the issuer's nor a responder it delegated \
         (responder certificate: expired)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pem_crl_is_read_too() {
    let ca = TestCa::new(ISSUER);
    let crl = HttpServer::start(Behaviour::Silent).await;
    let leaf = ca.issue("revoked", &closed_url("/"), &crl.url("/issuing.crl"));
    let at = ca.revoke(&leaf, "superseded");
    let _ = ca.crl(48);
    let pem = std::fs::read(ca.dir.path().join("issuing.crl.pem")).expect("PEM CRL");
    crl.set(Behaviour::Serve(pem));
    crl_says_revoked(&ca, &leaf, at, Reason::Superseded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_signed_by_an_impostor_of_the_issuer_is_refused() {
    let ca = TestCa::new(ISSUER);
    let impostor = TestCa::new(ISSUER);
    let leaf = ca.issue("good", &ca.ocsp_url(), &closed_url("/issuing.crl"));
    let _responder = ca.responder(&impostor.file("issuing"), &["-ndays", "1"]);
    let problem = ocsp_problem(&patient(), &ca, &leaf, now()).await;
    assert_eq!(
        problem,
        "response signature refused: the signature does not verify"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sha1_signed_response_is_refused() {
    let ca = TestCa::new(ISSUER);
    let leaf = ca.issue("good", &ca.ocsp_url(), &closed_url("/issuing.crl"));
    let _responder = ca.responder(&ca.file("issuing"), &["-ndays", "1", "-rmd", "sha1"]);
    let problem = ocsp_problem(&patient(), &ca, &leaf, now()).await;
    assert_eq!(
        problem,
        "response signature refused: signed with SHA-1 (1.2.840.113549.1.1.5), which is \
         refused: SHA-1 signatures can be forged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_responder_falls_to_a_good_crl() {
    let (ca, _crl, crl_url) = ca_with_crl().await;
    let leaf = ca.issue("good", &closed_url("/"), &crl_url);
    let t = now();
    let answer = check(&patient(), &ca, &leaf, t).await.expect("an answer");
    assert_eq!((answer.status, answer.source), (Status::Good, Source::Crl));
    let next = answer.next_update.expect("a CRL always has nextUpdate");
    assert!(
        (t + 2 * DAY - 600..=t + 2 * DAY + 600).contains(&next),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_responder_falls_to_a_crl_that_revokes() {
    let ca = TestCa::new(ISSUER);
    let crl = HttpServer::start(Behaviour::Silent).await;
    let leaf = ca.issue("revoked", &closed_url("/"), &crl.url("/issuing.crl"));
    let at = ca.revoke(&leaf, "keyCompromise");
    crl.set(Behaviour::Serve(ca.crl(48)));
    crl_says_revoked(&ca, &leaf, at, Reason::KeyCompromise).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_both_unreachable_there_is_no_answer_naming_both() {
    let ca = TestCa::new(ISSUER);
    let (ocsp, crl) = (closed_url("/"), closed_url("/issuing.crl"));
    let leaf = ca.issue("good", &ocsp, &crl);
    let no = check(&patient(), &ca, &leaf, now())
        .await
        .expect_err("no answer");
    let urls: Vec<_> = no.attempts.iter().map(|a| a.url.as_str()).collect();
    assert_eq!(urls, [ocsp.as_str(), crl.as_str()]);
    let text = no.to_string();
    assert!(text.starts_with(&format!("{ocsp}: ")), "{text}");
    assert!(text.contains(&format!("; {crl}: ")), "{text}");
    assert!(
        no.attempts
            .iter()
            .all(|a| a.problem.contains("onnection refused")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_crl_is_refused() {
    let (ca, _crl, crl_url) = ca_with_crl().await;
    let ocsp = closed_url("/");
    let leaf = ca.issue("good", &ocsp, &crl_url);
    let no = check(&patient(), &ca, &leaf, now() + 3 * DAY)
        .await
        .expect_err("no answer");
    let problem = &no.attempts[1].problem;
    assert!(
        problem.starts_with("expired CRL (nextUpdate 20") && problem.ends_with("Z)"),
        "{no}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_signed_by_the_wrong_key_is_refused() {
    let ca = TestCa::new(ISSUER);
    let impostor = TestCa::new(ISSUER);
    let crl = HttpServer::start(Behaviour::Serve(impostor.crl(48))).await;
    let leaf = ca.issue("good", &closed_url("/"), &crl.url("/issuing.crl"));
    let no = check(&patient(), &ca, &leaf, now())
        .await
        .expect_err("no answer");
    assert_eq!(
        no.attempts[1],
        attempt(
            &crl.url("/issuing.crl"),
            "CRL signature refused: the signature does not verify"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_of_another_issuer_is_refused() {
    let ca = TestCa::new(ISSUER);
    let other = TestCa::new("Other CA");
    let crl = HttpServer::start(Behaviour::Serve(other.crl(48))).await;
    let leaf = ca.issue("good", &closed_url("/"), &crl.url("/issuing.crl"));
    let no = check(&patient(), &ca, &leaf, now())
        .await
        .expect_err("no answer");
    assert_eq!(
        no.attempts[1].problem,
        "the CRL is issued by \"CN=Other CA\", not by the certificate's issuer"
    );
}

/// A leaf whose OCSP responder is a hostile server behaving as told, with no CRL to fall
/// back to; the OCSP attempt's problem.
async fn hostile(behaviour: Behaviour, checker: &Checker) -> String {
    let ca = TestCa::new(ISSUER);
    let server = HttpServer::start(behaviour).await;
    let leaf = ca.issue("good", &server.url("/"), "");
    let no = check(checker, &ca, &leaf, now())
        .await
        .expect_err("no answer");
    assert_eq!(no.attempts.len(), 1, "{no}");
    assert_eq!(no.attempts[0].url, server.url("/"));
    no.attempts[0].problem.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_answer_is_refused() {
    let problem = hostile(Behaviour::Serve(b"<html>hello</html>".to_vec()), &patient()).await;
    assert!(
        problem.starts_with("the answer is not an OCSP response: "),
        "{problem}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_the_limit_is_refused() {
    let limit = grant_agent::revocation::MAX_OCSP_RESPONSE;
    let expected = format!("the answer is larger than {limit} bytes");
    let declared = hostile(Behaviour::Serve(vec![0x30; limit + 1]), &patient()).await;
    assert_eq!(declared, expected);
    let streamed = hostile(Behaviour::Stream(limit * 4), &patient()).await;
    assert_eq!(streamed, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responder_that_never_answers_times_out() {
    let problem = hostile(Behaviour::Silent, &checker(Duration::from_secs(2))).await;
    assert_eq!(problem, "no answer within 2000 ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_response_with_another_nonce_is_refused() {
    let ca = TestCa::new(ISSUER);
    let server = HttpServer::start(Behaviour::Silent).await;
    let leaf = ca.issue("good", &server.url("/"), "");
    let captured = {
        let _responder = ca.responder(&ca.file("responder"), &["-ndays", "1"]);
        ca.fetch_response(&leaf, &[])
    };
    server.set(Behaviour::Serve(captured));
    let no = check(&patient(), &ca, &leaf, now())
        .await
        .expect_err("no answer");
    assert_eq!(
        no.attempts,
        [attempt(
            &server.url("/"),
            "the response's nonce is not the request's (a replayed response)"
        )]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_naming_no_place_has_no_answer() {
    let ca = TestCa::new(ISSUER);
    let leaf = ca.issue("nowhere", "", "");
    let no = check(&patient(), &ca, &leaf, now())
        .await
        .expect_err("no answer");
    assert!(no.attempts.is_empty());
    assert_eq!(
        no.to_string(),
        "the certificate names no OCSP responder and no CRL distribution point"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ldap_places_are_skipped() {
    let ca = TestCa::new(ISSUER);
    let ldap = "ldap://ldap.example/cn=Test%20Issuing%20CA?certificateRevocationList";
    let leaf = ca.issue("ldap", "", ldap);
    let no = check(&patient(), &ca, &leaf, now())
        .await
        .expect_err("no answer");
    assert_eq!(
        no.attempts,
        [attempt(
            ldap,
            "skipped: only http:// and https:// URLs are fetched"
        )]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_of_another_issuer_is_not_asked_about() {
    let ca = TestCa::new(ISSUER);
    let other = TestCa::new("Other CA");
    let leaf = ca.issue("good", &ca.ocsp_url(), "");
    let no = patient()
        .check(&leaf.der, &other.issuer_der, now())
        .await
        .expect_err("no answer");
    assert_eq!(
        no.to_string(),
        "the certificate is issued by \"CN=Test Issuing CA\", not by the issuer certificate given"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_without_next_update_or_our_nonce_goes_stale_after_an_hour() {
    let ca = TestCa::new(ISSUER);
    let server = HttpServer::start(Behaviour::Silent).await;
    let leaf = ca.issue("good", &server.url("/"), "");
    let captured = {
        let _responder = ca.responder(&ca.file("responder"), &[]);
        ca.fetch_response(&leaf, &["-no_nonce"])
    };
    server.set(Behaviour::Serve(captured));
    let t = now();
    let answer = check(&patient(), &ca, &leaf, t)
        .await
        .expect("fresh enough");
    assert_eq!((answer.status, answer.next_update), (Status::Good, None));
    let no = check(&patient(), &ca, &leaf, t + 2 * 3600)
        .await
        .expect_err("stale");
    let problem = &no.attempts[0].problem;
    assert!(
        problem.starts_with("stale response (thisUpdate 20")
            && problem.ends_with("Z, without nextUpdate or our nonce)"),
        "{problem}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_from_the_future_is_refused() {
    // Signed by the CA itself: a delegated responder certificate would not be valid yet.
    let ca = TestCa::new(ISSUER);
    let leaf = ca.issue("good", &ca.ocsp_url(), &closed_url("/issuing.crl"));
    let _responder = ca.responder(&ca.file("issuing"), &["-ndays", "1"]);
    let problem = ocsp_problem(&patient(), &ca, &leaf, now() - 3600).await;
    assert!(
        problem.starts_with("response producedAt 20") && problem.ends_with("Z is in the future"),
        "{problem}"
    );
}
