//! A refused token request: the OAuth2 error, Maskinporten's MP code where it has one,
//! and a description. Kept apart from the checks so the HTTP side can turn a refusal into
//! a response without knowing how it came about.

/// The OAuth2 `error` values the mock answers with (RFC 6749 section 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OAuthError {
    /// A parameter is missing or malformed.
    InvalidRequest,
    /// The client is unknown.
    InvalidClient,
    /// The grant is invalid, expired, replayed or badly signed.
    InvalidGrant,
    /// A scope the client may not have.
    InvalidScope,
    /// A grant type other than jwt-bearer.
    UnsupportedGrantType,
}

impl OAuthError {
    /// The `error` string.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            OAuthError::InvalidRequest => "invalid_request",
            OAuthError::InvalidClient => "invalid_client",
            OAuthError::InvalidGrant => "invalid_grant",
            OAuthError::InvalidScope => "invalid_scope",
            OAuthError::UnsupportedGrantType => "unsupported_grant_type",
        }
    }
}

/// Maskinporten's documented error codes, for the ones the mock reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MpCode {
    /// The `jti` was used before.
    Mp012,
    /// Unknown client.
    Mp100,
    /// Wrong audience.
    Mp110,
    /// Certificate invalid (chain, validity, trust).
    Mp120,
    /// The registered key has expired.
    Mp121,
    /// The certificate belongs to another organisation than the client.
    Mp122,
    /// Malformed certificate.
    Mp123,
    /// The grant's signature cannot be validated with its certificate; Digdir names an
    /// expired certificate or one for the other environment. The mock answers it for a
    /// signature that does not verify and for the other environment (test vs production).
    Mp124,
    /// `iat`/`exp` out of bounds.
    Mp130,
    /// A scope the client may not have.
    Mp200,
    /// No scope.
    Mp201,
    /// `consumer_org` without a delegation.
    Mp251,
}

impl MpCode {
    /// The code as Maskinporten writes it, e.g. `MP-120`.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            MpCode::Mp012 => "MP-012",
            MpCode::Mp100 => "MP-100",
            MpCode::Mp110 => "MP-110",
            MpCode::Mp120 => "MP-120",
            MpCode::Mp121 => "MP-121",
            MpCode::Mp122 => "MP-122",
            MpCode::Mp123 => "MP-123",
            MpCode::Mp124 => "MP-124",
            MpCode::Mp130 => "MP-130",
            MpCode::Mp200 => "MP-200",
            MpCode::Mp201 => "MP-201",
            MpCode::Mp251 => "MP-251",
        }
    }
}

/// A refused token request.
#[derive(Debug)]
pub(super) struct Refusal {
    /// The OAuth2 error.
    pub(super) error: OAuthError,
    /// Maskinporten's code, when it has one for this case.
    pub(super) code: Option<MpCode>,
    /// What was wrong, for `error_description` (the trace id is added on the way out).
    pub(super) description: String,
    /// The grant's `iss`, once read, for the log.
    pub(super) client_id: Option<String>,
}

/// A refusal with any error.
pub(super) fn refuse(
    error: OAuthError,
    code: Option<MpCode>,
    description: impl Into<String>,
) -> Refusal {
    Refusal {
        error,
        code,
        description: description.into(),
        client_id: None,
    }
}

/// An `invalid_grant` refusal.
pub(super) fn invalid_grant(code: Option<MpCode>, description: impl Into<String>) -> Refusal {
    refuse(OAuthError::InvalidGrant, code, description)
}

/// An `invalid_request` refusal, which never has an MP code.
pub(super) fn invalid_request(description: impl Into<String>) -> Refusal {
    refuse(OAuthError::InvalidRequest, None, description)
}
