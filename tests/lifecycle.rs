//! The virksomhetssertifikat lifecycle against real SoftHSM: keys made in the token,
//! CSRs signed there, certificates from a stand-in CA (openssl) imported next to them,
//! the environment guard, validity, rollover, reload, kid mode and expiry warnings.

#![allow(
    clippy::expect_used,
    reason = "a test that cannot go on should fail loudly"
)]

mod common;

use std::{path::PathBuf, process::Output, time::Duration};

use common::{
    DevAgent, TEST_AUD, TestCa, ca, grant_request, openssl, params, read, unix_now, verify,
};
use grant_agent::proto::{KeyInfo, ListKeysRequest};
use tonic::Code;

const BUYPASS_TEST: &str =
    "/C=NO/O=Buypass AS-983163327/CN=Buypass Class 3 Test4 CA G2 ST Business";
const BUYPASS_PROD: &str = "/C=NO/O=Buypass AS-983163327/CN=Buypass Class 3 CA 3";
const COMMFIDES_TEST: &str = "/C=NO/O=Commfides Norge AS/CN=Commfides Legal Person - G3 - TEST";
const UNKNOWN_CA: &str = "/C=NO/O=Example/CN=Example Issuing CA";
const SEID2: &str = "/C=NO/organizationIdentifier=NTRNO-974760673/O=ACME AS/CN=ACME AS";
const SEID1: &str = "/C=NO/serialNumber=974760673/O=ACME AS/CN=ACME AS";
const OLD_O: &str = "/C=NO/O=ACME AS - 974760673/CN=ACME AS";
const DAY: i64 = 86_400;

/// A token with the dev key, its agent stopped, ready for key commands.
fn token() -> tempfile::TempDir {
    DevAgent::start().stop()
}

fn run(dir: &tempfile::TempDir, args: &[&str]) -> Output {
    std::process::Command::new(common::BIN)
        .args(args)
        .env("SOFTHSM2_CONF", dir.path().join("softhsm2.conf"))
        .env("GRANT_AGENT_CONFIG", dir.path().join("config.toml"))
        .output()
        .expect("run grant-agent")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(out: Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `grant-agent sign` with `agent.toml` in `dir`, for client `c` and scope `a:b`.
fn sign_a_b(dir: &tempfile::TempDir) -> Output {
    let config = dir.path().join("agent.toml");
    run(
        dir,
        &[
            "sign",
            "--config",
            config.to_str().expect("utf-8"),
            "--client-id",
            "c",
            "--scope",
            "a:b",
        ],
    )
}

/// Generates a key in the token and returns the path of its CSR.
fn key_with_csr(dir: &tempfile::TempDir, label: &str, key_type: &str) -> PathBuf {
    let _ = ok(run(
        dir,
        &["key", "generate", "--label", label, "--type", key_type],
    ));
    let csr = dir.path().join(format!("{label}.csr"));
    let _ = ok(run(dir, &common::csr_args(label, &csr)));
    csr
}

/// A key with a certificate from `ca` for `subject`, valid from `start` to `end`, imported.
fn certified(
    dir: &tempfile::TempDir,
    label: &str,
    ca: &TestCa,
    subject: &str,
    start: i64,
    end: i64,
) {
    let csr = key_with_csr(dir, label, "rsa2048");
    let chain = ca.issue(&csr, subject, start, end);
    let _ = ok(run(
        dir,
        &[
            "cert",
            "import",
            "--label",
            label,
            chain.to_str().expect("utf-8"),
        ],
    ));
}

/// Writes DIR/NAME: the dev config's listen and [pkcs11] section (port 0), then `rest`.
fn config(dir: &tempfile::TempDir, name: &str, rest: &str) {
    config_with_top(dir, name, "", rest);
}

/// As [`config`], with top-level settings `top` before the tables.
fn config_with_top(dir: &tempfile::TempDir, name: &str, top: &str, rest: &str) {
    let dev = read(&dir.path().join("config.toml"));
    let head = &dev[..dev.find("[[keys]]").expect("keys")];
    let head = head
        .lines()
        .map(|l| {
            if l.starts_with("listen") {
                "listen = \"127.0.0.1:0\""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.path().join(name), format!("{top}{head}\n{rest}")).expect("config");
}

/// Serves `keys` (each a [`key_toml`]) from the token in `dir`, with the dev config's
/// listen and [pkcs11] section.
fn serve_keys(dir: tempfile::TempDir, keys: &[String]) -> DevAgent {
    config(&dir, "agent.toml", &keys.concat());
    DevAgent::serve(dir, "agent.toml")
}

fn key_toml(name: &str, label: &str, extra: &str) -> String {
    format!("[[keys]]\nname = \"{name}\"\nlabel = \"{label}\"\ncertificate = \"token\"\n{extra}\n")
}

async fn list(agent: &DevAgent) -> Vec<KeyInfo> {
    agent
        .client()
        .await
        .list_keys(ListKeysRequest {})
        .await
        .expect("list")
        .into_inner()
        .keys
}

async fn sign(agent: &DevAgent, key: &str, environment: &str) -> Result<String, tonic::Status> {
    let mut p = params();
    p.key = key.into();
    p.environment = environment.into();
    agent.sign(p).await.map(|r| r.assertion)
}

#[tokio::test]
async fn a_key_made_in_the_token_gets_a_csr_a_certificate_and_signs() {
    let dir = token();
    let csr = key_with_csr(&dir, "vs-2027", "rsa3072");
    let err = fails(run(&dir, &["key", "generate", "--label", "vs-2027"]));
    assert!(
        err.contains("--label: a key labelled \"vs-2027\" exists already"),
        "{err}"
    );
    let err = fails(run(
        &dir,
        &[
            "key",
            "csr",
            "--label",
            "vs-2027",
            "--org-number",
            "974760672",
            "--org-name",
            "X",
        ],
    ));
    assert!(
        err.contains("--org-number: \"974760672\" is not nine digits with a valid check digit"),
        "{err}"
    );

    // openssl accepts the request signed inside the token, with the SEID 2.0 subject.
    let out = openssl(
        &[
            "req",
            "-verify",
            "-noout",
            "-subject",
            "-nameopt",
            "RFC2253",
            "-in",
            csr.to_str().expect("utf-8"),
        ],
        dir.path(),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("verify OK"), "{text}");
    assert!(
        text.contains("CN=ACME AS,O=ACME AS,organizationIdentifier=NTRNO-974760673,C=NO"),
        "{text}"
    );

    let ca = TestCa::new(dir.path(), "buypass-test", BUYPASS_TEST);
    let chain = ca.issue(&csr, SEID2, unix_now() - DAY, unix_now() + 400 * DAY);
    let chain = chain.to_str().expect("utf-8");
    let out = ok(run(&dir, &["cert", "import", "--label", "vs-2027", chain]));
    assert!(
        out.starts_with("imported 2 certificate object(s) for key \"vs-2027\""),
        "{out}"
    );
    assert!(out.contains("environment test"), "{out}");
    let out = ok(run(&dir, &["cert", "import", "--label", "vs-2027", chain]));
    assert!(
        out.starts_with("imported 0 certificate object(s)"),
        "importing again changes nothing: {out}"
    );

    // A certificate for another key, and one that may not sign, are refused; nothing is written.
    let other = ca.issue(
        &key_with_csr(&dir, "other", "rsa2048"),
        SEID2,
        unix_now() - DAY,
        unix_now() + DAY,
    );
    let err = fails(run(
        &dir,
        &[
            "cert",
            "import",
            "--label",
            "vs-2027",
            other.to_str().expect("utf-8"),
        ],
    ));
    assert!(
        err.contains(
            "FILE: no certificate in the file has the public key of the key labelled \"vs-2027\""
        ),
        "{err}"
    );
    let encrypt = ca.issue_with(
        &dir.path().join("other.csr"),
        SEID2,
        unix_now() - DAY,
        unix_now() + DAY,
        "encrypt",
    );
    let err = fails(run(
        &dir,
        &[
            "cert",
            "import",
            "--label",
            "other",
            encrypt.to_str().expect("utf-8"),
        ],
    ));
    assert!(
        err.contains("key usage allows neither digitalSignature nor nonRepudiation"),
        "{err}"
    );

    let (flags, _) = common::private_key_access(dir.path(), "vs-2027");
    common::assert_generated_in_token(&flags);
    let listing = ok(run(&dir, &["key", "list"]));
    assert!(listing.contains("key \"vs-2027\" (id "), "{listing}");
    assert!(
        listing.contains("RSA-3072, sensitive, never extractable"),
        "{listing}"
    );
    assert!(
        listing.contains("issuer:      CN=Buypass Class 3 Test4 CA G2 ST Business"),
        "{listing}"
    );
    assert!(listing.contains("org number:  974760673"), "{listing}");
    assert!(listing.contains("chain:       2 certificates"), "{listing}");
    assert!(
        listing.contains("key \"other\" (id ") && listing.contains("certificate: none"),
        "{listing}"
    );

    let agent = serve_keys(
        dir,
        &[key_toml("default", "vs-2027", "algorithm = \"RS384\"")],
    );
    let assertion = sign(&agent, "", "test").await.expect("signed");
    let grant = verify(&assertion, TEST_AUD);
    assert_eq!(grant.header["alg"], "RS384");
    assert_eq!(
        grant.header["x5c"].as_array().expect("x5c").len(),
        2,
        "leaf and CA"
    );
    let keys = list(&agent).await;
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].organization_number, "974760673");
    assert_eq!(keys[0].environment, "test");
    assert!(keys[0].active && !keys[0].expires_soon);
    assert!(
        (398..=400).contains(&keys[0].days_to_expiry),
        "{}",
        keys[0].days_to_expiry
    );
    let status = sign(&agent, "", "prod")
        .await
        .expect_err("test certificate in prod");
    assert_eq!(status.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn both_profiles_and_the_environment_guard_both_ways() {
    let dir = token();
    let (now, year) = (unix_now(), 365 * DAY);
    let buypass_prod = TestCa::new(dir.path(), "buypass-prod", BUYPASS_PROD);
    let buypass_test = TestCa::new(dir.path(), "buypass-test", BUYPASS_TEST);
    let commfides_test = TestCa::new(dir.path(), "commfides-test", COMMFIDES_TEST);
    let unknown = TestCa::new(dir.path(), "unknown", UNKNOWN_CA);
    certified(
        &dir,
        "seid1-prod",
        &buypass_prod,
        SEID1,
        now - DAY,
        now + year,
    );
    certified(
        &dir,
        "old-test",
        &commfides_test,
        OLD_O,
        now - DAY,
        now + year,
    );
    certified(&dir, "unknown", &unknown, SEID2, now - DAY, now + year);
    certified(&dir, "declared", &unknown, SEID2, now - DAY, now + year);
    certified(&dir, "lenient", &buypass_test, SEID2, now - DAY, now + year);
    let agent = serve_keys(
        dir,
        &[
            key_toml("seid1-prod", "seid1-prod", ""),
            key_toml("old-test", "old-test", ""),
            key_toml("unknown", "unknown", ""),
            key_toml("declared", "declared", "certificate_environment = \"prod\""),
            key_toml("lenient", "lenient", "allow_environment_mismatch = true"),
        ],
    );
    let keys = list(&agent).await;
    let by_name = |n: &str| keys.iter().find(|k| k.name == n).expect("key listed");
    assert_eq!(keys.len(), 5, "several keys in one agent");
    for name in ["seid1-prod", "old-test", "unknown"] {
        assert_eq!(by_name(name).organization_number, "974760673", "{name}");
    }
    assert_eq!(by_name("seid1-prod").environment, "prod");
    assert_eq!(by_name("old-test").environment, "test");
    assert_eq!(by_name("unknown").environment, "unknown");
    assert_eq!(by_name("declared").environment, "prod");

    for (key, env, allowed) in [
        ("seid1-prod", "prod", true),
        ("seid1-prod", "test", false),
        ("old-test", "test", true),
        ("old-test", "prod", false),
        ("unknown", "test", false),
        ("unknown", "prod", false),
        ("declared", "prod", true),
        ("declared", "test", false),
        ("lenient", "prod", true),
        ("lenient", "test", true),
    ] {
        match sign(&agent, key, env).await {
            Ok(assertion) => {
                assert!(allowed, "{key} in {env} should be refused");
                let aud = if env == "prod" {
                    "https://maskinporten.no/"
                } else {
                    TEST_AUD
                };
                let _ = verify(&assertion, aud);
            }
            Err(status) => {
                assert!(!allowed, "{key} in {env}: {}", status.message());
                assert_eq!(status.code(), Code::FailedPrecondition);
                let expected = match key {
                    "seid1-prod" | "declared" => "has a production certificate",
                    "unknown" => "has a unrecognised certificate",
                    _ => "has a test certificate",
                };
                assert!(status.message().contains(expected), "{}", status.message());
                assert!(
                    status
                        .message()
                        .contains(&format!("refuses in environment {env:?}"))
                );
            }
        }
    }
    let status = sign(&agent, "unknown", "test").await.expect_err("refused");
    assert!(
        status
            .message()
            .contains("set keys[].certificate_environment"),
        "{}",
        status.message()
    );
}

#[test]
fn expired_and_not_yet_valid_certificates_stop_start_up() {
    let dir = token();
    let now = unix_now();
    let ca = TestCa::new(dir.path(), "ca", BUYPASS_TEST);
    certified(&dir, "expired", &ca, SEID2, now - 30 * DAY, now - DAY);
    certified(&dir, "future", &ca, SEID2, now + DAY, now + 30 * DAY);
    let sign_with = |key: &str| {
        config(&dir, "agent.toml", &key_toml("default", key, ""));
        fails(sign_a_b(&dir))
    };
    let err = sign_with("expired");
    assert!(
        err.contains("key \"default\" has no certificate valid now: expired (on "),
        "{err}"
    );
    let err = sign_with("future");
    assert!(
        err.contains("key \"default\" has no certificate valid now: not valid yet (from "),
        "{err}"
    );
}

#[tokio::test]
async fn renewal_rolls_over_by_itself() {
    let dir = token();
    let now = unix_now();
    let ca = TestCa::new(dir.path(), "ca", BUYPASS_TEST);
    // The switch comes this long after `now`: time for openssl to issue four certificates
    // and for the agent to start, on a loaded 2-core machine too (5 s was not).
    const SWITCH: i64 = 20;
    // "renewal": the successor becomes valid in a few seconds and then takes over.
    certified(&dir, "old", &ca, SEID2, now - DAY, now + 300 * DAY);
    certified(&dir, "new", &ca, SEID2, now + SWITCH, now + 700 * DAY);
    // "expiry": the newest expires in a few seconds; the older one takes over.
    certified(&dir, "short", &ca, SEID2, now - 60, now + SWITCH);
    certified(&dir, "long", &ca, SEID2, now - 2 * DAY, now + 300 * DAY);
    let agent = serve_keys(
        dir,
        &[
            key_toml("renewal", "old", ""),
            key_toml("renewal", "new", ""),
            key_toml("expiry", "short", ""),
            key_toml("expiry", "long", ""),
        ],
    );
    let active = |keys: &[KeyInfo], name: &str| {
        let active: Vec<i64> = keys
            .iter()
            .filter(|k| k.name == name && k.active)
            .map(|k| k.not_after)
            .collect();
        assert_eq!(active.len(), 1, "exactly one active version of {name}");
        active[0]
    };
    let sha = |assertion: &str| {
        use sha2::Digest;
        let leaf = verify(assertion, TEST_AUD).leaf_der;
        sha2::Sha256::digest(&leaf)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert!(
        unix_now() < now + SWITCH,
        "the setup took more than {SWITCH} s: the test saw nothing switch"
    );
    let keys = list(&agent).await;
    assert_eq!(keys.len(), 4);
    assert_eq!(active(&keys, "renewal"), now + 300 * DAY);
    assert_eq!(active(&keys, "expiry"), now + SWITCH);
    let before = (
        sha(&sign(&agent, "renewal", "test").await.expect("signed")),
        sha(&sign(&agent, "expiry", "test").await.expect("signed")),
    );

    tokio::time::sleep(Duration::from_secs(
        (now + SWITCH + 2 - unix_now()).max(0) as u64
    ))
    .await;
    let keys = list(&agent).await;
    assert_eq!(
        active(&keys, "renewal"),
        now + 700 * DAY,
        "the renewed certificate took over"
    );
    assert_eq!(
        active(&keys, "expiry"),
        now + 300 * DAY,
        "the expired one was dropped"
    );
    let after = (
        sha(&sign(&agent, "renewal", "test").await.expect("signed")),
        sha(&sign(&agent, "expiry", "test").await.expect("signed")),
    );
    assert_ne!(before.0, after.0);
    assert_ne!(before.1, after.1);
    for key in &keys {
        let signed_with = if key.name == "renewal" {
            &after.0
        } else {
            &after.1
        };
        assert_eq!(
            key.active,
            &key.certificate_sha256 == signed_with,
            "{}",
            key.name
        );
    }
}

#[tokio::test]
async fn sighup_reloads_without_dropping_requests_and_a_bad_config_keeps_the_old_keys() {
    let dir = token();
    let ca = TestCa::new(dir.path(), "ca", BUYPASS_TEST);
    certified(
        &dir,
        "second",
        &ca,
        SEID2,
        unix_now() - DAY,
        unix_now() + 100 * DAY,
    );
    let dev_key = key_toml(
        "default",
        "virksomhetssertifikat",
        "certificate_environment = \"test\"",
    );
    config(&dir, "agent.toml", &dev_key);
    let path = dir.path().join("agent.toml");
    let agent = DevAgent::serve(dir, "agent.toml");
    assert_eq!(list(&agent).await.len(), 1);

    // Sign continuously while the agent reloads.
    let client = agent.client().await;
    let load = tokio::spawn(async move {
        let mut signed = 0;
        for _ in 0..300 {
            let mut c = client.clone();
            let _ = c
                .sign_grant(grant_request(params()))
                .await
                .expect("no request fails during reload");
            signed += 1;
        }
        signed
    });
    std::fs::write(&path, read(&path) + &key_toml("second", "second", "")).expect("edit config");
    agent.signal("HUP");
    let mut names = Vec::new();
    for _ in 0..100 {
        names = list(&agent).await.into_iter().map(|k| k.name).collect();
        if names.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(names, ["default", "second"]);
    assert_eq!(load.await.expect("load"), 300);
    let _ = verify(
        &sign(&agent, "second", "test").await.expect("signed"),
        TEST_AUD,
    );

    std::fs::write(&path, "listen = [broken").expect("break config");
    agent.signal("HUP");
    for _ in 0..100 {
        if agent
            .log()
            .contains("reload failed; keeping the running keys")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        agent
            .log()
            .contains("reload failed; keeping the running keys"),
        "{}",
        agent.log()
    );
    assert_eq!(list(&agent).await.len(), 2);
    let _ = verify(
        &sign(&agent, "second", "test").await.expect("still signing"),
        TEST_AUD,
    );
}

#[test]
fn kid_mode_signs_with_a_registered_key_and_the_jwk_verifies_it() {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let dir = token();
    let _ = ok(run(
        &dir,
        &[
            "key",
            "generate",
            "--label",
            "registered",
            "--type",
            "rsa4096",
        ],
    ));
    let jwk: serde_json::Value = serde_json::from_str(&ok(run(
        &dir,
        &[
            "key",
            "jwk",
            "--label",
            "registered",
            "--algorithm",
            "RS512",
        ],
    )))
    .expect("jwk json");
    assert_eq!(jwk["kty"], "RSA");
    assert_eq!(jwk["alg"], "RS512");
    assert_eq!(jwk["use"], "sig");
    assert_eq!(
        jwk["kid"].as_str().expect("kid").len(),
        43,
        "the RFC 7638 thumbprint"
    );
    let named: serde_json::Value = serde_json::from_str(&ok(run(
        &dir,
        &["key", "jwk", "--label", "registered", "--kid", "acme-2026"],
    )))
    .expect("jwk json");
    assert_eq!(named["kid"], "acme-2026");
    assert_eq!(named["n"], jwk["n"]);

    // An expired registration (an older key) is skipped; the current one signs.
    let _ = ok(run(
        &dir,
        &["key", "generate", "--label", "registered-2025"],
    ));
    let kid_key = |label: &str, kid: &str, window: &str| {
        format!(
            "[[keys]]\nname = \"default\"\nlabel = \"{label}\"\nkid = \"{kid}\"\nalgorithm = \"RS512\"\n{window}\n"
        )
    };
    config(
        &dir,
        "agent.toml",
        &[
            kid_key(
                "registered-2025",
                "acme-2025",
                "not_before = 2025-01-01T00:00:00Z\nnot_after = 2025-12-31T00:00:00Z",
            ),
            kid_key(
                "registered",
                "acme-2026",
                "not_before = 2026-01-01T00:00:00Z\nnot_after = 2099-01-01T00:00:00Z",
            ),
        ]
        .concat(),
    );
    let jws = ok(sign_a_b(&dir));
    let jws = jws.trim_end();
    let header: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(jws.split('.').next().expect("header"))
            .expect("b64"),
    )
    .expect("json");
    assert_eq!(
        header,
        serde_json::json!({"alg": "RS512", "kid": "acme-2026"}),
        "kid, and no x5c"
    );
    let key = jsonwebtoken::DecodingKey::from_rsa_components(
        jwk["n"].as_str().expect("n"),
        jwk["e"].as_str().expect("e"),
    )
    .expect("jwk key");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS512);
    validation.set_audience(&[TEST_AUD]);
    let _ = jsonwebtoken::decode::<serde_json::Value>(jws, &key, &validation)
        .expect("verifies with the JWK");

    let err = fails(run(&dir, &["key", "jwk", "--label", "missing"]));
    assert!(
        err.contains("no private key with label \"missing\""),
        "{err}"
    );
}

#[tokio::test]
async fn a_certificate_near_expiry_is_warned_about_and_flagged() {
    let dir = token();
    let ca = TestCa::new(dir.path(), "ca", BUYPASS_TEST);
    certified(
        &dir,
        "soon",
        &ca,
        SEID2,
        unix_now() - DAY,
        unix_now() + 10 * DAY + 600,
    );
    let agent = serve_keys(dir, &[key_toml("default", "soon", "")]);
    let keys = list(&agent).await;
    assert!(keys[0].expires_soon);
    assert_eq!(keys[0].days_to_expiry, 10);
    assert!(
        agent.log().contains("the key in use expires soon"),
        "{}",
        agent.log()
    );
    let dir = agent.stop();
    config_with_top(
        &dir,
        "agent.toml",
        "expiry_warning_days = 5\n",
        &key_toml("default", "soon", ""),
    );
    let agent = DevAgent::serve(dir, "agent.toml");
    assert!(!list(&agent).await[0].expires_soon);
    assert!(!agent.log().contains("expires soon"));
}

#[test]
fn an_ec_key_in_the_token_is_refused_for_maskinporten() {
    let dir = token();
    let _ = common::pkcs11_tool(
        dir.path(),
        &[
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--label",
            "ec",
            "--id",
            "ec",
        ],
    );
    config(&dir, "agent.toml", &key_toml("default", "ec", ""));
    let err = fails(sign_a_b(&dir));
    assert!(
        err.contains("key \"default\" (label \"ec\"): the key with label \"ec\" is a")
            && err.contains("not RSA; Maskinporten needs RSA keys of 2048 bits or more"),
        "{err}"
    );
}

#[tokio::test]
async fn a_pkcs12_file_moves_into_the_token_and_signs() {
    let dir = token();
    let p = dir.path();
    let path = |name: &str| p.join(name).to_str().expect("utf-8").to_owned();
    // A virksomhetssertifikat as a CA delivers it: key and certificate (with chain) in a .p12.
    let ca = TestCa::new(p, "ca", BUYPASS_TEST);
    let _ = openssl(
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "delivered.key",
            "-out",
            "delivered.csr",
            "-subj",
            "/CN=ACME",
        ],
        p,
    );
    let chain = ca.issue(
        &p.join("delivered.csr"),
        SEID2,
        unix_now() - DAY,
        unix_now() + 300 * DAY,
    );
    std::fs::write(p.join("password"), "correct horse\n").expect("password file");
    let export = |out: &str, legacy: bool| {
        let mut args = vec![
            "pkcs12",
            "-export",
            "-inkey",
            "delivered.key",
            "-in",
            chain.to_str().expect("utf-8"),
            "-out",
            out,
            "-passout",
            "pass:correct horse",
        ];
        if legacy {
            args.push("-legacy");
        }
        let _ = openssl(&args, p);
    };
    export("modern.p12", false);
    export("legacy.p12", true);
    let import = |label: &str, file: &str, password: &str| {
        run(
            &dir,
            &[
                "key",
                "import-p12",
                "--label",
                label,
                "--password-file",
                &path(password),
                &path(file),
            ],
        )
    };

    let listing = ok(run(&dir, &["key", "list"]));
    let out = ok(import("p12-modern", "modern.p12", "password"));
    assert!(out.starts_with("imported RSA-2048 key \"p12-modern\" with 2 certificate(s) into the token: sensitive, never extractable"), "{out}");
    let out = ok(import("p12-legacy", "legacy.p12", "password"));
    assert!(out.contains("environment test"), "{out}");
    let err = fails(import("p12-modern", "modern.p12", "password"));
    assert!(
        err.contains("a key labelled \"p12-modern\" exists already"),
        "{err}"
    );

    // A wrong password or a damaged file: a clear error, and nothing written.
    std::fs::write(p.join("wrong"), "battery staple\n").expect("write");
    let before = ok(run(&dir, &["key", "list"]));
    let err = fails(import("bad", "modern.p12", "wrong"));
    assert!(
        err.contains("FILE: wrong password, or the file is damaged"),
        "{err}"
    );
    let err = fails(import("bad", "legacy.p12", "wrong"));
    assert!(
        err.contains("FILE: wrong password, or the file is damaged"),
        "{err}"
    );
    let mut damaged = std::fs::read(p.join("modern.p12")).expect("p12");
    damaged.truncate(damaged.len() / 2);
    std::fs::write(p.join("damaged.p12"), damaged).expect("write");
    let err = fails(import("bad", "damaged.p12", "password"));
    assert!(err.contains("FILE: "), "{err}");
    let err = fails(run(
        &dir,
        &["key", "import-p12", "--label", "bad", &path("modern.p12")],
    ));
    assert!(
        err.contains("--password-file: required when there is no terminal"),
        "{err}"
    );
    // Compare the keys and certificates, not the day counters, which may tick meanwhile.
    let identity = |listing: &str| -> Vec<String> {
        listing
            .lines()
            .filter(|l| l.starts_with("key ") || l.contains("sha256:"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        identity(&ok(run(&dir, &["key", "list"]))),
        identity(&before),
        "the failed imports wrote nothing"
    );
    assert!(
        before.contains("key \"p12-modern\" (id ")
            && before.contains("not extractable (imported: it existed outside the token before)"),
        "{before}"
    );
    assert!(!before.contains("\"bad\""));
    assert_ne!(before, listing);

    // Sensitive and not extractable from now on. The token truthfully does not claim
    // "always sensitive" or "never extractable": the key once lived in a file.
    let (flags, block) = common::private_key_access(p, "p12-legacy");
    assert!(flags.contains(&"sensitive".to_owned()), "{flags:?}");
    assert!(!flags.contains(&"extractable".to_owned()), "{flags:?}");
    assert!(
        !flags.contains(&"never extractable".to_owned()),
        "{flags:?}"
    );
    assert!(block.contains("Usage:      sign\n"), "{block}");

    // And it signs grants that verify against the delivered certificate.
    let delivered = read(&chain);
    let agent = serve_keys(
        dir,
        &[
            key_toml("default", "p12-modern", ""),
            key_toml("legacy", "p12-legacy", ""),
        ],
    );
    for key in ["default", "legacy"] {
        let grant = verify(&sign(&agent, key, "test").await.expect("signed"), TEST_AUD);
        let leaf_pem = &delivered[..delivered.find("-----END CERTIFICATE-----").expect("pem")];
        use base64::Engine;
        let b64: String = leaf_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        assert_eq!(
            grant.leaf_der,
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("pem body")
        );
    }
}

/// The chain is judged against `[trust]`, as Maskinporten judges it against its issuers:
/// valid up to a configured root; untrusted without one (a warning, the key still signs);
/// refused at start with `chain = "require"`. `cert check` prints the same and exits 1
/// when a key cannot sign.
#[tokio::test]
async fn the_chain_is_judged_against_the_configured_roots() {
    let dir = token();
    let now = unix_now();
    let ca = TestCa::new(dir.path(), "ca", BUYPASS_TEST);
    certified(&dir, "vs", &ca, SEID2, now - DAY, now + 30 * DAY);
    let agent_toml = dir.path().join("agent.toml");
    let check = || {
        run(
            &dir,
            &[
                "cert",
                "check",
                "--config",
                agent_toml.to_str().expect("utf-8"),
            ],
        )
    };

    // No test root configured: untrusted, and `cert check` says what to add.
    config(&dir, "agent.toml", &key_toml("default", "vs", ""));
    let out = ok(check());
    assert!(
        out.contains("key \"default\" (signs now, default)"),
        "{out}"
    );
    assert!(
        out.contains("  chain        untrusted: no root is trusted for test certificates; add the issuer's root to [trust] test_roots"),
        "{out}"
    );
    assert!(
        out.contains("  revocation   not checked: the certificate names no OCSP responder"),
        "{out}"
    );
    assert!(
        out.ends_with("verdict: 1 key name(s), each has a certificate that can sign now\n"),
        "{out}"
    );

    // chain = "require" refuses the key: `cert check`, `sign` and `serve` all stop.
    let require = format!(
        "{}[trust]\nchain = \"require\"\n",
        key_toml("default", "vs", "")
    );
    config(&dir, "agent.toml", &require);
    let err = fails(check());
    assert!(
        err.contains("key \"default\": the certificate chain is untrusted: no root is trusted for test certificates"),
        "{err}"
    );
    let err = fails(sign_a_b(&dir));
    assert!(err.contains("the certificate chain is untrusted"), "{err}");

    // The CA's root configured: valid, through ListKeys and `cert check`; the agent signs.
    let trusted = format!(
        "{}[trust]\ntest_roots = [\"ca/ca.pem\"]\nchain = \"require\"\n",
        key_toml("default", "vs", "")
    );
    config(&dir, "agent.toml", &trusted);
    let out = ok(check());
    assert!(
        out.contains("  chain        valid: leads to CN=Buypass Class 3 Test4 CA G2 ST Business"),
        "{out}"
    );
    let agent = DevAgent::serve(dir, "agent.toml");
    let keys = list(&agent).await;
    assert_eq!(keys[0].chain_status, "valid", "{keys:?}");
    assert!(
        keys[0]
            .chain_detail
            .starts_with("leads to CN=Buypass Class 3 Test4"),
        "{keys:?}"
    );
    assert_eq!(keys[0].revocation_status, "not_checked", "{keys:?}");
    assert!(sign(&agent, "", "test").await.is_ok());
}

/// A key's certificate under a test PKI with a live `openssl ocsp` responder and a CRL
/// served over HTTP (tests/common/ca.rs), end to end through the agent: checked before
/// serving and good; revoked at the CA and found by the check a reload starts, after which
/// the key no longer signs (FAILED_PRECONDITION naming the time and reason) and ListKeys,
/// health `key/default`, the metrics and `cert check` say so, while readiness stays
/// SERVING. With the responder and the CRL gone, a fresh agent only warns, and signs.
#[tokio::test]
async fn a_revoked_certificate_stops_its_key_and_an_unreachable_responder_only_warns() {
    let dir = token();
    let pki = ca::TestCa::new("Buypass Class 3 Test4 CA G2 ST Business");
    let crl = ca::HttpServer::start(ca::Behaviour::Serve(pki.crl(24))).await;
    let csr = key_with_csr(&dir, "vs", "rsa2048");
    let leaf = pki.issue_for(&csr, SEID2, &pki.ocsp_url(), &crl.url("/issuing.crl"));
    let chain = leaf.pem.to_str().expect("utf-8");
    let _ = ok(run(&dir, &["cert", "import", "--label", "vs", chain]));
    let responder = pki.responder(&pki.file("responder"), &[]);
    let settings = format!(
        "{}[trust]\ntest_roots = [{:?}]\nchain = \"require\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[audit]\nfile = \"audit.jsonl\"\n",
        key_toml("default", "vs", ""),
        pki.file("root.pem"),
    );
    config(&dir, "agent.toml", &settings);
    let agent = DevAgent::serve(dir, "agent.toml");

    let key = list(&agent).await.remove(0);
    assert_eq!(
        (key.chain_status.as_str(), key.revocation_status.as_str()),
        ("valid", "good"),
        "{key:?}"
    );
    assert!(key.revocation_checked_at > 0, "{key:?}");
    assert_eq!(
        key.revocation_last_good, key.revocation_checked_at,
        "{key:?}"
    );
    assert!(
        key.revocation_detail
            .starts_with(&format!("good (ocsp {}), checked ", pki.ocsp_url())),
        "{key:?}"
    );
    assert!(sign(&agent, "", "test").await.is_ok());
    assert_eq!(agent.health_of("key/default").await, 1, "SERVING");
    let metrics = common::http_get(agent.metrics_url()).await;
    assert!(
        metrics.contains("grant_agent_certificate_revoked{key=\"default\"")
            && metrics
                .contains("grant_agent_revocation_last_good_timestamp_seconds{key=\"default\""),
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "grant_agent_certificate_revoked{"), 0.0);

    // Revoked at the CA; the responder reads its database again at its start; a reload
    // checks at once.
    let revoked_at = pki.revoke(&leaf, "keyCompromise");
    drop(responder);
    let _responder = pki.responder(&pki.file("responder"), &[]);
    agent.signal("HUP");
    let key = wait_for_key(&agent, |k| k.revocation_status == "revoked").await;
    assert_eq!(
        (key.revoked_at, key.revocation_reason.as_str()),
        (revoked_at, "keyCompromise"),
        "{key:?}"
    );
    assert!(!key.active, "a revoked version is not the one that signs");
    let refused = sign(&agent, "", "test").await.expect_err("revoked");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let expected = format!(
        "key \"default\": its certificate was revoked on {} (reason keyCompromise; ocsp {})",
        grant_agent::agent::rfc3339(revoked_at),
        pki.ocsp_url()
    );
    assert!(
        refused.message().starts_with(&expected),
        "{}",
        refused.message()
    );
    assert_eq!(agent.health_of("key/default").await, 2, "NOT_SERVING");
    assert_eq!(
        agent.health().await,
        1,
        "readiness: the token itself is fine"
    );
    let metrics = common::http_get(agent.metrics_url()).await;
    assert_eq!(
        metric(&metrics, "grant_agent_certificate_revoked{"),
        1.0,
        "{metrics}"
    );
    assert!(
        agent
            .log()
            .contains("the certificate is revoked: this key no longer signs"),
        "{}",
        agent.log()
    );
    let audited = agent.wait_for_audit(|l| l["outcome"] == "refused");
    assert!(
        audited.is_some(),
        "the refusal is audited: {:?}",
        agent.audit_lines()
    );

    // `cert check` and `sign` from the same config refuse too (exit 1).
    let dir = agent.stop();
    let config_path = dir.path().join("agent.toml");
    let config_path = config_path.to_str().expect("utf-8");
    let out = run(&dir, &["cert", "check", "--config", config_path]);
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        printed.contains("  revocation   REVOKED on ") && printed.contains("reason keyCompromise"),
        "{printed}"
    );
    let err = fails(out);
    assert!(
        err.contains("verdict: 1 of 1 key name(s) cannot sign now: default"),
        "{err}"
    );
    let err = fails(sign_a_b(&dir));
    assert!(err.contains("its certificate was revoked on"), "{err}");

    // The responder and the CRL gone: a fresh agent warns, and signs.
    drop(_responder);
    drop(crl);
    let agent = DevAgent::serve(dir, "agent.toml");
    let key = list(&agent).await.remove(0);
    assert_eq!(key.revocation_status, "unreachable", "{key:?}");
    assert!(
        key.revocation_detail.contains(&pki.ocsp_url())
            && key.revocation_detail.contains("/issuing.crl"),
        "every place tried is named: {key:?}"
    );
    assert!(
        sign(&agent, "", "test").await.is_ok(),
        "an unreachable responder only warns"
    );
    assert!(
        agent.log().contains("revocation check got no answer"),
        "{}",
        agent.log()
    );
}

/// The first key version in ListKeys once `done` holds for it (up to a minute).
async fn wait_for_key(agent: &DevAgent, done: impl Fn(&KeyInfo) -> bool) -> KeyInfo {
    let until = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let key = list(agent).await.remove(0);
        if done(&key) || std::time::Instant::now() > until {
            return key;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of the first sample of `prefix` in a Prometheus text.
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

/// A hostile network at start-up: the certificate's OCSP responder and CRL point accept
/// the connection and never answer. The first check, which the agent makes before it
/// serves, gives up after `[revocation] timeout_seconds` for each, so the agent starts,
/// says why in ListKeys, and signs.
#[tokio::test]
async fn responders_that_never_answer_delay_start_up_by_the_timeout_only() {
    let dir = token();
    let pki = ca::TestCa::new("Buypass Class 3 Test4 CA G2 ST Business");
    let silent = ca::HttpServer::start(ca::Behaviour::Silent).await;
    let csr = key_with_csr(&dir, "vs", "rsa2048");
    let leaf = pki.issue_for(&csr, SEID2, &silent.url("/"), &silent.url("/issuing.crl"));
    let chain = leaf.pem.to_str().expect("utf-8");
    let _ = ok(run(&dir, &["cert", "import", "--label", "vs", chain]));
    let settings = format!(
        "{}[revocation]\ntimeout_seconds = 1\n",
        key_toml("default", "vs", "")
    );
    config(&dir, "agent.toml", &settings);
    let agent = DevAgent::serve(dir, "agent.toml");
    let key = list(&agent).await.remove(0);
    assert_eq!(key.revocation_status, "unreachable", "{key:?}");
    assert_eq!(
        key.revocation_detail
            .matches("no answer within 1000 ms")
            .count(),
        2,
        "the responder and the CRL point each timed out: {key:?}"
    );
    assert!(sign(&agent, "", "test").await.is_ok());
}
