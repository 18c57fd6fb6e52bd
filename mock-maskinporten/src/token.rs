//! The access tokens the mock issues: RS256 JWTs shaped like Maskinporten's, signed
//! with the mock's own key, which `/jwks` publishes so resource servers under test can
//! verify them exactly as they would verify real ones.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rsa::{Pkcs1v15Sign, PrivateKey, traits::PublicKeyParts};
use serde::Serialize;
use sha2::{Digest, Sha256};

use grant_agent::admin::thumbprint;

use crate::verify::{Granted, Proof};

/// Modulus size of a generated signing key: the smallest Maskinporten-grade size, and the
/// fastest to generate at start.
pub(super) const GENERATED_KEY_BITS: usize = 2048;

/// The key that signs access tokens, with its kid and published JWK set.
pub(super) struct TokenSigner {
    key: PrivateKey,
    kid: String,
    jwks: serde_json::Value,
}

impl TokenSigner {
    /// Wraps a configured key.
    pub(super) fn new(key: PrivateKey) -> Self {
        let (n, e) = (key.n_bytes(), key.e_bytes());
        let kid = thumbprint(&n, &e);
        let jwks = serde_json::json!({
            "keys": [{
                "kty": "RSA",
                "use": "sig",
                "alg": "RS256",
                "kid": kid,
                "n": URL_SAFE_NO_PAD.encode(&n),
                "e": URL_SAFE_NO_PAD.encode(&e),
            }]
        });
        TokenSigner { key, kid, jwks }
    }

    /// Generates a fresh key from the operating system's random source. CPU-bound for
    /// a noticeable time: call it on a blocking thread.
    pub(super) fn generate() -> Result<Self, rsa::Error> {
        PrivateKey::new(&mut getrandom::SysRng, GENERATED_KEY_BITS).map(Self::new)
    }

    /// The `/jwks` document.
    pub(super) fn jwks(&self) -> &serde_json::Value {
        &self.jwks
    }

    /// Signs an access token for `granted`, issued at `now` by `issuer`.
    pub(super) fn issue(
        &self,
        issuer: &str,
        granted: &Granted,
        lifetime_seconds: u32,
        now: i64,
    ) -> Result<String, rsa::Error> {
        let header = serde_json::json!({"alg": "RS256", "typ": "at+jwt", "kid": self.kid});
        let aud = match granted.resources.as_slice() {
            [] => None,
            [one] => Some(serde_json::Value::from(one.as_str())),
            many => Some(serde_json::Value::from(many.to_vec())),
        };
        let delegated = granted.consumer_org.is_some();
        let claims = AccessTokenClaims {
            iss: issuer,
            client_id: &granted.client_id,
            scope: granted.scopes.join(" "),
            iat: now,
            exp: now + i64::from(lifetime_seconds),
            jti: uuid::Uuid::new_v4().to_string(),
            token_type: "Bearer",
            client_amr: match granted.proof {
                Proof::Certificate => "virksomhetssertifikat",
                Proof::RegisteredKey => "private_key_jwt",
            },
            consumer: granted
                .consumer_org
                .as_deref()
                .or(granted.own_org.as_deref())
                .map(Organization::new),
            supplier: granted
                .own_org
                .as_deref()
                .filter(|_| delegated)
                .map(Organization::new),
            aud,
            authorization_details: granted.authorization_details.as_ref(),
            pid: granted.pid.as_deref(),
            iss_onbehalfof: granted.iss_onbehalfof.as_deref(),
        };
        // Serialising maps of strings and integers cannot fail.
        let mut jwt = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap_or_default());
        jwt.push('.');
        URL_SAFE_NO_PAD.encode_string(serde_json::to_vec(&claims).unwrap_or_default(), &mut jwt);
        let signature = self.key.sign(
            Pkcs1v15Sign::new::<Sha256>(),
            &Sha256::digest(jwt.as_bytes()),
        )?;
        jwt.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut jwt);
        Ok(jwt)
    }
}

/// The claims of an access token, as Maskinporten issues them.
#[derive(Serialize)]
struct AccessTokenClaims<'a> {
    iss: &'a str,
    client_id: &'a str,
    scope: String,
    iat: i64,
    exp: i64,
    jti: String,
    token_type: &'static str,
    client_amr: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    consumer: Option<Organization>,
    #[serde(skip_serializing_if = "Option::is_none")]
    supplier: Option<Organization>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authorization_details: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss_onbehalfof: Option<&'a str>,
}

/// An organisation as Maskinporten names it in tokens: ISO 6523 ICD 0192 (the Norwegian
/// organisation number register).
#[derive(Serialize)]
struct Organization {
    authority: &'static str,
    #[serde(rename = "ID")]
    id: String,
}

impl Organization {
    fn new(org: &str) -> Self {
        Organization {
            authority: "iso6523-actorid-upis",
            id: format!("0192:{org}"),
        }
    }
}
