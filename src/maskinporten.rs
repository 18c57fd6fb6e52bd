//! Maskinporten's protocol as Digdir documents it, in one place: the issuers of its
//! environments (and Skyporten's), their token endpoints, the grant type and claims a
//! grant may carry, its time limits and the MP error codes with what to do about each.
//!
//! When Digdir changes one of these, this is the file to edit. The agent's `config`,
//! `grant` and `token` modules read it, and so does the local Maskinporten of the
//! `mock-maskinporten` crate, so the two cannot drift apart. It imports nothing from the
//! crate, so any layer may use it.

/// The grant type of RFC 7523, the only one Maskinporten takes from a server.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The claims Digdir's JWT grant page lists; since 2025 Maskinporten refuses any other.
pub const CLAIMS: [&str; 11] = [
    "aud",
    "iss",
    "scope",
    "iat",
    "exp",
    "jti",
    "resource",
    "consumer_org",
    "authorization_details",
    "pid",
    "iss_onbehalfof",
];

/// Longest grant Maskinporten accepts: `exp - iat <= 120`.
pub const MAX_LIFETIME_SECONDS: u32 = 120;

/// How far a grant's `iat` may be from Maskinporten's clock, either way.
pub const CLOCK_SKEW_SECONDS: u64 = 10;

/// Where Maskinporten documents its error codes; an answer's `error_uri` is this plus the
/// code.
pub const ERROR_URI_BASE: &str = "https://docs.digdir.no/maskinporten/errors/";

/// A Maskinporten or Skyporten environment Digdir runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Environment {
    /// The name a config or request uses for it.
    pub(crate) name: &'static str,
    /// The issuer, which a grant's `aud` must equal exactly.
    pub(crate) issuer: &'static str,
    /// Whether it takes production certificates (otherwise test certificates).
    pub(crate) production: bool,
    /// The token endpoint; `None` where Digdir documents only the issuer's metadata, from
    /// which the endpoint is discovered.
    pub(crate) token_endpoint: Option<&'static str>,
}

/// Digdir's environments, sorted by name. Maskinporten's issuers end in `/`; Skyporten's
/// do not, so each is kept as Digdir publishes it. Digdir documents Skyporten's metadata
/// (`/.well-known/openid-configuration`) but not its token endpoint.
pub(crate) const ENVIRONMENTS: [Environment; 4] = [
    Environment {
        name: "prod",
        issuer: "https://maskinporten.no/",
        production: true,
        token_endpoint: Some("https://maskinporten.no/token"),
    },
    Environment {
        name: "sky",
        issuer: "https://sky.maskinporten.no",
        production: true,
        token_endpoint: None,
    },
    Environment {
        name: "sky-test",
        issuer: "https://test.sky.maskinporten.no",
        production: false,
        token_endpoint: None,
    },
    Environment {
        name: "test",
        issuer: "https://test.maskinporten.no/",
        production: false,
        token_endpoint: Some("https://test.maskinporten.no/token"),
    },
];

/// Maskinporten's layout, for an issuer whose token endpoint is not given: the token
/// endpoint is `token` under the issuer.
pub(crate) fn token_endpoint_under(issuer: &str) -> String {
    format!("{}/token", issuer.trim_end_matches('/'))
}

/// `MP-` and three or more digits, anywhere in `text`: how an error code appears in an
/// answer's `error_uri` or `error_description`.
pub(crate) fn find_error_code(text: &str) -> Option<&str> {
    text.match_indices("MP-").find_map(|(at, _)| {
        let digits = text[at + 3..]
            .bytes()
            .take_while(u8::is_ascii_digit)
            .count();
        (digits >= 3).then(|| &text[at..at + 3 + digits])
    })
}

/// What to do about an MP error code, for the codes we know.
pub(crate) fn error_hint(code: &str) -> Option<&'static str> {
    Some(match code {
        "MP-011" => {
            "Maskinporten could not read the grant (a claim missing or of the wrong form); error_description names it: compare the grant (grant-agent client grant) with Digdir's JWT grant page"
        }
        "MP-012" => {
            "the grant's jti was used before: a grant must never be replayed (the agent signs a new one for every request and retry)"
        }
        "MP-100" => {
            "the client_id is not registered in this environment: check client_id and environment (test and prod have separate clients)"
        }
        "MP-110" => {
            "wrong aud: the grant's audience must be the environment's issuer; check [environments] audience in the agent config"
        }
        "MP-120" => {
            "the certificate is not valid (expired, revoked or not from a trusted issuer): renew it or check the chain sent in x5c"
        }
        "MP-121" => {
            "the key registered on the client has expired: register a new key (grant-agent key jwk) and configure its kid"
        }
        "MP-122" => {
            "the certificate's organisation number is not the client owner's: use the owner's virksomhetssertifikat, or a client owned by the certificate's organisation"
        }
        "MP-123" => {
            "the x5c header is malformed or does not match the signature: check the certificate configured for the key"
        }
        "MP-124" => {
            "the grant's signature did not validate against its certificate: typically the certificate has expired (renew it), or it is from the other environment (a test certificate in test, a production certificate in prod)"
        }
        "MP-130" => {
            "the grant's iat is over 10 s from Maskinporten's clock, or it expired: synchronise this host's clock (NTP)"
        }
        "MP-200" | "MP-201" => {
            "invalid scope: check the scope names and that the client has them in this environment"
        }
        "MP-250" => "the scope is not granted to this client: ask the API owner to grant it",
        "MP-251" => {
            "no delegation for consumer_org: the consumer must delegate the scope to your organisation in Altinn"
        }
        "MP-301" | "MP-302" => {
            "Maskinporten refused the authorization_details (RFC 9396): error_description names the entry; check its type and fields against the API's documentation, and that the client may ask for that type"
        }
        "MP-303" => {
            "invalid_altinn_customer_configuration: Altinn found no usable system user for this request: the system in Altinn's system register must carry this client_id, systemuser_org must be the customer's organisation, and externalRef must match when the system user request set one"
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environments_are_sorted_and_follow_the_token_endpoint_layout() {
        assert!(ENVIRONMENTS.is_sorted_by_key(|env| env.name));
        for env in ENVIRONMENTS {
            if let Some(endpoint) = env.token_endpoint {
                assert_eq!(endpoint, token_endpoint_under(env.issuer), "{}", env.name);
            }
        }
    }

    #[test]
    fn error_codes_are_found_with_three_digits_or_more() {
        assert_eq!(find_error_code("see MP-1234."), Some("MP-1234"));
        assert_eq!(find_error_code("MP-1x MP-12"), None);
        assert!(error_hint("MP-999").is_none());
    }
}
