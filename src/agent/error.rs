//! The agent's errors: [`SignError`] for one request, [`StartError`] for start-up and
//! reload. A request's token failures are variants of [`SignError`] of their own, so the
//! server's failure table matches them without knowing the `hsm` types.

use crate::{
    cert::{CertEnvironment, CertError},
    grant::InvalidGrant,
    hsm::{FailedCall, HsmError, RequestError},
};

/// Why a grant was not signed: the request's own faults, then the token's, each a variant
/// of its own so that callers (the server's failure table) need not know the `hsm` types.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The request is malformed; the message names the field.
    #[error(transparent)]
    Invalid(#[from] InvalidGrant),
    /// The request names a key the agent does not have.
    #[error("grant.key: no key is named {0:?}")]
    UnknownKey(String),
    /// No version of the key is valid now.
    #[error("key {key:?} has no certificate valid now: {state}; renew it or configure another key")]
    CertificateNotValid {
        /// The key name.
        key: String,
        /// "expired (on ...)" or "not valid yet (from ...)".
        state: String,
    },
    /// The certificate was revoked, as a verified OCSP or CRL answer said.
    #[error(
        "key {key:?}: its certificate was revoked on {at} (reason {reason}; {answered_by}); renew it and configure the new one (docs/operations.md, \"A revoked certificate\")"
    )]
    Revoked {
        /// The key name.
        key: String,
        /// When, RFC 3339.
        at: String,
        /// The CRL reason code's name, or "not given".
        reason: &'static str,
        /// Where the answer came from: "ocsp http://…" or "crl http://…".
        answered_by: String,
    },
    /// The certificate is for the other Maskinporten environment, which would refuse it.
    #[error("key {key:?} has a {} certificate (issuer {issuer}), which Maskinporten refuses in environment {environment:?}; {}", describe(*certificate), fix(*certificate))]
    WrongEnvironment {
        /// The key name.
        key: String,
        /// What the certificate is.
        certificate: CertEnvironment,
        /// The environment asked for.
        environment: String,
        /// The certificate's issuer.
        issuer: String,
    },
    /// The token is out of service while the agent recovers it, or did not come back in
    /// time.
    #[error(
        "the token is unavailable (being recovered, or waiting for an operator: see the agent log)"
    )]
    Unavailable,
    /// Too many requests are waiting for a token session.
    #[error(
        "the token is busy: {queued} requests are already waiting for a session; retry with backoff"
    )]
    Busy {
        /// Requests ahead.
        queued: usize,
    },
    /// The caller's deadline would pass before a token session is free.
    #[error("the caller's deadline cannot be met with the queue ahead of it")]
    Deadline,
    /// A PKCS#11 call failed, and the agent could not mend it.
    #[error(transparent)]
    Pkcs11(FailedCall),
}

impl From<RequestError> for SignError {
    fn from(error: RequestError) -> Self {
        match error {
            RequestError::Call(call) => SignError::Pkcs11(call),
            RequestError::Unavailable => SignError::Unavailable,
            RequestError::Busy { queued } => SignError::Busy { queued },
            RequestError::Deadline => SignError::Deadline,
        }
    }
}

fn describe(certificate: CertEnvironment) -> &'static str {
    match certificate {
        CertEnvironment::Test => "test",
        CertEnvironment::Production => "production",
        CertEnvironment::Unknown => "unrecognised",
    }
}

fn fix(certificate: CertEnvironment) -> &'static str {
    match certificate {
        CertEnvironment::Unknown => {
            "set keys[].certificate_environment to \"test\" or \"prod\" for this issuer"
        }
        _ => {
            "use a key with a certificate for that environment (or set keys[].allow_environment_mismatch = true)"
        }
    }
}

/// Why the agent could not start (or a reload was refused). Each variant names the key.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The token could not be opened or a key not found.
    #[error("{context}: {source}")]
    Hsm {
        /// What was being done, e.g. `key "default"`.
        context: String,
        /// The cause.
        #[source]
        source: HsmError,
    },
    /// The certificate file could not be read.
    #[error("key {key:?}: cannot read certificate file {path}: {source}")]
    CertificateFile {
        /// The key name.
        key: String,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The certificate is malformed or unusable.
    #[error("key {key:?}: {source}")]
    Certificate {
        /// The key name.
        key: String,
        /// The cause.
        #[source]
        source: CertError,
    },
    /// The certificate does not belong to the key.
    #[error(
        "key {key:?}: the certificate's public key is not the token key's public key; configure the certificate issued for this key"
    )]
    KeyMismatch {
        /// The key name.
        key: String,
    },
    /// No version of a key is valid now.
    #[error(
        "key {key:?} has no certificate valid now: {state}; renew it (docs/operations.md) or remove the key"
    )]
    NotValid {
        /// The key name.
        key: String,
        /// Why.
        state: String,
    },
    /// The chain does not lead to a trusted root, and `[trust] chain = "require"`.
    #[error("key {key:?}: the certificate chain is {status}: {detail}")]
    Chain {
        /// The key name.
        key: String,
        /// "untrusted" or "invalid".
        status: &'static str,
        /// Why, and what to do.
        detail: String,
    },
    /// A reload would need settings that only a restart can apply.
    #[error(
        "the [pkcs11] section changed; restart the agent to apply it (the running keys are kept)"
    )]
    TokenChanged,
}
