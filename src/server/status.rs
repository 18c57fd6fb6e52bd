//! The one place where errors become gRPC statuses.
//!
//! | error                              | code                  |
//! |------------------------------------|-----------------------|
//! | invalid field in the request       | `INVALID_ARGUMENT`    |
//! | unknown key name                   | `NOT_FOUND`           |
//! | certificate expired / not yet valid| `FAILED_PRECONDITION` |
//! | certificate for the other environment | `FAILED_PRECONDITION` |
//! | PKCS#11 call failed                | `UNAVAILABLE`         |
//! | session queue full                 | `RESOURCE_EXHAUSTED`  |
//! | deadline cannot be met             | `DEADLINE_EXCEEDED`   |
//! | signing thread lost                | `INTERNAL`            |
//! | caller not in the policy / not allowed | `PERMISSION_DENIED` |
//! | caller over its rate               | `RESOURCE_EXHAUSTED`  |
//! | Maskinporten: invalid_scope, unauthorized_client, access_denied | `PERMISSION_DENIED` |
//! | Maskinporten: HTTP 429             | `RESOURCE_EXHAUSTED`  |
//! | Maskinporten: any other 4xx (invalid_grant, invalid_client, ...) | `FAILED_PRECONDITION` |
//! | Maskinporten: 5xx or unreachable after retries, discovery failed, unusable answer | `UNAVAILABLE` |
//! | no token before the deadline       | `DEADLINE_EXCEEDED`   |
//! | the audit line not written (`fail_closed`) | `UNAVAILABLE`  |
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

use crate::{agent::SignError, hsm::HsmError, token::TokenError};

use super::{audit::AuditUnavailable, policy::Refusal};

/// A grant or token that was ready but whose audit line could not be written, with
/// `[audit] fail_closed = true`: the answer is withheld.
pub(super) fn from_audit(error: &AuditUnavailable) -> Status {
    Status::new(Code::Unavailable, error.to_string())
}

pub(super) fn from_refusal(refusal: &Refusal) -> Status {
    let code = match refusal {
        Refusal::UnknownCaller(_) | Refusal::NotAllowed { .. } => Code::PermissionDenied,
        Refusal::RateLimited { .. } => Code::ResourceExhausted,
    };
    Status::new(code, refusal.to_string())
}

pub(super) fn from_sign_error(error: &SignError) -> Status {
    let code = match error {
        SignError::Invalid(_) => Code::InvalidArgument,
        SignError::UnknownKey(_) => Code::NotFound,
        SignError::CertificateNotValid { .. } | SignError::WrongEnvironment { .. } => {
            Code::FailedPrecondition
        }
        SignError::Hsm(HsmError::Thread(_)) => Code::Internal,
        SignError::Hsm(HsmError::Unavailable) => Code::Unavailable,
        SignError::Hsm(HsmError::Busy { .. }) => Code::ResourceExhausted,
        SignError::Hsm(HsmError::Deadline) => Code::DeadlineExceeded,
        SignError::Hsm(_) => Code::Unavailable,
    };
    let message = match error {
        SignError::Hsm(e) => format!("signing in the token failed: {e}"),
        other => other.to_string(),
    };
    Status::new(code, message)
}

pub(super) fn from_token_error(error: &TokenError) -> Status {
    let (code, oauth, status) = match error {
        TokenError::Sign(sign) => return from_sign_error(sign),
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
            return Status::new(Code::DeadlineExceeded, error.to_string());
        }
        TokenError::Upstream { .. } | TokenError::Discovery { .. } | TokenError::BadAnswer(_) => {
            return Status::new(Code::Unavailable, error.to_string());
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
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(oauth.error.clone(), "maskinporten", metadata),
    )
}

#[cfg(test)]
mod tests {
    use cryptoki::{
        context::Function,
        error::{Error as Pkcs11Error, RvError},
    };

    use super::*;
    use crate::{cert::CertEnvironment, grant::InvalidGrant, token::OAuthError};

    fn device_error() -> HsmError {
        HsmError::Call {
            function: "C_Sign",
            rv: "DeviceError".into(),
            source: Pkcs11Error::Pkcs11(RvError::DeviceError, Function::Sign),
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
        for (refusal, code, message) in table {
            let status = from_refusal(&refusal);
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }

    #[test]
    fn each_signing_error_has_its_code_and_a_message_naming_the_cause() {
        let table = [
            (
                SignError::Invalid(InvalidGrant {
                    field: "grant.scopes[1]".into(),
                    reason: "is empty".into(),
                }),
                Code::InvalidArgument,
                "grant.scopes[1]: is empty".to_owned(),
            ),
            (
                SignError::UnknownKey("other".into()),
                Code::NotFound,
                "grant.key: no key is named \"other\"".to_owned(),
            ),
            (
                SignError::CertificateNotValid {
                    key: "default".into(),
                    state: "expired (on 2026-01-01)".into(),
                },
                Code::FailedPrecondition,
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
                "key \"default\" has a test certificate (issuer CN=Buypass Class 3 Test4 CA G2), which Maskinporten refuses in environment \"prod\"; use a key with a certificate for that environment (or set keys[].allow_environment_mismatch = true)".to_owned(),
            ),
            (
                SignError::Hsm(HsmError::Thread("panicked".into())),
                Code::Internal,
                "signing in the token failed: the signing thread failed: panicked".to_owned(),
            ),
            (
                SignError::Hsm(HsmError::Unavailable),
                Code::Unavailable,
                "signing in the token failed: the token is unavailable (being recovered, or waiting for an operator: see the agent log)".to_owned(),
            ),
            (
                SignError::Hsm(HsmError::Busy { queued: 64 }),
                Code::ResourceExhausted,
                "signing in the token failed: the token is busy: 64 requests are already waiting for a session; retry with backoff".to_owned(),
            ),
            (
                SignError::Hsm(HsmError::Deadline),
                Code::DeadlineExceeded,
                "signing in the token failed: the caller's deadline cannot be met with the queue ahead of it".to_owned(),
            ),
            (
                SignError::Hsm(device_error()),
                Code::Unavailable,
                "signing in the token failed: PKCS#11 C_Sign failed: DeviceError".to_owned(),
            ),
            (
                SignError::Hsm(HsmError::PinRefused(RvError::PinIncorrect)),
                Code::Unavailable,
                "signing in the token failed: the token refused the user PIN (PinIncorrect); check the PIN source, and do not retry blindly: tokens lock after a few wrong PINs".to_owned(),
            ),
        ];
        for (error, code, message) in table {
            let status = from_sign_error(&error);
            assert_eq!(
                (status.code(), status.message()),
                (code, message.as_str()),
                "{error:?}"
            );
            assert!(status.details().is_empty(), "{error:?}: no details");
        }
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
            (refused(400, "invalid_scope", ""), Code::PermissionDenied),
            (
                refused(401, "unauthorized_client", ""),
                Code::PermissionDenied,
            ),
            (refused(403, "access_denied", ""), Code::PermissionDenied),
            (refused(429, "", ""), Code::ResourceExhausted),
            (refused(400, "invalid_grant", ""), Code::FailedPrecondition),
            (refused(401, "invalid_client", ""), Code::FailedPrecondition),
            (
                TokenError::Upstream {
                    detail: "HTTP 503".into(),
                    attempts: 3,
                },
                Code::Unavailable,
            ),
            (
                TokenError::Discovery {
                    issuer: "https://test.maskinporten.no/".into(),
                    detail: "timed out".into(),
                },
                Code::Unavailable,
            ),
            (
                TokenError::BadAnswer("no access_token".into()),
                Code::Unavailable,
            ),
            (TokenError::Deadline { attempts: 2 }, Code::DeadlineExceeded),
            (
                TokenError::Sign(SignError::UnknownKey("other".into())),
                Code::NotFound,
            ),
            (
                TokenError::Sign(SignError::Hsm(HsmError::Busy { queued: 3 })),
                Code::ResourceExhausted,
            ),
        ];
        for (error, code) in table {
            let status = from_token_error(&error);
            assert_eq!(status.code(), code, "{error:?}");
            let expected = match &error {
                TokenError::Sign(sign) => from_sign_error(sign).message().to_owned(),
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
        let status = from_token_error(&error);
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
        let status = from_token_error(&refused(429, "", ""));
        assert_eq!(status.message(), refused(429, "", "").to_string());
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert!(!info.metadata.contains_key("mp_code"));
        assert!(!info.metadata.contains_key("hint"));
        assert_eq!(info.metadata["http_status"], "429");
    }
}
