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

use super::policy::Refusal;

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
