//! Grant verification: each check, its error and its MP code (x5c checks in `x5c.rs`).

use serde_json::{Value, json};

use grant_agent::{agent::unix_now, grant::Algorithm};

use crate::{
    refusal::{MpCode, OAuthError, Refusal},
    verify::{Granted, Proof, Verifier},
};

use super::{
    DELEGATING_ORG, Grant, ISSUER, KID_CLIENT, ORG, TestKey, config, files, form, test_chain,
};

/// A verifier for [`ISSUER`] over the test clients, with `top` added to the config.
pub(super) fn verifier(top: &str) -> Verifier {
    let dir = files();
    Verifier::new(config(dir.path(), top), ISSUER.into())
}

/// The grant, which must be accepted.
pub(super) fn accepted(verifier: &Verifier, grant: &Grant) -> Granted {
    verifier
        .verify(&grant.form(), unix_now())
        .unwrap_or_else(|r| panic!("refused: {r:?}"))
}

/// Checks that `body` is refused with `error` and `code`, saying `says`.
#[track_caller]
pub(super) fn assert_refused(
    verifier: &Verifier,
    body: &[u8],
    error: OAuthError,
    code: Option<MpCode>,
    says: &str,
) -> Refusal {
    let refusal = verifier
        .verify(body, unix_now())
        .expect_err("should be refused");
    assert_eq!((refusal.error, refusal.code), (error, code), "{refusal:?}");
    assert!(
        refusal.description.contains(says),
        "{:?} should contain {says:?}",
        refusal.description
    );
    refusal
}

#[test]
fn a_good_kid_grant_is_accepted_with_everything_it_asks_for() {
    let v = verifier("");
    let granted = accepted(&v, &Grant::kid(ISSUER));
    assert_eq!(granted.client_id, KID_CLIENT);
    assert_eq!(granted.scopes, ["test:read"]);
    assert_eq!(granted.proof, Proof::RegisteredKey);
    assert_eq!(granted.own_org.as_deref(), Some(ORG));
    assert_eq!(granted.consumer_org, None);

    // aud without the trailing slash, RS512, a wildcard scope, repeats folded, delegation,
    // resources and authorization_details.
    let details =
        json!([{"type": "urn:altinn:systemuser", "systemuser_org": {"ID": "0192:991825827"}}]);
    let grant = Grant::kid(ISSUER.trim_end_matches('/'))
        .algorithm(Algorithm::Rs512)
        .claim("scope", "test:read wild:anything test:read")
        .claim("consumer_org", DELEGATING_ORG)
        .claim(
            "resource",
            json!(["https://a.example/", "https://b.example/"]),
        )
        .claim("authorization_details", details.clone());
    let granted = accepted(&v, &grant);
    assert_eq!(granted.scopes, ["test:read", "wild:anything"]);
    assert_eq!(granted.consumer_org.as_deref(), Some(DELEGATING_ORG));
    assert_eq!(
        granted.resources,
        ["https://a.example/", "https://b.example/"]
    );
    assert_eq!(granted.authorization_details, Some(details));
}

#[test]
fn grant_type_and_assertion_are_required() {
    let v = verifier("");
    let assertion = Grant::kid(ISSUER).assertion();
    let cases = [
        (
            form(&[("assertion", &assertion)]),
            OAuthError::InvalidRequest,
            "grant_type is missing",
        ),
        (
            form(&[
                ("grant_type", "client_credentials"),
                ("assertion", &assertion),
            ]),
            OAuthError::UnsupportedGrantType,
            "\"client_credentials\" is not supported",
        ),
        (
            form(&[("grant_type", super::JWT_BEARER)]),
            OAuthError::InvalidRequest,
            "assertion",
        ),
        (
            form(&[
                ("grant_type", super::JWT_BEARER),
                ("assertion", &assertion),
                ("assertion", &assertion),
            ]),
            OAuthError::InvalidRequest,
            "more than once",
        ),
    ];
    for (body, error, says) in cases {
        let _ = assert_refused(&v, &body, error, None, says);
    }
}

#[test]
fn the_header_needs_an_rs_alg_and_exactly_one_of_x5c_and_kid() {
    let v = verifier("");
    let chain = test_chain();
    let jwt =
        |assertion: &str| form(&[("grant_type", super::JWT_BEARER), ("assertion", assertion)]);
    let cases = [
        (
            Grant::kid(ISSUER).header("alg", "HS256").form(),
            "alg \"HS256\"",
        ),
        (
            Grant::kid(ISSUER).header("alg", Value::Null).form(),
            "no alg",
        ),
        (
            Grant::kid(ISSUER).header("kid", Value::Null).form(),
            "neither x5c",
        ),
        (
            Grant::x5c(ISSUER, &chain).header("kid", "k").form(),
            "both x5c and kid",
        ),
        (Grant::kid(ISSUER).header("kid", 7).form(), "kid a string"),
        (jwt("a.b"), "three dot-separated parts"),
        (jwt("e30.e30.!!"), "not base64url"),
        (
            jwt("bm90IGpzb24.e30.AA"),
            "header is not a base64url JSON object",
        ),
    ];
    for (body, says) in cases {
        let _ = assert_refused(&v, &body, OAuthError::InvalidGrant, None, says);
    }
}

#[test]
fn unknown_claims_and_clients_are_refused() {
    let v = verifier("");
    let _ = assert_refused(
        &v,
        &Grant::kid(ISSUER).claim("sub", "x").form(),
        OAuthError::InvalidGrant,
        None,
        "unknown claim sub",
    );
    let refusal = assert_refused(
        &v,
        &Grant::kid(ISSUER).claim("iss", "stranger").form(),
        OAuthError::InvalidClient,
        Some(MpCode::Mp100),
        "unknown client_id \"stranger\"",
    );
    assert_eq!(refusal.client_id.as_deref(), Some("stranger"), "logged");
    let _ = assert_refused(
        &v,
        &Grant::kid(ISSUER).claim("iss", Value::Null).form(),
        OAuthError::InvalidGrant,
        None,
        "iss",
    );
}

#[test]
fn a_wrong_audience_is_mp110() {
    let v = verifier("");
    let _ = assert_refused(
        &v,
        &Grant::kid("https://test.maskinporten.no/").form(),
        OAuthError::InvalidGrant,
        Some(MpCode::Mp110),
        "not this issuer",
    );
    let _ = assert_refused(
        &v,
        &Grant::kid(ISSUER).claim("aud", Value::Null).form(),
        OAuthError::InvalidGrant,
        Some(MpCode::Mp110),
        "aud is missing",
    );
}

#[test]
fn kid_mode_needs_a_registered_unexpired_key_that_verifies() {
    let v = verifier("");
    let _ = assert_refused(
        &v,
        &Grant::kid(ISSUER).header("kid", "other").form(),
        OAuthError::InvalidGrant,
        None,
        "kid \"other\" is not a key registered on client kid-client",
    );
    let _ = assert_refused(
        &v,
        &Grant::kid(ISSUER).header("kid", "expired-key").form(),
        OAuthError::InvalidGrant,
        Some(MpCode::Mp121),
        "expired",
    );
    let _ = assert_refused(
        &v,
        &Grant::kid(ISSUER).signed_by(TestKey::Leaf).form(),
        OAuthError::InvalidGrant,
        None,
        "signature does not verify",
    );
    // The header says RS384 but the signature is RS256.
    let _ = assert_refused(
        &v,
        &Grant::kid(ISSUER).header("alg", "RS384").form(),
        OAuthError::InvalidGrant,
        None,
        "signature does not verify",
    );
}

#[test]
fn times_are_checked_mp130() {
    let v = verifier("");
    let now = unix_now();
    let cases = [
        (
            Grant::kid(ISSUER).claim("iat", now + 40),
            "from the server's clock",
        ),
        (
            Grant::kid(ISSUER).claim("iat", now - 40),
            "from the server's clock",
        ),
        (
            Grant::kid(ISSUER)
                .claim("iat", now - 5)
                .claim("exp", now - 1),
            "expired",
        ),
        (
            Grant::kid(ISSUER).claim("iat", now).claim("exp", now + 121),
            "exp - iat is 121 s",
        ),
        (
            Grant::kid(ISSUER).claim("iat", Value::Null),
            "iat is missing",
        ),
        (Grant::kid(ISSUER).claim("exp", "soon"), "exp is missing"),
    ];
    for (grant, says) in cases {
        let _ = assert_refused(
            &v,
            &grant.form(),
            OAuthError::InvalidGrant,
            Some(MpCode::Mp130),
            says,
        );
    }
    let _ = accepted(
        &v,
        &Grant::kid(ISSUER)
            .claim("iat", now - 9)
            .claim("exp", now + 111),
    );
}

#[test]
fn a_jti_is_required_and_single_use_mp012() {
    let v = verifier("");
    let grant = Grant::kid(ISSUER);
    let _ = accepted(&v, &grant);
    let _ = assert_refused(
        &v,
        &grant.form(),
        OAuthError::InvalidGrant,
        Some(MpCode::Mp012),
        "used before",
    );
    for missing in [Value::Null, json!("")] {
        let _ = assert_refused(
            &v,
            &Grant::kid(ISSUER).claim("jti", missing).form(),
            OAuthError::InvalidGrant,
            None,
            "jti is missing",
        );
    }
}

#[test]
fn scopes_must_be_allowed_mp200_and_present_mp201() {
    let v = verifier("");
    let _ = assert_refused(
        &v,
        &Grant::kid(ISSUER)
            .claim("scope", "test:read test:admin")
            .form(),
        OAuthError::InvalidScope,
        Some(MpCode::Mp200),
        "may not get scope \"test:admin\"",
    );
    // "wild:*" covers scopes under the prefix, not the bare prefix.
    let _ = assert_refused(
        &v,
        &Grant::kid(ISSUER).claim("scope", "wild:").form(),
        OAuthError::InvalidScope,
        Some(MpCode::Mp200),
        "\"wild:\"",
    );
    for empty in [json!(" "), Value::Null] {
        let _ = assert_refused(
            &v,
            &Grant::kid(ISSUER).claim("scope", empty).form(),
            OAuthError::InvalidScope,
            Some(MpCode::Mp201),
            "no scope",
        );
    }
}

#[test]
fn consumer_org_needs_a_delegation_mp251() {
    let v = verifier("");
    let _ = assert_refused(
        &v,
        &Grant::kid(ISSUER).claim("consumer_org", "313367002").form(),
        OAuthError::InvalidScope,
        Some(MpCode::Mp251),
        "no delegation from organisation \"313367002\"",
    );
}

#[test]
fn authorization_details_and_resource_must_be_well_formed() {
    let v = verifier("");
    for bad in [json!({"type": "x"}), json!([{"kind": "x"}]), json!(["x"])] {
        let _ = assert_refused(
            &v,
            &Grant::kid(ISSUER)
                .claim("authorization_details", bad)
                .form(),
            OAuthError::InvalidRequest,
            None,
            "array of objects",
        );
    }
    let _ = assert_refused(
        &v,
        &Grant::kid(ISSUER).claim("resource", json!([1])).form(),
        OAuthError::InvalidRequest,
        None,
        "resource",
    );
}
