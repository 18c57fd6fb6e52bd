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
//!
//! Messages are safe to send: they name fields, keys and PKCS#11 return values, never the
//! PIN, an assertion or key material (none of which any error type holds).

use tonic::{Code, Status};

use crate::{agent::SignError, hsm::HsmError};

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
