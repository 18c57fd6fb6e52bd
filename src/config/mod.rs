//! The agent's configuration: plain data parsed from TOML and validated before any
//! socket is bound or PKCS#11 session opened.
//!
//! Every error names the file, the key and the fix, because the person reading it is
//! an operator at a terminal, not a developer with a debugger. Relative paths in the
//! file are resolved against the file's own folder, so a config and its PIN file can
//! move together.
//!
//! One file per section, each with its `Raw*` serde struct and its validation:
//! `access` (listeners, TLS, policy, audit), `pkcs11`, `keys`, `environments`, `token`,
//! `limits`, `tracing`, and `trust` (with `[revocation]`). This file holds [`Config`], the top-level keys and [`ConfigError`].

use std::{collections::BTreeMap, path::Path};

use serde::Deserialize;

use crate::cert::CertEnvironment;

mod access;
mod environments;
mod keys;
mod limits;
mod pkcs11;
#[cfg(test)]
mod tests;
mod token;
mod tracing;
mod trust;

pub use crate::telemetry::TracingSettings;
pub use access::{Access, PolicyRule, Tls, UnixSocket};
pub(crate) use access::{CachedAudit, IdentityField, Pattern};
pub(crate) use environments::{EnvironmentConfig, TokenEndpoint};
pub(crate) use keys::{CertificateSource, KeyBinding};
pub use keys::{KeyConfig, KeyLocator};
pub(crate) use limits::{Limits, MAX_REQUEST_BYTES};
pub use pkcs11::{PinSource, Pkcs11Config, default_sessions};
pub use token::TokenSettings;
pub(crate) use token::endpoint_problem;
pub use trust::{RevocationSettings, TrustSettings};

/// Where the agent listens when the config says nothing.
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// Days before expiry when the agent starts warning, unless the config says otherwise.
pub(crate) const DEFAULT_EXPIRY_WARNING_DAYS: u32 = 30;

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
    pub(crate) default_key: String,
    /// Environment used when a request names none; `None` makes it required.
    pub(crate) default_environment: Option<String>,
    /// Named environments beyond (or overriding) the built-in `test`, `prod`, `sky-test`
    /// and `sky`.
    pub(crate) environments: BTreeMap<String, EnvironmentConfig>,
    /// Warn when a certificate expires within this many days.
    pub(crate) expiry_warning_days: u32,
    /// Address for Prometheus metrics (`GET /metrics`); `None` serves none.
    pub(crate) metrics_listen: Option<std::net::SocketAddr>,
    /// `[health] listen`: an address serving only `grpc.health.v1` over plaintext HTTP/2,
    /// for probes that cannot present a client certificate; `None` serves none.
    pub health_listen: Option<std::net::SocketAddr>,
    /// Reaching Maskinporten's token endpoint, and the access token cache.
    pub token: TokenSettings,
    /// What a peer may make the agent hold: connections, streams, windows, timeouts.
    pub(crate) limits: Limits,
    /// `[tracing]`: where OpenTelemetry spans go; `None` sends none.
    pub tracing: Option<TracingSettings>,
    /// `[trust]`: the roots each key's chain must lead to.
    pub(crate) trust: TrustSettings,
    /// `[revocation]`: OCSP and CRL checks of each key's certificate.
    pub(crate) revocation: RevocationSettings,
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
        let (text, file) = read(path)?;
        let config = Self::parse(&text, &file, base_of(path))?;
        pkcs11::refuse_exposed_pin_file(&config.pkcs11, &file)?;
        Ok(config)
    }

    /// Reads only the `[pkcs11]` section, for key management commands that run before any
    /// key is configured.
    pub(crate) fn load_token_settings(path: &Path) -> Result<Pkcs11Config, ConfigError> {
        let (text, file) = read(path)?;
        let raw: RawConfig = from_toml(&text, &file)?;
        let pkcs11 = pkcs11::pkcs11(raw.pkcs11, base_of(path), &invalid_in(&file))?;
        pkcs11::refuse_exposed_pin_file(&pkcs11, &file)?;
        Ok(pkcs11)
    }

    /// Parses and validates config text; `origin` names it in errors and relative paths
    /// resolve against the current directory. Tests use it to need no files.
    #[cfg(test)]
    pub(crate) fn from_toml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::parse(text, origin, Path::new("."))
    }

    /// Validates each section in turn and stops at the first error, so the order here is
    /// the order in which an operator meets them.
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
        let pkcs11 = pkcs11::pkcs11(raw.pkcs11, base, &invalid)?;
        let expiry_warning_days = expiry_warning_days(raw.expiry_warning_days, &invalid)?;
        let keys = keys::keys(raw.keys, base, &invalid)?;
        let default_key = keys::default_key(raw.default_key, &keys, &invalid)?;
        let token = token::token(raw.token, base, &invalid)?;
        let limits = limits::limits(raw.limits, &invalid)?;
        let environments = environments::environments(raw.environments, &invalid)?;
        let metrics_listen = listen_address(raw.metrics, "metrics.listen", "9464", &invalid)?;
        let health_listen = listen_address(raw.health, "health.listen", "8081", &invalid)?;
        let tracing = tracing::tracing(raw.tracing, &invalid)?;
        let trust = trust::trust(raw.trust, base, &invalid)?;
        let revocation = trust::revocation(raw.revocation, &invalid)?;
        let config = Config {
            access,
            pkcs11,
            keys,
            default_key,
            default_environment: raw.default_environment,
            environments,
            expiry_warning_days,
            metrics_listen,
            health_listen,
            token,
            limits,
            tracing,
            trust,
            revocation,
        };
        config.check_default_environment(&invalid)?;
        Ok(config)
    }
}

/// The file's text and its name for errors.
fn read(path: &Path) -> Result<(String, String), ConfigError> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((text, file)),
        Err(source) => Err(ConfigError::Read { file, source }),
    }
}

/// The folder relative paths in the file resolve against: the file's own.
fn base_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// `expiry_warning_days`: up to ten years.
fn expiry_warning_days(raw: Option<u32>, invalid: Invalid<'_>) -> Result<u32, ConfigError> {
    match raw {
        None => Ok(DEFAULT_EXPIRY_WARNING_DAYS),
        Some(days) if days <= 3650 => Ok(days),
        Some(days) => Err(invalid(
            "expiry_warning_days",
            format!("{days} is more than ten years"),
            "use 0 to 3650 days",
        )),
    }
}

/// `[metrics] listen` or `[health] listen` (`key`): an IP address and port, or none
/// served; `port` is the example in the fix.
fn listen_address(
    raw: Option<RawListen>,
    key: &str,
    port: &str,
    invalid: Invalid<'_>,
) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    let Some(RawListen { listen }) = raw else {
        return Ok(None);
    };
    listen.parse().map(Some).map_err(|_| {
        invalid(
            key,
            format!("{listen:?} is not an IP address and port"),
            &format!("write it as \"127.0.0.1:{port}\""),
        )
    })
}

/// How a section reports a value that cannot work: the key, the problem, the fix.
type Invalid<'a> = &'a dyn Fn(&str, String, &str) -> ConfigError;

/// A number within `range`, or `default` when the key is left out; `fix` gives the range.
fn within<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: Option<T>,
    range: std::ops::RangeInclusive<T>,
    default: T,
    fix: &str,
    invalid: Invalid<'_>,
) -> Result<T, ConfigError> {
    match value {
        None => Ok(default),
        Some(n) if range.contains(&n) => Ok(n),
        Some(n) => Err(invalid(key, format!("{n} is out of range"), fix)),
    }
}

/// A certificate environment as the file names it: `test` or `prod`.
fn cert_environment(name: &str) -> Option<CertEnvironment> {
    match name {
        "test" => Some(CertEnvironment::Test),
        "prod" => Some(CertEnvironment::Production),
        _ => None,
    }
}

/// A TOML offset date-time as Unix seconds; a bare date means midnight UTC. Public, as
/// are [`from_toml`] and [`invalid_in`], for the local Maskinporten's config reader (the
/// `mock-maskinporten` crate), whose errors have the same shape.
pub fn unix_seconds(
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
    let (h, m, sec) = value
        .time
        .map_or((0, 0, 0), |t| (t.hour, t.minute, t.second));
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
    let local = der::DateTime::new(date.year, date.month, date.day, h, m, sec).map_err(|_| {
        invalid(
            key,
            format!("{value} is not a time from 1970 to 9999"),
            "write it as 2027-01-31T00:00:00Z",
        )
    })?;
    // At most 253402300799 seconds (9999-12-31T23:59:59), which fits an i64.
    let local = i64::try_from(local.unix_duration().as_secs()).unwrap_or(i64::MAX);
    Ok(local - offset_minutes * 60)
}

/// Parses TOML text, naming `file` in a syntax error.
pub fn from_toml<T: serde::de::DeserializeOwned>(text: &str, file: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Syntax {
        file: file.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })
}

/// Makes [`ConfigError::Invalid`] for `file`: the key, the problem, the fix.
pub fn invalid_in(file: &str) -> impl Fn(&str, String, &str) -> ConfigError + '_ {
    move |key, problem, fix| ConfigError::Invalid {
        file: file.to_owned(),
        key: key.to_owned(),
        problem,
        fix: fix.to_owned(),
    }
}

/// A key or environment name: 1 to 64 characters from A-Z a-z 0-9 . _ -
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
    unix_socket: Option<std::path::PathBuf>,
    socket_mode: Option<String>,
    #[serde(default)]
    insecure: bool,
    tls: Option<access::RawTls>,
    #[serde(default)]
    policy: Vec<access::RawPolicy>,
    audit: Option<access::RawAudit>,
    pkcs11: pkcs11::RawPkcs11,
    #[serde(default)]
    keys: Vec<keys::RawKey>,
    default_key: Option<String>,
    default_environment: Option<String>,
    #[serde(default)]
    environments: BTreeMap<String, environments::RawEnvironment>,
    expiry_warning_days: Option<u32>,
    metrics: Option<RawListen>,
    health: Option<RawListen>,
    token: Option<token::RawToken>,
    limits: Option<limits::RawLimits>,
    tracing: Option<tracing::RawTracing>,
    trust: Option<trust::RawTrust>,
    revocation: Option<trust::RawRevocation>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
/// `[metrics]` and `[health]`: one address each.
struct RawListen {
    listen: String,
}
