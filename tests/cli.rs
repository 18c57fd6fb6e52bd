//! The command line and the token, as an operator meets them: `sign`, `dev`, config and
//! PIN errors, the key's attributes read back independently, and what the log holds.

#![allow(
    clippy::expect_used,
    reason = "a test that cannot go on should fail loudly"
)]

mod common;

use std::process::Output;

use common::{BIN, DevAgent, TEST_AUD, pem, read, verify};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `grant-agent ARGS` against the agent's token, without the server.
fn cli(agent: &DevAgent, args: &[&str]) -> Output {
    agent
        .command(BIN)
        .args(args)
        .output()
        .expect("run grant-agent")
}

fn sign_args<'a>(config: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "sign",
        "--config",
        config,
        "--client-id",
        "cli-client",
        "--scope",
        "test:one",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn sign_prints_one_verifiable_grant() {
    let agent = DevAgent::start();
    let config = agent.path("config.toml");
    let config = config.to_str().expect("utf-8 path");
    let out = cli(
        &agent,
        &sign_args(config, &["--scope", "test:two", "--env", "test"]),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let jws = stdout(&out);
    assert_eq!(jws.lines().count(), 1);
    let claims = verify(jws.trim_end(), TEST_AUD).claims;
    assert_eq!(claims["iss"], "cli-client");
    assert_eq!(claims["scope"], "test:one test:two");
}

#[test]
fn cli_errors_name_the_flag() {
    let agent = DevAgent::start();
    let config = agent.path("config.toml");
    let config = config.to_str().expect("utf-8 path");
    let cases: [(&[&str], &str); 7] = [
        (&["--scope", "test:a b"], "--scope: contains a space"),
        (
            &["--env", "staging"],
            "--env: \"staging\" is not a known environment",
        ),
        (
            &["--lifetime", "600"],
            "--lifetime: 600 is over the maximum of 120",
        ),
        (&["--key", "other"], "--key: no key is named \"other\""),
        (
            &["--consumer-org", "12345678"],
            "--consumer-org: must be a nine-digit",
        ),
        (&["--pid", "12345678901"], "--pid: must be an 11-digit"),
        (
            &["--iss-onbehalfof", "a b"],
            "--iss-onbehalfof: must be 1..=",
        ),
    ];
    for (extra, expected) in cases {
        let out = cli(&agent, &sign_args(config, extra));
        assert_eq!(out.status.code(), Some(1), "{extra:?}");
        assert!(stdout(&out).is_empty());
        assert!(
            stderr(&out).contains(&format!("grant-agent: error: {expected}")),
            "{extra:?}: {}",
            stderr(&out)
        );
    }
    let out = cli(&agent, &["sign", "--config", config, "--client-id", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--scope"), "{}", stderr(&out));

    // The files the key and cert commands read are checked before the token is opened.
    for command in [["cert", "import"], ["key", "import-p12"]] {
        let mut args = command.to_vec();
        args.extend(["--config", config, "--label", "k", "/nonexistent/file"]);
        let out = cli(&agent, &args);
        assert_eq!(out.status.code(), Some(1), "{command:?}");
        assert!(
            stderr(&out).contains("grant-agent: error: FILE /nonexistent/file: "),
            "{command:?}: {}",
            stderr(&out)
        );
    }

    let out = cli(&agent, &["serve", "--config", "/nonexistent/agent.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/nonexistent/agent.toml: cannot read the config file"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn dev_is_idempotent_and_keeps_its_key() {
    let agent = DevAgent::start();
    let first = read(&agent.path("config.toml"));
    let pin = read(&agent.path("pin"));
    let cert = export_certificate(&agent);
    let dir = agent.stop();

    let agent = DevAgent::start_in(dir);
    assert_eq!(read(&agent.path("pin")), pin);
    assert_eq!(
        export_certificate(&agent),
        cert,
        "same certificate, not a new one"
    );
    assert_eq!(
        first.replace(|c: char| c.is_ascii_digit(), ""),
        read(&agent.path("config.toml")).replace(|c: char| c.is_ascii_digit(), ""),
        "the config differs only in the port"
    );
    assert!(agent.log().contains("listening"));
    assert!(!agent.log().contains("generating"), "no second key");
}

/// A released binary knows nothing of the machine it was built on: without `--state-dir`,
/// `dev` keeps its state in `.dev` below the folder it runs in, as `softhsm/demo.sh` and the
/// README say, and its help names that default, not the build's project folder.
#[test]
fn dev_defaults_to_dev_in_the_current_folder_not_the_build_path() {
    let out = std::process::Command::new(BIN)
        .args(["dev", "--help"])
        .output()
        .expect("dev --help");
    assert!(out.status.success(), "{}", stderr(&out));
    let help = stdout(&out);
    assert!(help.contains("[default: .dev]"), "{help}");
    assert!(!help.contains(env!("CARGO_MANIFEST_DIR")), "{help}");

    common::require_softhsm();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = std::process::Command::new(BIN);
    let _ = command
        .args(["dev", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("SOFTHSM2_CONF");
    let agent = DevAgent::spawn(command, dir);
    let conf = read(&agent.path(".dev/softhsm2.conf"));
    let tokens = agent.path(".dev/tokens");
    assert!(conf.contains(&tokens.display().to_string()), "{conf}");
    assert!(agent.path(".dev/config.toml").is_file());
}

/// In a container `dev --listen 0.0.0.0:50051` must reach the host: `dev` alone may serve
/// plain TCP beyond loopback, says so in its log, and writes a config that keeps to
/// loopback, so `serve --config` on it (which refuses plain TCP elsewhere) stays local.
#[test]
fn dev_serves_beyond_loopback_with_a_warning_and_a_loopback_config() {
    common::require_softhsm();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = std::process::Command::new(BIN);
    let _ = command
        .args(["dev", "--listen", "0.0.0.0:0", "--state-dir"])
        .arg(dir.path())
        .env_remove("SOFTHSM2_CONF");
    let agent = DevAgent::spawn(command, dir);
    let port = agent
        .addr
        .strip_prefix("0.0.0.0:")
        .unwrap_or_else(|| panic!("listens on {}, not 0.0.0.0", agent.addr));
    assert!(
        agent.log().contains(
            "grant-agent dev: plain TCP beyond loopback, for development only: whoever reaches \
             this address gets grants from the throwaway dev token"
        ),
        "{}",
        agent.log()
    );
    assert!(
        read(&agent.path("config.toml")).contains("listen = \"127.0.0.1:0\"\n"),
        "{}",
        read(&agent.path("config.toml"))
    );

    let addr = format!("127.0.0.1:{port}");
    let out = cli(
        &agent,
        &[
            "client",
            "grant",
            "--addr",
            &addr,
            "--client-id",
            "c",
            "--scope",
            "test:s",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let claims = verify(stdout(&out).trim_end(), TEST_AUD).claims;
    assert_eq!(claims["iss"], "c");

    let check = cli(
        &agent,
        &[
            "check",
            "--config",
            agent.path("config.toml").to_str().expect("utf-8"),
        ],
    );
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(
        stdout(&check).contains("127.0.0.1:0 (insecure loopback)"),
        "{}",
        stdout(&check)
    );
}

/// The certificate object, read back with OpenSC's pkcs11-tool (independent of our code).
fn export_certificate(agent: &DevAgent) -> Vec<u8> {
    let out_file = agent.path("exported.der");
    let out = agent
        .command("pkcs11-tool")
        .args(["--module", &module(), "--token-label", "grant-agent"])
        .args([
            "--read-object",
            "--type",
            "cert",
            "--id",
            "01",
            "--output-file",
        ])
        .arg(&out_file)
        .output()
        .expect("pkcs11-tool (install it with: sudo apt-get install -y opensc)");
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::read(out_file).expect("exported certificate")
}

fn module() -> String {
    grant_agent::dev::softhsm_module()
        .expect("softhsm")
        .display()
        .to_string()
}

#[test]
fn the_private_key_is_sensitive_and_never_extractable() {
    let agent = DevAgent::start();
    let (flags, block) = common::private_key_access(agent.dir.path(), "virksomhetssertifikat");
    assert!(block.contains("; RSA"), "{block}");
    assert!(
        block.contains("Usage:      sign\n"),
        "signing only: {block}"
    );
    common::assert_generated_in_token(&flags);
}

/// Reads the key back through PKCS#11 itself. SoftHSM takes its token folder from the
/// environment at C_Initialize, so this test re-runs itself as a child process with the
/// dev token's SOFTHSM2_CONF (never changing this process's environment); the child
/// branch does the reading and asserting.
#[test]
fn the_token_refuses_to_reveal_or_wrap_the_private_key() {
    const PROBE: &str = "GRANT_AGENT_TEST_KEY_PROBE";
    if let Some(pin_file) = std::env::var_os(PROBE) {
        probe_key(&read(std::path::Path::new(&pin_file)));
        println!("key probe passed");
        return;
    }
    let agent = DevAgent::start();
    let out = agent
        .command(
            &std::env::current_exe()
                .expect("test binary")
                .display()
                .to_string(),
        )
        .args([
            "--exact",
            "the_token_refuses_to_reveal_or_wrap_the_private_key",
            "--nocapture",
        ])
        .env(PROBE, agent.path("pin"))
        .output()
        .expect("re-run the test binary");
    assert!(
        out.status.success() && stdout(&out).contains("key probe passed"),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
}

fn probe_key(pin: &str) {
    use cryptoki::{
        context::{CInitializeArgs, CInitializeFlags, Pkcs11},
        mechanism::Mechanism,
        object::{Attribute, AttributeType, ObjectClass},
        session::UserType,
        types::AuthPin,
    };
    let pkcs11 = Pkcs11::new(module()).expect("load SoftHSM");
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("initialize");
    let slot = pkcs11
        .get_slots_with_initialized_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            pkcs11
                .get_token_info(*s)
                .is_ok_and(|i| i.label() == "grant-agent")
        })
        .expect("the dev token");
    let session = pkcs11.open_rw_session(slot).expect("session");
    session
        .login(UserType::User, Some(&AuthPin::from(pin.to_owned())))
        .expect("login");
    let keys = session
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .expect("find");
    assert_eq!(keys.len(), 1);
    let attributes = session
        .get_attributes(
            keys[0],
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Private,
                AttributeType::Token,
                AttributeType::ModulusBits,
                AttributeType::Modulus,
            ],
        )
        .expect("attributes");
    let mut seen = 0;
    for attribute in &attributes {
        match attribute {
            Attribute::Sensitive(v)
            | Attribute::AlwaysSensitive(v)
            | Attribute::NeverExtractable(v)
            | Attribute::Private(v)
            | Attribute::Token(v) => {
                assert!(*v, "{attribute:?}");
                seen += 1;
            }
            Attribute::Extractable(v) => {
                assert!(!*v, "the key is extractable");
                seen += 1;
            }
            Attribute::Modulus(m) => {
                assert_eq!(m.len() * 8, 2048, "RSA-2048");
                seen += 1;
            }
            _ => {}
        }
    }
    assert_eq!(seen, 7, "{attributes:?}");
    // CKA_VALUE and CKA_PRIVATE_EXPONENT of a sensitive key are unavailable.
    let secret = session
        .get_attributes(
            keys[0],
            &[
                AttributeType::Value,
                AttributeType::PrivateExponent,
                AttributeType::Prime1,
            ],
        )
        .unwrap_or_default();
    assert!(
        secret.is_empty(),
        "secret parts were returned: {} attributes",
        secret.len()
    );
    // And the token will not wrap it out, even under a key of our choosing.
    let wrapping = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Wrap(true),
            ],
        )
        .expect("session AES key");
    let wrapped = session.wrap_key(&Mechanism::AesKeyWrapPad, wrapping, keys[0]);
    assert!(
        wrapped.is_err(),
        "the private key was wrapped out of the token"
    );
    drop(session);
    pkcs11.finalize().expect("finalize");
}

#[test]
fn a_pem_certificate_and_a_key_by_id_work_and_a_foreign_certificate_is_refused() {
    let agent = DevAgent::start();
    std::fs::write(agent.path("cert.pem"), pem(&export_certificate(&agent))).expect("write pem");
    let config = read(&agent.path("config.toml"))
        .replace("label = \"virksomhetssertifikat\"", "id = \"01\"")
        .replace("certificate = \"token\"", "certificate = \"cert.pem\"");
    let path = agent.path("pem.toml");
    std::fs::write(&path, config).expect("write config");
    let path = path.to_str().expect("utf-8");
    let out = cli(&agent, &sign_args(path, &[]));
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = verify(stdout(&out).trim_end(), TEST_AUD);

    // The certificate of another token's key does not match this token's key.
    let other = DevAgent::start();
    std::fs::write(agent.path("cert.pem"), pem(&export_certificate(&other))).expect("write pem");
    let out = cli(&agent, &sign_args(path, &[]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(
            "key \"default\": the certificate's public key is not the token key's public key"
        ),
        "{}",
        stderr(&out)
    );

    std::fs::write(agent.path("cert.pem"), "not a certificate").expect("write");
    let out = cli(&agent, &sign_args(path, &[]));
    assert!(
        stderr(&out).contains("key \"default\": no certificate found"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_wrong_pin_or_token_label_is_a_clear_error() {
    let agent = DevAgent::start();
    write_pin(&agent.path("wrong-pin"), "0000\n", 0o600);
    let config =
        read(&agent.path("config.toml")).replace("pin_file = \"pin\"", "pin_file = \"wrong-pin\"");
    std::fs::write(agent.path("wrong.toml"), config).expect("write");
    let out = cli(
        &agent,
        &sign_args(agent.path("wrong.toml").to_str().expect("utf-8"), &[]),
    );
    // EX_CONFIG, which the systemd unit does not restart on: the same PIN again would
    // count towards locking the token.
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("pkcs11: the token refused the user PIN (PinIncorrect)"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("0000"), "the PIN is not echoed");
    let served = agent
        .command(BIN)
        .args(["serve", "--config"])
        .arg(agent.path("wrong.toml"))
        .output()
        .expect("serve");
    assert_eq!(served.status.code(), Some(78), "{}", stderr(&served));
    let unit = read(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/systemd/grant-agent.service"
    )));
    assert!(unit.contains("\nRestartPreventExitStatus=78\n"), "{unit}");

    let config = read(&agent.path("config.toml"))
        .replace("token_label = \"grant-agent\"", "token_label = \"missing\"");
    std::fs::write(agent.path("label.toml"), config).expect("write");
    let out = cli(
        &agent,
        &sign_args(agent.path("label.toml").to_str().expect("utf-8"), &[]),
    );
    assert_eq!(out.status.code(), Some(1), "any other failure is 1");
    assert!(
        stderr(&out)
            .contains("no token labelled \"missing\" (tokens present: \"grant-agent\" (serial "),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn the_log_holds_neither_the_pin_nor_an_assertion() {
    let agent = DevAgent::start();
    let mut client = agent.client().await;
    let mut assertions = Vec::new();
    for _ in 0..5 {
        let r = client
            .sign_grant(grant_agent::proto::SignGrantRequest {
                grant: Some(common::params()),
            })
            .await
            .expect("signed");
        assertions.push(r.into_inner().assertion);
    }
    let mut bad = common::params();
    bad.scopes = vec!["test:x y".into()];
    let _ = client
        .sign_grant(grant_agent::proto::SignGrantRequest { grant: Some(bad) })
        .await
        .expect_err("refused");
    let log = agent
        .log_when(|l| l.contains(r#""outcome":"signed""#) && l.contains(r#""outcome":"refused""#));
    assert!(log.contains(r#""outcome":"signed""#), "{log}");
    assert!(log.contains(r#""outcome":"refused""#), "{log}");
    let pin = read(&agent.path("pin"));
    assert!(!log.contains(&pin), "the PIN is in the log");
    for assertion in &assertions {
        let signature = assertion.rsplit('.').next().expect("signature");
        assert!(!log.contains(signature), "an assertion is in the log");
    }
    assert!(!log.contains("eyJ"), "something JWT-like is in the log");
}

/// Writes a PIN file with `mode`.
fn write_pin(path: &std::path::Path, pin: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, pin).expect("write pin");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod pin");
}

#[test]
fn a_pin_file_others_may_read_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pin = dir.path().join("pin");
    write_pin(&pin, "123456\n", 0o644);
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "unix_socket = \"a.sock\"\n[pkcs11]\nmodule = \"/nonexistent.so\"\ntoken_label = \"t\"\npin_file = \"pin\"\n\
         [[keys]]\nname = \"default\"\nlabel = \"k\"\ncertificate = \"token\"\n",
    )
    .expect("write");
    let expected = format!(
        "grant-agent: error: {}: `pkcs11.pin_file`: {pin} is readable by group or others (mode 0644); run: chmod 600 {pin}\n",
        config.display(),
        pin = pin.display()
    );
    // `check` and `serve` refuse it before any module is loaded or socket bound.
    for command in ["check", "serve"] {
        let out = std::process::Command::new(BIN)
            .args([command, "--config"])
            .arg(&config)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(1), "{command}");
        assert_eq!(stderr(&out), expected, "{command}");
        assert!(!stderr(&out).contains("123456"), "the PIN is not shown");
    }
    assert!(!dir.path().join("a.sock").exists(), "nothing was bound");
    // The fix it names works.
    let fix = std::process::Command::new("chmod")
        .arg("600")
        .arg(&pin)
        .status()
        .expect("chmod");
    assert!(fix.success());
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("check");
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The agent's binary carries no test server: the local Maskinporten is a binary of its
/// own (`mock-maskinporten`), so neither `--help` nor the subcommand exists here.
#[test]
fn help_lists_the_commands_and_no_mock() {
    let out = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .expect("help");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for command in ["serve", "check", "sign", "dev", "client", "key", "cert"] {
        assert!(
            text.contains(&format!("\n  {command} ")),
            "{command}: {text}"
        );
    }
    assert!(!text.to_lowercase().contains("mock"), "{text}");

    let out = std::process::Command::new(BIN)
        .args(["mock-maskinporten", "--help"])
        .output()
        .expect("mock-maskinporten");
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("unrecognized subcommand 'mock-maskinporten'"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn version_names_the_build_and_check_validates_without_a_token() {
    let out = std::process::Command::new(BIN)
        .arg("--version")
        .output()
        .expect("version");
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!(
            "grant-agent {}\ncommit ",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    assert!(text.contains("rustc "), "{text}");

    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "unix_socket = \"a.sock\"\n[pkcs11]\nmodule = \"/nonexistent.so\"\ntoken_label = \"t\"\npin_env = \"UNSET\"\n\
         [[keys]]\nname = \"default\"\nlabel = \"k\"\ncertificate = \"token\"\n",
    )
    .expect("write");
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .expect("check");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out)
            .contains("valid: 1 key name(s) (1 version(s)), 0 policy rule(s), listeners: unix:"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("WARNING: no policy rules"),
        "{}",
        stdout(&out)
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        read(&good).replace("unix_socket = \"a.sock\"", "listen = \"0.0.0.0:1\""),
    )
    .expect("write");
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .expect("check");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("`listen`: 0.0.0.0:1 is not a loopback address"),
        "{}",
        stderr(&out)
    );
    // The token endpoint's trust anchors are read too, so a restart will not fail on them.
    let no_ca = dir.path().join("no-ca.toml");
    std::fs::write(
        &no_ca,
        read(&good) + "[token]\nca_file = \"missing-ca.pem\"\n",
    )
    .expect("write");
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&no_ca)
        .output()
        .expect("check");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("token.ca_file") && stderr(&out).contains("missing-ca.pem"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_token_can_be_chosen_by_serial_number() {
    let agent = DevAgent::start();
    let slots = agent
        .command("softhsm2-util")
        .arg("--show-slots")
        .output()
        .expect("softhsm2-util (sudo apt-get install -y softhsm2)");
    let listing = stdout(&slots);
    let serial = listing
        .lines()
        .find_map(|l| l.trim().strip_prefix("Serial number:"))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| panic!("no serial in {listing}"))
        .to_owned();
    let config = read(&agent.path("config.toml")).replace(
        "token_label = \"grant-agent\"",
        &format!("token_serial = \"{serial}\""),
    );
    std::fs::write(agent.path("serial.toml"), config).expect("config");
    let out = cli(
        &agent,
        &sign_args(agent.path("serial.toml").to_str().expect("utf-8"), &[]),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = verify(stdout(&out).trim_end(), TEST_AUD);

    let config = read(&agent.path("config.toml")).replace(
        "token_label = \"grant-agent\"",
        "token_serial = \"0000000000000000\"",
    );
    std::fs::write(agent.path("wrong-serial.toml"), config).expect("config");
    let out = cli(
        &agent,
        &sign_args(
            agent.path("wrong-serial.toml").to_str().expect("utf-8"),
            &[],
        ),
    );
    assert!(
        stderr(&out).contains("no token with serial number \"0000000000000000\" (tokens present: \"grant-agent\" (serial "),
        "{}",
        stderr(&out)
    );
}

/// `[health] listen` is checked with the rest: a good address is listed, a bad one named.
#[test]
fn check_lists_the_health_port_and_names_a_bad_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |health: &str| {
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            format!(
                "unix_socket = \"a.sock\"\n[health]\nlisten = \"{health}\"\n\
                 [pkcs11]\nmodule = \"/nonexistent.so\"\ntoken_label = \"t\"\npin_env = \"UNSET\"\n\
                 [[keys]]\nname = \"default\"\nlabel = \"k\"\ncertificate = \"token\"\n"
            ),
        )
        .expect("write");
        std::process::Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("check")
    };
    let out = config("0.0.0.0:8081");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("0.0.0.0:8081 (health)"),
        "{}",
        stdout(&out)
    );
    let out = config("everywhere:8081");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(
            "`health.listen`: \"everywhere:8081\" is not an IP address and port; write it as \"127.0.0.1:8081\""
        ),
        "{}",
        stderr(&out)
    );
}

/// A pid file in a folder that does not exist is refused, naming the flag, before the
/// config is read or the token opened: a typo must not surface only when spiffe-helper
/// finds no pid to signal.
#[test]
fn serve_refuses_a_pid_file_in_a_missing_folder() {
    let out = std::process::Command::new(BIN)
        .args(["serve", "--config", "/nonexistent/agent.toml"])
        .args(["--pid-file", "/nonexistent/run/agent.pid"])
        .output()
        .expect("serve");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--pid-file /nonexistent/run/agent.pid: its folder does not exist"),
        "{err}"
    );
    assert!(
        !err.contains("agent.toml"),
        "checked before the config: {err}"
    );
}

/// A `[tracing]` section that cannot work stops `check` and `serve` before any module is
/// loaded or socket bound, naming the key.
#[test]
fn a_bad_tracing_section_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_pin(&dir.path().join("pin"), "123456\n", 0o600);
    let config = dir.path().join("agent.toml");
    let base = "unix_socket = \"a.sock\"\n[pkcs11]\nmodule = \"/nonexistent.so\"\ntoken_label = \"t\"\n\
                pin_file = \"pin\"\n[[keys]]\nname = \"default\"\nlabel = \"k\"\ncertificate = \"token\"\n";
    for (tracing, key) in [
        (
            "otlp_endpoint = \"collector:4317\"",
            "tracing.otlp_endpoint",
        ),
        (
            "otlp_endpoint = \"http://127.0.0.1:4317\"\nsample_ratio = 2.0",
            "tracing.sample_ratio",
        ),
    ] {
        std::fs::write(&config, format!("{base}[tracing]\n{tracing}\n")).expect("write");
        for command in ["check", "serve"] {
            let out = std::process::Command::new(BIN)
                .args([command, "--config"])
                .arg(&config)
                .output()
                .expect("run");
            assert_eq!(out.status.code(), Some(1), "{command}");
            let prefix = format!("grant-agent: error: {}: `{key}`: ", config.display());
            assert!(
                stderr(&out).starts_with(&prefix),
                "{command}: {}",
                stderr(&out)
            );
        }
    }
    assert!(!dir.path().join("a.sock").exists(), "nothing was bound");
}
