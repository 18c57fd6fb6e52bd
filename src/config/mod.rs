//! The agent's configuration: plain data parsed from TOML and validated before any
//! socket is bound or PKCS#11 session opened.
//!
//! Every error names the file, the key and the fix, because the person reading it is
//! an operator at a terminal, not a developer with a debugger. Relative paths in the
//! file are resolved against the file's own folder, so a config and its PIN file can
//! move together.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{cert::CertEnvironment, grant::Algorithm, hex};

mod access;
mod limits;
mod token;

pub use access::{
    Access, CachedAudit, DEFAULT_REQUESTS_PER_SECOND, IdentityField, Pattern, PolicyRule, Tls,
    UnixSocket,
};
pub use limits::{Limits, MAX_REQUEST_BYTES};
pub use token::TokenSettings;
pub(crate) use token::endpoint_problem;

/// Where the agent listens when the config says nothing.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// Most sessions a pool may open; more buys nothing on any token we know of.
const MAX_SESSIONS: usize = 256;

/// Requests that may wait for a PKCS#11 session before more are refused.
pub const DEFAULT_QUEUE: usize = 1024;

/// Days before expiry when the agent starts warning, unless the config says otherwise.
pub const DEFAULT_EXPIRY_WARNING_DAYS: u32 = 30;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners, mutual TLS, caller policy and audit.
    pub access: Access,
    /// The PKCS#11 module, token and PIN.
    pub pkcs11: Pkcs11Config,
    /// Keys the agent signs with, in file order; at least one. Entries that share a name
    /// are versions of one key (rollover): the newest valid one signs.
    pub keys: Vec<KeyConfig>,
    /// Name of the key used when a request names none.
    pub default_key: String,
    /// Environment used when a request names none; `None` makes it required.
    pub default_environment: Option<String>,
    /// Named environments beyond (or overriding) the built-in `test`, `prod`, `sky-test`
    /// and `sky`.
    pub environments: BTreeMap<String, EnvironmentConfig>,
    /// Warn when a certificate expires within this many days.
    pub expiry_warning_days: u32,
    /// Address for Prometheus metrics (`GET /metrics`); `None` serves none.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Reaching Maskinporten's token endpoint, and the access token cache.
    pub token: TokenSettings,
    /// What a peer may make the agent hold: connections, streams, windows, timeouts.
    pub limits: Limits,
}

/// How to reach the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 shared library.
    pub module: PathBuf,
    /// Which token: by label (slot numbers move; labels do not), serial number or slot id.
    pub token: TokenSelector,
    /// Where the user PIN comes from.
    pub pin: PinSource,
    /// Sessions in the signing pool.
    pub sessions: usize,
    /// Requests that may wait for a session; more are refused at once.
    pub queue: usize,
}

/// How the token is found among the module's slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// By token label (`token_label`).
    Label(String),
    /// By token serial number (`token_serial`).
    Serial(String),
    /// By slot id (`slot_id`), for modules whose slots are fixed (opencryptoki, some HSMs).
    Slot(u64),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(label) => write!(f, "labelled \"{label}\""),
            TokenSelector::Serial(serial) => write!(f, "with serial number \"{serial}\""),
            TokenSelector::Slot(slot) => write!(f, "in slot {slot}"),
        }
    }
}

/// The user PIN is read from a file or an environment variable, never from the command line
/// (which every user of the machine can read in `/proc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file holding the PIN; one trailing newline is ignored.
    File(PathBuf),
    /// The name of an environment variable holding the PIN.
    Env(String),
}

/// A PIN file that users other than the agent's may read or change, as (problem, fix).
///
/// As ssh does for private keys: a PIN file the agent's user owns must be open to that
/// user only (0600 or 0400). A file owned by another user (root, or the kubelet for a
/// Kubernetes Secret under `fsGroup`, which forces mode 0440) reaches the agent through
/// its group, so there group read is allowed, and nothing else for group or others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExposedPinFile {
    /// What is wrong, naming the file and its mode.
    pub(crate) problem: String,
    /// The command that fixes it.
    pub(crate) fix: String,
}

impl fmt::Display for ExposedPinFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; {}", self.problem, self.fix)
    }
}

/// Checks a PIN file's permissions from its metadata (`stat`, or `fstat` of the open file).
pub(crate) fn exposed_pin_file(
    path: &Path,
    metadata: &std::fs::Metadata,
) -> Option<ExposedPinFile> {
    use std::os::unix::fs::MetadataExt;
    let owned_by_agent = metadata.uid() == rustix::process::geteuid().as_raw();
    pin_file_exposure(path, metadata.mode(), owned_by_agent)
}

fn pin_file_exposure(path: &Path, mode: u32, owned_by_agent: bool) -> Option<ExposedPinFile> {
    let (forbidden, fix_mode) = if owned_by_agent {
        (0o077, "600")
    } else {
        (0o037, "440")
    };
    let open = mode & forbidden;
    if open == 0 {
        return None;
    }
    let how = if open & 0o044 != 0 {
        "readable"
    } else if open & 0o022 != 0 {
        "writable"
    } else {
        "executable"
    };
    let path = path.display();
    Some(ExposedPinFile {
        problem: format!(
            "{path} is {how} by group or others (mode {:04o})",
            mode & 0o7777
        ),
        fix: format!("run: chmod {fix_mode} {path}"),
    })
}

/// One signing key.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    /// The name callers use in `GrantParameters.key`.
    pub name: String,
    /// How the private key is found in the token.
    pub locator: KeyLocator,
    /// How Maskinporten knows the key: by certificate (`x5c`) or registered key (`kid`).
    pub binding: KeyBinding,
    /// JWS algorithm for grants signed with this key.
    pub algorithm: Algorithm,
    /// Sign for an environment that does not match the certificate's (test vs production).
    pub allow_environment_mismatch: bool,
}

/// How the grant tells Maskinporten which key signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyBinding {
    /// Virksomhetssertifikat mode: the certificate chain goes in `x5c`.
    Certificate {
        /// Where the chain comes from.
        source: CertificateSource,
        /// Declares test or production for an issuer the agent does not recognise.
        environment: Option<CertEnvironment>,
    },
    /// A key registered on the Maskinporten client: `kid` in the header, no `x5c`.
    /// Registered keys expire (at most a year), so the validity drives rollover.
    Kid {
        /// The key id registered with the client.
        kid: String,
        /// Unix seconds from which this key may be used.
        not_before: Option<i64>,
        /// Unix seconds after which this key is no longer used.
        not_after: Option<i64>,
    },
}

/// How a private key is found in the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLocator {
    /// By `CKA_LABEL`.
    Label(String),
    /// By `CKA_ID` (bytes, given in the file as hex).
    Id(Vec<u8>),
}

impl fmt::Display for KeyLocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyLocator::Label(label) => write!(f, "label \"{label}\""),
            KeyLocator::Id(id) => write!(f, "id {}", hex::encode(id)),
        }
    }
}

/// Where a key's certificate chain comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateSource {
    /// The `CKO_CERTIFICATE` object in the token with the key's `CKA_ID`.
    Token,
    /// A PEM file: the leaf first, then intermediates.
    PemFile(PathBuf),
}

/// An environment: where grants are addressed and exchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvironmentConfig {
    /// The `aud` claim, Maskinporten's issuer URL.
    pub audience: String,
    /// Which certificates it accepts (test or production).
    pub certificates: CertEnvironment,
    /// Where grants are exchanged for access tokens.
    pub token_endpoint: TokenEndpoint,
}

/// How the token endpoint of an environment is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenEndpoint {
    /// This URL.
    Url(String),
    /// `token_endpoint` from the issuer's `/.well-known/oauth-authorization-server`, or
    /// its `/.well-known/openid-configuration` when that is absent, fetched at the first
    /// token request and kept.
    Discover,
}

impl EnvironmentConfig {
    fn at(audience: &str, certificates: CertEnvironment) -> Self {
        EnvironmentConfig {
            audience: audience.to_owned(),
            certificates,
            token_endpoint: TokenEndpoint::Url(default_token_endpoint(audience)),
        }
    }

    /// An issuer whose token endpoint is read from its metadata at the first request.
    fn discovered(audience: &str, certificates: CertEnvironment) -> Self {
        EnvironmentConfig {
            audience: audience.to_owned(),
            certificates,
            token_endpoint: TokenEndpoint::Discover,
        }
    }
}

/// The environments every config has, unless it names its own of the same name.
///
/// Maskinporten's issuers end in `/`; Skyporten's do not, and a grant's `aud` must be the
/// issuer exactly, so each string is kept as Digdir publishes it. Digdir documents
/// Skyporten's metadata (`/.well-known/openid-configuration`) but not its token endpoint,
/// so `sky-test` and `sky` discover it.
const BUILT_IN: [&str; 4] = ["prod", "sky", "sky-test", "test"];

fn built_in(name: &str) -> Option<EnvironmentConfig> {
    Some(match name {
        "test" => EnvironmentConfig::at("https://test.maskinporten.no/", CertEnvironment::Test),
        "prod" => EnvironmentConfig::at("https://maskinporten.no/", CertEnvironment::Production),
        "sky-test" => {
            EnvironmentConfig::discovered("https://test.sky.maskinporten.no", CertEnvironment::Test)
        }
        "sky" => EnvironmentConfig::discovered(
            "https://sky.maskinporten.no",
            CertEnvironment::Production,
        ),
        _ => return None,
    })
}

/// Maskinporten's layout: the token endpoint is `token` under the issuer.
fn default_token_endpoint(audience: &str) -> String {
    format!("{}/token", audience.trim_end_matches('/'))
}

/// A configuration that cannot be used, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read the config file: {source}")]
    Read {
        /// The file.
        file: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has keys of the wrong type.
    #[error("{file}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// The TOML parser's message, which names the key and the line.
        message: String,
    },
    /// A value is well-formed but cannot work.
    #[error("{file}: `{key}`: {problem}; {fix}")]
    Invalid {
        /// The file.
        file: String,
        /// The dotted key path, e.g. `keys[0].label`.
        key: String,
        /// What is wrong.
        problem: String,
        /// What to do.
        fix: String,
    },
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let file = path.display().to_string();
        let config = Self::parse(&text, &file, base)?;
        refuse_exposed_pin_file(&config.pkcs11, &file)?;
        Ok(config)
    }

    /// Reads only the `[pkcs11]` section, for key management commands that run before any
    /// key is configured.
    pub fn load_token_settings(path: &Path) -> Result<Pkcs11Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })?;
        let file = path.display().to_string();
        let raw: RawConfig = from_toml(&text, &file)?;
        let pkcs11 = pkcs11_section(raw.pkcs11, &file, path.parent().unwrap_or(Path::new(".")))?;
        refuse_exposed_pin_file(&pkcs11, &file)?;
        Ok(pkcs11)
    }

    /// Parses and validates config text; `origin` names it in errors and relative paths
    /// resolve against the current directory.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::parse(text, origin, Path::new("."))
    }

    fn parse(text: &str, file: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = from_toml(text, file)?;
        let invalid = invalid_in(file);

        let access = access::access(
            access::RawAccess {
                listen: raw.listen,
                unix_socket: raw.unix_socket,
                socket_mode: raw.socket_mode,
                insecure: raw.insecure,
                tls: raw.tls,
                policy: raw.policy,
                audit: raw.audit,
            },
            base,
            &invalid,
        )?;
        let pkcs11 = pkcs11_section(raw.pkcs11, file, base)?;
        let expiry_warning_days = match raw.expiry_warning_days {
            None => DEFAULT_EXPIRY_WARNING_DAYS,
            Some(days) if days <= 3650 => days,
            Some(days) => {
                return Err(invalid(
                    "expiry_warning_days",
                    format!("{days} is more than ten years"),
                    "use 0 to 3650 days",
                ));
            }
        };

        if raw.keys.is_empty() {
            return Err(invalid(
                "keys",
                "no key is configured".into(),
                "add a [[keys]] table with name, label (or id) and certificate",
            ));
        }
        let mut keys: Vec<KeyConfig> = Vec::with_capacity(raw.keys.len());
        for (i, k) in raw.keys.into_iter().enumerate() {
            let at = |field: &str| format!("keys[{i}].{field}");
            if !is_key_name(&k.name) {
                return Err(invalid(
                    &at("name"),
                    format!("{:?} is not a usable key name", k.name),
                    "use 1 to 64 characters from A-Z a-z 0-9 . _ -",
                ));
            }
            let locator = match (k.label, k.id) {
                (Some(label), None) if !label.is_empty() => KeyLocator::Label(label),
                (None, Some(id)) => KeyLocator::Id(hex::decode(&id).ok_or_else(|| {
                    invalid(
                        &at("id"),
                        format!("{id:?} is not hex"),
                        "write the CKA_ID as hex digits, e.g. id = \"01\"",
                    )
                })?),
                _ => {
                    return Err(invalid(
                        &at("label"),
                        "exactly one of label and id must be set (and not empty)".into(),
                        "find the key by its CKA_LABEL (label = \"...\") or its CKA_ID (id = \"01\")",
                    ));
                }
            };
            if let Some(earlier) = keys.iter().find(|seen| seen.locator == locator) {
                return Err(invalid(
                    &at("label"),
                    format!(
                        "the same token key is configured again (as {:?})",
                        earlier.name
                    ),
                    "a new certificate for the same name needs its own key; give it its own label or id",
                ));
            }
            let environment = match k.certificate_environment.as_deref() {
                None => None,
                Some(name) => Some(cert_environment(name).ok_or_else(|| {
                    invalid(
                        &at("certificate_environment"),
                        format!("{name:?} is neither \"test\" nor \"prod\""),
                        "say which Maskinporten environment the certificate's issuer serves",
                    )
                })?),
            };
            let binding = match (k.certificate.as_deref(), k.kid) {
                (Some(""), None) | (None, None) => {
                    return Err(invalid(
                        &at("certificate"),
                        "is missing".into(),
                        "write \"token\" or the path of a PEM chain (leaf first), or set kid for a key registered on the client",
                    ));
                }
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        &at("kid"),
                        "is set together with certificate".into(),
                        "a grant carries either x5c (certificate) or kid (registered key): keep one",
                    ));
                }
                (Some(source), None) => {
                    if k.not_before.is_some() || k.not_after.is_some() {
                        return Err(invalid(
                            &at("not_after"),
                            "is only for kid keys".into(),
                            "a certificate's own validity decides when it is used; remove not_before/not_after",
                        ));
                    }
                    KeyBinding::Certificate {
                        source: match source {
                            "token" => CertificateSource::Token,
                            path => CertificateSource::PemFile(base.join(path)),
                        },
                        environment,
                    }
                }
                (None, Some(kid)) => {
                    if kid.is_empty()
                        || kid.len() > 256
                        || !kid.chars().all(|c| c.is_ascii_graphic())
                    {
                        return Err(invalid(
                            &at("kid"),
                            "must be 1 to 256 printable ASCII characters".into(),
                            "use the kid registered on the Maskinporten client (grant-agent key jwk prints one)",
                        ));
                    }
                    if environment.is_some() {
                        return Err(invalid(
                            &at("certificate_environment"),
                            "has no certificate to describe".into(),
                            "remove it from the kid key",
                        ));
                    }
                    KeyBinding::Kid {
                        kid,
                        not_before: k
                            .not_before
                            .map(|d| unix_seconds(&d, &at("not_before"), &invalid))
                            .transpose()?,
                        not_after: k
                            .not_after
                            .map(|d| unix_seconds(&d, &at("not_after"), &invalid))
                            .transpose()?,
                    }
                }
            };
            let algorithm = match k.algorithm.as_deref() {
                None => Algorithm::Rs256,
                Some(name) => Algorithm::from_jws_name(name).ok_or_else(|| {
                    invalid(
                        &at("algorithm"),
                        format!("{name:?} is not an algorithm Maskinporten accepts"),
                        "use RS256, RS384 or RS512",
                    )
                })?,
            };
            keys.push(KeyConfig {
                name: k.name,
                locator,
                binding,
                algorithm,
                allow_environment_mismatch: k.allow_environment_mismatch,
            });
        }
        let default_key = match raw.default_key {
            None => keys[0].name.clone(),
            Some(name) if keys.iter().any(|k| k.name == name) => name,
            Some(name) => {
                return Err(invalid(
                    "default_key",
                    format!("no key is named {name:?}"),
                    "name one of the [[keys]], or leave it out to use the first",
                ));
            }
        };

        let token = token::token(raw.token, base, &invalid)?;
        let limits = limits::limits(raw.limits, &invalid)?;
        let mut environments = BTreeMap::new();
        for (name, env) in raw.environments {
            let key = format!("environments.{name}.audience");
            if !is_key_name(&name) {
                return Err(invalid(
                    &format!("environments.{name}"),
                    "is not a usable environment name".into(),
                    "use 1 to 64 characters from A-Z a-z 0-9 . _ -",
                ));
            }
            if !(env.audience.starts_with("https://") || env.audience.starts_with("http://"))
                || env
                    .audience
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(invalid(
                    &key,
                    format!("{:?} is not an http(s) URL", env.audience),
                    "use the Maskinporten issuer URL, e.g. \"https://test.maskinporten.no/\"",
                ));
            }
            let certificates = match env.certificates.as_deref() {
                None => CertEnvironment::Test,
                Some(c) => cert_environment(c).ok_or_else(|| {
                    invalid(
                        &format!("environments.{name}.certificates"),
                        format!("{c:?} is neither \"test\" nor \"prod\""),
                        "say which certificates this environment accepts",
                    )
                })?,
            };
            let token_endpoint = match (env.token_endpoint, env.discover) {
                (Some(_), true) => {
                    return Err(invalid(
                        &format!("environments.{name}.discover"),
                        "is set together with token_endpoint".into(),
                        "give token_endpoint, or discover = true, not both",
                    ));
                }
                (Some(url), false) => {
                    if let Some(problem) = endpoint_problem(&url) {
                        return Err(invalid(
                            &format!("environments.{name}.token_endpoint"),
                            problem,
                            "use https (plain http only to a loopback address)",
                        ));
                    }
                    TokenEndpoint::Url(url)
                }
                (None, true) => {
                    if let Some(problem) = endpoint_problem(&env.audience) {
                        return Err(invalid(
                            &key,
                            problem,
                            "discovery reads the issuer over https (plain http only on loopback)",
                        ));
                    }
                    TokenEndpoint::Discover
                }
                (None, false) => TokenEndpoint::Url(default_token_endpoint(&env.audience)),
            };
            let _ = environments.insert(
                name,
                EnvironmentConfig {
                    audience: env.audience,
                    certificates,
                    token_endpoint,
                },
            );
        }
        let config = Config {
            access,
            pkcs11,
            keys,
            default_key,
            default_environment: raw.default_environment,
            environments,
            expiry_warning_days,
            metrics_listen: match raw.metrics.map(|m| m.listen) {
                None => None,
                Some(text) => Some(text.parse().map_err(|_| {
                    invalid(
                        "metrics.listen",
                        format!("{text:?} is not an IP address and port"),
                        "write it as \"127.0.0.1:9464\"",
                    )
                })?),
            },
            token,
            limits,
        };
        if let Some(env) = &config.default_environment
            && config.environment(env).is_none()
        {
            return Err(invalid(
                "default_environment",
                format!("{env:?} is not a known environment"),
                "use \"test\", \"prod\", \"sky-test\", \"sky\" or a name from [environments]",
            ));
        }
        Ok(config)
    }

    /// An environment by name: the config's own first, then the built-in `test`, `prod`
    /// (Maskinporten) and `sky-test`, `sky` (Skyporten).
    pub fn environment(&self, name: &str) -> Option<EnvironmentConfig> {
        match self.environments.get(name) {
            Some(env) => Some(env.clone()),
            None => built_in(name),
        }
    }

    /// All environment names a request may use, sorted.
    pub fn environment_names(&self) -> Vec<String> {
        let mut names: Vec<String> = BUILT_IN.map(String::from).into();
        names.extend(self.environments.keys().cloned());
        names.sort();
        names.dedup();
        names
    }
}

fn pkcs11_section(p: RawPkcs11, file: &str, base: &Path) -> Result<Pkcs11Config, ConfigError> {
    let invalid = |key: &str, problem: String, fix: &str| ConfigError::Invalid {
        file: file.to_owned(),
        key: key.to_owned(),
        problem,
        fix: fix.to_owned(),
    };
    if p.module.as_os_str().is_empty() {
        return Err(invalid(
            "pkcs11.module",
            "is empty".into(),
            "set it to the PKCS#11 library, e.g. \"/usr/lib/softhsm/libsofthsm2.so\"",
        ));
    }
    let token = match (p.token_label, p.token_serial, p.slot_id) {
        (Some(label), None, None) if !label.is_empty() && label.len() <= 32 => {
            TokenSelector::Label(label)
        }
        (Some(label), None, None) => {
            return Err(invalid(
                "pkcs11.token_label",
                format!("must be 1 to 32 bytes, got {}", label.len()),
                "use the label the token was initialised with (softhsm2-util --show-slots lists them)",
            ));
        }
        (None, Some(serial), None) if !serial.is_empty() && serial.len() <= 16 => {
            TokenSelector::Serial(serial)
        }
        (None, None, Some(slot)) => TokenSelector::Slot(slot),
        _ => {
            return Err(invalid(
                "pkcs11.token_label",
                "exactly one of token_label, token_serial (1 to 16 characters) and slot_id must be set".into(),
                "prefer token_label; use slot_id only where slots are fixed",
            ));
        }
    };
    let pin = match (p.pin_file, p.pin_env) {
        (Some(path), None) => PinSource::File(base.join(path)),
        (None, Some(var)) if !var.is_empty() => PinSource::Env(var),
        (None, Some(_)) => {
            return Err(invalid(
                "pkcs11.pin_env",
                "is empty".into(),
                "name the environment variable that holds the PIN",
            ));
        }
        (None, None) => {
            return Err(invalid(
                "pkcs11",
                "has neither pin_file nor pin_env".into(),
                "add pin_file = \"/run/secrets/hsm-pin\" or pin_env = \"GRANT_AGENT_PIN\"",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(invalid(
                "pkcs11",
                "has both pin_file and pin_env".into(),
                "keep exactly one of them",
            ));
        }
    };
    let sessions = match p.sessions {
        None => default_sessions(),
        Some(n) if (1..=MAX_SESSIONS).contains(&n) => n,
        Some(n) => {
            return Err(invalid(
                "pkcs11.sessions",
                format!("{n} is out of range"),
                &format!("use 1 to {MAX_SESSIONS}, or leave it out for four per CPU"),
            ));
        }
    };
    let queue = match p.queue {
        None => DEFAULT_QUEUE,
        Some(n) if (1..=100_000).contains(&n) => n,
        Some(n) => {
            return Err(invalid(
                "pkcs11.queue",
                format!("{n} is out of range"),
                "use 1 to 100000 waiting requests",
            ));
        }
    };
    Ok(Pkcs11Config {
        module: p.module,
        token,
        pin,
        sessions,
        queue,
    })
}

/// A PIN file others may read is refused at load, so `check` and `serve` fail before any
/// session opens. A file that cannot be examined yet is left to the read, which says why.
fn refuse_exposed_pin_file(pkcs11: &Pkcs11Config, file: &str) -> Result<(), ConfigError> {
    let PinSource::File(path) = &pkcs11.pin else {
        return Ok(());
    };
    let Ok(metadata) = std::fs::metadata(path) else {
        return Ok(());
    };
    match exposed_pin_file(path, &metadata) {
        None => Ok(()),
        Some(exposed) => Err(ConfigError::Invalid {
            file: file.to_owned(),
            key: "pkcs11.pin_file".to_owned(),
            problem: exposed.problem,
            fix: exposed.fix,
        }),
    }
}

fn cert_environment(name: &str) -> Option<CertEnvironment> {
    match name {
        "test" => Some(CertEnvironment::Test),
        "prod" => Some(CertEnvironment::Production),
        _ => None,
    }
}

/// A TOML offset date-time as Unix seconds; a bare date means midnight UTC.
pub(crate) fn unix_seconds(
    value: &toml::value::Datetime,
    key: &str,
    invalid: &dyn Fn(&str, String, &str) -> ConfigError,
) -> Result<i64, ConfigError> {
    let Some(date) = value.date else {
        return Err(invalid(
            key,
            format!("{value} has no date"),
            "write it as 2027-01-31T00:00:00Z",
        ));
    };
    let (h, m, sec) = value.time.map_or((0, 0, 0), |t| {
        (i64::from(t.hour), i64::from(t.minute), i64::from(t.second))
    });
    let offset_minutes = match value.offset {
        None if value.time.is_some() => {
            return Err(invalid(
                key,
                format!("{value} has no time zone"),
                "add Z or an offset, e.g. 2027-01-31T00:00:00Z",
            ));
        }
        None | Some(toml::value::Offset::Z) => 0,
        Some(toml::value::Offset::Custom { minutes }) => i64::from(minutes),
    };
    // Days from 1970-01-01 to the civil date (Howard Hinnant's algorithm).
    let (y, mo, d) = (
        i64::from(date.year),
        i64::from(date.month),
        i64::from(date.day),
    );
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days * 86_400 + h * 3600 + m * 60 + sec - offset_minutes * 60)
}

/// Sessions when the config sets none: four per CPU (at least 4). A soft token signs on the
/// CPU, so extra sessions keep every core busy while other requests are between signs
/// (measured on 2 cores: 2 sessions reach 0.56 of raw C_Sign/s through gRPC, 8 reach
/// 0.86; see docs/performance.md). A hardware HSM caps sessions: set `pkcs11.sessions`.
pub fn default_sessions() -> usize {
    std::thread::available_parallelism().map_or(4, |n| (n.get() * 4).max(4))
}

/// Parses TOML text, naming `file` in a syntax error.
pub(crate) fn from_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Syntax {
        file: file.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })
}

/// Makes [`ConfigError::Invalid`] for `file`: the key, the problem, the fix.
pub(crate) fn invalid_in(file: &str) -> impl Fn(&str, String, &str) -> ConfigError + '_ {
    move |key, problem, fix| ConfigError::Invalid {
        file: file.to_owned(),
        key: key.to_owned(),
        problem,
        fix: fix.to_owned(),
    }
}

fn is_key_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    unix_socket: Option<PathBuf>,
    socket_mode: Option<String>,
    #[serde(default)]
    insecure: bool,
    tls: Option<access::RawTls>,
    #[serde(default)]
    policy: Vec<access::RawPolicy>,
    audit: Option<access::RawAudit>,
    pkcs11: RawPkcs11,
    #[serde(default)]
    keys: Vec<RawKey>,
    default_key: Option<String>,
    default_environment: Option<String>,
    #[serde(default)]
    environments: BTreeMap<String, RawEnvironment>,
    expiry_warning_days: Option<u32>,
    metrics: Option<RawMetrics>,
    token: Option<token::RawToken>,
    limits: Option<limits::RawLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPkcs11 {
    module: PathBuf,
    token_label: Option<String>,
    token_serial: Option<String>,
    slot_id: Option<u64>,
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
    sessions: Option<usize>,
    queue: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: String,
    label: Option<String>,
    id: Option<String>,
    certificate: Option<String>,
    kid: Option<String>,
    not_before: Option<toml::value::Datetime>,
    not_after: Option<toml::value::Datetime>,
    algorithm: Option<String>,
    certificate_environment: Option<String>,
    #[serde(default)]
    allow_environment_mismatch: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvironment {
    #[serde(alias = "issuer")]
    audience: String,
    certificates: Option<String>,
    token_endpoint: Option<String>,
    #[serde(default)]
    discover: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_pin_file_is_open_to_its_owner_only_or_read_through_the_group() {
        let at = Path::new("/x/pin");
        let problem = |mode, owned| pin_file_exposure(at, mode, owned).map(|e| e.to_string());
        // The agent's own file: owner only, as ssh wants of a private key.
        assert_eq!(problem(0o100600, true), None);
        assert_eq!(problem(0o100400, true), None);
        assert_eq!(
            problem(0o100644, true).as_deref(),
            Some("/x/pin is readable by group or others (mode 0644); run: chmod 600 /x/pin")
        );
        assert_eq!(
            problem(0o100640, true).as_deref(),
            Some("/x/pin is readable by group or others (mode 0640); run: chmod 600 /x/pin")
        );
        assert_eq!(
            problem(0o100620, true).as_deref(),
            Some("/x/pin is writable by group or others (mode 0620); run: chmod 600 /x/pin")
        );
        assert_eq!(
            problem(0o100601, true).as_deref(),
            Some("/x/pin is executable by group or others (mode 0601); run: chmod 600 /x/pin")
        );
        // Another user's file (root:agent-group 0440, a Secret under fsGroup): read
        // through the group, nothing more.
        assert_eq!(problem(0o100440, false), None);
        assert_eq!(problem(0o100400, false), None);
        assert_eq!(
            problem(0o100444, false).as_deref(),
            Some("/x/pin is readable by group or others (mode 0444); run: chmod 440 /x/pin")
        );
        assert_eq!(
            problem(0o100460, false).as_deref(),
            Some("/x/pin is writable by group or others (mode 0460); run: chmod 440 /x/pin")
        );
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
                env(
                    "audience = \"https://mp.example/\"\ntoken_endpoint = \"http://mp.example/token\"",
                ),
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
        assert!(
            err(&(GOOD.to_owned() + "algorithm = \"ES256\"\n")).contains("`keys[0].algorithm`")
        );
        assert!(
            err(&GOOD.replace("label = \"virksomhetssertifikat\"", "id = \"xyz\""))
                .contains("`keys[0].id`")
        );
        assert!(
            err(&GOOD.replace("[pkcs11]", "[pkcs11]\nsessions = 0")).contains("`pkcs11.sessions`")
        );
        assert!(err(&format!("default_key = \"nope\"\n{GOOD}")).contains("`default_key`"));
        assert!(
            err(&(GOOD.to_owned() + "[audit]\ncached = \"never\"\n")).contains("`audit.cached`")
        );
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
        assert!(
            err(&format!("default_environment = \"nope\"\n{GOOD}"))
                .contains("`default_environment`")
        );
        let twice = GOOD.to_owned()
            + "[[keys]]\nname = \"other\"\nlabel = \"virksomhetssertifikat\"\ncertificate = \"token\"\n";
        assert!(
            err(&twice).contains(
                "`keys[1].label`: the same token key is configured again (as \"default\")"
            ),
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
        assert!(
            err(&format!("expiry_warning_days = 5000\n{GOOD}")).contains("`expiry_warning_days`")
        );
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
    }

    #[test]
    fn listeners_without_caller_identity_are_refused() {
        let no_insecure = GOOD.replace("insecure = true\n", "");
        assert!(err(&no_insecure).contains(
            "`listen`: 127.0.0.1:50051 would serve plain TCP, where callers cannot be identified"
        ));
        let public = GOOD.replace("127.0.0.1:50051", "0.0.0.0:50051");
        assert!(
            err(&public).contains(
                "`listen`: 0.0.0.0:50051 is not a loopback address, and there is no [tls]"
            )
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
            err(&rule("caller = \"root\""))
                .contains("`policy[0].caller`: \"root\" is not a caller")
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
}
