//! The assertion as it arrives: form parameters, the compact JWS and its header, and
//! RSASSA-PKCS1-v1_5 verification for the three algorithms Maskinporten accepts.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rsa::{Pkcs1v15Sign, PublicKey};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256, Sha384, Sha512};

use grant_agent::grant::Algorithm;

use crate::refusal::{Refusal, invalid_grant, invalid_request};

/// A decoded compact JWS; nothing in it is trusted until the signature is checked.
pub(super) struct Jws<'a> {
    algorithm: Algorithm,
    /// The key the header names.
    pub(super) key: KeyReference,
    /// The claim set, unverified until the signature is.
    pub(super) claims: Map<String, Value>,
    signing_input: &'a str,
    signature: Vec<u8>,
}

/// Which key signed the grant, per its header.
pub(super) enum KeyReference {
    /// A certificate chain, leaf first, each entry (still) a JSON value.
    X5c(Vec<Value>),
    /// A key registered on the client.
    Kid(String),
}

impl<'a> Jws<'a> {
    /// Decodes a compact JWS and reads its header; the signature is not checked here.
    pub(super) fn parse(assertion: &'a str) -> Result<Self, Refusal> {
        let not_jws =
            |why: &str| invalid_grant(None, format!("the assertion is not a compact JWS: {why}"));
        let mut parts = assertion.split('.');
        let (Some(header_part), Some(claims_part), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(not_jws("it must have three dot-separated parts"));
        };
        let json_object = |part: &str, what: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Map<String, Value>>(&bytes).ok())
                .ok_or_else(|| not_jws(&format!("the {what} is not a base64url JSON object")))
        };
        let mut header = json_object(header_part, "header")?;
        let claims = json_object(claims_part, "claim set")?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| not_jws("the signature is not base64url"))?;
        let algorithm = match header.get("alg").and_then(Value::as_str) {
            Some(name) => Algorithm::from_jws_name(name).ok_or_else(|| {
                invalid_grant(
                    None,
                    format!("alg {name:?} is not accepted; use RS256, RS384 or RS512"),
                )
            })?,
            None => return Err(invalid_grant(None, "the header has no alg")),
        };
        let key = match (header.remove("x5c"), header.remove("kid")) {
            (Some(Value::Array(x5c)), None) => KeyReference::X5c(x5c),
            (None, Some(Value::String(kid))) => KeyReference::Kid(kid),
            (Some(_), Some(_)) => {
                return Err(invalid_grant(
                    None,
                    "the header has both x5c and kid; use exactly one",
                ));
            }
            (None, None) => {
                return Err(invalid_grant(
                    None,
                    "the header has neither x5c (virksomhetssertifikat) nor kid (registered key)",
                ));
            }
            _ => {
                return Err(invalid_grant(
                    None,
                    "x5c must be an array of strings and kid a string",
                ));
            }
        };
        Ok(Jws {
            algorithm,
            key,
            claims,
            signing_input: &assertion[..header_part.len() + 1 + claims_part.len()],
            signature,
        })
    }

    /// Whether `key` made the signature, with the header's algorithm.
    pub(super) fn signature_verifies(&self, key: &PublicKey) -> bool {
        rsa_signature_verifies(
            self.algorithm,
            key,
            self.signing_input.as_bytes(),
            &self.signature,
        )
    }
}

/// The grant's two parameters; each may appear at most once (RFC 6749 section 3.2).
pub(super) fn form_parameters(form: &[u8]) -> Result<(Option<String>, Option<String>), Refusal> {
    let (mut grant_type, mut assertion) = (None, None);
    for (name, value) in form_urlencoded::parse(form) {
        let slot = match name.as_ref() {
            "grant_type" => &mut grant_type,
            "assertion" => &mut assertion,
            _ => continue,
        };
        if slot.replace(value.into_owned()).is_some() {
            return Err(invalid_request(format!("{name} is given more than once")));
        }
    }
    Ok((grant_type, assertion))
}

/// Whether `signature` over `message` is RSASSA-PKCS1-v1_5 by `key` with the
/// algorithm's digest.
pub(super) fn rsa_signature_verifies(
    algorithm: Algorithm,
    key: &PublicKey,
    message: &[u8],
    signature: &[u8],
) -> bool {
    let result = match algorithm {
        Algorithm::Rs256 => key.verify(
            Pkcs1v15Sign::new::<Sha256>(),
            &Sha256::digest(message),
            signature,
        ),
        Algorithm::Rs384 => key.verify(
            Pkcs1v15Sign::new::<Sha384>(),
            &Sha384::digest(message),
            signature,
        ),
        Algorithm::Rs512 => key.verify(
            Pkcs1v15Sign::new::<Sha512>(),
            &Sha512::digest(message),
            signature,
        ),
    };
    result.is_ok()
}
