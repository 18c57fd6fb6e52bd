//! The signing agent: the configured keys, found in the token and bound to their
//! certificates at start-up, and the one operation everything else calls, [`Agent::sign_grant`].
//!
//! Start-up checks what can be checked before the first request, so a misconfiguration
//! stops the agent with a message naming the key instead of failing calls later: the key
//! exists exactly once, is RSA-2048 or larger, and its public key equals the certificate's.

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{
    cert::{CertError, CertificateChain},
    config::{CertificateSource, Config, KeyConfig},
    grant::{self, Algorithm, Claims, GrantParameters, Header, InvalidGrant},
    hsm::{HsmError, ObjectHandle, Token, read_pin},
};

/// A key ready to sign: its token handle, certificate chain and precomputed JOSE header.
#[derive(Debug)]
pub struct SigningKey {
    name: String,
    handle: ObjectHandle,
    header: Header,
    chain: CertificateChain,
    certificate_sha256: String,
}

impl SigningKey {
    /// The configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The JWS algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.header.algorithm()
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &CertificateChain {
        &self.chain
    }

    /// Lowercase hex SHA-256 of the leaf certificate.
    pub fn certificate_sha256(&self) -> &str {
        &self.certificate_sha256
    }
}

/// A signed grant and the facts a caller may want without decoding it.
#[derive(Debug)]
pub struct SignedGrant {
    /// The compact JWS. A bearer credential for up to two minutes: never log it.
    pub assertion: String,
    /// The grant's unique id.
    pub jti: String,
    /// `iat`, Unix seconds.
    pub issued_at: i64,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
    /// The JWS algorithm.
    pub algorithm: Algorithm,
    /// The key name that signed.
    pub key: String,
    /// SHA-256 of the leaf certificate in `x5c`.
    pub certificate_sha256: String,
}

/// Why a grant was not signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The request is malformed; the message names the field.
    #[error(transparent)]
    Invalid(#[from] InvalidGrant),
    /// The request names a key the agent does not have.
    #[error("grant.key: no key is named {0:?}")]
    UnknownKey(String),
    /// The key's certificate is outside its validity period now.
    #[error("the certificate of key {key:?} is {state}; renew it or configure another key")]
    CertificateNotValid {
        /// The key name.
        key: String,
        /// "expired since ..." or "not valid before ...".
        state: String,
    },
    /// The token failed.
    #[error(transparent)]
    Hsm(#[from] HsmError),
}

/// Why the agent could not start. Each variant names the key and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The token could not be opened or a key not found.
    #[error("{context}: {source}")]
    Hsm {
        /// What was being done, e.g. `key "default"`.
        context: String,
        /// The cause.
        #[source]
        source: HsmError,
    },
    /// The certificate file could not be read.
    #[error("key {key:?}: cannot read certificate file {path}: {source}")]
    CertificateFile {
        /// The key name.
        key: String,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The certificate is malformed or unusable.
    #[error("key {key:?}: {source}")]
    Certificate {
        /// The key name.
        key: String,
        /// The cause.
        #[source]
        source: CertError,
    },
    /// The certificate does not belong to the key.
    #[error(
        "key {key:?}: the certificate's public key is not the token key's public key; configure the certificate issued for this key"
    )]
    KeyMismatch {
        /// The key name.
        key: String,
    },
}

/// The running agent. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct Agent {
    token: Token,
    keys: BTreeMap<String, SigningKey>,
    default_key: String,
    audiences: BTreeMap<String, String>,
    default_environment: Option<String>,
}

impl Agent {
    /// Opens the token, logs in, and binds every configured key to its certificate.
    /// Blocking: call it from a blocking thread or before the async runtime starts serving.
    pub fn start(config: &Config) -> Result<Agent, StartError> {
        let hsm = |context: &str| {
            let context = context.to_owned();
            move |source| StartError::Hsm { context, source }
        };
        let pin = read_pin(&config.pkcs11.pin).map_err(hsm("pkcs11"))?;
        let token = Token::open(&config.pkcs11, &pin).map_err(hsm("pkcs11"))?;
        drop(pin);
        let mut keys = BTreeMap::new();
        for key_config in &config.keys {
            let key = load_key(&token, key_config)?;
            let _ = keys.insert(key.name.clone(), key);
        }
        let audiences = config
            .environment_names()
            .into_iter()
            .filter_map(|name| {
                let aud = config.audience(&name)?.to_owned();
                Some((name, aud))
            })
            .collect();
        Ok(Agent {
            token,
            keys,
            default_key: config.default_key.clone(),
            audiences,
            default_environment: config.default_environment.clone(),
        })
    }

    /// Builds a grant from `params`, signs it in the token and returns it. Every call signs
    /// a new grant with a new `jti`.
    pub async fn sign_grant(&self, params: &GrantParameters) -> Result<SignedGrant, SignError> {
        let (key, claims) = self.prepare(params)?;
        let input = grant::signing_input(&key.header, &claims);
        let signature = self
            .token
            .sign(key.handle, key.algorithm(), input.as_bytes().to_vec())
            .await?;
        Ok(finish(key, claims, input, &signature))
    }

    /// [`Agent::sign_grant`] on the calling thread, for the command line.
    pub fn sign_grant_blocking(&self, params: &GrantParameters) -> Result<SignedGrant, SignError> {
        let (key, claims) = self.prepare(params)?;
        let input = grant::signing_input(&key.header, &claims);
        let signature = self
            .token
            .sign_blocking(key.handle, key.algorithm(), input.as_bytes())?;
        Ok(finish(key, claims, input, &signature))
    }

    fn prepare(&self, params: &GrantParameters) -> Result<(&SigningKey, Claims), SignError> {
        let name = if params.key.is_empty() {
            &self.default_key
        } else {
            &params.key
        };
        let key = self
            .keys
            .get(name)
            .ok_or_else(|| SignError::UnknownKey(params.key.clone()))?;
        let environment = match (params.environment.as_str(), &self.default_environment) {
            ("", Some(default)) => default.as_str(),
            (env, _) => env,
        };
        let audience = self
            .audiences
            .get(environment)
            .ok_or_else(|| InvalidGrant {
                field: "grant.environment".into(),
                reason: format!(
                    "{} is not a known environment; use one of: {}",
                    if environment.is_empty() {
                        "empty".to_owned()
                    } else {
                        format!("{environment:?}")
                    },
                    self.audiences
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        let now = unix_now();
        let (not_before, not_after) = key.chain.validity();
        if now > not_after || now < not_before {
            return Err(SignError::CertificateNotValid {
                key: key.name.clone(),
                state: if now > not_after {
                    format!("expired (not after {not_after})")
                } else {
                    format!("not yet valid (not before {not_before})")
                },
            });
        }
        Ok((key, Claims::new(params, audience, now)?))
    }

    /// The keys, sorted by name.
    pub fn keys(&self) -> impl Iterator<Item = &SigningKey> {
        self.keys.values()
    }

    /// The name of the key used when a request names none.
    pub fn default_key(&self) -> &str {
        &self.default_key
    }

    /// Logs out and finalizes the PKCS#11 module.
    pub fn close(self) -> Result<(), HsmError> {
        self.token.close()
    }
}

fn finish(key: &SigningKey, claims: Claims, input: String, signature: &[u8]) -> SignedGrant {
    SignedGrant {
        assertion: grant::compact(input, signature),
        jti: claims.jti,
        issued_at: claims.iat,
        expires_at: claims.exp,
        algorithm: key.algorithm(),
        key: key.name.clone(),
        certificate_sha256: key.certificate_sha256.clone(),
    }
}

fn load_key(token: &Token, config: &KeyConfig) -> Result<SigningKey, StartError> {
    let name = &config.name;
    let hsm = |source| StartError::Hsm {
        context: format!("key {name:?}"),
        source,
    };
    let cert = |source| StartError::Certificate {
        key: name.clone(),
        source,
    };
    let token_key = token.find_key(&config.locator).map_err(hsm)?;
    let chain = match &config.certificate {
        CertificateSource::Token => {
            CertificateChain::from_der(vec![token.certificate_der(&token_key).map_err(hsm)?])
        }
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
    let (_, not_after) = chain.validity();
    tracing::info!(
        key = %name,
        bits = token_key.bits,
        algorithm = config.algorithm.jws_name(),
        subject = %chain.subject(),
        certificate_sha256 = %chain.leaf_sha256_hex(),
        not_after,
        "key ready"
    );
    Ok(SigningKey {
        name: name.clone(),
        handle: token_key.handle,
        header: Header::with_x5c(config.algorithm, chain.der()),
        certificate_sha256: chain.leaf_sha256_hex(),
        chain,
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
