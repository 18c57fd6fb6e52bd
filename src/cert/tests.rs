//! The cert module's tests: organisation numbers, issuer rules, key usage and parsing of
//! certificates made with openssl at test time.

use super::*;

/// A self-signed certificate made by openssl with `subject` (which is also the issuer)
/// and optional extra `-addext` values.
fn openssl_certificate(subject: &str, addext: &[&str]) -> CertificateChain {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = vec!["-days", "2", "-subj", subject];
    for ext in addext {
        options.extend_from_slice(&["-addext", ext]);
    }
    crate::testing::self_signed(dir.path(), "k.pem", "c.pem", &options);
    CertificateChain::from_pem(&std::fs::read(dir.path().join("c.pem")).expect("pem"))
        .expect("parses")
}

#[test]
fn organization_number_from_both_profiles_in_order() {
    let seid2 = openssl_certificate(
        "/C=NO/organizationIdentifier=NTRNO-974760673/O=ACME/CN=ACME",
        &[],
    );
    assert_eq!(seid2.organization_number().as_deref(), Some("974760673"));
    let seid1 = openssl_certificate("/C=NO/serialNumber=991825827/O=ACME/CN=ACME", &[]);
    assert_eq!(seid1.organization_number().as_deref(), Some("991825827"));
    let old = openssl_certificate("/C=NO/O=ACME AS - 974760673/CN=ACME", &[]);
    assert_eq!(old.organization_number().as_deref(), Some("974760673"));
    // SEID 2.0 wins over SEID 1, which wins over O.
    let both = openssl_certificate(
        "/C=NO/serialNumber=991825827/organizationIdentifier=NTRNO-974760673/O=X - 313367002/CN=ACME",
        &[],
    );
    assert_eq!(both.organization_number().as_deref(), Some("974760673"));
    let seid1_and_o = openssl_certificate("/C=NO/serialNumber=991825827/O=X - 313367002/CN=A", &[]);
    assert_eq!(
        seid1_and_o.organization_number().as_deref(),
        Some("991825827")
    );
    // A bad check digit is no organisation number; the next layout is tried.
    let bad = openssl_certificate(
        "/C=NO/organizationIdentifier=NTRNO-974760672/O=X - 313367002/CN=A",
        &[],
    );
    assert_eq!(bad.organization_number().as_deref(), Some("313367002"));
    let none = openssl_certificate("/C=NO/serialNumber=12345/O=ACME/CN=ACME", &[]);
    assert_eq!(none.organization_number(), None);
    assert_eq!(
        seid2.subject(),
        "CN=ACME,O=ACME,organizationIdentifier=NTRNO-974760673,C=NO"
    );
}

#[test]
fn every_issuer_rule_classifies() {
    let cases = [
        (
            "/C=NO/O=Buypass AS-983163327/CN=Buypass Class 3 Test4 CA G2 ST Business",
            CertEnvironment::Test,
        ),
        (
            "/C=NO/O=Buypass AS-983163327/CN=Buypass Class 3 Test4 CA 3",
            CertEnvironment::Test,
        ),
        (
            "/C=NO/O=Commfides Norge AS/CN=Commfides Legal Person - G3 - TEST",
            CertEnvironment::Test,
        ),
        (
            "/C=NO/O=Buypass AS-983163327/CN=Buypass Class 3 CA 3",
            CertEnvironment::Production,
        ),
        (
            "/C=NO/O=Buypass AS-983163327/CN=Buypass Class 3 CA G2 ST Business",
            CertEnvironment::Production,
        ),
        (
            "/C=NO/O=Buypass AS-983163327/CN=Buypass Class 3 CA G2 HT Business",
            CertEnvironment::Production,
        ),
        (
            "/C=NO/O=Commfides Norge AS/CN=Commfides Legal Person - G3",
            CertEnvironment::Production,
        ),
        (
            "/C=NO/O=Commfides Norge AS/CN=CPN Enterprise SHA256 CLASS 3",
            CertEnvironment::Production,
        ),
        ("/C=NO/O=Example/CN=Example CA", CertEnvironment::Unknown),
        // "TEST" alone is not a Commfides test issuer, nor "Test4" a Buypass one.
        (
            "/C=NO/O=ACME TEST/CN=ACME TEST CA",
            CertEnvironment::Unknown,
        ),
        ("/C=NO/O=Other/CN=Other Test4 CA", CertEnvironment::Unknown),
    ];
    for (issuer, expected) in cases {
        assert_eq!(
            openssl_certificate(issuer, &[]).environment(),
            expected,
            "{issuer}"
        );
    }
    let policy = openssl_certificate(
        "/C=NO/O=Example/CN=Example CA",
        &["certificatePolicies=2.16.578.1.29.913.200.1"],
    );
    assert_eq!(
        policy.environment(),
        CertEnvironment::Test,
        "Commfides test policy arc"
    );
}

#[test]
fn key_usage_must_allow_signing() {
    let usage =
        |value: &str| openssl_certificate("/CN=x", &[&format!("keyUsage=critical,{value}")]);
    assert!(usage("digitalSignature").allows_signing().is_ok());
    assert!(usage("nonRepudiation").allows_signing().is_ok());
    assert!(matches!(
        usage("keyEncipherment").allows_signing(),
        Err(CertError::KeyUsage)
    ));
}

#[test]
fn an_ec_certificate_is_not_rsa() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _ = crate::testing::openssl(
        dir.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "k.pem",
            "-out",
            "c.pem",
            "-days",
            "1",
            "-subj",
            "/CN=ec",
        ],
    );
    let chain = CertificateChain::from_pem(&std::fs::read(dir.path().join("c.pem")).expect("pem"))
        .expect("parses");
    let err = chain.rsa_public_key_der().expect_err("EC");
    assert!(
        err.to_string()
            .contains("Maskinporten accepts only RS256, RS384 and RS512"),
        "{err}"
    );
}

/// One real certificate, made once by openssl, for the mutation tests.
fn sample_der() -> &'static [u8] {
    static DER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    DER.get_or_init(|| {
        let chain = openssl_certificate(
            "/C=NO/organizationIdentifier=NTRNO-974760673/O=ACME/CN=ACME",
            &[
                "keyUsage=critical,nonRepudiation",
                "subjectAltName=URI:spiffe://a/b,DNS:a.example",
            ],
        );
        chain.der().next().expect("leaf").to_vec()
    })
}

/// Exercises every accessor the agent uses on a parsed chain.
fn read_everything(chain: &CertificateChain) {
    let _ = (
        chain.subject(),
        chain.issuer(),
        chain.validity(),
        chain.environment(),
    );
    let _ = (
        chain.organization_number(),
        chain.allows_signing(),
        chain.rsa_public_key_der(),
    );
    let _ = (chain.leaf_sha256_hex(), chain.subjects_der());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

    /// Random bytes never parse into a panic.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
        if let Ok(chain) = CertificateChain::from_der(vec![bytes.clone()]) {
            read_everything(&chain);
        }
        let _ = ClientCertificate::parse(&bytes);
        let _ = CertificateChain::from_pem(&bytes);
    }

    /// A real certificate with bytes changed, cut or extended parses or fails cleanly,
    /// and whatever parses can be read in full.
    #[test]
    fn mutated_certificates_never_panic(
        flips in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 1..8),
        cut in proptest::prelude::any::<usize>(),
    ) {
        let mut der = sample_der().to_vec();
        for (at, value) in flips {
            let i = at % der.len();
            der[i] = value;
        }
        der.truncate(der.len() - cut % 16);
        if let Ok(chain) = CertificateChain::from_der(vec![der.clone()]) {
            read_everything(&chain);
        }
        let _ = ClientCertificate::parse(&der);
        let _ = CertificateChain::for_key(vec![der], b"key");
    }
}

#[test]
fn a_real_client_certificate_has_its_names_read() {
    let names = ClientCertificate::parse(sample_der()).expect("parses");
    assert_eq!(names.uris, ["spiffe://a/b"]);
    assert_eq!(names.dns_names, ["a.example"]);
    assert_eq!(names.common_name.as_deref(), Some("ACME"));
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    assert!(matches!(
        CertificateChain::from_der(vec![]),
        Err(CertError::Empty)
    ));
    assert!(matches!(
        CertificateChain::from_der(vec![vec![0x30, 0x03, 0x02, 0x01]]),
        Err(CertError::Parse(_))
    ));
    assert!(matches!(
        CertificateChain::from_pem(b"hello"),
        Err(CertError::Empty)
    ));
    let bad_pem = b"-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n";
    assert!(matches!(
        CertificateChain::from_pem(bad_pem),
        Err(CertError::Parse(_))
    ));
    assert_eq!(escape_rfc4514("#a, b+c "), "\\#a\\, b\\+c\\ ");
    for len in 0..64 {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
        assert!(CertificateChain::from_der(vec![bytes]).is_err());
    }
}
