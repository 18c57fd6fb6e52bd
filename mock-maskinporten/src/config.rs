//! The mock's configuration: which clients exist, what they may ask for, the keys and
//! certificates they prove themselves with, and the key that signs access tokens.
//!
//! Every file the config names (JWKs, the CA bundle, the signing key) is read and checked
//! here, before any port is bound, so a typo stops the mock at start with the file, the
//! key and the fix, rather than as a puzzling refusal in someone's CI run later. Errors
//! are the agent's own [`ConfigError`], since they have the same reader and the same shape.

use std::path::{Path, PathBuf};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rsa::{BoxedUint, PrivateKey, PublicKey, pkcs8::DecodePrivateKey};
use serde::Deserialize;
use x509_cert::Certificate;
use zeroize::Zeroizing;

use grant_agent::{
    admin::thumbprint,
    config::{ConfigError, unix_seconds},
    grant::is_organization_number,
};

use crate::MockError;

/// `expires_in` of issued access tokens when the config sets none (Maskinporten's own
/// default token lifetime is also two minutes in test).
const DEFAULT_TOKEN_LIFETIME_SECONDS: u32 = 120;
/// The longest access token lifetime the config may ask for: one day.
const MAX_TOKEN_LIFETIME_SECONDS: u32 = 86_400;

/// A validated mock configuration: clients, their scopes, keys and delegations, trust
/// anchors and the token signing key, with every file it names already read.
///
/// Built only by [`MockConfig::from_file`] or [`MockConfig::from_toml_str`], so a value
/// of this type has passed every check; [`MockServer::bind`](crate::MockServer::bind) can
/// then only fail on what the config does not hold (the address, the TLS files,
/// generating a key).
#[derive(Debug)]
pub struct MockConfig {
    pub(crate) issuer: Option<String>,
    pub(crate) token_lifetime_seconds: u32,
    pub(crate) well_known: WellKnown,
    pub(crate) certificates: CertificatePolicy,
    pub(crate) trust_anchors: Vec<x509_cert::Certificate>,
    pub(crate) signing_key: Option<rsa::PrivateKey>,
    pub(crate) clients: Vec<Client>,
}

impl MockConfig {
    /// Reads and checks a config file; relative paths in it resolve against its folder.
    pub fn from_file(path: &Path) -> Result<MockConfig, MockError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Ok(parse(&text, &file, base)?)
    }

    /// Parses and checks config text. `file` names it in errors, and relative paths
    /// resolve against `file`'s folder (the current directory for a bare name such as
    /// `"mock.toml"`), so tests can point it into a temporary directory without writing
    /// the config itself.
    pub fn from_toml_str(text: &str, file: &str) -> Result<MockConfig, MockError> {
        let base = Path::new(file).parent().unwrap_or(Path::new("."));
        Ok(parse(text, file, base)?)
    }
}

/// Which virksomhetssertifikat environments the mock accepts. Maskinporten's test
/// environment refuses production certificates and production refuses test ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum CertificatePolicy {
    /// Refuse production certificates, as Maskinporten's test environment does.
    #[default]
    Test,
    /// Refuse test certificates, as Maskinporten's production environment does.
    Prod,
    /// Accept both.
    Any,
}

/// Which metadata documents the mock publishes, so a client's discovery can be tested
/// against an issuer that has only one of them (Skyporten has only OpenID Connect's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum WellKnown {
    /// `/.well-known/oauth-authorization-server` (RFC 8414), as Maskinporten publishes.
    #[default]
    OauthAuthorizationServer,
    /// `/.well-known/openid-configuration` (OpenID Connect Discovery) only.
    OpenidConfiguration,
    /// Both.
    Both,
}

impl WellKnown {
    /// Whether `/.well-known/oauth-authorization-server` is served.
    pub(super) fn rfc8414(self) -> bool {
        matches!(self, WellKnown::OauthAuthorizationServer | WellKnown::Both)
    }

    /// Whether `/.well-known/openid-configuration` is served.
    pub(super) fn openid(self) -> bool {
        matches!(self, WellKnown::OpenidConfiguration | WellKnown::Both)
    }
}

/// A registered Maskinporten client.
#[derive(Debug)]
pub(super) struct Client {
    /// The client_id, which grants carry as `iss`.
    pub(super) client_id: String,
    /// Scope names the client may get; an entry ending in `:*` allows every scope with
    /// that prefix.
    pub(super) scopes: Vec<String>,
    /// The organisation the client belongs to; an `x5c` certificate must name it.
    pub(super) organization_number: Option<String>,
    /// Organisations that delegated to this client (allowed `consumer_org` values).
    pub(super) consumer_orgs: Vec<String>,
    /// Keys registered for `kid` grants.
    pub(super) keys: Vec<RegisteredKey>,
}

impl Client {
    /// Whether `scope` is one the client may get.
    pub(super) fn allows_scope(&self, scope: &str) -> bool {
        self.scopes
            .iter()
            .any(|allowed| match allowed.strip_suffix('*') {
                Some(prefix) => scope.len() > prefix.len() && scope.starts_with(prefix),
                None => allowed == scope,
            })
    }
}

/// A public key registered on a client, as Maskinporten's self-service keeps them.
#[derive(Debug)]
pub(super) struct RegisteredKey {
    /// The key id grants name in their header.
    pub(super) kid: String,
    /// The RSA public key from the JWK.
    pub(super) public_key: PublicKey,
    /// Unix seconds after which the key no longer works (MP-121).
    pub(super) expires_at: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    issuer: Option<String>,
    token_lifetime_seconds: Option<u32>,
    #[serde(default)]
    well_known: WellKnown,
    #[serde(default)]
    certificates: CertificatePolicy,
    ca: Option<PathBuf>,
    signing_key: Option<PathBuf>,
    #[serde(default)]
    clients: Vec<RawClient>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    client_id: String,
    #[serde(default)]
    scopes: Vec<String>,
    organization_number: Option<String>,
    #[serde(default)]
    consumer_orgs: Vec<String>,
    #[serde(default)]
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    jwk: PathBuf,
    kid: Option<String>,
    expires_at: Option<toml::value::Datetime>,
}

/// The JWK members the mock reads; others (`use`, `alg`, ...) are ignored.
#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    n: Option<String>,
    e: Option<String>,
    kid: Option<String>,
}

/// Builds [`ConfigError::Invalid`] for one file.
type Invalid<'a> = dyn Fn(&str, String, &str) -> ConfigError + 'a;

/// Parses and checks config text; `file` names it in errors and relative paths resolve
/// against `base`.
pub(super) fn parse(text: &str, file: &str, base: &Path) -> Result<MockConfig, ConfigError> {
    let raw: RawConfig = grant_agent::config::from_toml(text, file)?;
    let invalid = grant_agent::config::invalid_in(file);

    if let Some(issuer) = &raw.issuer {
        let scheme_ok = issuer.starts_with("http://") || issuer.starts_with("https://");
        if !scheme_ok || issuer.chars().any(char::is_whitespace) {
            return Err(invalid(
                "issuer",
                format!("{issuer:?} is not an http(s) URL"),
                "write it as the URL clients use as aud, e.g. \"http://127.0.0.1:9000/\"",
            ));
        }
    }
    let token_lifetime_seconds = match raw.token_lifetime_seconds {
        None => DEFAULT_TOKEN_LIFETIME_SECONDS,
        Some(n) if (1..=MAX_TOKEN_LIFETIME_SECONDS).contains(&n) => n,
        Some(n) => {
            return Err(invalid(
                "token_lifetime_seconds",
                format!("{n} is out of range"),
                "use 1 to 86400 seconds, or leave it out for 120",
            ));
        }
    };
    let trust_anchors = match &raw.ca {
        None => Vec::new(),
        Some(path) => trust_anchors(&base.join(path), &invalid)?,
    };
    let signing_key = match &raw.signing_key {
        None => None,
        Some(path) => Some(signing_key(&base.join(path), &invalid)?),
    };
    if raw.clients.is_empty() {
        return Err(invalid(
            "clients",
            "no client is configured".into(),
            "add a [[clients]] table with client_id and scopes",
        ));
    }
    let mut clients: Vec<Client> = Vec::with_capacity(raw.clients.len());
    for (i, raw_client) in raw.clients.into_iter().enumerate() {
        let client = client(raw_client, &format!("clients[{i}]"), base, &invalid)?;
        if clients.iter().any(|c| c.client_id == client.client_id) {
            return Err(invalid(
                &format!("clients[{i}].client_id"),
                format!("{:?} is configured twice", client.client_id),
                "give every client its own client_id, or merge the two tables",
            ));
        }
        clients.push(client);
    }
    Ok(MockConfig {
        issuer: raw.issuer,
        token_lifetime_seconds,
        well_known: raw.well_known,
        certificates: raw.certificates,
        trust_anchors,
        signing_key,
        clients,
    })
}

fn client(
    raw: RawClient,
    at: &str,
    base: &Path,
    invalid: &Invalid<'_>,
) -> Result<Client, ConfigError> {
    let key = |field: &str| format!("{at}.{field}");
    if raw.client_id.is_empty() || !raw.client_id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(
            &key("client_id"),
            format!("{:?} is not a usable client_id", raw.client_id),
            "use the client's id without spaces, e.g. a UUID",
        ));
    }
    for (j, scope) in raw.scopes.iter().enumerate() {
        let star_ok = match scope.find('*') {
            None => true,
            Some(at) => at + 1 == scope.len() && scope[..at].ends_with(':'),
        };
        if scope.is_empty() || !scope.chars().all(|c| c.is_ascii_graphic()) || !star_ok {
            return Err(invalid(
                &key(&format!("scopes[{j}]")),
                format!("{scope:?} is not a scope name or pattern"),
                "use exact scope names (\"test:read\"), or \"prefix:*\" for every scope under a prefix",
            ));
        }
    }
    if let Some(org) = &raw.organization_number
        && !is_organization_number(org)
    {
        return Err(invalid(
            &key("organization_number"),
            format!("{org:?} is not an organisation number"),
            "use nine digits with a valid check digit, e.g. \"991825827\"",
        ));
    }
    if let Some((j, org)) = raw
        .consumer_orgs
        .iter()
        .enumerate()
        .find(|(_, org)| !is_organization_number(org))
    {
        return Err(invalid(
            &key(&format!("consumer_orgs[{j}]")),
            format!("{org:?} is not an organisation number"),
            "use nine digits with a valid check digit, e.g. \"974760673\"",
        ));
    }
    let mut keys: Vec<RegisteredKey> = Vec::with_capacity(raw.keys.len());
    for (j, raw_key) in raw.keys.into_iter().enumerate() {
        let at = key(&format!("keys[{j}]"));
        let registered = registered_key(raw_key, &at, base, invalid)?;
        if keys.iter().any(|k| k.kid == registered.kid) {
            return Err(invalid(
                &format!("{at}.kid"),
                format!(
                    "kid {:?} is registered twice on this client",
                    registered.kid
                ),
                "give each key its own kid",
            ));
        }
        keys.push(registered);
    }
    Ok(Client {
        client_id: raw.client_id,
        scopes: raw.scopes,
        organization_number: raw.organization_number,
        consumer_orgs: raw.consumer_orgs,
        keys,
    })
}

/// Reads a JWK file; the kid is the config's, else the JWK's, else its RFC 7638
/// thumbprint (which is what `grant-agent key jwk` uses by default).
fn registered_key(
    raw: RawKey,
    at: &str,
    base: &Path,
    invalid: &Invalid<'_>,
) -> Result<RegisteredKey, ConfigError> {
    let jwk_key = format!("{at}.jwk");
    let path = base.join(&raw.jwk);
    let bad = |problem: String| {
        invalid(
            &jwk_key,
            problem,
            "use a file holding one RSA JWK object, as `grant-agent key jwk` prints it",
        )
    };
    let text = read(&path, &jwk_key, invalid)?;
    let jwk: RawJwk = serde_json::from_slice(&text)
        .map_err(|e| bad(format!("{} is not a JWK: {e}", path.display())))?;
    if jwk.kty != "RSA" {
        return Err(bad(format!(
            "{} holds a {:?} key; Maskinporten grants use RSA",
            path.display(),
            jwk.kty
        )));
    }
    let member = |name: &str, value: Option<&String>| {
        value
            .and_then(|v| URL_SAFE_NO_PAD.decode(v).ok())
            .filter(|bytes| !bytes.is_empty())
            .ok_or_else(|| {
                bad(format!(
                    "{}: `{name}` is missing or not base64url",
                    path.display()
                ))
            })
    };
    let n = member("n", jwk.n.as_ref())?;
    let e = member("e", jwk.e.as_ref())?;
    let public_key = PublicKey::new(
        BoxedUint::from_be_slice_vartime(&n),
        BoxedUint::from_be_slice_vartime(&e),
    )
    .map_err(|e| bad(format!("{}: not a usable RSA key ({e})", path.display())))?;
    let kid = raw.kid.or(jwk.kid).unwrap_or_else(|| thumbprint(&n, &e));
    if kid.is_empty() {
        return Err(invalid(
            &format!("{at}.kid"),
            "the kid is empty".into(),
            "set kid to the key id the grants carry, or leave it out to use the JWK's",
        ));
    }
    let expires_at = match &raw.expires_at {
        None => None,
        Some(when) => Some(unix_seconds(when, &format!("{at}.expires_at"), invalid)?),
    };
    Ok(RegisteredKey {
        kid,
        public_key,
        expires_at,
    })
}

/// The `ca` PEM bundle: every certificate in it is a trust anchor for `x5c` chains.
fn trust_anchors(path: &Path, invalid: &Invalid<'_>) -> Result<Vec<Certificate>, ConfigError> {
    let pem = read(path, "ca", invalid)?;
    let anchors = Certificate::load_pem_chain(&pem).map_err(|e| {
        invalid(
            "ca",
            format!("{} is not a PEM certificate bundle: {e}", path.display()),
            "use a file of \"-----BEGIN CERTIFICATE-----\" blocks",
        )
    })?;
    if anchors.is_empty() {
        return Err(invalid(
            "ca",
            format!("{} holds no certificate", path.display()),
            "use a file of \"-----BEGIN CERTIFICATE-----\" blocks",
        ));
    }
    Ok(anchors)
}

/// The `signing_key` file: an unencrypted PKCS#8 PEM RSA key.
fn signing_key(path: &Path, invalid: &Invalid<'_>) -> Result<PrivateKey, ConfigError> {
    let pem = Zeroizing::new(read(path, "signing_key", invalid)?);
    let fix = "use an unencrypted PKCS#8 RSA key (\"-----BEGIN PRIVATE KEY-----\"), e.g. from \
               `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048`";
    let (label, der) = der::pem::decode_vec(&pem).map_err(|e| {
        invalid(
            "signing_key",
            format!("{} is not PEM: {e}", path.display()),
            fix,
        )
    })?;
    let der = Zeroizing::new(der);
    if label != "PRIVATE KEY" {
        return Err(invalid(
            "signing_key",
            format!("{} holds a {label:?}, not a PKCS#8 key", path.display()),
            "convert it with `openssl pkcs8 -topk8 -nocrypt -in old.pem -out key.pem`",
        ));
    }
    PrivateKey::from_pkcs8_der(&der).map_err(|e| {
        invalid(
            "signing_key",
            format!("{} is not an RSA private key: {e}", path.display()),
            fix,
        )
    })
}

fn read(path: &Path, key: &str, invalid: &Invalid<'_>) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| {
        invalid(
            key,
            format!("cannot read {}: {e}", path.display()),
            "check the path; relative paths are relative to the config file's folder",
        )
    })
}
