//! `[trust]` (the roots a key's chain must lead to, and whether a chain that does not
//! stops the key) and `[revocation]` (OCSP and CRL checks of each key's certificate).

use std::{path::Path, time::Duration};

use serde::Deserialize;

use super::{ConfigError, Invalid, within};
use crate::cert::{Root, TrustStore};

/// What the agent trusts, and what it does about a chain that leads nowhere trusted.
#[derive(Debug, Clone, Default)]
pub struct TrustSettings {
    /// The shipped production roots plus `test_roots` and `prod_roots`.
    pub(crate) store: TrustStore,
    /// `chain = "require"`: a key whose chain is not valid is not loaded. The default,
    /// `"warn"`, loads it with a warning and shows the status.
    pub(crate) require_chain: bool,
}

/// How certificates' revocation is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevocationSettings {
    /// `enabled = false` checks nothing (an air-gapped site without a responder).
    pub(crate) enabled: bool,
    /// Time between checks of every key's certificate.
    pub(crate) interval: Duration,
    /// How long a good answer counts when later checks get no answer; past it the status
    /// is `unreachable` and a warning is logged (the key still signs).
    pub(crate) good_for: Duration,
    /// For each request to a responder or CRL distribution point.
    pub(crate) timeout: Duration,
}

impl Default for RevocationSettings {
    fn default() -> Self {
        RevocationSettings {
            enabled: true,
            interval: Duration::from_secs(3600),
            good_for: Duration::from_secs(7 * 86400),
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTrust {
    #[serde(default)]
    test_roots: Vec<String>,
    #[serde(default)]
    prod_roots: Vec<String>,
    chain: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRevocation {
    enabled: Option<bool>,
    interval_seconds: Option<u64>,
    good_for_seconds: Option<u64>,
    timeout_seconds: Option<u64>,
}

/// Validates `[trust]`, reading every root file; a relative path resolves against `base`.
pub(super) fn trust(
    raw: Option<RawTrust>,
    base: &Path,
    invalid: Invalid<'_>,
) -> Result<TrustSettings, ConfigError> {
    let raw = raw.unwrap_or(RawTrust {
        test_roots: Vec::new(),
        prod_roots: Vec::new(),
        chain: None,
    });
    let require_chain = match raw.chain.as_deref() {
        None | Some("warn") => false,
        Some("require") => true,
        Some(other) => {
            return Err(invalid(
                "trust.chain",
                format!("{other:?} is neither \"warn\" nor \"require\""),
                "use \"require\" (a key whose chain does not lead to a trusted root is not loaded) or \"warn\" (loaded, with a warning)",
            ));
        }
    };
    let test = roots(&raw.test_roots, "trust.test_roots", base, invalid)?;
    let production = roots(&raw.prod_roots, "trust.prod_roots", base, invalid)?;
    Ok(TrustSettings {
        store: TrustStore::new(test, production),
        require_chain,
    })
}

/// Every certificate of every PEM file in `files` (`key` names the list in errors).
fn roots(
    files: &[String],
    key: &str,
    base: &Path,
    invalid: Invalid<'_>,
) -> Result<Vec<Root>, ConfigError> {
    let mut roots = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let path = base.join(file);
        let key = format!("{key}[{i}]");
        let pem = std::fs::read(&path).map_err(|e| {
            invalid(
                &key,
                format!("cannot read {}: {e}", path.display()),
                "name a PEM file holding the issuer's root certificate",
            )
        })?;
        roots.extend(
            Root::from_pem(&pem, &path.display().to_string()).map_err(|e| {
                invalid(
                    &key,
                    format!("{}: {e}", path.display()),
                    "name a PEM file of root certificates (\"-----BEGIN CERTIFICATE-----\" blocks)",
                )
            })?,
        );
    }
    Ok(roots)
}

/// Validates `[revocation]`.
pub(super) fn revocation(
    raw: Option<RawRevocation>,
    invalid: Invalid<'_>,
) -> Result<RevocationSettings, ConfigError> {
    let defaults = RevocationSettings::default();
    let Some(raw) = raw else {
        return Ok(defaults);
    };
    let interval = within(
        "revocation.interval_seconds",
        raw.interval_seconds,
        60..=86400,
        defaults.interval.as_secs(),
        "use 60 seconds to 86400 (a day)",
        invalid,
    )?;
    let good_for = within(
        "revocation.good_for_seconds",
        raw.good_for_seconds,
        interval..=90 * 86400,
        defaults.good_for.as_secs().max(interval),
        "use from interval_seconds up to 7776000 (90 days)",
        invalid,
    )?;
    let timeout = within(
        "revocation.timeout_seconds",
        raw.timeout_seconds,
        1..=60,
        defaults.timeout.as_secs(),
        "use 1 to 60 seconds",
        invalid,
    )?;
    Ok(RevocationSettings {
        enabled: raw.enabled.unwrap_or(true),
        interval: Duration::from_secs(interval),
        good_for: Duration::from_secs(good_for),
        timeout: Duration::from_secs(timeout),
    })
}
