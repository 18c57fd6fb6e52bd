//! `[[keys]]` and `default_key`: the keys the agent signs with, how each is found in the
//! token, and how Maskinporten knows it (certificate chain or registered `kid`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, Invalid, cert_environment, is_key_name, unix_seconds};
pub use crate::hsm::KeyLocator;
use crate::{cert::CertEnvironment, grant::Algorithm, hex};

/// One signing key.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    /// The name callers use in `GrantParameters.key`.
    pub name: String,
    /// How the private key is found in the token.
    pub(crate) locator: KeyLocator,
    /// How Maskinporten knows the key: by certificate (`x5c`) or registered key (`kid`).
    pub(crate) binding: KeyBinding,
    /// JWS algorithm for grants signed with this key.
    pub(crate) algorithm: Algorithm,
    /// Sign for an environment that does not match the certificate's (test vs production).
    pub(crate) allow_environment_mismatch: bool,
}

/// How the grant tells Maskinporten which key signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyBinding {
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

/// Where a key's certificate chain comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CertificateSource {
    /// The `CKO_CERTIFICATE` object in the token with the key's `CKA_ID`.
    Token,
    /// A PEM file: the leaf first, then intermediates.
    PemFile(PathBuf),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
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

/// Validates the `[[keys]]` tables, in file order; a relative certificate path resolves
/// against `base`.
pub(super) fn keys(
    raw: Vec<RawKey>,
    base: &Path,
    invalid: Invalid<'_>,
) -> Result<Vec<KeyConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid(
            "keys",
            "no key is configured".into(),
            "add a [[keys]] table with name, label (or id) and certificate",
        ));
    }
    let mut keys: Vec<KeyConfig> = Vec::with_capacity(raw.len());
    for (i, k) in raw.into_iter().enumerate() {
        let key = key(
            k,
            &keys,
            &|field| format!("keys[{i}].{field}"),
            base,
            invalid,
        )?;
        keys.push(key);
    }
    Ok(keys)
}

/// `default_key`: a configured key's name, or the first key's.
pub(super) fn default_key(
    raw: Option<String>,
    keys: &[KeyConfig],
    invalid: Invalid<'_>,
) -> Result<String, ConfigError> {
    match raw {
        None => Ok(keys[0].name.clone()),
        Some(name) if keys.iter().any(|k| k.name == name) => Ok(name),
        Some(name) => Err(invalid(
            "default_key",
            format!("no key is named {name:?}"),
            "name one of the [[keys]], or leave it out to use the first",
        )),
    }
}

/// One `[[keys]]` table; `earlier` are the ones before it and `at` names its fields.
fn key(
    k: RawKey,
    earlier: &[KeyConfig],
    at: &dyn Fn(&str) -> String,
    base: &Path,
    invalid: Invalid<'_>,
) -> Result<KeyConfig, ConfigError> {
    if !is_key_name(&k.name) {
        return Err(invalid(
            &at("name"),
            format!("{:?} is not a usable key name", k.name),
            "use 1 to 64 characters from A-Z a-z 0-9 . _ -",
        ));
    }
    let locator = locator(k.label.as_deref(), k.id.as_deref(), at, invalid)?;
    if let Some(earlier) = earlier.iter().find(|seen| seen.locator == locator) {
        return Err(invalid(
            &at("label"),
            format!(
                "the same token key is configured again (as {:?})",
                earlier.name
            ),
            "a new certificate for the same name needs its own key; give it its own label or id",
        ));
    }
    let binding = binding(&k, at, base, invalid)?;
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
    Ok(KeyConfig {
        name: k.name,
        locator,
        binding,
        algorithm,
        allow_environment_mismatch: k.allow_environment_mismatch,
    })
}

/// Exactly one of `label` and `id` (hex).
fn locator(
    label: Option<&str>,
    id: Option<&str>,
    at: &dyn Fn(&str) -> String,
    invalid: Invalid<'_>,
) -> Result<KeyLocator, ConfigError> {
    match (label, id) {
        (Some(label), None) if !label.is_empty() => Ok(KeyLocator::Label(label.to_owned())),
        (None, Some(id)) => hex::decode(id).map(KeyLocator::Id).ok_or_else(|| {
            invalid(
                &at("id"),
                format!("{id:?} is not hex"),
                "write the CKA_ID as hex digits, e.g. id = \"01\"",
            )
        }),
        _ => Err(invalid(
            &at("label"),
            "exactly one of label and id must be set (and not empty)".into(),
            "find the key by its CKA_LABEL (label = \"...\") or its CKA_ID (id = \"01\")",
        )),
    }
}

/// A certificate (from the token or a PEM file) or a registered `kid`, not both.
fn binding(
    k: &RawKey,
    at: &dyn Fn(&str) -> String,
    base: &Path,
    invalid: Invalid<'_>,
) -> Result<KeyBinding, ConfigError> {
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
    match (k.certificate.as_deref(), &k.kid) {
        (Some(""), None) | (None, None) => Err(invalid(
            &at("certificate"),
            "is missing".into(),
            "write \"token\" or the path of a PEM chain (leaf first), or set kid for a key registered on the client",
        )),
        (Some(_), Some(_)) => Err(invalid(
            &at("kid"),
            "is set together with certificate".into(),
            "a grant carries either x5c (certificate) or kid (registered key): keep one",
        )),
        (Some(source), None) => {
            if k.not_before.is_some() || k.not_after.is_some() {
                return Err(invalid(
                    &at("not_after"),
                    "is only for kid keys".into(),
                    "a certificate's own validity decides when it is used; remove not_before/not_after",
                ));
            }
            Ok(KeyBinding::Certificate {
                source: match source {
                    "token" => CertificateSource::Token,
                    path => CertificateSource::PemFile(base.join(path)),
                },
                environment,
            })
        }
        (None, Some(kid)) => kid_binding(k, kid, environment, at, invalid),
    }
}

/// A key registered on the Maskinporten client, with its optional validity.
fn kid_binding(
    k: &RawKey,
    kid: &str,
    environment: Option<CertEnvironment>,
    at: &dyn Fn(&str) -> String,
    invalid: Invalid<'_>,
) -> Result<KeyBinding, ConfigError> {
    if kid.is_empty() || kid.len() > 256 || !kid.chars().all(|c| c.is_ascii_graphic()) {
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
    let seconds = |field: &str, value: Option<&toml::value::Datetime>| {
        value
            .map(|d| unix_seconds(d, &at(field), invalid))
            .transpose()
    };
    Ok(KeyBinding::Kid {
        kid: kid.to_owned(),
        not_before: seconds("not_before", k.not_before.as_ref())?,
        not_after: seconds("not_after", k.not_after.as_ref())?,
    })
}
