//! The one place where failures are classified: each becomes a gRPC status for the caller
//! and an [`Outcome`], which is both the audit line's `outcome` and the `outcome` label of
//! `grant_agent_grants_total` / `grant_agent_tokens_total`.
//!
//! | error                              | code                  | outcome |
//! |------------------------------------|-----------------------|---------|
//! | invalid field in the request       | `INVALID_ARGUMENT`    | refused |
//! | unknown key name                   | `NOT_FOUND`           | refused |
//! | certificate expired / not yet valid| `FAILED_PRECONDITION` | refused |
//! | certificate for the other environment | `FAILED_PRECONDITION` | refused |
//! | PKCS#11 call failed, token unavailable | `UNAVAILABLE`     | failed  |
//! | session queue full                 | `RESOURCE_EXHAUSTED`  | busy    |
//! | deadline cannot be met             | `DEADLINE_EXCEEDED`   | busy    |
//! | caller not in the policy / not allowed | `PERMISSION_DENIED` | denied |
//! | caller over its rate               | `RESOURCE_EXHAUSTED`  | denied  |
//! | Maskinporten: invalid_scope, unauthorized_client, access_denied | `PERMISSION_DENIED` | refused |
//! | Maskinporten: HTTP 429             | `RESOURCE_EXHAUSTED`  | refused |
//! | Maskinporten: any other 4xx (invalid_grant, invalid_client, ...) | `FAILED_PRECONDITION` | refused |
//! | Maskinporten: 5xx or unreachable after retries, discovery failed, unusable answer | `UNAVAILABLE` | failed |
//! | no token before the deadline       | `DEADLINE_EXCEEDED`   | failed  |
//! | the audit line not written (`fail_closed`) | `UNAVAILABLE`  | (the line is lost) |
//!
//! A Maskinporten refusal also carries a `google.rpc.ErrorInfo` detail (reason = the
//! OAuth2 `error`, domain `maskinporten`) whose metadata holds `error_description` (with
//! Maskinporten's trace_id), `error_uri`, `mp_code`, `hint` and `http_status`, so programs
//! need not parse the message.
//!
//! Messages are safe to send: they name fields, keys and PKCS#11 return values, never the
//! PIN, an assertion or key material (none of which any error type holds).

use tonic::{Code, Status};

use std::collections::HashMap;

use tonic_types::{ErrorDetails, StatusExt};

use crate::{agent::SignError, token::TokenError};

use super::{audit::AuditUnavailable, policy::Refusal};

/// The `google.rpc.ErrorInfo` domain of a refusal that came from Maskinporten.
pub(super) const MASKINPORTEN_DOMAIN: &str = "maskinporten";

/// A grant or token that was ready but whose audit line could not be written, with
/// `[audit] fail_closed = true`: the answer is withheld.
pub(super) fn from_audit(error: &AuditUnavailable) -> Status {
    Status::new(Code::Unavailable, error.to_string())
}

/// What a failed request's audit line and metrics say happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The policy said no: the caller is unknown, not allowed, or over its rate.
    Denied,
    /// The request, or Maskinporten's answer to it, was refused: bad input, a key or
    /// certificate that cannot serve it, or an OAuth2 error.
    Refused,
    /// Overload: the session queue was full, or the deadline could not be met with the
    /// queue ahead. Not a failure: no PKCS#11 error, and logged only in a summary.
    Busy,
    /// The token or Maskinporten failed: logged.
    Failed,
}

impl Outcome {
    /// The audit line's `outcome`, and the metrics' `outcome` label.
    pub(super) fn label(self) -> &'static str {
        match self {
            Outcome::Denied => "denied",
            Outcome::Refused => "refused",
            Outcome::Busy => "busy",
            Outcome::Failed => "failed",
        }
    }
}

/// A classified failure: what the caller is sent, and what is audited and counted.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) status: Status,
    pub(super) outcome: Outcome,
}

/// A policy refusal.
pub(super) fn refusal(refusal: &Refusal) -> Failure {
    let code = match refusal {
        Refusal::UnknownCaller(_) | Refusal::NotAllowed { .. } => Code::PermissionDenied,
        Refusal::RateLimited { .. } => Code::ResourceExhausted,
    };
    Failure {
        status: Status::new(code, refusal.to_string()),
        outcome: Outcome::Denied,
    }
}

/// A grant that could not be signed. The token's failures are sent as such, so the
/// caller can tell them from its own request's.
pub(super) fn sign_failure(error: &SignError) -> Failure {
    let (code, outcome, in_token) = match error {
        SignError::Invalid(_) => (Code::InvalidArgument, Outcome::Refused, false),
        SignError::UnknownKey(_) => (Code::NotFound, Outcome::Refused, false),
        SignError::CertificateNotValid { .. }
        | SignError::WrongEnvironment { .. }
        | SignError::Revoked { .. } => (Code::FailedPrecondition, Outcome::Refused, false),
        SignError::Unavailable | SignError::Pkcs11(_) => (Code::Unavailable, Outcome::Failed, true),
        SignError::Busy { .. } => (Code::ResourceExhausted, Outcome::Busy, true),
        SignError::Deadline => (Code::DeadlineExceeded, Outcome::Busy, true),
    };
    let message = if in_token {
        format!("signing in the token failed: {error}")
    } else {
        error.to_string()
    };
    Failure {
        status: Status::new(code, message),
        outcome,
    }
}

/// An access token that could not be had. The token path's own deadline
/// ([`TokenError::Deadline`]) is `failed`, not `busy`: Maskinporten did not answer in time,
/// the agent is not full.
pub(super) fn token_failure(error: &TokenError) -> Failure {
    let (code, oauth, status) = match error {
        TokenError::Sign(sign) => return sign_failure(sign),
        TokenError::Refused { status, oauth, .. } => {
            let code = match (oauth.error.as_str(), status) {
                ("invalid_scope" | "unauthorized_client" | "access_denied", _) => {
                    Code::PermissionDenied
                }
                (_, 429) => Code::ResourceExhausted,
                _ => Code::FailedPrecondition,
            };
            (code, oauth, *status)
        }
        TokenError::Deadline { .. } => {
            return Failure {
                status: Status::new(Code::DeadlineExceeded, error.to_string()),
                outcome: Outcome::Failed,
            };
        }
        TokenError::Upstream { .. } | TokenError::Discovery { .. } | TokenError::BadAnswer(_) => {
            return Failure {
                status: Status::new(Code::Unavailable, error.to_string()),
                outcome: Outcome::Failed,
            };
        }
    };
    let hint = oauth.hint();
    let message = match hint {
        Some(hint) => format!("{error}; hint: {hint}"),
        None => error.to_string(),
    };
    let mut metadata = HashMap::from([
        ("error_description".to_owned(), oauth.description.clone()),
        ("error_uri".to_owned(), oauth.uri.clone()),
        ("http_status".to_owned(), status.to_string()),
    ]);
    if let Some(code) = oauth.mp_code() {
        let _ = metadata.insert("mp_code".to_owned(), code.to_owned());
    }
    if let Some(hint) = hint {
        let _ = metadata.insert("hint".to_owned(), hint.to_owned());
    }
    Failure {
        status: Status::with_error_details(
            code,
            message,
            ErrorDetails::with_error_info(oauth.error.clone(), MASKINPORTEN_DOMAIN, metadata),
        ),
        outcome: Outcome::Refused,
    }
}

/// The HTTP status the JSON API answers for a gRPC code, as Google's API design guide maps
/// them; 499 is its "client closed request".
pub(super) fn http_status(code: Code) -> http::StatusCode {
    use http::StatusCode as H;
    match code {
        Code::Ok => H::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => H::BAD_REQUEST,
        Code::Unauthenticated => H::UNAUTHORIZED,
        Code::PermissionDenied => H::FORBIDDEN,
        Code::NotFound => H::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => H::CONFLICT,
        Code::ResourceExhausted => H::TOO_MANY_REQUESTS,
        Code::Cancelled => H::from_u16(499).unwrap_or(H::BAD_REQUEST),
        Code::Unimplemented => H::NOT_IMPLEMENTED,
        Code::Unavailable => H::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => H::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => H::INTERNAL_SERVER_ERROR,
    }
}

/// The OAuth2 `error` (RFC 6749 5.2 and 4.1.2.1) the JSON API answers for a failure of the
/// agent's own; Maskinporten's refusals keep Maskinporten's.
pub(super) fn oauth_error(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange | Code::NotFound => {
            "invalid_request"
        }
        Code::PermissionDenied | Code::Unauthenticated => "access_denied",
        Code::ResourceExhausted
        | Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Aborted => "temporarily_unavailable",
        _ => "server_error",
    }
}

/// The name of a gRPC code as audit lines spell it (`Ok`, `InvalidArgument`, ...: its
/// `Debug` form), without formatting it anew for every line.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use cryptoki::{
        context::Function,
        error::{Error as Pkcs11Error, RvError},
    };

    use super::*;
    use crate::{
        cert::CertEnvironment,
        grant::{GrantField, InvalidGrant},
        hsm::FailedCall,
        token::OAuthError,
    };

    fn device_error() -> FailedCall {
        FailedCall {
            function: "C_Sign",
            source: Pkcs11Error::Pkcs11(RvError::DeviceError, Function::Sign),
        }
    }

    #[test]
    fn http_statuses_follow_the_code() {
        let table = [
            (Code::InvalidArgument, 400, "invalid_request"),
            (Code::NotFound, 404, "invalid_request"),
            (Code::FailedPrecondition, 400, "invalid_request"),
            (Code::PermissionDenied, 403, "access_denied"),
            (Code::ResourceExhausted, 429, "temporarily_unavailable"),
            (Code::Unavailable, 503, "temporarily_unavailable"),
            (Code::DeadlineExceeded, 504, "temporarily_unavailable"),
            (Code::Internal, 500, "server_error"),
        ];
        for (code, http, error) in table {
            assert_eq!(http_status(code).as_u16(), http, "{code:?}");
            assert_eq!(oauth_error(code), error, "{code:?}");
        }
        for number in 1..=16 {
            assert!(http_status(Code::from_i32(number)).as_u16() >= 400);
        }
    }

    #[test]
    fn code_names_are_the_codes_debug_form() {
        for number in 0..=16 {
            let code = Code::from_i32(number);
            assert_eq!(code_name(code), format!("{code:?}"));
        }
    }

    #[test]
    fn each_refusal_has_its_code_and_names_the_caller_and_the_part_refused() {
        let table = [
            (
                Refusal::UnknownCaller("uid:1000".into()),
                Code::PermissionDenied,
                "caller uid:1000 is not in the policy",
            ),
            (
                Refusal::NotAllowed {
                    caller: "uid:1000".into(),
                    what: "scope \"nav:x\"".into(),
                },
                Code::PermissionDenied,
                "caller uid:1000 may not use scope \"nav:x\"",
            ),
            (
                Refusal::RateLimited {
                    caller: "uid:1000".into(),
                    rate: 5,
                },
                Code::ResourceExhausted,
                "caller uid:1000 is over its limit of 5 requests per second",
            ),
        ];
        for (refused, code, message) in table {
            let Failure { status, outcome } = refusal(&refused);
            assert_eq!((status.code(), status.message()), (code, message));
            assert_eq!(outcome, Outcome::Denied, "{refused:?}");
        }
    }

    #[test]
    fn each_signing_error_has_its_code_and_a_message_naming_the_cause() {
        for (error, code, outcome, message) in signing_errors() {
            let failure = sign_failure(&error);
            let status = &failure.status;
            assert_eq!(
                (status.code(), status.message(), failure.outcome),
                (code, message.as_str(), outcome),
                "{error:?}"
            );
            assert!(status.details().is_empty(), "{error:?}: no details");
        }
    }

    /// Every kind of signing error, with its code, outcome and message.
    fn signing_errors() -> Vec<(SignError, Code, Outcome, String)> {
        vec![
            (
                SignError::Invalid(InvalidGrant::at(
                    GrantField::Scopes,
                    "[1]".into(),
                    "is empty",
                )),
                Code::InvalidArgument,
                Outcome::Refused,
                "grant.scopes[1]: is empty".to_owned(),
            ),
            (
                SignError::UnknownKey("other".into()),
                Code::NotFound,
                Outcome::Refused,
                "grant.key: no key is named \"other\"".to_owned(),
            ),
            (
                SignError::CertificateNotValid {
                    key: "default".into(),
                    state: "expired (on 2026-01-01)".into(),
                },
                Code::FailedPrecondition,
                Outcome::Refused,
                "key \"default\" has no certificate valid now: expired (on 2026-01-01); renew it or configure another key".to_owned(),
            ),
            (
                SignError::WrongEnvironment {
                    key: "default".into(),
                    certificate: CertEnvironment::Test,
                    environment: "prod".into(),
                    issuer: "CN=Buypass Class 3 Test4 CA G2".into(),
                },
                Code::FailedPrecondition,
                Outcome::Refused,
                "key \"default\" has a test certificate (issuer CN=Buypass Class 3 Test4 CA G2), which Maskinporten refuses in environment \"prod\"; use a key with a certificate for that environment (or set keys[].allow_environment_mismatch = true)".to_owned(),
            ),
            (
                SignError::Revoked {
                    key: "default".into(),
                    at: "2026-11-30T12:00:00Z".into(),
                    reason: "keyCompromise",
                    answered_by: "ocsp http://ocsp.example/".into(),
                },
                Code::FailedPrecondition,
                Outcome::Refused,
                "key \"default\": its certificate was revoked on 2026-11-30T12:00:00Z (reason keyCompromise; ocsp http://ocsp.example/); renew it and configure the new one (docs/operations.md, \"A revoked certificate\")".to_owned(),
            ),
            (
                SignError::Unavailable,
                Code::Unavailable,
                Outcome::Failed,
                "signing in the token failed: the token is unavailable (being recovered, or waiting for an operator: see the agent log)".to_owned(),
            ),
            (
                SignError::Busy { queued: 64 },
                Code::ResourceExhausted,
                Outcome::Busy,
                "signing in the token failed: the token is busy: 64 requests are already waiting for a session; retry with backoff".to_owned(),
            ),
            (
                SignError::Deadline,
                Code::DeadlineExceeded,
                Outcome::Busy,
                "signing in the token failed: the caller's deadline cannot be met with the queue ahead of it".to_owned(),
            ),
            (
                SignError::Pkcs11(device_error()),
                Code::Unavailable,
                Outcome::Failed,
                "signing in the token failed: PKCS#11 C_Sign failed: DeviceError".to_owned(),
            ),
        ]
    }

    fn refused(status: u16, error: &str, uri: &str) -> TokenError {
        TokenError::Refused {
            status,
            oauth: OAuthError {
                error: error.into(),
                description: "Invalid assertion (trace_id: 1f2e)".into(),
                uri: uri.into(),
            },
            attempts: 1,
        }
    }

    #[test]
    fn each_token_error_has_its_code() {
        let table = [
            (
                refused(400, "invalid_scope", ""),
                Code::PermissionDenied,
                Outcome::Refused,
            ),
            (
                refused(401, "unauthorized_client", ""),
                Code::PermissionDenied,
                Outcome::Refused,
            ),
            (
                refused(403, "access_denied", ""),
                Code::PermissionDenied,
                Outcome::Refused,
            ),
            (
                refused(429, "", ""),
                Code::ResourceExhausted,
                Outcome::Refused,
            ),
            (
                refused(400, "invalid_grant", ""),
                Code::FailedPrecondition,
                Outcome::Refused,
            ),
            (
                refused(401, "invalid_client", ""),
                Code::FailedPrecondition,
                Outcome::Refused,
            ),
            (
                TokenError::Upstream {
                    detail: "HTTP 503".into(),
                    attempts: 3,
                },
                Code::Unavailable,
                Outcome::Failed,
            ),
            (
                TokenError::Discovery {
                    issuer: "https://test.maskinporten.no/".into(),
                    detail: "timed out".into(),
                },
                Code::Unavailable,
                Outcome::Failed,
            ),
            (
                TokenError::BadAnswer("no access_token".into()),
                Code::Unavailable,
                Outcome::Failed,
            ),
            (
                TokenError::Deadline { attempts: 2 },
                Code::DeadlineExceeded,
                Outcome::Failed,
            ),
            (
                TokenError::Sign(SignError::UnknownKey("other".into())),
                Code::NotFound,
                Outcome::Refused,
            ),
            (
                TokenError::Sign(SignError::Busy { queued: 3 }),
                Code::ResourceExhausted,
                Outcome::Busy,
            ),
        ];
        for (error, code, outcome) in table {
            let Failure {
                status,
                outcome: got,
            } = token_failure(&error);
            assert_eq!((status.code(), got), (code, outcome), "{error:?}");
            let expected = match &error {
                TokenError::Sign(sign) => sign_failure(sign).status.message().to_owned(),
                other => other.to_string(),
            };
            assert_eq!(status.message(), expected, "{error:?}");
        }
    }

    #[test]
    fn a_maskinporten_refusal_carries_its_oauth_error_and_hint_as_error_info() {
        let error = refused(
            400,
            "invalid_grant",
            "https://docs.digdir.no/maskinporten/errors/MP-130",
        );
        let status = token_failure(&error).status;
        assert_eq!(status.code(), Code::FailedPrecondition);
        let TokenError::Refused { oauth, .. } = &error else {
            unreachable!("built as a refusal");
        };
        let hint = oauth.hint().expect("MP-130 has a hint");
        assert_eq!(status.message(), format!("{error}; hint: {hint}"));
        assert!(status.message().contains("trace_id: 1f2e"));
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "invalid_grant");
        assert_eq!(info.domain, "maskinporten");
        let expected = HashMap::from([
            (
                "error_description".to_owned(),
                "Invalid assertion (trace_id: 1f2e)".to_owned(),
            ),
            (
                "error_uri".to_owned(),
                "https://docs.digdir.no/maskinporten/errors/MP-130".to_owned(),
            ),
            ("http_status".to_owned(), "400".to_owned()),
            ("mp_code".to_owned(), "MP-130".to_owned()),
            ("hint".to_owned(), hint.to_owned()),
        ]);
        assert_eq!(info.metadata, expected);

        // Without an MP code: no hint, and no empty mp_code or hint entries.
        let status = token_failure(&refused(429, "", "")).status;
        assert_eq!(status.message(), refused(429, "", "").to_string());
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert!(!info.metadata.contains_key("mp_code"));
        assert!(!info.metadata.contains_key("hint"));
        assert_eq!(info.metadata["http_status"], "429");
    }
}
