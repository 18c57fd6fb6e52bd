//! `[environments]` and `default_environment`: where grants are addressed and exchanged,
//! next to the built-in `test` and `prod` (Maskinporten) and `sky-test` and `sky`
//! (Skyporten), whose issuers and token endpoints are in [`crate::maskinporten`].

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Config, ConfigError, Invalid, cert_environment, endpoint_problem, is_key_name};
use crate::{cert::CertEnvironment, maskinporten};

/// An environment: where grants are addressed and exchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EnvironmentConfig {
    /// The `aud` claim, Maskinporten's issuer URL.
    pub(crate) audience: String,
    /// Which certificates it accepts (test or production).
    pub(crate) certificates: CertEnvironment,
    /// Where grants are exchanged for access tokens.
    pub(crate) token_endpoint: TokenEndpoint,
}

/// How the token endpoint of an environment is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenEndpoint {
    /// This URL.
    Url(String),
    /// `token_endpoint` from the issuer's `/.well-known/oauth-authorization-server`, or
    /// its `/.well-known/openid-configuration` when that is absent, fetched at the first
    /// token request and kept.
    Discover,
}

/// A Digdir environment as the config describes environments: its certificates as
/// [`CertEnvironment`], and an unlisted token endpoint as discovered.
fn built_in(name: &str) -> Option<EnvironmentConfig> {
    let env = maskinporten::ENVIRONMENTS
        .into_iter()
        .find(|env| env.name == name)?;
    Some(EnvironmentConfig {
        audience: env.issuer.to_owned(),
        certificates: if env.production {
            CertEnvironment::Production
        } else {
            CertEnvironment::Test
        },
        token_endpoint: match env.token_endpoint {
            Some(url) => TokenEndpoint::Url(url.to_owned()),
            None => TokenEndpoint::Discover,
        },
    })
}

impl Config {
    /// An environment by name: the config's own first, then the built-in `test`, `prod`
    /// (Maskinporten) and `sky-test`, `sky` (Skyporten).
    pub(crate) fn environment(&self, name: &str) -> Option<EnvironmentConfig> {
        match self.environments.get(name) {
            Some(env) => Some(env.clone()),
            None => built_in(name),
        }
    }

    /// All environment names a request may use, sorted.
    pub(crate) fn environment_names(&self) -> Vec<String> {
        let mut names: Vec<String> = maskinporten::ENVIRONMENTS
            .iter()
            .map(|env| env.name.to_owned())
            .collect();
        names.extend(self.environments.keys().cloned());
        names.sort();
        names.dedup();
        names
    }

    /// Refuses a `default_environment` that is neither the config's own nor built in.
    pub(super) fn check_default_environment(
        &self,
        invalid: Invalid<'_>,
    ) -> Result<(), ConfigError> {
        match &self.default_environment {
            Some(env) if self.environment(env).is_none() => Err(invalid(
                "default_environment",
                format!("{env:?} is not a known environment"),
                "use \"test\", \"prod\", \"sky-test\", \"sky\" or a name from [environments]",
            )),
            _ => Ok(()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEnvironment {
    #[serde(alias = "issuer")]
    audience: String,
    certificates: Option<String>,
    token_endpoint: Option<String>,
    #[serde(default)]
    discover: bool,
}

/// Validates the `[environments.NAME]` tables.
pub(super) fn environments(
    raw: BTreeMap<String, RawEnvironment>,
    invalid: Invalid<'_>,
) -> Result<BTreeMap<String, EnvironmentConfig>, ConfigError> {
    raw.into_iter()
        .map(|(name, env)| Ok((name.clone(), environment(&name, env, invalid)?)))
        .collect()
}

/// One `[environments.NAME]` table.
fn environment(
    name: &str,
    env: RawEnvironment,
    invalid: Invalid<'_>,
) -> Result<EnvironmentConfig, ConfigError> {
    let key = format!("environments.{name}.audience");
    if !is_key_name(name) {
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
    let token_endpoint = token_endpoint(name, &env, invalid)?;
    Ok(EnvironmentConfig {
        audience: env.audience,
        certificates,
        token_endpoint,
    })
}

/// A given `token_endpoint`, `discover = true`, or the default under the issuer.
fn token_endpoint(
    name: &str,
    env: &RawEnvironment,
    invalid: Invalid<'_>,
) -> Result<TokenEndpoint, ConfigError> {
    match (&env.token_endpoint, env.discover) {
        (Some(_), true) => Err(invalid(
            &format!("environments.{name}.discover"),
            "is set together with token_endpoint".into(),
            "give token_endpoint, or discover = true, not both",
        )),
        (Some(url), false) => match endpoint_problem(url) {
            Some(problem) => Err(invalid(
                &format!("environments.{name}.token_endpoint"),
                problem,
                "use https (plain http only to a loopback address)",
            )),
            None => Ok(TokenEndpoint::Url(url.clone())),
        },
        (None, true) => match endpoint_problem(&env.audience) {
            Some(problem) => Err(invalid(
                &format!("environments.{name}.audience"),
                problem,
                "discovery reads the issuer over https (plain http only on loopback)",
            )),
            None => Ok(TokenEndpoint::Discover),
        },
        (None, false) => Ok(TokenEndpoint::Url(maskinporten::token_endpoint_under(
            &env.audience,
        ))),
    }
}
