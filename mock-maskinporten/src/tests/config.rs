//! Config parsing: every mistake is reported with the file, the key and a fix.

use grant_agent::config::ConfigError;

use super::{KID, KID_CLIENT, config, config_text, files};

use crate::{MockConfig, MockError};

/// The dotted key of an invalid-value error, and its full message.
fn invalid_key(dir: &std::path::Path, text: &str) -> (String, String) {
    let file = dir.join("mock.toml").display().to_string();
    let error = MockConfig::from_toml_str(text, &file).expect_err("refused");
    let message = error.to_string();
    assert!(message.starts_with(&file), "names the file: {message}");
    match error {
        MockError::Config(ConfigError::Invalid { key, .. }) => (key, message),
        other => panic!("expected an invalid value, got {other:?}"),
    }
}

#[test]
fn config_errors_name_the_key_and_the_fix() {
    let dir = files();
    let with_client = |client: &str| format!("[[clients]]\nclient_id = \"c\"\n{client}");
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "issuer = \"ftp://x/\"\n".to_owned() + &with_client(""),
            "issuer",
            "http(s) URL",
        ),
        (
            "token_lifetime_seconds = 0\n".to_owned() + &with_client(""),
            "token_lifetime_seconds",
            "use 1 to 86400",
        ),
        (
            "ca = \"missing.pem\"\n".to_owned() + &with_client(""),
            "ca",
            "relative paths are relative to the config file's folder",
        ),
        (
            "ca = \"client.jwk.json\"\n".to_owned() + &with_client(""),
            "ca",
            "BEGIN CERTIFICATE",
        ),
        (
            "signing_key = \"client.jwk.json\"\n".to_owned() + &with_client(""),
            "signing_key",
            "PKCS#8",
        ),
        (String::new(), "clients", "add a [[clients]] table"),
        (
            with_client("") + "[[clients]]\nclient_id = \"c\"\n",
            "clients[1].client_id",
            "configured twice",
        ),
        (
            with_client("scopes = [\"te*st\"]\n"),
            "clients[0].scopes[0]",
            "\"prefix:*\"",
        ),
        (
            with_client("organization_number = \"991825828\"\n"),
            "clients[0].organization_number",
            "check digit",
        ),
        (
            with_client("consumer_orgs = [\"974760673\", \"12345\"]\n"),
            "clients[0].consumer_orgs[1]",
            "check digit",
        ),
        (
            with_client("[[clients.keys]]\njwk = \"nope.json\"\n"),
            "clients[0].keys[0].jwk",
            "cannot read",
        ),
        (
            with_client("[[clients.keys]]\njwk = \"ca.pem\"\n"),
            "clients[0].keys[0].jwk",
            "grant-agent key jwk",
        ),
        (
            with_client(
                "[[clients.keys]]\njwk = \"client.jwk.json\"\nexpires_at = 2027-01-01T00:00:00\n",
            ),
            "clients[0].keys[0].expires_at",
            "time zone",
        ),
        (
            with_client(
                "[[clients.keys]]\njwk = \"client.jwk.json\"\n[[clients.keys]]\njwk = \"client.jwk.json\"\n",
            ),
            "clients[0].keys[1].kid",
            "registered twice",
        ),
    ];
    for (text, key, fix) in cases {
        let (got, message) = invalid_key(dir.path(), &text);
        assert_eq!(got, key, "{message}");
        assert!(message.contains(fix), "{key}: {message}");
    }
}

#[test]
fn syntax_errors_name_the_file_and_the_key() {
    let cases = [
        ("colour = \"blue\"\n", "unknown field `colour`"),
        ("certificates = \"staging\"\n", "certificates"),
        (
            "[[clients]]\nclient_id = \"c\"\nscope = [\"a\"]\n",
            "unknown field `scope`",
        ),
    ];
    for (text, expected) in cases {
        let error = MockConfig::from_toml_str(text, "mock.toml").expect_err("refused");
        let message = error.to_string();
        assert!(
            matches!(error, MockError::Config(ConfigError::Syntax { .. })),
            "{message}"
        );
        assert!(message.starts_with("mock.toml: "), "{message}");
        assert!(message.contains(expected), "{message}");
    }
    let missing =
        MockConfig::from_file(std::path::Path::new("/nonexistent/mock.toml")).expect_err("refused");
    assert!(
        missing.to_string().starts_with("/nonexistent/mock.toml: "),
        "{missing}"
    );
}

#[test]
fn files_resolve_against_the_config_folder_and_kids_default_sensibly() {
    let dir = files();
    let parsed = config(dir.path(), "signing_key = \"token-key.pem\"");
    assert!(parsed.signing_key.is_some());
    assert_eq!(parsed.trust_anchors.len(), 1);
    let kids: Vec<&str> = parsed.clients[0]
        .keys
        .iter()
        .map(|k| k.kid.as_str())
        .collect();
    assert_eq!(kids, [KID, "expired-key"]);
    assert_eq!(parsed.clients[0].client_id, KID_CLIENT);
    assert!(parsed.clients[0].keys[1].expires_at == Some(1_577_836_800));
    assert!(config_text("").contains(KID));

    // Without a kid in the config the JWK's is used; without either, the thumbprint.
    let file = dir.path().join("mock.toml").display().to_string();
    let text = "[[clients]]\nclient_id = \"c\"\n[[clients.keys]]\njwk = \"client.jwk.json\"\n";
    let parsed = MockConfig::from_toml_str(text, &file).expect("config");
    assert_eq!(parsed.clients[0].keys[0].kid, "ignored-by-the-config");
    let bare = serde_json::json!({
        "kty": "RSA",
        "n": serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(dir.path().join("client.jwk.json")).expect("jwk")
        ).expect("json")["n"],
        "e": "AQAB",
    });
    std::fs::write(dir.path().join("bare.jwk.json"), bare.to_string()).expect("write");
    let text = "[[clients]]\nclient_id = \"c\"\n[[clients.keys]]\njwk = \"bare.jwk.json\"\n";
    let parsed = MockConfig::from_toml_str(text, &file).expect("config");
    assert_eq!(
        parsed.clients[0].keys[0].kid.len(),
        43,
        "a SHA-256 thumbprint"
    );
}
