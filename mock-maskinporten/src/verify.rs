//! Checking a token request the way Maskinporten does, in its order, so a client under
//! test sees the error (and MP code) it would see from the real service.
//!
//! The checks, their order, errors and MP codes are tabled in the [crate]'s
//! documentation.
//!
//! A `jti` is spent once the grant's signature and times have passed, even if a later
//! check refuses it; it is remembered until `exp` + 10 s, after which the time checks
//! refuse a replay anyway, so memory stays bounded by the request rate.

use std::{collections::HashMap, sync::Mutex};

use base64::{Engine, engine::general_purpose::STANDARD};
use der::Decode;
use rsa::{PublicKey, pkcs1::DecodeRsaPublicKey};
use serde_json::{Map, Value};
use x509_cert::Certificate;

use grant_agent::{
    cert::{CertEnvironment, CertificateChain},
    maskinporten::{CLAIMS, CLOCK_SKEW_SECONDS, JWT_BEARER, MAX_LIFETIME_SECONDS},
};

use crate::{
    MockConfig,
    config::{CertificatePolicy, Client},
    jws::{Jws, KeyReference, form_parameters},
    refusal::{MpCode, OAuthError, Refusal, invalid_grant, invalid_request, refuse},
    x5c,
};

/// How long after `exp` a `jti` is remembered.
const JTI_MEMORY_AFTER_EXP: i64 = 10;
/// Longest client_id a refusal log line carries, since an unknown one comes from outside.
const MAX_LOGGED_CLIENT_ID: usize = 256;

/// How the client proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Proof {
    /// A virksomhetssertifikat chain in `x5c`.
    Certificate,
    /// A key registered on the client, named by `kid`.
    RegisteredKey,
}

/// An accepted grant: what the access token says.
#[derive(Debug)]
pub(super) struct Granted {
    /// The client.
    pub(super) client_id: String,
    /// The granted scopes, in the grant's order without repeats.
    pub(super) scopes: Vec<String>,
    /// How the client authenticated.
    pub(super) proof: Proof,
    /// The client's own organisation, from its certificate or its config.
    pub(super) own_org: Option<String>,
    /// The organisation acted for by delegation.
    pub(super) consumer_org: Option<String>,
    /// The grant's `resource` values (the token's audience).
    pub(super) resources: Vec<String>,
    /// The grant's `authorization_details`, echoed into the token.
    pub(super) authorization_details: Option<Value>,
    /// The person the token is restricted to, echoed into the token.
    pub(super) pid: Option<String>,
    /// The customer a supplier acts for, echoed into the token.
    pub(super) iss_onbehalfof: Option<String>,
}

/// `jti`s seen recently, each with when it may be forgotten.
#[derive(Default)]
struct SeenJtis {
    forget_at: HashMap<String, i64>,
    pruned_at: i64,
}

impl SeenJtis {
    /// Records `jti` until `forget_at`; false if it was already there. Prunes at most
    /// once a second, so the work stays proportional to the request rate.
    fn insert(&mut self, jti: &str, forget_at: i64, now: i64) -> bool {
        if now != self.pruned_at {
            self.forget_at.retain(|_, t| *t >= now);
            self.pruned_at = now;
        }
        if self.forget_at.contains_key(jti) {
            return false;
        }
        let _ = self.forget_at.insert(jti.to_owned(), forget_at);
        true
    }
}

/// Verifies grants against the config; shared by all requests.
pub(super) struct Verifier {
    config: MockConfig,
    issuer: String,
    seen: Mutex<SeenJtis>,
}

impl Verifier {
    /// A verifier for grants addressed to `issuer`.
    pub(super) fn new(config: MockConfig, issuer: String) -> Self {
        Verifier {
            config,
            issuer,
            seen: Mutex::new(SeenJtis::default()),
        }
    }

    /// Checks a form-encoded token request at `now` (Unix seconds).
    pub(super) fn verify(&self, form: &[u8], now: i64) -> Result<Granted, Refusal> {
        let mut client_id = None;
        self.check(form, now, &mut client_id)
            .map_err(|mut refusal| {
                refusal.client_id =
                    client_id.map(|id: String| id.chars().take(MAX_LOGGED_CLIENT_ID).collect());
                refusal
            })
    }

    fn check(
        &self,
        form: &[u8],
        now: i64,
        client_id: &mut Option<String>,
    ) -> Result<Granted, Refusal> {
        let assertion = assertion(form)?;
        let jws = Jws::parse(&assertion)?;

        if let Some(name) = jws.claims.keys().find(|k| !CLAIMS.contains(&k.as_str())) {
            return Err(invalid_grant(
                None,
                format!(
                    "unknown claim {name}: Maskinporten refuses claims other than {}",
                    CLAIMS.join(", ")
                ),
            ));
        }
        let Some(iss) = jws.claims.get("iss").and_then(Value::as_str) else {
            return Err(invalid_grant(
                None,
                "iss (the client_id) is missing or not a string",
            ));
        };
        *client_id = Some(iss.to_owned());
        let Some(client) = self.config.clients.iter().find(|c| c.client_id == iss) else {
            return Err(refuse(
                OAuthError::InvalidClient,
                Some(MpCode::Mp100),
                format!("unknown client_id {iss:?}"),
            ));
        };
        self.check_audience(jws.claims.get("aud"))?;

        let (proof, own_org) = match &jws.key {
            KeyReference::X5c(x5c) => (Proof::Certificate, self.check_x5c(client, x5c, &jws, now)?),
            KeyReference::Kid(kid) => (Proof::RegisteredKey, check_kid(client, kid, &jws, now)?),
        };
        let exp = check_times(&jws.claims, now)?;
        self.check_jti(jws.claims.get("jti"), exp, now)?;
        let scopes = check_scopes(client, jws.claims.get("scope"))?;
        let consumer_org = check_consumer_org(client, jws.claims.get("consumer_org"))?;
        let Optional {
            resources,
            authorization_details,
            pid,
            iss_onbehalfof,
        } = optional_claims(&jws.claims)?;
        Ok(Granted {
            client_id: client.client_id.clone(),
            scopes,
            proof,
            own_org,
            consumer_org,
            resources,
            authorization_details,
            pid,
            iss_onbehalfof,
        })
    }

    /// `aud` must be the issuer, with or without its trailing slash.
    fn check_audience(&self, aud: Option<&Value>) -> Result<(), Refusal> {
        let issuer = self.issuer.trim_end_matches('/');
        match aud.and_then(Value::as_str) {
            Some(aud) if aud.trim_end_matches('/') == issuer => Ok(()),
            Some(aud) => Err(invalid_grant(
                Some(MpCode::Mp110),
                format!("aud {aud:?} is not this issuer ({:?})", self.issuer),
            )),
            None => Err(invalid_grant(
                Some(MpCode::Mp110),
                format!("aud is missing or not a string; use {:?}", self.issuer),
            )),
        }
    }

    /// Virksomhetssertifikat mode; returns the certificate's organisation number (or the
    /// client's, when the certificate has none).
    fn check_x5c(
        &self,
        client: &Client,
        x5c: &[Value],
        jws: &Jws<'_>,
        now: i64,
    ) -> Result<Option<String>, Refusal> {
        let malformed =
            |why: String| invalid_grant(Some(MpCode::Mp123), format!("x5c is malformed: {why}"));
        let der = x5c
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                let bytes = entry.as_str().and_then(|s| STANDARD.decode(s).ok());
                bytes.ok_or_else(|| malformed(format!("x5c[{i}] is not a standard-base64 string")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let parsed = der
            .iter()
            .enumerate()
            .map(|(i, d)| Certificate::from_der(d).map_err(|e| malformed(format!("x5c[{i}]: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let chain = CertificateChain::from_der(der).map_err(|e| malformed(e.to_string()))?;
        let leaf_key = chain
            .rsa_public_key_der()
            .map_err(|e| e.to_string())
            .and_then(|der| {
                PublicKey::from_pkcs1_der(der).map_err(|e| format!("unreadable RSA key ({e})"))
            })
            .map_err(|why| malformed(format!("x5c[0]: {why}")))?;
        if !jws.signature_verifies(&leaf_key) {
            return Err(invalid_grant(
                Some(MpCode::Mp124),
                "the signature does not verify with the key of the x5c certificate",
            ));
        }
        x5c::verify_path(&parsed, &self.config.trust_anchors, now).map_err(|why| {
            invalid_grant(Some(MpCode::Mp120), format!("certificate invalid: {why}"))
        })?;
        let environment = chain.environment();
        let wrong_environment = match self.config.certificates {
            CertificatePolicy::Test => environment == CertEnvironment::Production,
            CertificatePolicy::Prod => environment == CertEnvironment::Test,
            CertificatePolicy::Any => false,
        };
        if wrong_environment {
            return Err(invalid_grant(
                Some(MpCode::Mp124),
                format!(
                    "a {} certificate (issuer {}) is not accepted here; this mock acts as Maskinporten's {} environment",
                    environment.name(),
                    chain.issuer(),
                    if environment == CertEnvironment::Production {
                        "test"
                    } else {
                        "production"
                    },
                ),
            ));
        }
        let certificate_org = chain.organization_number();
        if let Some(expected) = &client.organization_number
            && certificate_org.as_ref() != Some(expected)
        {
            return Err(invalid_grant(
                Some(MpCode::Mp122),
                format!(
                    "the certificate's organisation number ({}) is not client {}'s ({expected})",
                    certificate_org.as_deref().unwrap_or("none"),
                    client.client_id
                ),
            ));
        }
        Ok(certificate_org.or_else(|| client.organization_number.clone()))
    }

    fn check_jti(&self, jti: Option<&Value>, exp: i64, now: i64) -> Result<(), Refusal> {
        let Some(jti) = jti.and_then(Value::as_str).filter(|j| !j.is_empty()) else {
            return Err(invalid_grant(
                None,
                "jti is missing or empty; give every grant a fresh UUID",
            ));
        };
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.insert(jti, exp.saturating_add(JTI_MEMORY_AFTER_EXP), now) {
            Ok(())
        } else {
            Err(invalid_grant(
                Some(MpCode::Mp012),
                format!("jti {jti:?} was used before"),
            ))
        }
    }
}

/// Kid mode; returns the client's configured organisation number.
fn check_kid(
    client: &Client,
    kid: &str,
    jws: &Jws<'_>,
    now: i64,
) -> Result<Option<String>, Refusal> {
    let Some(key) = client.keys.iter().find(|k| k.kid == kid) else {
        return Err(invalid_grant(
            None,
            format!(
                "kid {kid:?} is not a key registered on client {}",
                client.client_id
            ),
        ));
    };
    if let Some(expired) = key.expires_at.filter(|t| *t <= now) {
        return Err(invalid_grant(
            Some(MpCode::Mp121),
            format!(
                "the registered key {kid:?} expired (at Unix time {expired}); register a new one"
            ),
        ));
    }
    if !jws.signature_verifies(&key.public_key) {
        return Err(invalid_grant(
            None,
            format!("the signature does not verify with the registered key {kid:?}"),
        ));
    }
    Ok(client.organization_number.clone())
}

/// `iat` near now, `exp` in the future and at most 120 s after `iat`; returns `exp`.
fn check_times(claims: &Map<String, Value>, now: i64) -> Result<i64, Refusal> {
    let time = |name: &str| {
        claims.get(name).and_then(Value::as_i64).ok_or_else(|| {
            invalid_grant(
                Some(MpCode::Mp130),
                format!("{name} is missing or not whole Unix seconds"),
            )
        })
    };
    let (iat, exp) = (time("iat")?, time("exp")?);
    if iat.abs_diff(now) > CLOCK_SKEW_SECONDS {
        return Err(invalid_grant(
            Some(MpCode::Mp130),
            format!(
                "iat is {} s from the server's clock; at most {CLOCK_SKEW_SECONDS} s is allowed",
                iat.saturating_sub(now)
            ),
        ));
    }
    if exp <= now {
        return Err(invalid_grant(
            Some(MpCode::Mp130),
            format!("the grant expired (exp {exp}, now {now})"),
        ));
    }
    let lifetime = exp.saturating_sub(iat);
    if lifetime > i64::from(MAX_LIFETIME_SECONDS) {
        return Err(invalid_grant(
            Some(MpCode::Mp130),
            format!("exp - iat is {lifetime} s; at most {MAX_LIFETIME_SECONDS} s is allowed"),
        ));
    }
    Ok(exp)
}

fn check_scopes(client: &Client, scope: Option<&Value>) -> Result<Vec<String>, Refusal> {
    let text = match scope {
        None => "",
        Some(Value::String(text)) => text,
        Some(_) => {
            return Err(invalid_grant(
                None,
                "scope must be a space-separated string",
            ));
        }
    };
    let mut scopes: Vec<String> = Vec::new();
    for scope in text.split(' ').filter(|s| !s.is_empty()) {
        if !client.allows_scope(scope) {
            return Err(refuse(
                OAuthError::InvalidScope,
                Some(MpCode::Mp200),
                format!("client {} may not get scope {scope:?}", client.client_id),
            ));
        }
        if !scopes.iter().any(|s| s == scope) {
            scopes.push(scope.to_owned());
        }
    }
    if scopes.is_empty() {
        return Err(refuse(
            OAuthError::InvalidScope,
            Some(MpCode::Mp201),
            "no scope was asked for",
        ));
    }
    Ok(scopes)
}

fn check_consumer_org(
    client: &Client,
    consumer_org: Option<&Value>,
) -> Result<Option<String>, Refusal> {
    match consumer_org {
        None => Ok(None),
        Some(Value::String(org)) if client.consumer_orgs.contains(org) => Ok(Some(org.clone())),
        Some(Value::String(org)) => Err(refuse(
            OAuthError::InvalidScope,
            Some(MpCode::Mp251),
            format!(
                "client {} has no delegation from organisation {org:?} (consumer_org)",
                client.client_id
            ),
        )),
        Some(_) => Err(invalid_grant(
            None,
            "consumer_org must be an organisation number string",
        )),
    }
}

/// RFC 9396: an array of objects, each with a string `type`.
fn is_authorization_details(details: &Value) -> bool {
    details.as_array().is_some_and(|entries| {
        entries
            .iter()
            .all(|entry| entry.get("type").is_some_and(Value::is_string))
    })
}

/// The assertion of a token request's form, once its grant type is the JWT bearer one.
fn assertion(form: &[u8]) -> Result<String, Refusal> {
    let (grant_type, assertion) = form_parameters(form)?;
    match grant_type.as_deref() {
        None => {
            return Err(invalid_request(format!(
                "grant_type is missing; use {JWT_BEARER}"
            )));
        }
        Some(JWT_BEARER) => {}
        Some(other) => {
            return Err(refuse(
                OAuthError::UnsupportedGrantType,
                None,
                format!("grant_type {other:?} is not supported; use {JWT_BEARER}"),
            ));
        }
    }
    assertion
        .filter(|a| !a.is_empty())
        .ok_or_else(|| invalid_request("assertion (the signed JWT grant) is missing"))
}

/// The claims a grant may leave out, each checked for its shape.
struct Optional {
    resources: Vec<String>,
    authorization_details: Option<Value>,
    pid: Option<String>,
    iss_onbehalfof: Option<String>,
}

fn optional_claims(claims: &serde_json::Map<String, Value>) -> Result<Optional, Refusal> {
    let authorization_details = claims.get("authorization_details").cloned();
    if let Some(details) = &authorization_details
        && !is_authorization_details(details)
    {
        return Err(invalid_request(
            "authorization_details must be a JSON array of objects, each with a string `type`",
        ));
    }
    let pid = match claims.get("pid") {
        None => None,
        Some(Value::String(pid)) if grant_agent::grant::is_national_identity_number(pid) => {
            Some(pid.clone())
        }
        Some(_) => {
            return Err(invalid_request(
                "pid must be an 11-digit national identity number or D-number",
            ));
        }
    };
    let iss_onbehalfof = match claims.get("iss_onbehalfof") {
        None => None,
        Some(Value::String(value)) if !value.is_empty() => Some(value.clone()),
        Some(_) => return Err(invalid_request("iss_onbehalfof must be a string")),
    };
    let resources = match claims.get("resource") {
        None => Vec::new(),
        Some(Value::String(one)) => vec![one.clone()],
        Some(Value::Array(many)) if many.iter().all(Value::is_string) => many
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Some(_) => {
            return Err(invalid_request(
                "resource must be a URI or an array of URIs",
            ));
        }
    };
    Ok(Optional {
        resources,
        authorization_details,
        pid,
        iss_onbehalfof,
    })
}

#[cfg(test)]
mod tests {
    use super::SeenJtis;

    #[test]
    fn seen_jtis_are_forgotten_after_their_time() {
        let mut seen = SeenJtis::default();
        assert!(seen.insert("a", 110, 100));
        assert!(!seen.insert("a", 110, 100), "a replay is caught");
        assert!(seen.insert("b", 200, 100));
        // A second later nothing is due; at 111 "a" is gone, "b" stays.
        assert!(seen.insert("c", 120, 101));
        assert_eq!(seen.forget_at.len(), 3);
        assert!(seen.insert("d", 300, 111));
        assert_eq!(seen.forget_at.len(), 3, "a was pruned");
        assert!(!seen.forget_at.contains_key("a"));
        assert!(!seen.insert("b", 200, 111));
    }
}
