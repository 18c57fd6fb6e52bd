//! Keys as the agent sees them: each configured entry bound to its token key and
//! certificate (or registered `kid`), grouped by name into versions for rollover.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use crate::{
    cert::{CertEnvironment, CertificateChain, ChainStatus},
    config::{CertificateSource, Config, EnvironmentConfig, KeyBinding, KeyConfig},
    grant::{Algorithm, Claims, GrantField, Header, InvalidGrant, ValidGrant},
    hsm::{Hash, HsmError, KeyRef, SignPath, Token, TokenKey},
};

use super::{SignError, StartError, revocation::RevocationBook};

/// One version of a key: a token key and how Maskinporten knows it.
#[derive(Debug)]
pub(crate) struct SigningKey {
    name: String,
    pub(super) key: KeyRef,
    /// How the token signs with this key's algorithm, found when the key was loaded.
    pub(super) path: SignPath,
    pub(super) header: Header,
    identity: Identity,
    not_before: Option<i64>,
    not_after: Option<i64>,
    allow_environment_mismatch: bool,
}

#[derive(Debug)]
enum Identity {
    Certificate {
        chain: CertificateChain,
        sha256: String,
        environment: CertEnvironment,
        /// Where the chain leads, judged when the key was loaded.
        status: ChainStatus,
        /// DER of the certificate that issued the leaf, for the revocation check.
        issuer: Option<Vec<u8>>,
    },
    Kid(String),
}

impl SigningKey {
    /// The configured name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The JWS algorithm.
    pub(crate) fn algorithm(&self) -> Algorithm {
        self.header.algorithm()
    }

    /// The certificate chain, leaf first; `None` for a `kid` key.
    pub(crate) fn chain(&self) -> Option<&CertificateChain> {
        match &self.identity {
            Identity::Certificate { chain, .. } => Some(chain),
            Identity::Kid(_) => None,
        }
    }

    /// Where the chain leads (`None` for a `kid` key).
    pub(crate) fn chain_status(&self) -> Option<&ChainStatus> {
        match &self.identity {
            Identity::Certificate { status, .. } => Some(status),
            Identity::Kid(_) => None,
        }
    }

    /// DER of the certificate that issued the leaf, when known.
    pub(crate) fn issuer(&self) -> Option<&[u8]> {
        match &self.identity {
            Identity::Certificate { issuer, .. } => issuer.as_deref(),
            Identity::Kid(_) => None,
        }
    }

    /// Lowercase hex SHA-256 of the leaf certificate; empty for a `kid` key.
    pub(crate) fn certificate_sha256(&self) -> &str {
        match &self.identity {
            Identity::Certificate { sha256, .. } => sha256,
            Identity::Kid(_) => "",
        }
    }

    /// Test or production (after any config override); `None` for a `kid` key.
    pub(crate) fn environment(&self) -> Option<CertEnvironment> {
        match &self.identity {
            Identity::Certificate { environment, .. } => Some(*environment),
            Identity::Kid(_) => None,
        }
    }

    /// The registered key id, for a `kid` key.
    pub(crate) fn kid(&self) -> Option<&str> {
        match &self.identity {
            Identity::Kid(kid) => Some(kid),
            Identity::Certificate { .. } => None,
        }
    }

    /// When this version may be used, as Unix seconds (`None` = unbounded).
    pub(crate) fn validity(&self) -> (Option<i64>, Option<i64>) {
        (self.not_before, self.not_after)
    }

    fn valid_at(&self, now: i64) -> bool {
        self.not_before.is_none_or(|t| t <= now) && self.not_after.is_none_or(|t| now <= t)
    }
}

/// Every key the agent signs with, and the environments it signs for. Replaced whole on
/// reload; requests in flight keep the set they started with.
#[derive(Debug)]
pub(crate) struct KeySet {
    keys: BTreeMap<String, Vec<SigningKey>>,
    default_key: String,
    environments: BTreeMap<String, EnvironmentConfig>,
    default_environment: Option<String>,
    /// Days before expiry when warnings start.
    pub(crate) expiry_warning_days: u32,
    /// What is known of each certificate's revocation; shared with the agent, so it
    /// outlives this set.
    revocation: Arc<RevocationBook>,
}

impl KeySet {
    /// Binds every configured key to its token key and certificate, and checks that each
    /// name has a version usable now. Blocking.
    pub(super) fn load(
        token: &Token,
        config: &Config,
        now: i64,
        revocation: Arc<RevocationBook>,
    ) -> Result<KeySet, StartError> {
        let mut keys: BTreeMap<String, Vec<SigningKey>> = BTreeMap::new();
        for key_config in &config.keys {
            let key = load_key(token, key_config, config, now)?;
            keys.entry(key.name.clone()).or_default().push(key);
        }
        let set = KeySet {
            keys,
            default_key: config.default_key.clone(),
            environments: config
                .environment_names()
                .into_iter()
                .filter_map(|name| Some((name.clone(), config.environment(&name)?)))
                .collect(),
            default_environment: config.default_environment.clone(),
            expiry_warning_days: config.expiry_warning_days,
            revocation,
        };
        for (name, versions) in &set.keys {
            if let Err(SignError::CertificateNotValid { state, .. }) = set.select(name, now) {
                return Err(StartError::NotValid {
                    key: name.clone(),
                    state,
                });
            }
            for v in versions {
                if v.environment() == Some(CertEnvironment::Unknown)
                    && !v.allow_environment_mismatch
                {
                    tracing::warn!(
                        key = %name,
                        issuer = %v.chain().map(CertificateChain::issuer).unwrap_or_default(),
                        "the certificate's issuer is not known as test or production; grants will be refused until keys[].certificate_environment says which"
                    );
                }
            }
        }
        Ok(set)
    }

    /// The version of `name` that signs at `now`: the newest (latest start) valid one.
    pub(crate) fn select(&self, name: &str, now: i64) -> Result<&SigningKey, SignError> {
        let versions = self
            .keys
            .get(name)
            .ok_or_else(|| SignError::UnknownKey(name.to_owned()))?;
        let newest_first = |v: &&SigningKey| v.not_before.unwrap_or(i64::MIN);
        let dated = || versions.iter().filter(|v| v.valid_at(now));
        if let Some(key) = dated()
            .filter(|v| self.revocation.revoked(v.certificate_sha256()).is_none())
            .max_by_key(newest_first)
        {
            return Ok(key);
        }
        // Every version valid now is revoked: say so for the newest.
        if let Some(key) = dated().max_by_key(newest_first)
            && let Some((at, reason, source)) = self.revocation.revoked(key.certificate_sha256())
        {
            return Err(SignError::Revoked {
                key: name.to_owned(),
                at: rfc3339(at),
                reason: reason.unwrap_or("not given"),
                answered_by: source,
            });
        }
        // None is valid now.
        let future = versions
            .iter()
            .filter_map(|v| v.not_before.filter(|t| *t > now))
            .min();
        let expired = versions.iter().filter_map(|v| v.not_after).max();
        Err(SignError::CertificateNotValid {
            key: name.to_owned(),
            state: match (future, expired) {
                (Some(t), _) => format!("not valid yet (from {})", rfc3339(t)),
                (None, Some(t)) => format!("expired (on {})", rfc3339(t)),
                (None, None) => "not valid".to_owned(),
            },
        })
    }

    /// Picks the key and makes the claims for a grant issued at `now`.
    pub(super) fn prepare(
        &self,
        grant: &ValidGrant,
        now: i64,
    ) -> Result<(&SigningKey, Claims), SignError> {
        let params = grant.params();
        let name = self.key_name(&params.key);
        let (environment_name, environment) = self.environment(&params.environment)?;
        let claims = grant.claims(&environment.audience, now);
        let key = self.select(name, now)?;
        if let Some(certificate) = key.environment()
            && certificate != environment.certificates
            && !key.allow_environment_mismatch
        {
            return Err(SignError::WrongEnvironment {
                key: key.name.clone(),
                certificate,
                environment: environment_name.to_owned(),
                issuer: key
                    .chain()
                    .map(CertificateChain::issuer)
                    .unwrap_or_default(),
            });
        }
        Ok((key, claims))
    }

    /// Checks the names a valid request uses against this key set, before the policy: the
    /// environment must exist (`grant.environment`) and so must the key (`grant.key`).
    /// Whether a certificate is valid, and for that environment, is judged when signing.
    pub(crate) fn check_names(&self, grant: &ValidGrant) -> Result<(), SignError> {
        let params = grant.params();
        let _ = self.environment(&params.environment)?;
        let name = self.key_name(&params.key);
        if self.keys.contains_key(name) {
            Ok(())
        } else {
            Err(SignError::UnknownKey(name.to_owned()))
        }
    }

    /// The key name a request means: the one it names, or the default key's.
    pub(crate) fn key_name<'a>(&'a self, requested: &'a str) -> &'a str {
        if requested.is_empty() {
            &self.default_key
        } else {
            requested
        }
    }

    /// The environment name a request means: the one it names, or the default (empty
    /// when there is none).
    pub(crate) fn environment_name<'a>(&'a self, requested: &'a str) -> &'a str {
        match (requested, &self.default_environment) {
            ("", Some(default)) => default,
            (env, _) => env,
        }
    }

    /// The environment a request names, or the default when it names none.
    pub(crate) fn environment<'a>(
        &'a self,
        requested: &'a str,
    ) -> Result<(&'a str, &'a EnvironmentConfig), InvalidGrant> {
        let name = self.environment_name(requested);
        let environment = self.environments.get(name).ok_or_else(|| {
            InvalidGrant::new(
                GrantField::Environment,
                format!(
                    "{} is not a known environment; use one of: {}",
                    if name.is_empty() {
                        "empty".to_owned()
                    } else {
                        format!("{name:?}")
                    },
                    self.environments
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?;
        Ok((name, environment))
    }

    /// Every version of every key, by name then file order.
    pub(crate) fn versions(&self) -> impl Iterator<Item = &SigningKey> {
        self.keys.values().flatten()
    }

    /// The name used when a request names none.
    pub(crate) fn default_key(&self) -> &str {
        &self.default_key
    }
}

fn load_key(
    token: &Token,
    config: &KeyConfig,
    all: &Config,
    now: i64,
) -> Result<SigningKey, StartError> {
    let name = &config.name;
    let hsm = hsm_error(config);
    let token_key = token.find_key(&config.locator).map_err(hsm)?;
    let path = token.sign_path(hash(config.algorithm)).map_err(hsm)?;
    let (identity, header, not_before, not_after) = match &config.binding {
        KeyBinding::Kid {
            kid,
            not_before,
            not_after,
        } => (
            Identity::Kid(kid.clone()),
            Header::with_kid(config.algorithm, kid),
            *not_before,
            *not_after,
        ),
        KeyBinding::Certificate {
            source,
            environment,
        } => {
            let chain = checked_chain(token, &token_key, config, source)?;
            let (not_before, not_after) = chain.validity();
            let header = Header::with_x5c(config.algorithm, chain.der());
            let environment = environment.unwrap_or_else(|| chain.environment());
            let judged = all.trust.store.judge(&chain, environment, now);
            judge_chain(name, &judged.status, all.trust.require_chain)?;
            (
                Identity::Certificate {
                    sha256: chain.leaf_sha256_hex(),
                    environment,
                    chain,
                    status: judged.status,
                    issuer: judged.issuer,
                },
                header,
                Some(not_before),
                Some(not_after),
            )
        }
    };
    let key = SigningKey {
        name: name.clone(),
        key: token_key.key_ref(),
        path,
        header,
        identity,
        not_before,
        not_after,
        allow_environment_mismatch: config.allow_environment_mismatch,
    };
    tracing::info!(
        key = %name,
        locator = %config.locator,
        bits = token_key.bits,
        algorithm = config.algorithm.jws_name(),
        mechanism = path.describe(hash(config.algorithm)),
        kid = key.kid().unwrap_or_default(),
        subject = %key.chain().map(CertificateChain::subject).unwrap_or_default(),
        environment = key.environment().map_or("", CertEnvironment::name),
        certificate_sha256 = key.certificate_sha256(),
        not_after = %not_after.map(rfc3339).unwrap_or_default(),
        "key ready"
    );
    Ok(key)
}

/// Refuses a chain that is not valid when `[trust] chain = "require"`; otherwise warns.
fn judge_chain(key: &str, status: &ChainStatus, require: bool) -> Result<(), StartError> {
    match status {
        ChainStatus::Valid { .. } => Ok(()),
        _ if require => Err(StartError::Chain {
            key: key.to_owned(),
            status: status.name(),
            detail: status.detail(),
        }),
        _ => {
            tracing::warn!(
                key,
                chain = status.name(),
                detail = %status.detail(),
                "the certificate chain does not lead to a trusted root; Maskinporten may refuse this key's grants ([trust] chain = \"require\" would refuse the key)"
            );
            Ok(())
        }
    }
}

/// The certificate chain `source` gives for the key found in the token, checked to hold
/// that key's public key and to allow signing.
fn checked_chain(
    token: &Token,
    token_key: &TokenKey,
    config: &KeyConfig,
    source: &CertificateSource,
) -> Result<CertificateChain, StartError> {
    let name = &config.name;
    let cert = |source| StartError::Certificate {
        key: name.clone(),
        source,
    };
    let chain = match source {
        CertificateSource::Token => CertificateChain::for_key(
            token
                .certificates_der(token_key)
                .map_err(hsm_error(config))?,
            &token_key.public_key_der,
        ),
        CertificateSource::PemFile(path) => {
            let pem = std::fs::read(path).map_err(|source| StartError::CertificateFile {
                key: name.clone(),
                path: path.display().to_string(),
                source,
            })?;
            CertificateChain::from_pem(&pem)
        }
    }
    .map_err(cert)?;
    if chain.rsa_public_key_der().map_err(cert)? != token_key.public_key_der {
        return Err(StartError::KeyMismatch { key: name.clone() });
    }
    chain.allows_signing().map_err(cert)?;
    Ok(chain)
}

/// A token error while loading the key `config` describes, naming the key and its locator.
fn hsm_error(config: &KeyConfig) -> impl Fn(HsmError) -> StartError + Copy + '_ {
    move |source| StartError::Hsm {
        context: format!("key {:?} ({})", config.name, config.locator),
        source,
    }
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`, for messages people read. Certificate times and
/// the clock are always within `der`'s 1970 to 9999; anything else is shown as a number.
pub fn rfc3339(t: i64) -> String {
    u64::try_from(t)
        .ok()
        .and_then(|secs| der::DateTime::from_unix_duration(Duration::from_secs(secs)).ok())
        .map_or_else(|| format!("{t} (Unix seconds)"), |time| time.to_string())
}

/// The hash a JWS algorithm signs with: the token knows hashes, not JWS names.
pub(super) fn hash(algorithm: Algorithm) -> Hash {
    match algorithm {
        Algorithm::Rs256 => Hash::Sha256,
        Algorithm::Rs384 => Hash::Sha384,
        Algorithm::Rs512 => Hash::Sha512,
    }
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn formats_unix_seconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_543_043), "2026-11-24T17:57:23Z");
        assert_eq!(rfc3339(-1), "-1 (Unix seconds)");
    }
}
