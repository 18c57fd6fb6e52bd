//! The agent on a second PKCS#11 implementation: opencryptoki's soft token, set up by
//! `softhsm/opencryptoki.sh`. It lacks CKM_SHA256_RSA_PKCS, so every signature here goes
//! the DigestInfo way (hash in software, CKM_RSA_PKCS in the token), its token clock is
//! `HH:MM:SS` (which cryptoki cannot parse, so the agent reads the token's information
//! itself: the tests select the token by label and serial number), and it runs behind a
//! slot daemon.

#![allow(
    clippy::expect_used,
    reason = "a test that cannot go on should fail loudly"
)]

mod common;

use std::path::{Path, PathBuf};

use common::{BIN, DevAgent, TEST_AUD, TestCa, openssl, params, read, unix_now, verify};
use grant_agent::proto::{GrantParameters, SignGrantRequest};

/// The folder the setup script wrote; fails (never skips) when it has not run.
fn opencryptoki() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("GRANT_AGENT_OCK_DIR")
            .unwrap_or_else(|_| "/var/lib/grant-agent-test/opencryptoki".into()),
    );
    assert!(
        dir.join("config.toml").exists(),
        "opencryptoki is not set up: run `bash softhsm/opencryptoki.sh` (softhsm/test.sh does it for you)"
    );
    dir
}

fn run(config: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env("GRANT_AGENT_CONFIG", config)
        .output()
        .expect("grant-agent");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The label of the token `softhsm/opencryptoki.sh` sets up in slot 3.
const LABEL: &str = "grant-agent-test";

/// The setup script's config, with the PIN file where the script keeps it and the token
/// selected by `selector` (a `token_label`, `token_serial` or `slot_id` line).
fn config_selecting(ock: &Path, selector: &str) -> String {
    read(&ock.join("config.toml"))
        .replace(
            "pin_file = \"pin\"",
            &format!("pin_file = \"{}\"", ock.join("pin").display()),
        )
        .lines()
        .map(|l| {
            if ["slot_id", "token_label", "token_serial"]
                .iter()
                .any(|key| l.starts_with(key))
            {
                selector
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `grant-agent key list` with `config`: its exit status and stderr.
fn key_list(dir: &Path, config: &str) -> (bool, String) {
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).expect("config");
    let out = std::process::Command::new(BIN)
        .args(["key", "list"])
        .env("GRANT_AGENT_CONFIG", &path)
        .output()
        .expect("grant-agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// opencryptoki 3.8 writes its token clock as `HH:MM:SS`, which cryptoki cannot parse;
/// the agent reads the token's information without it, so a label it cannot find is
/// answered with the tokens that are there, never with "none".
#[test]
fn a_label_not_found_lists_the_opencryptoki_token() {
    let ock = opencryptoki();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_selecting(&ock, "token_label = \"no-such-token\"");
    let (ok, stderr) = key_list(dir.path(), &config);
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "no token labelled \"no-such-token\" (tokens present: \"{LABEL}\" (serial 123, slot 3));"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("none"), "{stderr}");
    assert!(!stderr.contains("cannot be read"), "{stderr}");
}

/// The serial number selects the token as well as the label does.
#[test]
fn the_serial_number_selects_the_opencryptoki_token() {
    let ock = opencryptoki();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_selecting(&ock, "token_serial = \"123\"");
    let (ok, stderr) = key_list(dir.path(), &config);
    assert!(ok, "{stderr}");
}

#[tokio::test]
async fn keys_csrs_certificates_and_grants_on_opencryptoki() {
    let ock = opencryptoki();
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path();
    // The token's settings, selecting it by label, with the PIN file where the setup
    // script keeps it.
    let token = config_selecting(&ock, &format!("token_label = \"{LABEL}\"")).replace(
        "unix_socket = \"agent.sock\"",
        "listen = \"127.0.0.1:0\"\ninsecure = true",
    );
    let config = p.join("agent.toml");
    std::fs::write(&config, &token).expect("config");

    // Keys made in opencryptoki, with labels of this run (the token is shared across runs).
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (rs256, rs512) = (format!("ga-{run_id}-256"), format!("ga-{run_id}-512"));
    let ca = TestCa::new(
        p,
        "ca",
        "/C=NO/O=Buypass AS-983163327/CN=Buypass Class 3 Test4 CA G2 ST Business",
    );
    for (label, key_type) in [(&rs256, "rsa2048"), (&rs512, "rsa3072")] {
        let _ = run(
            &config,
            &["key", "generate", "--label", label, "--type", key_type],
        );
        let csr = p.join(format!("{label}.csr"));
        let _ = run(&config, &common::csr_args(label, &csr));
        // The request was signed over a DigestInfo; openssl checks that signature.
        let out = openssl(
            &[
                "req",
                "-verify",
                "-noout",
                "-in",
                csr.to_str().expect("utf-8"),
            ],
            p,
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("verify OK"), "{text}");
        let chain = ca.issue(
            &csr,
            "/C=NO/organizationIdentifier=NTRNO-974760673/O=ACME AS/CN=ACME AS",
            unix_now() - 86_400,
            unix_now() + 86_400 * 30,
        );
        let _ = run(
            &config,
            &[
                "cert",
                "import",
                "--label",
                label,
                chain.to_str().expect("utf-8"),
            ],
        );
    }
    let listing = run(&config, &["key", "list"]);
    assert!(
        listing.contains(&format!("key \"{rs256}\""))
            && listing.contains("RSA-3072, sensitive, never extractable"),
        "{listing}"
    );

    let policy = "[[policy]]\ncaller = \"anonymous\"\nkeys = [\"*\"]\nclient_ids = [\"*\"]\nscopes = [\"*\"]\nenvironments = [\"*\"]\n";
    let keys = format!(
        "{policy}\n[[keys]]\nname = \"default\"\nlabel = \"{rs256}\"\ncertificate = \"token\"\n\n\
         [[keys]]\nname = \"strong\"\nlabel = \"{rs512}\"\ncertificate = \"token\"\nalgorithm = \"RS512\"\n"
    );
    std::fs::write(&config, format!("{token}\n{keys}")).expect("config");
    let agent = DevAgent::serve(dir, "agent.toml");
    let mut client = agent.client().await;
    for key in ["default", "strong"] {
        let grant = client
            .sign_grant(SignGrantRequest {
                grant: Some(GrantParameters {
                    key: key.into(),
                    ..params()
                }),
            })
            .await
            .expect("signed on opencryptoki")
            .into_inner();
        let verified = verify(&grant.assertion, TEST_AUD);
        assert_eq!(
            verified.header["alg"],
            if key == "strong" { "RS512" } else { "RS256" }
        );
        assert_eq!(verified.header["x5c"].as_array().expect("x5c").len(), 2);
    }
    let log = agent.log();
    assert!(
        log.contains("CKM_RSA_PKCS over a SHA-256 DigestInfo"),
        "the log says which path each key uses: {log}"
    );
    assert!(
        log.contains("CKM_RSA_PKCS over a SHA-512 DigestInfo"),
        "{log}"
    );
}
