//! Virksomhetssertifikat (x5c) grants: the chain, its trust, environment and organisation.

use der::Encode;
use serde_json::json;

use super::{
    CERT_CLIENT, Grant, ISSUER, ORG, TEST_CA, TestKey, certificate, config, files, key, test_chain,
    verify::{accepted, assert_refused, verifier},
};
use crate::{
    refusal::{MpCode, OAuthError},
    verify::{Proof, Verifier},
};

#[test]
fn a_good_x5c_grant_is_accepted_with_or_without_the_ca_in_the_chain() {
    let v = verifier("");
    let chain = test_chain();
    for x5c in [&chain[..1], &chain[..]] {
        let granted = accepted(&v, &Grant::x5c(ISSUER, x5c));
        assert_eq!(granted.client_id, CERT_CLIENT);
        assert_eq!(granted.proof, Proof::Certificate);
        assert_eq!(granted.own_org.as_deref(), Some(ORG));
    }
}

#[test]
fn an_x5c_chain_must_lead_to_the_ca_mp120() {
    let v = verifier("");
    let leaf = |issuer: (&str, TestKey), valid_for: i64| {
        let der = certificate(
            &format!("CN=Mock Leaf,2.5.4.97=NTRNO-{ORG},C=NO"),
            key(TestKey::Leaf),
            (issuer.0, key(issuer.1)),
            false,
            valid_for,
        )
        .to_der()
        .expect("der");
        Grant::x5c(ISSUER, &[der]).form()
    };
    let cases = [
        // Same CA name, wrong key: an impostor CA.
        (
            leaf((TEST_CA, TestKey::Client), 3600),
            "is not signed by the trust anchor",
        ),
        (
            leaf(("CN=Other Test4 CA,O=Buypass AS,C=NO", TestKey::Ca), 3600),
            "not a trust anchor",
        ),
        (leaf((TEST_CA, TestKey::Ca), -60), "x5c[0] expired"),
    ];
    for (body, says) in cases {
        let _ = assert_refused(
            &v,
            &body,
            OAuthError::InvalidGrant,
            Some(MpCode::Mp120),
            says,
        );
    }
    // A chain whose second certificate did not issue the first.
    let mut chain = test_chain();
    chain[1] = certificate(
        "CN=Unrelated CA,C=NO",
        key(TestKey::Ca),
        ("CN=Unrelated CA,C=NO", key(TestKey::Ca)),
        true,
        3600,
    )
    .to_der()
    .expect("der");
    let _ = assert_refused(
        &v,
        &Grant::x5c(ISSUER, &chain).form(),
        OAuthError::InvalidGrant,
        Some(MpCode::Mp120),
        "but x5c[1] is",
    );

    // Without `ca` every x5c grant is refused, saying what to configure.
    let dir = files();
    let text = super::config_text("").replace("ca = \"ca.pem\"", "");
    let file = dir.path().join("mock.toml").display().to_string();
    let no_ca = Verifier::new(
        crate::MockConfig::from_toml_str(&text, &file).expect("config"),
        ISSUER.into(),
    );
    let _ = assert_refused(
        &no_ca,
        &Grant::x5c(ISSUER, &test_chain()).form(),
        OAuthError::InvalidGrant,
        Some(MpCode::Mp120),
        "set `ca`",
    );
}

#[test]
fn the_certificate_must_be_the_clients_organisation_mp122() {
    let v = verifier("");
    let other_org = certificate(
        "CN=Mock Leaf,2.5.4.97=NTRNO-974760673,C=NO",
        key(TestKey::Leaf),
        (TEST_CA, key(TestKey::Ca)),
        false,
        3600,
    )
    .to_der()
    .expect("der");
    let _ = assert_refused(
        &v,
        &Grant::x5c(ISSUER, &[other_org]).form(),
        OAuthError::InvalidGrant,
        Some(MpCode::Mp122),
        "(974760673) is not client cert-client's (991825827)",
    );
}

#[test]
fn the_certificate_must_be_for_the_right_environment_mp124() {
    let production_ca = "CN=Buypass Class 3 CA 3,O=Buypass AS,C=NO";
    let leaf = certificate(
        &format!("CN=Mock Leaf,2.5.4.97=NTRNO-{ORG},C=NO"),
        key(TestKey::Leaf),
        (production_ca, key(TestKey::Ca)),
        false,
        3600,
    );
    let ca = certificate(
        production_ca,
        key(TestKey::Ca),
        (production_ca, key(TestKey::Ca)),
        true,
        3600,
    );
    let chain = [leaf.to_der().expect("der"), ca.to_der().expect("der")];
    // The production chain is trusted (it ends in a certificate the CA key signed)...
    let dir = files();
    let pem = der::EncodePem::to_pem(&ca, der::pem::LineEnding::LF).expect("pem");
    std::fs::write(dir.path().join("ca.pem"), pem).expect("write");
    let test_env = Verifier::new(config(dir.path(), ""), ISSUER.into());
    let _ = assert_refused(
        &test_env,
        &Grant::x5c(ISSUER, &chain).form(),
        OAuthError::InvalidGrant,
        Some(MpCode::Mp124),
        "a prod certificate",
    );
    let any = Verifier::new(config(dir.path(), "certificates = \"any\""), ISSUER.into());
    let _ = accepted(&any, &Grant::x5c(ISSUER, &chain));
    // ...and a production mock refuses the test chain.
    let prod = verifier("certificates = \"prod\"");
    let _ = assert_refused(
        &prod,
        &Grant::x5c(ISSUER, &test_chain()).form(),
        OAuthError::InvalidGrant,
        Some(MpCode::Mp124),
        "a test certificate",
    );
}

#[test]
fn a_malformed_chain_is_mp123_and_a_bad_signature_mp124() {
    let v = verifier("");
    let chain = test_chain();
    let cases = [
        (
            Grant::x5c(ISSUER, &chain)
                .header("x5c", json!(["%%%"]))
                .form(),
            "x5c[0] is not a standard-base64 string",
        ),
        (
            Grant::x5c(ISSUER, &chain)
                .header("x5c", json!(["AAAA"]))
                .form(),
            "x5c is malformed: x5c[0]",
        ),
        (
            Grant::x5c(ISSUER, &chain).header("x5c", json!([])).form(),
            "x5c is malformed",
        ),
    ];
    for (body, says) in cases {
        let _ = assert_refused(
            &v,
            &body,
            OAuthError::InvalidGrant,
            Some(MpCode::Mp123),
            says,
        );
    }
    // Digdir: MP-124 is a signature that cannot be validated.
    let _ = assert_refused(
        &v,
        &Grant::x5c(ISSUER, &chain).signed_by(TestKey::Client).form(),
        OAuthError::InvalidGrant,
        Some(MpCode::Mp124),
        "signature does not verify with the key of the x5c certificate",
    );
}
