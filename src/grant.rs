//! The Maskinporten JWT grant (RFC 7523): request validation, claims and JWS compact
//! encoding. Nothing here touches PKCS#11; signing is a function handed in by the caller.
//!
//! The claim set is closed: a caller chooses values for the claims Maskinporten lists
//! and nothing else, because since 2025 Maskinporten rejects claims it does not know,
//! and because a signing agent must not sign what it was not asked to vouch for.
//!
//! Limits (also in `docs/architecture.md`): client_id 1..=256 bytes; 1..=100 scopes of
//! 1..=256 bytes each; 0..=20 resources of 1..=2048 bytes each; consumer_org nine
//! digits with a valid check digit; lifetime 1..=120 seconds; authorization_details a
//! JSON array of 1..=20 objects, each with a `type`, at most 8 KiB in all; pid eleven
//! digits with both check digits valid (national identity numbers and D-numbers);
//! iss_onbehalfof 1..=128 bytes of printable ASCII without spaces.

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    write::EncoderStringWriter,
};
use serde::Serialize;

use crate::maskinporten::MAX_LIFETIME_SECONDS;

const MAX_CLIENT_ID: usize = 256;
const MAX_SCOPES: usize = 100;
const MAX_SCOPE: usize = 256;
const MAX_RESOURCES: usize = 20;
const MAX_RESOURCE: usize = 2048;
const MAX_AUTHORIZATION_DETAILS: usize = 8 * 1024;
const MAX_AUTHORIZATION_ENTRIES: usize = 20;
const MAX_AUTHORIZATION_TYPE: usize = 256;
const MAX_ISS_ONBEHALFOF: usize = 128;

/// JWS algorithms Maskinporten accepts. All are RSASSA-PKCS1-v1_5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    Rs512,
}

impl Algorithm {
    /// The JWS `alg` name.
    pub fn jws_name(self) -> &'static str {
        match self {
            Algorithm::Rs256 => "RS256",
            Algorithm::Rs384 => "RS384",
            Algorithm::Rs512 => "RS512",
        }
    }

    /// Parses a JWS `alg` name.
    pub fn from_jws_name(name: &str) -> Option<Self> {
        match name {
            "RS256" => Some(Algorithm::Rs256),
            "RS384" => Some(Algorithm::Rs384),
            "RS512" => Some(Algorithm::Rs512),
            _ => None,
        }
    }
}

/// What a caller asks for, before validation: the gRPC message itself, so errors name
/// its fields and a field added to the contract reaches the signer with no copy to update.
pub use crate::proto::GrantParameters;

mod invalid;
pub use invalid::GrantField;
pub use invalid::InvalidGrant;

/// The claims of one grant, in the order they are serialised: those of
/// [`maskinporten::CLAIMS`](crate::maskinporten::CLAIMS). Its Debug leaves the pid out.
#[derive(Clone, Serialize)]
pub(crate) struct Claims {
    /// Maskinporten's issuer URL for the environment.
    pub(crate) aud: String,
    /// The client_id.
    pub(crate) iss: String,
    /// Space-separated scopes.
    pub(crate) scope: String,
    /// Issued at, Unix seconds.
    pub(crate) iat: i64,
    /// Expiry, Unix seconds.
    pub(crate) exp: i64,
    /// Unique id (UUID v4); Maskinporten refuses a reused one.
    pub(crate) jti: String,
    /// Audience-restricted token targets.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) resource: Vec<String>,
    /// Organisation acted for, by delegation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) consumer_org: Option<String>,
    /// Rich authorization requests (Altinn system users, consent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) authorization_details: Option<AuthorizationDetails>,
    /// The person a person-restricted token is for. Personal data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pid: Option<String>,
    /// The customer a supplier acts for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) iss_onbehalfof: Option<String>,
}

impl std::fmt::Debug for Claims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claims")
            .field("aud", &self.aud)
            .field("iss", &self.iss)
            .field("scope", &self.scope)
            .field("iat", &self.iat)
            .field("exp", &self.exp)
            .field("jti", &self.jti)
            .field("resource", &self.resource)
            .field("consumer_org", &self.consumer_org)
            .field("authorization_details", &self.authorization_details)
            .field("pid", &self.pid.as_ref().map(|_| "[redacted]"))
            .field("iss_onbehalfof", &self.iss_onbehalfof)
            .finish()
    }
}

impl Claims {
    /// About how long the claims' JSON is (the names, quotes and numbers at most 160
    /// bytes, plus the values), to size the signing input once.
    fn json_len_estimate(&self) -> usize {
        160 + self.aud.len()
            + self.iss.len()
            + self.scope.len()
            + self.jti.len()
            + self.resource.iter().map(|r| r.len() + 3).sum::<usize>()
            + self.consumer_org.as_ref().map_or(0, |o| o.len() + 20)
    }

    /// Validates `params` and builds the claims for a grant issued at `now` (Unix seconds)
    /// to `aud`, with a fresh random `jti`. A service validates once, with
    /// [`ValidGrant::new`], and builds claims from that; this shortcut is for tests.
    #[cfg(test)]
    pub(crate) fn new(params: &GrantParameters, aud: &str, now: i64) -> Result<Self, InvalidGrant> {
        let grant = ValidGrant::new(params.clone()).map_err(|rejected| rejected.invalid)?;
        Ok(grant.claims(aud, now))
    }
}

/// A request whose every field passed validation, with what validation worked out; claims
/// are made from it at signing time ([`ValidGrant::claims`]). Only [`ValidGrant::new`] makes
/// one, so a request is validated once, before the policy sees it, and never again.
#[derive(Debug, Clone)]
pub(crate) struct ValidGrant {
    params: GrantParameters,
    lifetime: u32,
    authorization_details: Option<AuthorizationDetails>,
}

/// A request that failed validation, given back whole so that the refusal can still be
/// audited with what was asked.
#[derive(Debug)]
pub(crate) struct Rejected {
    /// The request as it came.
    pub(crate) params: Box<GrantParameters>,
    /// Why it was refused, naming the field.
    pub(crate) invalid: InvalidGrant,
}

impl ValidGrant {
    /// Checks every field of `params` (the limits in the module doc).
    pub(crate) fn new(params: GrantParameters) -> Result<Self, Rejected> {
        match check(&params) {
            Ok((lifetime, authorization_details)) => Ok(ValidGrant {
                params,
                lifetime,
                authorization_details,
            }),
            Err(invalid) => Err(Rejected {
                params: Box::new(params),
                invalid,
            }),
        }
    }

    /// The request as it came (defaults such as the key and environment not resolved).
    pub(crate) fn params(&self) -> &GrantParameters {
        &self.params
    }

    /// The parsed authorization_details, if the request has any.
    pub(crate) fn authorization_details(&self) -> Option<&AuthorizationDetails> {
        self.authorization_details.as_ref()
    }

    /// The claims for a grant issued at `now` (Unix seconds) to `aud`, with a fresh random
    /// `jti`.
    pub(crate) fn claims(&self, aud: &str, now: i64) -> Claims {
        let params = &self.params;
        Claims {
            aud: aud.to_owned(),
            iss: params.client_id.clone(),
            scope: params.scopes.join(" "),
            iat: now,
            exp: now + i64::from(self.lifetime),
            jti: random_uuid().to_string(),
            resource: params.resources.clone(),
            consumer_org: Some(params.consumer_org.clone()).filter(|org| !org.is_empty()),
            authorization_details: self.authorization_details.clone(),
            pid: Some(params.pid.clone()).filter(|pid| !pid.is_empty()),
            iss_onbehalfof: Some(params.iss_onbehalfof.clone()).filter(|v| !v.is_empty()),
        }
    }
}

/// A random (version 4) UUID from the thread's CSPRNG (rand's ChaCha12, seeded and
/// reseeded from the OS): as unpredictable as `Uuid::new_v4`, which asks the kernel
/// (`getrandom`) on every call, a system call per `jti` and per request id.
pub(crate) fn random_uuid() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

/// Every field check; the lifetime (0 resolved) and the parsed authorization_details.
fn check(params: &GrantParameters) -> Result<(u32, Option<AuthorizationDetails>), InvalidGrant> {
    check_client_id(&params.client_id)?;
    check_scopes(&params.scopes)?;
    check_resources(&params.resources)?;
    if !params.consumer_org.is_empty() && !is_organization_number(&params.consumer_org) {
        return Err(InvalidGrant::new(
            GrantField::ConsumerOrg,
            "must be a nine-digit Norwegian organisation number with a valid check digit",
        ));
    }
    let lifetime = match params.lifetime_seconds {
        0 => MAX_LIFETIME_SECONDS,
        n if n <= MAX_LIFETIME_SECONDS => n,
        n => {
            return Err(InvalidGrant::new(
                GrantField::LifetimeSeconds,
                format!(
                    "{n} is over the maximum of {MAX_LIFETIME_SECONDS} (0 means {MAX_LIFETIME_SECONDS})"
                ),
            ));
        }
    };
    if !params.pid.is_empty() && !is_national_identity_number(&params.pid) {
        // The value stays out of the message: it may be a person's number with a typo.
        return Err(InvalidGrant::new(
            GrantField::Pid,
            "must be an 11-digit national identity number or D-number with valid check digits",
        ));
    }
    if !params.iss_onbehalfof.is_empty()
        && (params.iss_onbehalfof.len() > MAX_ISS_ONBEHALFOF
            || !params.iss_onbehalfof.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(InvalidGrant::new(
            GrantField::IssOnBehalfOf,
            format!("must be 1..={MAX_ISS_ONBEHALFOF} bytes of printable ASCII without spaces"),
        ));
    }
    let authorization_details = AuthorizationDetails::parse(&params.authorization_details_json)?;
    Ok((lifetime, authorization_details))
}

/// Whether `s` is a Norwegian national identity number (fødselsnummer) or D-number: eleven
/// digits whose two check digits are right (modulus 11 with the weights Skatteetaten
/// publishes). The date part is not checked: D-numbers add 4 to the first digit, and
/// synthetic test persons (Tenor) add 80 to the month.
pub fn is_national_identity_number(s: &str) -> bool {
    const FIRST: [u32; 9] = [3, 7, 6, 1, 8, 9, 4, 5, 2];
    const SECOND: [u32; 10] = [5, 4, 3, 2, 7, 6, 5, 4, 3, 2];
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if s.len() != 11 || digits.len() != 11 {
        return false;
    }
    let check = |weights: &[u32]| {
        let sum: u32 = weights.iter().zip(&digits).map(|(w, d)| w * d).sum();
        match 11 - sum % 11 {
            11 => Some(0),
            10 => None,
            k => Some(k),
        }
    };
    check(&FIRST) == Some(digits[9]) && check(&SECOND) == Some(digits[10])
}

/// A validated `authorization_details` value (RFC 9396): a JSON array of objects, each
/// with a `type` such as `urn:altinn:systemuser` or `urn:altinn:consent`. What each type
/// means is Maskinporten's and Altinn's business; the agent checks the shape and lets the
/// caller policy decide which types a caller may ask for.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub(crate) struct AuthorizationDetails(serde_json::Value);

impl AuthorizationDetails {
    /// Parses `json`; `None` when it is empty (no claim).
    pub(crate) fn parse(json: &str) -> Result<Option<Self>, InvalidGrant> {
        const FIELD: GrantField = GrantField::AuthorizationDetails;
        if json.trim().is_empty() {
            return Ok(None);
        }
        if json.len() > MAX_AUTHORIZATION_DETAILS {
            return Err(InvalidGrant::new(
                FIELD,
                format!("is longer than {MAX_AUTHORIZATION_DETAILS} bytes"),
            ));
        }
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| {
            InvalidGrant::new(
                FIELD,
                format!("is not JSON ({e}); send an array such as [{{\"type\":\"urn:altinn:systemuser\", ...}}]"),
            )
        })?;
        let Some(entries) = value.as_array() else {
            return Err(InvalidGrant::new(FIELD, "must be a JSON array of objects"));
        };
        if entries.is_empty() || entries.len() > MAX_AUTHORIZATION_ENTRIES {
            return Err(InvalidGrant::new(
                FIELD,
                format!("must hold 1 to {MAX_AUTHORIZATION_ENTRIES} entries"),
            ));
        }
        for (i, entry) in entries.iter().enumerate() {
            let at = format!("[{i}]");
            let Some(object) = entry.as_object() else {
                return Err(InvalidGrant::at(FIELD, at, "must be a JSON object"));
            };
            match object.get("type").and_then(serde_json::Value::as_str) {
                Some(t)
                    if !t.is_empty()
                        && t.len() <= MAX_AUTHORIZATION_TYPE
                        && t.chars().all(|c| c.is_ascii_graphic()) => {}
                Some(_) => {
                    return Err(InvalidGrant::at(
                        FIELD,
                        format!("{at}.type"),
                        format!("must be 1 to {MAX_AUTHORIZATION_TYPE} printable ASCII characters"),
                    ));
                }
                None => {
                    return Err(InvalidGrant::at(
                        FIELD,
                        format!("{at}.type"),
                        "is required, e.g. \"urn:altinn:systemuser\"",
                    ));
                }
            }
        }
        Ok(Some(AuthorizationDetails(value)))
    }

    /// The `type` of each entry, in order.
    pub(crate) fn types(&self) -> Vec<&str> {
        self.0
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.get("type").and_then(serde_json::Value::as_str))
            .collect()
    }

    /// One spelling for equal values (object keys sorted, no spaces), for cache keys.
    pub(crate) fn canonical(&self) -> String {
        self.0.to_string()
    }
}

fn check_client_id(client_id: &str) -> Result<(), InvalidGrant> {
    let field = GrantField::ClientId;
    if client_id.is_empty() {
        return Err(InvalidGrant::new(field, "must not be empty"));
    }
    if client_id.len() > MAX_CLIENT_ID {
        return Err(InvalidGrant::new(
            field,
            format!("is longer than {MAX_CLIENT_ID} bytes"),
        ));
    }
    if !client_id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(InvalidGrant::new(
            field,
            "must be printable ASCII without spaces (a Maskinporten client_id is usually a UUID)",
        ));
    }
    Ok(())
}

/// Maskinporten scope names are `prefix:name`, both parts non-empty, where the name may
/// hold `/`, `.`, `:`, `-` and `_`. Anything else (spaces above all, which would split one scope into two
/// inside the `scope` claim) is refused.
fn check_scopes(scopes: &[String]) -> Result<(), InvalidGrant> {
    if scopes.is_empty() {
        return Err(InvalidGrant::new(
            GrantField::Scopes,
            "at least one scope is required",
        ));
    }
    if scopes.len() > MAX_SCOPES {
        return Err(InvalidGrant::new(
            GrantField::Scopes,
            format!("more than {MAX_SCOPES} scopes"),
        ));
    }
    for (i, scope) in scopes.iter().enumerate() {
        // Named only when refused: a valid request allocates nothing here.
        let at = || format!("[{i}]");
        if scope.is_empty() {
            return Err(InvalidGrant::at(
                GrantField::Scopes,
                at(),
                "must not be empty",
            ));
        }
        if scope.len() > MAX_SCOPE {
            return Err(InvalidGrant::at(
                GrantField::Scopes,
                at(),
                format!("is longer than {MAX_SCOPE} bytes"),
            ));
        }
        if let Some(c) = scope
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '/' | '.' | '-' | '_')))
        {
            let shown = if c == ' ' {
                "a space".to_owned()
            } else if c.is_ascii_graphic() {
                format!("{c:?}")
            } else {
                format!("U+{:04X}", u32::from(c))
            };
            return Err(InvalidGrant::at(
                GrantField::Scopes,
                at(),
                format!("contains {shown}; scopes use A-Z a-z 0-9 and : / . - _ only"),
            ));
        }
        match scope.split_once(':') {
            Some((prefix, name)) if !prefix.is_empty() && !name.is_empty() => {}
            Some((prefix, "")) if !prefix.is_empty() => {
                return Err(InvalidGrant::at(
                    GrantField::Scopes,
                    at(),
                    format!(
                        "has no name after {:?}; it must have the form prefix:name",
                        format!("{prefix}:")
                    ),
                ));
            }
            _ => {
                return Err(InvalidGrant::at(
                    GrantField::Scopes,
                    at(),
                    "must have the form prefix:name",
                ));
            }
        }
        if scopes[..i].contains(scope) {
            return Err(InvalidGrant::at(
                GrantField::Scopes,
                at(),
                format!("repeats scope {scope:?}"),
            ));
        }
    }
    Ok(())
}

fn check_resources(resources: &[String]) -> Result<(), InvalidGrant> {
    if resources.len() > MAX_RESOURCES {
        return Err(InvalidGrant::new(
            GrantField::Resources,
            format!("more than {MAX_RESOURCES} resources"),
        ));
    }
    for (i, resource) in resources.iter().enumerate() {
        let at = || format!("[{i}]");
        if resource.is_empty() || resource.len() > MAX_RESOURCE {
            return Err(InvalidGrant::at(
                GrantField::Resources,
                at(),
                format!("must be 1 to {MAX_RESOURCE} bytes"),
            ));
        }
        let scheme_ok = resource
            .split_once(':')
            .is_some_and(|(scheme, rest)| !scheme.is_empty() && !rest.is_empty());
        if !scheme_ok || !resource.chars().all(|c| c.is_ascii_graphic()) {
            return Err(InvalidGrant::at(
                GrantField::Resources,
                at(),
                "must be an absolute URI without spaces, e.g. \"https://api.example.no/\"",
            ));
        }
    }
    Ok(())
}

/// True for nine digits whose last is the mod-11 check digit of the first eight
/// (weights 3 2 7 6 5 4 3 2), as Brønnøysundregistrene assigns them.
pub fn is_organization_number(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if s.len() != 9 || digits.len() != 9 {
        return false;
    }
    let sum: u32 = [3, 2, 7, 6, 5, 4, 3, 2]
        .iter()
        .zip(&digits)
        .map(|(w, d)| w * d)
        .sum();
    match 11 - sum % 11 {
        11 => digits[8] == 0,
        10 => false,
        check => digits[8] == check,
    }
}

/// The JOSE header for a key: `alg` and the certificate chain in `x5c`. Built once per
/// key and reused, since it never changes between grants.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    algorithm: Algorithm,
    encoded: String,
}

impl Header {
    /// A header carrying `x5c`: each DER certificate as standard (not URL-safe) base64,
    /// leaf first, as RFC 7515 section 4.1.6 requires.
    pub(crate) fn with_x5c<'a>(
        algorithm: Algorithm,
        chain: impl IntoIterator<Item = &'a [u8]>,
    ) -> Self {
        #[derive(Serialize)]
        struct Json<'a> {
            alg: &'a str,
            x5c: Vec<String>,
        }
        let json = Json {
            alg: algorithm.jws_name(),
            x5c: chain.into_iter().map(|der| STANDARD.encode(der)).collect(),
        };
        let bytes = serde_json::to_vec(&json).unwrap_or_default();
        Header {
            algorithm,
            encoded: URL_SAFE_NO_PAD.encode(bytes),
        }
    }

    /// A header carrying `kid`, for a key registered on the Maskinporten client.
    pub(crate) fn with_kid(algorithm: Algorithm, kid: &str) -> Self {
        #[derive(Serialize)]
        struct Json<'a> {
            alg: &'a str,
            kid: &'a str,
        }
        let json = Json {
            alg: algorithm.jws_name(),
            kid,
        };
        let bytes = serde_json::to_vec(&json).unwrap_or_default();
        Header {
            algorithm,
            encoded: URL_SAFE_NO_PAD.encode(bytes),
        }
    }

    /// The algorithm the signature must use.
    pub(crate) fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

/// Room for `.signature` after the signing input: the base64url of an RSA-4096
/// signature (512 bytes), so [`compact`] never grows the string for keys up to that size.
const SIGNATURE_ROOM: usize = 1 + 683;

/// `header.claims`, the bytes the token signs, in a string with room for the signature.
/// The claims' JSON is encoded as it is written, with no copy of it in between.
pub(crate) fn signing_input(header: &Header, claims: &Claims) -> String {
    let json = claims.json_len_estimate();
    let mut input =
        String::with_capacity(header.encoded.len() + 1 + json.div_ceil(3) * 4 + SIGNATURE_ROOM);
    input.push_str(&header.encoded);
    input.push('.');
    let mut encoder = EncoderStringWriter::from_consumer(&mut input, &URL_SAFE_NO_PAD);
    // Serialising a struct of strings, integers and string vectors cannot fail.
    let _ = serde_json::to_writer(&mut encoder, claims);
    let _ = encoder.into_inner();
    input
}

/// Appends the signature to the signing input, giving the compact JWS.
pub(crate) fn compact(mut signing_input: String, signature: &[u8]) -> String {
    signing_input.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut signing_input);
    signing_input
}

#[cfg(test)]
mod tests;
