//! The grant module's tests: the claim set, field validation naming each field, and the
//! header and compact form.

use super::*;

fn params() -> GrantParameters {
    GrantParameters {
        client_id: "0a3b5c7d-1111-2222-3333-444455556666".into(),
        scopes: vec![
            "nav:aareg/v1/arbeidsforhold".into(),
            "skatteetaten:mva".into(),
        ],
        ..GrantParameters::default()
    }
}

fn refused(p: &GrantParameters) -> InvalidGrant {
    Claims::new(p, "https://test.maskinporten.no/", 1_700_000_000).expect_err("refused")
}

#[test]
fn claims_have_exactly_the_listed_names() {
    let mut p = params();
    let c = Claims::new(&p, "https://test.maskinporten.no/", 1_700_000_000).expect("valid");
    let json: serde_json::Value = serde_json::to_value(&c).expect("json");
    let names: Vec<&String> = json.as_object().expect("object").keys().collect();
    assert_eq!(names, ["aud", "exp", "iat", "iss", "jti", "scope"]);
    assert_eq!(
        json["scope"],
        "nav:aareg/v1/arbeidsforhold skatteetaten:mva"
    );
    assert_eq!(c.exp - c.iat, 120);
    assert!(uuid::Uuid::parse_str(&c.jti).is_ok_and(|u| u.get_version_num() == 4));

    p.resources = vec!["https://api.example.no/".into()];
    p.consumer_org = "974760673".into();
    p.lifetime_seconds = 30;
    let c = Claims::new(&p, "https://maskinporten.no/", 1_700_000_000).expect("valid");
    let json = serde_json::to_value(&c).expect("json");
    assert_eq!(
        json["resource"],
        serde_json::json!(["https://api.example.no/"])
    );
    assert_eq!(json["consumer_org"], "974760673");
    assert_eq!(c.exp - c.iat, 30);

    p.pid = "01019012480".into();
    p.iss_onbehalfof = "kunde-42".into();
    let c = Claims::new(&p, "https://maskinporten.no/", 1_700_000_000).expect("valid");
    let json = serde_json::to_value(&c).expect("json");
    assert_eq!(json["pid"], "01019012480");
    assert_eq!(json["iss_onbehalfof"], "kunde-42");
    let listed = json.as_object().expect("object").keys();
    assert!(
        listed
            .into_iter()
            .all(|k| crate::maskinporten::CLAIMS.contains(&k.as_str()))
    );
    let debug = format!("{c:?} {p:?}");
    assert!(!debug.contains("01019012480"), "{debug}");
    assert!(debug.contains("[redacted]"), "{debug}");
}

#[test]
fn national_identity_numbers_need_both_check_digits() {
    // A national identity number, a D-number (first digit + 4) and a synthetic test
    // person (month + 80).
    for valid in ["01019012480", "41019012393", "01809012375", "15058543206"] {
        assert!(is_national_identity_number(valid), "{valid}");
    }
    for invalid in [
        "01019012481",  // second check digit
        "01019012470",  // first check digit
        "0101901248",   // ten digits
        "010190124800", // twelve
        "0101901248a",
        "０1019012480", // a full-width digit
        "",
    ] {
        assert!(!is_national_identity_number(invalid), "{invalid}");
    }
}

#[test]
fn every_bad_field_is_named() {
    type Mutate = fn(&mut GrantParameters);
    let cases: Vec<(Mutate, &str)> = vec![
        (
            |p| p.pid = "01019012481".into(),
            "grant.pid: must be an 11-digit national identity number or D-number with valid check digits",
        ),
        (
            |p| p.iss_onbehalfof = "two words".into(),
            "grant.iss_onbehalfof: must be 1..=128 bytes of printable ASCII without spaces",
        ),
        (
            |p| p.iss_onbehalfof = "x".repeat(129),
            "grant.iss_onbehalfof: must be 1..=128 bytes",
        ),
        (
            |p| p.client_id.clear(),
            "grant.client_id: must not be empty",
        ),
        (
            |p| p.client_id = "a b".into(),
            "grant.client_id: must be printable",
        ),
        (
            |p| p.client_id = "x".repeat(257),
            "grant.client_id: is longer than 256",
        ),
        (|p| p.scopes.clear(), "grant.scopes: at least one scope"),
        (
            |p| p.scopes[1] = "a:b c".into(),
            "grant.scopes[1]: contains a space",
        ),
        (
            |p| p.scopes[0] = "a:b\u{7}".into(),
            "grant.scopes[0]: contains U+0007",
        ),
        (
            |p| p.scopes[0] = "nocolon".into(),
            "grant.scopes[0]: must have the form",
        ),
        (
            |p| p.scopes[1] = "nav:".into(),
            "grant.scopes[1]: has no name after \"nav:\"",
        ),
        (
            |p| p.scopes[0] = ":x".into(),
            "grant.scopes[0]: must have the form",
        ),
        (
            |p| p.scopes[1] = p.scopes[0].clone(),
            "grant.scopes[1]: repeats",
        ),
        (
            |p| p.scopes[0] = format!("a:{}", "b".repeat(300)),
            "grant.scopes[0]: is longer",
        ),
        (
            |p| p.scopes = (0..101).map(|i| format!("a:{i}")).collect(),
            "grant.scopes: more than 100",
        ),
        (
            |p| p.resources = vec!["not a uri".into()],
            "grant.resources[0]: must be an absolute URI",
        ),
        (
            |p| p.consumer_org = "974760674".into(),
            "grant.consumer_org: must be a nine-digit",
        ),
        (
            |p| p.lifetime_seconds = 121,
            "grant.lifetime_seconds: 121 is over the maximum of 120",
        ),
    ];
    for (mutate, expected) in cases {
        let mut p = params();
        mutate(&mut p);
        let e = refused(&p).to_string();
        assert!(
            e.starts_with(expected),
            "{e:?} should start with {expected:?}"
        );
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

    /// Any request either becomes claims that serialise, or is refused naming a
    /// `grant.` field; never a panic.
    #[test]
    fn validation_never_panics_and_names_the_field(
        client_id in ".{0,300}",
        scopes in proptest::collection::vec(".{0,40}|[a-z]{1,8}:[a-z/._-]{0,20}", 0..6),
        resources in proptest::collection::vec(".{0,40}|https://[a-z.]{1,20}/", 0..4),
        consumer_org in "[0-9]{0,10}|.{0,12}",
        lifetime_seconds in proptest::prelude::any::<u32>(),
    ) {
        let p = GrantParameters { client_id, scopes, resources, consumer_org, lifetime_seconds, ..GrantParameters::default() };
        match Claims::new(&p, "https://test.maskinporten.no/", 1_700_000_000) {
            Ok(claims) => {
                let json = serde_json::to_value(&claims).expect("serialises");
                proptest::prop_assert!(claims.exp - claims.iat <= 120 && claims.exp > claims.iat);
                proptest::prop_assert!(!claims.scope.is_empty());
                proptest::prop_assert_eq!(claims.scope.split(' ').count(), p.scopes.len());
                proptest::prop_assert!(json.as_object().is_some_and(|o| o.len() <= 9));
            }
            Err(e) => proptest::prop_assert!(e.to_string().starts_with("grant."), "{}", e),
        }
    }
}

#[test]
fn authorization_details_are_checked_and_become_the_claim() {
    let mut p = params();
    p.authorization_details_json =
            r#"[{"type":"urn:altinn:systemuser","systemuser_org":{"authority":"iso6523-actorid-upis","ID":"0192:991825827"}}]"#
                .into();
    let c = Claims::new(&p, "https://test.maskinporten.no/", 1).expect("valid");
    let json = serde_json::to_value(&c).expect("json");
    assert_eq!(
        json["authorization_details"][0]["type"],
        "urn:altinn:systemuser"
    );
    let parsed = AuthorizationDetails::parse(&p.authorization_details_json)
        .expect("valid")
        .expect("some");
    assert_eq!(parsed.types(), ["urn:altinn:systemuser"]);
    // Key order and spacing do not change the canonical form.
    let other = AuthorizationDetails::parse(
            r#"[ {"systemuser_org":{"ID":"0192:991825827","authority":"iso6523-actorid-upis"}, "type":"urn:altinn:systemuser"} ]"#,
        )
        .expect("valid")
        .expect("some");
    assert_eq!(parsed.canonical(), other.canonical());
    assert_eq!(AuthorizationDetails::parse("  ").expect("empty"), None);

    let cases = [
        ("{", "grant.authorization_details_json: is not JSON"),
        (
            "{}",
            "grant.authorization_details_json: must be a JSON array",
        ),
        ("[]", "grant.authorization_details_json: must hold 1 to 20"),
        (
            "[1]",
            "grant.authorization_details_json[0]: must be a JSON object",
        ),
        (
            r#"[{"type":"a"},{"ID":"x"}]"#,
            "grant.authorization_details_json[1].type: is required",
        ),
        (
            r#"[{"type":""}]"#,
            "grant.authorization_details_json[0].type: must be 1 to 256",
        ),
    ];
    for (json, expected) in cases {
        let e = AuthorizationDetails::parse(json)
            .expect_err(json)
            .to_string();
        assert!(
            e.starts_with(expected),
            "{e:?} should start with {expected:?}"
        );
    }
    let long = format!(r#"[{{"type":"a","x":"{}"}}]"#, "y".repeat(9000));
    assert!(
        AuthorizationDetails::parse(&long)
            .expect_err("long")
            .to_string()
            .contains("longer than 8192 bytes")
    );
}

#[test]
fn organization_number_check_digit() {
    assert!(is_organization_number("974760673")); // Brønnøysundregistrene
    assert!(is_organization_number("991825827")); // Digitaliseringsdirektoratet
    assert!(!is_organization_number("974760672"));
    assert!(!is_organization_number("97476067"));
    assert!(!is_organization_number("97476067a"));
    assert!(!is_organization_number("+97476067"));
}

#[test]
fn header_and_compact_form() {
    let header = Header::with_x5c(Algorithm::Rs384, [&[0xfb_u8, 0xff][..], &[1, 2, 3][..]]);
    let claims = Claims::new(&params(), "https://test.maskinporten.no/", 1).expect("valid");
    let input = signing_input(&header, &claims);
    let jws = compact(input.clone(), &[0xff, 0xee]);
    let parts: Vec<&str> = jws.split('.').collect();
    assert_eq!(parts.len(), 3);
    let head: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).expect("b64")).expect("json");
    // x5c is standard base64 ('+' and '/'), the rest base64url.
    assert_eq!(
        head,
        serde_json::json!({"alg": "RS384", "x5c": ["+/8=", "AQID"]})
    );
    assert_eq!(parts[2], "_-4");
    assert_eq!(jws, format!("{input}._-4"));

    let kid = Header::with_kid(Algorithm::Rs512, "my-key-2026");
    let jws = compact(signing_input(&kid, &claims), &[1]);
    let head: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(jws.split('.').next().expect("header"))
            .expect("b64"),
    )
    .expect("json");
    assert_eq!(
        head,
        serde_json::json!({"alg": "RS512", "kid": "my-key-2026"})
    );
}
