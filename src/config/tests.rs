//! The config module's tests: every section, through `Config::from_toml_str`.

use std::path::{Path, PathBuf};

use super::*;
use crate::{grant::Algorithm, hsm::TokenSelector};

const GOOD: &str = r#"
listen = "127.0.0.1:50051"
insecure = true
[pkcs11]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "grant-agent"
pin_file = "/run/secrets/hsm-pin"
[[keys]]
name = "default"
label = "virksomhetssertifikat"
certificate = "token"
"#;

fn err(text: &str) -> String {
    Config::from_toml_str(text, "agent.toml")
        .expect_err("config should be refused")
        .to_string()
}

#[test]
fn the_issue_example_parses() {
    let c = Config::from_toml_str(GOOD, "agent.toml").expect("valid");
    assert_eq!(
        c.access.listen,
        Some("127.0.0.1:50051".parse().expect("addr"))
    );
    assert!(c.access.insecure);
    assert!(c.access.policy.is_empty());
    assert_eq!(c.pkcs11.pin, PinSource::File("/run/secrets/hsm-pin".into()));
    assert_eq!(
        c.keys[0].locator,
        KeyLocator::Label("virksomhetssertifikat".into())
    );
    assert_eq!(
        c.keys[0].binding,
        KeyBinding::Certificate {
            source: CertificateSource::Token,
            environment: None
        }
    );
    assert!(!c.keys[0].allow_environment_mismatch);
    assert_eq!(c.expiry_warning_days, 30);
    assert_eq!(c.keys[0].algorithm, Algorithm::Rs256);
    assert_eq!(c.default_key, "default");
    let test = c.environment("test").expect("built in");
    assert_eq!(test.audience, "https://test.maskinporten.no/");
    assert_eq!(test.certificates, CertEnvironment::Test);
    let prod = c.environment("prod").expect("built in");
    assert_eq!(prod.audience, "https://maskinporten.no/");
    assert_eq!(prod.certificates, CertEnvironment::Production);
    assert_eq!(c.environment("staging"), None);
}

#[test]
fn relative_paths_resolve_against_the_config_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    let text = GOOD.replace("/run/secrets/hsm-pin", "pin");
    std::fs::write(&path, text).expect("write");
    let c = Config::load(&path).expect("valid");
    assert_eq!(c.pkcs11.pin, PinSource::File(dir.path().join("pin")));
}

fn write_pin(dir: &Path, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let pin = dir.join("pin");
    std::fs::write(&pin, "1234\n").expect("pin");
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(mode)).expect("chmod");
    pin
}

#[test]
fn a_pin_file_group_or_others_may_read_is_refused_at_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, GOOD.replace("/run/secrets/hsm-pin", "pin")).expect("write");
    // Not there yet: left to the read, which names the file.
    assert!(Config::load(&path).is_ok());
    let pin = write_pin(dir.path(), 0o644);
    let expected = format!(
        "{}: `pkcs11.pin_file`: {pin} is readable by group or others (mode 0644); run: chmod 600 {pin}",
        path.display(),
        pin = pin.display()
    );
    let e = Config::load(&path).expect_err("refused");
    assert_eq!(e.to_string(), expected);
    let e = Config::load_token_settings(&path).expect_err("refused");
    assert_eq!(e.to_string(), expected);
    for mode in [0o600, 0o400] {
        let _ = write_pin(dir.path(), mode);
        assert!(Config::load(&path).is_ok(), "mode {mode:o}");
    }
}

#[test]
fn key_by_id_and_named_environments() {
    let text = GOOD.replace("label = \"virksomhetssertifikat\"", "id = \"0a1B\"")
        + "default_environment = \"staging\"\n[environments.staging]\naudience = \"http://127.0.0.1:8080/\"\n";
    // default_environment must sit before the tables; move it to the top.
    let text = format!(
        "default_environment = \"staging\"\n{}",
        text.replace("default_environment = \"staging\"\n", "")
    );
    let c = Config::from_toml_str(&text, "agent.toml").expect("valid");
    assert_eq!(c.keys[0].locator, KeyLocator::Id(vec![0x0a, 0x1b]));
    assert_eq!(
        c.environment("staging"),
        Some(EnvironmentConfig {
            audience: "http://127.0.0.1:8080/".into(),
            certificates: CertEnvironment::Test,
            token_endpoint: TokenEndpoint::Url("http://127.0.0.1:8080/token".into()),
        })
    );
    assert_eq!(
        c.environment_names(),
        ["prod", "sky", "sky-test", "staging", "test"]
    );
    assert_eq!(
        c.environment("prod").map(|e| e.token_endpoint),
        Some(TokenEndpoint::Url("https://maskinporten.no/token".into()))
    );
    assert_eq!(
        c.environment("test").map(|e| e.token_endpoint),
        Some(TokenEndpoint::Url(
            "https://test.maskinporten.no/token".into()
        ))
    );
    assert_eq!(c.token, TokenSettings::default());
}

#[test]
fn skyporten_is_built_in_with_its_issuers_exactly() {
    let c = Config::from_toml_str(GOOD, "agent.toml").expect("valid");
    // No trailing slash: the grant's aud must be Skyporten's issuer as published.
    assert_eq!(
        c.environment("sky-test"),
        Some(EnvironmentConfig {
            audience: "https://test.sky.maskinporten.no".into(),
            certificates: CertEnvironment::Test,
            token_endpoint: TokenEndpoint::Discover,
        })
    );
    assert_eq!(
        c.environment("sky"),
        Some(EnvironmentConfig {
            audience: "https://sky.maskinporten.no".into(),
            certificates: CertEnvironment::Production,
            token_endpoint: TokenEndpoint::Discover,
        })
    );
    // A config may still name its own "sky", and may default to a built-in one.
    let own = format!(
        "default_environment = \"sky-test\"\n{GOOD}[environments.sky]\nissuer = \"https://sky.example/\"\n"
    );
    let c = Config::from_toml_str(&own, "agent.toml").expect("valid");
    assert_eq!(
        c.environment("sky").map(|e| e.audience),
        Some("https://sky.example/".into())
    );
    assert_eq!(c.default_environment.as_deref(), Some("sky-test"));
    let unknown = format!("default_environment = \"skyport\"\n{GOOD}");
    let error = Config::from_toml_str(&unknown, "agent.toml")
        .expect_err("unknown")
        .to_string();
    assert!(error.contains("\"sky-test\", \"sky\""), "{error}");
}

#[test]
fn token_endpoints_and_token_settings() {
    let env = |body: &str| format!("[environments.mock]\n{body}\n");
    let c = Config::from_toml_str(
        &format!(
            "{GOOD}{}[token]\nproxy = \"http://proxy.example.no:3128\"\nno_proxy = \"localhost\"\nca_file = \"ca.pem\"\ntimeout_seconds = 5\nattempts = 2\nexpiry_margin_seconds = 10\nrefresh_ahead_seconds = 20\ncache_entries = 50\n",
            env("issuer = \"http://127.0.0.1:9000/\"\ndiscover = true")
        ),
        "agent.toml",
    )
    .expect("valid");
    assert_eq!(
        c.environment("mock").map(|e| e.token_endpoint),
        Some(TokenEndpoint::Discover)
    );
    assert_eq!(c.token.ca_file, Some(PathBuf::from("./ca.pem")));
    assert_eq!(c.token.timeout, std::time::Duration::from_secs(5));
    assert_eq!(c.token.attempts, 2);
    assert_eq!(c.token.cache_entries, 50);
    let cases = [
        (
            env("audience = \"https://mp.example/\"\ntoken_endpoint = \"http://mp.example/token\""),
            "`environments.mock.token_endpoint`: \"http://mp.example/token\" is plain HTTP to another host",
        ),
        (
            env(
                "audience = \"https://mp.example/\"\ntoken_endpoint = \"https://mp.example/token\"\ndiscover = true",
            ),
            "`environments.mock.discover`: is set together with token_endpoint",
        ),
        (
            env("audience = \"http://mp.example/\"\ndiscover = true"),
            "`environments.mock.audience`: \"http://mp.example/\" is plain HTTP",
        ),
        (
            "[token]\nproxy = \"proxy:3128\"\n".into(),
            "`token.proxy`: \"proxy:3128\" is not an http(s) proxy URL",
        ),
        (
            "[token]\nattempts = 0\n".into(),
            "`token.attempts`: 0 is out of range",
        ),
        (
            "[token]\ntimeout_seconds = 0\n".into(),
            "`token.timeout_seconds`: 0 is out of range",
        ),
        (
            "[token]\ncache_entries = 0\n".into(),
            "`token.cache_entries`: 0 is out of range",
        ),
        ("[token]\nretries = 3\n".into(), "unknown field `retries`"),
    ];
    for (text, expected) in cases {
        let e = err(&format!("{GOOD}{text}"));
        assert!(e.contains(expected), "{e:?} should contain {expected:?}");
    }
}

#[test]
fn errors_name_the_file_the_key_and_the_fix() {
    assert_eq!(
        err(&GOOD.replace("pin_file = \"/run/secrets/hsm-pin\"\n", "")),
        "agent.toml: `pkcs11`: has neither pin_file nor pin_env; add pin_file = \"/run/secrets/hsm-pin\" or pin_env = \"GRANT_AGENT_PIN\""
    );
    assert_eq!(
        err(&GOOD.replace("label = \"virksomhetssertifikat\"\n", "")),
        "agent.toml: `keys[0].label`: exactly one of label and id must be set (and not empty); find the key by its CKA_LABEL (label = \"...\") or its CKA_ID (id = \"01\")"
    );
    assert!(
        err(&GOOD.replace("127.0.0.1:50051", "localhost")).starts_with("agent.toml: `listen`:")
    );
    assert!(err(&(GOOD.to_owned() + "algorithm = \"ES256\"\n")).contains("`keys[0].algorithm`"));
    assert!(
        err(&GOOD.replace("label = \"virksomhetssertifikat\"", "id = \"xyz\""))
            .contains("`keys[0].id`")
    );
    assert!(err(&GOOD.replace("[pkcs11]", "[pkcs11]\nsessions = 0")).contains("`pkcs11.sessions`"));
    assert!(err(&format!("default_key = \"nope\"\n{GOOD}")).contains("`default_key`"));
    assert!(err(&(GOOD.to_owned() + "[audit]\ncached = \"never\"\n")).contains("`audit.cached`"));
    assert!(
        err(&(GOOD.to_owned() + "[audit]\nsummary_seconds = 0\n"))
            .contains("`audit.summary_seconds`")
    );
    let each = Config::from_toml_str(&(GOOD.to_owned() + "[audit]\ncached = \"each\"\n"), "a")
        .expect("valid");
    assert_eq!(each.access.audit_cached, CachedAudit::Each);
    let default = Config::from_toml_str(GOOD, "a").expect("valid");
    assert_eq!(
        default.access.audit_cached,
        CachedAudit::Summary(std::time::Duration::from_secs(60))
    );
    assert!(!default.access.audit_fail_closed, "fail open unless asked");
    let closed = Config::from_toml_str(&(GOOD.to_owned() + "[audit]\nfail_closed = true\n"), "a")
        .expect("valid");
    assert!(closed.access.audit_fail_closed);
    assert!(err(&(GOOD.to_owned() + "[audit]\nfail_closed = \"yes\"\n")).contains("fail_closed"));
    assert!(
        err(&format!("default_environment = \"nope\"\n{GOOD}")).contains("`default_environment`")
    );
    let twice = GOOD.to_owned()
        + "[[keys]]\nname = \"other\"\nlabel = \"virksomhetssertifikat\"\ncertificate = \"token\"\n";
    assert!(
        err(&twice)
            .contains("`keys[1].label`: the same token key is configured again (as \"default\")"),
        "{}",
        err(&twice)
    );
    assert!(
        err(&GOOD.replace("certificate = \"token\"", ""))
            .contains("`keys[0].certificate`: is missing")
    );
    assert!(
        err(&(GOOD.to_owned() + "kid = \"k\"\n"))
            .contains("`keys[0].kid`: is set together with certificate")
    );
    assert!(
        err(&(GOOD.to_owned() + "certificate_environment = \"staging\"\n"))
            .contains("`keys[0].certificate_environment`")
    );
    assert!(
        err(&(GOOD.to_owned() + "not_after = 2027-01-01T00:00:00Z\n"))
            .contains("`keys[0].not_after`: is only for kid keys")
    );
    assert!(err(&format!("expiry_warning_days = 5000\n{GOOD}")).contains("`expiry_warning_days`"));
}

#[test]
fn versions_kid_keys_and_overrides() {
    let text = format!(
        "expiry_warning_days = 60\n{GOOD}certificate_environment = \"prod\"\nallow_environment_mismatch = true\n\
         [[keys]]\nname = \"default\"\nlabel = \"renewed\"\ncertificate = \"renewed.pem\"\n\
         [[keys]]\nname = \"registered\"\nid = \"02\"\nkid = \"my-key-2026\"\nalgorithm = \"RS512\"\n\
         not_before = 2026-01-01T00:00:00Z\nnot_after = 2026-12-31T23:00:00-01:00\n"
    );
    let c = Config::from_toml_str(&text, "agent.toml").expect("valid");
    assert_eq!(c.expiry_warning_days, 60);
    assert_eq!(c.keys.len(), 3);
    assert_eq!(c.keys[0].name, c.keys[1].name, "two versions of one key");
    assert!(c.keys[0].allow_environment_mismatch);
    assert_eq!(
        c.keys[0].binding,
        KeyBinding::Certificate {
            source: CertificateSource::Token,
            environment: Some(CertEnvironment::Production)
        }
    );
    assert_eq!(
        c.keys[1].binding,
        KeyBinding::Certificate {
            source: CertificateSource::PemFile("./renewed.pem".into()),
            environment: None
        }
    );
    assert_eq!(
        c.keys[2].binding,
        KeyBinding::Kid {
            kid: "my-key-2026".into(),
            not_before: Some(1_767_225_600),
            not_after: Some(1_767_225_600 + 365 * 86_400),
        }
    );
    assert_eq!(c.keys[2].algorithm, Algorithm::Rs512);

    let early = text.replace(
        "not_before = 2026-01-01T00:00:00Z",
        "not_before = 1969-12-31",
    );
    assert!(
        err(&early).contains("`keys[2].not_before`: 1969-12-31 is not a time from 1970 to 9999")
    );
}

#[test]
fn listeners_without_caller_identity_are_refused() {
    let no_insecure = GOOD.replace("insecure = true\n", "");
    assert!(err(&no_insecure).contains(
        "`listen`: 127.0.0.1:50051 would serve plain TCP, where callers cannot be identified"
    ));
    let public = GOOD.replace("127.0.0.1:50051", "0.0.0.0:50051");
    assert!(
        err(&public)
            .contains("`listen`: 0.0.0.0:50051 is not a loopback address, and there is no [tls]")
    );
    let tls = no_insecure.replace("[pkcs11]", "[tls]\ncertificate = \"s.pem\"\nkey = \"s.key\"\nclient_ca = \"ca.pem\"\ncaller_identity = \"subject_cn\"\n[pkcs11]")
        .replace("127.0.0.1:50051", "0.0.0.0:50051");
    let c = Config::from_toml_str(&tls, "agent.toml").expect("mutual TLS on any address");
    let t = c.access.tls.expect("tls");
    assert_eq!(t.caller_identity, IdentityField::SubjectCn);
    assert_eq!(t.client_ca, PathBuf::from("./ca.pem"));
    let both = tls.replace("listen =", "insecure = true\nlisten =");
    assert!(err(&both).contains("`insecure`: is set together with [tls]"));

    let unix = format!(
        "unix_socket = \"/run/ga.sock\"\n{}",
        no_insecure.replace("listen = \"127.0.0.1:50051\"\n", "")
    );
    let c = Config::from_toml_str(&unix, "agent.toml").expect("unix socket only");
    assert_eq!(c.access.listen, None);
    assert_eq!(c.access.unix_socket.as_ref().map(|u| u.mode), Some(0o660));
    let open = unix.replace("unix_socket", "socket_mode = \"0666\"\nunix_socket");
    assert!(err(&open).contains("`socket_mode`"));
}

#[test]
fn policy_rules_are_checked() {
    let rule = |body: &str| format!("{GOOD}[[policy]]\n{body}\n");
    let c = Config::from_toml_str(
        &rule("caller = \"uid:1000\"\nkeys = [\"default\"]\nscopes = [\"nav:*\", \"skatteetaten:mva\"]\nrequests_per_second = 5"),
        "agent.toml",
    )
    .expect("valid");
    let p = &c.access.policy[0];
    assert_eq!(p.caller, "uid:1000");
    assert_eq!((p.requests_per_second, p.burst), (5, 5));
    assert!(p.scopes[0].matches("nav:aareg/v1"));
    assert!(!p.scopes[0].matches("navx:a"));
    assert!(p.scopes[1].matches("skatteetaten:mva"));
    assert!(!p.scopes[1].matches("skatteetaten:mva.read"));
    assert!(p.client_ids.is_empty(), "nothing allowed unless listed");
    assert!(
        err(&rule("caller = \"root\"")).contains("`policy[0].caller`: \"root\" is not a caller")
    );
    assert!(err(&rule("caller = \"uid:x\"")).contains("`policy[0].caller`"));
    assert!(
        err(&rule("caller = \"cn:a\"\nscopes = [\"a*b\"]"))
            .contains("`policy[0].scopes`: \"a*b\" is not a pattern")
    );
    let c = Config::from_toml_str(
        &rule("caller = \"uid:1000\"\nresources = [\"https://api.example.no/*\"]"),
        "agent.toml",
    )
    .expect("valid");
    assert!(c.access.policy[0].resources[0].matches("https://api.example.no/v1"));
    assert!(!c.access.policy[0].resources[0].matches("https://api.example.com/"));
    assert!(
        err(&rule("caller = \"cn:a\"\nresources = [\"https://*/x\"]"))
            .contains("`policy[0].resources`: \"https://*/x\" is not a pattern")
    );
    assert!(
        err(&rule("caller = \"cn:a\"\nrequests_per_second = 0"))
            .contains("`policy[0].requests_per_second`")
    );
    let anonymous = rule("caller = \"anonymous\"")
        .replace("insecure = true\n", "unix_socket = \"/s\"\n")
        .replace("listen = \"127.0.0.1:50051\"\n", "");
    assert!(err(&anonymous).contains("anonymous callers exist only with insecure = true"));
}

#[test]
fn token_settings_load_without_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    let pkcs11_only = GOOD[..GOOD.find("[[keys]]").expect("keys")].to_owned();
    std::fs::write(&path, &pkcs11_only).expect("write");
    assert!(Config::load(&path).is_err(), "serving needs a key");
    let token = Config::load_token_settings(&path).expect("token settings");
    assert_eq!(token.token, TokenSelector::Label("grant-agent".into()));
}

#[test]
fn unknown_keys_and_a_pin_on_the_command_line_are_refused() {
    let e = err(&GOOD.replace("pin_file", "pin"));
    assert!(e.starts_with("agent.toml: "), "{e}");
    assert!(e.contains("unknown field `pin`"), "{e}");
}

#[test]
fn the_health_port_is_off_unless_set_and_its_address_is_checked() {
    let c = Config::from_toml_str(GOOD, "agent.toml").expect("valid");
    assert_eq!(c.health_listen, None);
    let text = format!("{GOOD}[health]\nlisten = \"0.0.0.0:8081\"\n");
    let c = Config::from_toml_str(&text, "agent.toml").expect("valid");
    assert_eq!(c.health_listen, Some("0.0.0.0:8081".parse().expect("addr")));
    assert_eq!(
        err(&format!("{GOOD}[health]\nlisten = \":8081\"\n")),
        "agent.toml: `health.listen`: \":8081\" is not an IP address and port; write it as \"127.0.0.1:8081\""
    );
    assert!(err(&format!("{GOOD}[health]\nport = 8081\n")).contains("unknown field `port`"));
}

#[test]
fn tracing_is_off_unless_set_and_its_values_are_checked() {
    let c = Config::from_toml_str(GOOD, "agent.toml").expect("valid");
    assert_eq!(c.tracing, None);
    let text = format!("{GOOD}[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"\n");
    let c = Config::from_toml_str(&text, "agent.toml").expect("valid");
    assert_eq!(
        c.tracing,
        Some(TracingSettings {
            otlp_endpoint: "http://127.0.0.1:4317".into(),
            service_name: "grant-agent".into(),
            sample_ratio: 1.0,
            export_timeout: std::time::Duration::from_secs(10),
        })
    );
    let text = format!(
        "{GOOD}[tracing]\notlp_endpoint = \"https://otel.example.no\"\nservice_name = \"agent-a\"\nsample_ratio = 0.25\nexport_timeout_seconds = 3\n"
    );
    let c = Config::from_toml_str(&text, "agent.toml").expect("valid");
    let tracing = c.tracing.expect("tracing");
    assert_eq!(
        (tracing.service_name.as_str(), tracing.sample_ratio),
        ("agent-a", 0.25)
    );
    assert_eq!(
        err(&format!(
            "{GOOD}[tracing]\notlp_endpoint = \"127.0.0.1:4317\"\n"
        )),
        "agent.toml: `tracing.otlp_endpoint`: \"127.0.0.1:4317\" is not an http:// or https:// address with a host; write it as \"http://127.0.0.1:4317\" (the collector's OTLP/gRPC port)"
    );
    for bad in [
        "grpc://collector:4317",
        "http://",
        "http://collector:4317/v1/traces",
    ] {
        let e = err(&format!("{GOOD}[tracing]\notlp_endpoint = \"{bad}\"\n"));
        assert!(
            e.starts_with("agent.toml: `tracing.otlp_endpoint`: "),
            "{e}"
        );
    }
    assert!(
        err(&format!("{GOOD}[tracing]\nservice_name = \"a\"\n"))
            .starts_with("agent.toml: `tracing.otlp_endpoint`: is required")
    );
    for ratio in ["1.5", "-0.1", "nan"] {
        let e = err(&format!(
            "{GOOD}[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"\nsample_ratio = {ratio}\n"
        ));
        assert!(e.starts_with("agent.toml: `tracing.sample_ratio`: "), "{e}");
    }
    let e = err(&format!(
        "{GOOD}[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"\nexport_timeout_seconds = 0\n"
    ));
    assert!(
        e.starts_with("agent.toml: `tracing.export_timeout_seconds`: "),
        "{e}"
    );
    assert!(
        err(&format!(
            "{GOOD}[tracing]\nendpoint = \"http://127.0.0.1:4317\"\n"
        ))
        .contains("unknown field `endpoint`")
    );
}

#[test]
fn trust_and_revocation_settings() {
    let c = Config::from_toml_str(GOOD, "agent.toml").expect("valid");
    assert!(!c.trust.require_chain, "chain = \"warn\" by default");
    assert_eq!(c.revocation, crate::config::RevocationSettings::default());
    assert!(c.revocation.enabled);
    assert_eq!(
        c.trust
            .store
            .roots(crate::cert::CertEnvironment::Production)
            .len(),
        1,
        "the shipped Buypass Class 3 Root CA"
    );
    assert!(
        c.trust
            .store
            .roots(crate::cert::CertEnvironment::Test)
            .is_empty()
    );

    let dir = tempfile::tempdir().expect("dir");
    let root = dir.path().join("root.pem");
    std::fs::write(
        &root,
        include_bytes!("../cert/roots/buypass-class-3-root-ca.pem"),
    )
    .expect("write");
    let text = format!(
        "{GOOD}[trust]\ntest_roots = [{root:?}]\nchain = \"require\"\n\
         [revocation]\ninterval_seconds = 600\ngood_for_seconds = 3600\ntimeout_seconds = 3\n"
    );
    let c = Config::from_toml_str(&text, "agent.toml").expect("valid");
    assert!(c.trust.require_chain);
    assert_eq!(
        c.trust
            .store
            .roots(crate::cert::CertEnvironment::Test)
            .len(),
        1
    );
    assert_eq!(c.revocation.interval.as_secs(), 600);
    assert_eq!(c.revocation.good_for.as_secs(), 3600);
    assert_eq!(c.revocation.timeout.as_secs(), 3);

    for (extra, key) in [
        ("[trust]\nchain = \"strict\"\n", "`trust.chain`"),
        (
            "[trust]\ntest_roots = [\"/nonexistent/root.pem\"]\n",
            "`trust.test_roots[0]`",
        ),
        (
            "[trust]\nprod_roots = [\"agent.toml\"]\n",
            "`trust.prod_roots[0]`",
        ),
        (
            "[revocation]\ninterval_seconds = 5\n",
            "`revocation.interval_seconds`",
        ),
        (
            "[revocation]\ninterval_seconds = 600\ngood_for_seconds = 60\n",
            "`revocation.good_for_seconds`",
        ),
        (
            "[revocation]\ntimeout_seconds = 0\n",
            "`revocation.timeout_seconds`",
        ),
        ("[revocation]\nenable = false\n", "unknown field `enable`"),
    ] {
        let message = err(&format!("{GOOD}{extra}"));
        assert!(message.contains(key), "{extra}: {message}");
    }
}
