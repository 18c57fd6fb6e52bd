//! What goes wrong with the token, in two types because the two moments differ in what a
//! caller can do about them: [`HsmError`] while opening the token, logging in, finding
//! keys and provisioning (an operator fixes the config or the token), and
//! [`RequestError`] while signing one request (the caller retries, or the agent mends the
//! token). Both keep a failed PKCS#11 call as a [`FailedCall`], which knows its return
//! value, the [`Recovery`] it needs and its label in the metrics.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use cryptoki::error::{Error as Pkcs11Error, RvError};

use super::Hash;

/// A PKCS#11 call that failed: which function, and cryptoki's error with its return value.
#[derive(Debug, thiserror::Error)]
#[error("PKCS#11 {function} failed: {}", self.rv_label())]
pub struct FailedCall {
    /// What was being done.
    pub(crate) function: &'static str,
    /// The cryptoki error with the failing function.
    #[source]
    pub(crate) source: Pkcs11Error,
}

impl FailedCall {
    /// A `map_err` for a call to `function`.
    pub(crate) fn of(function: &'static str) -> impl FnOnce(Pkcs11Error) -> FailedCall {
        move |source| FailedCall { function, source }
    }

    /// The PKCS#11 return value, when the module returned one (cryptoki can also fail
    /// before or after the call).
    pub(crate) fn rv(&self) -> Option<RvError> {
        match self.source {
            Pkcs11Error::Pkcs11(rv, _) => Some(rv),
            _ => None,
        }
    }

    /// The return value as messages and the `rv` label of
    /// `grant_agent_pkcs11_errors_total` name it (`DeviceError`), or cryptoki's own error
    /// when there is none. The one place that text is made.
    pub(crate) fn rv_label(&self) -> String {
        match self.rv() {
            Some(rv) => format!("{rv:?}"),
            None => self.source.to_string(),
        }
    }

    /// What brings the token back after this failure, and the class it is counted under.
    /// The pool, the agent and the metrics all ask here.
    pub(crate) fn recovery(&self) -> Recovery {
        self.rv().map_or(Recovery::None, Recovery::of)
    }
}

/// A failure opening the token, logging in, finding a key or provisioning: start-up,
/// reload and recovery, and the command-line tools. The variants say what the operator
/// should look at.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// The module could not be loaded or initialised.
    #[error("cannot load PKCS#11 module {module}: {source}")]
    Module {
        /// Path of the module.
        module: String,
        /// The loader's or C_Initialize's error.
        #[source]
        source: Pkcs11Error,
    },
    /// No token with the configured label is present.
    #[error(
        "no token {label} (tokens present: {present}); check pkcs11.token_label (or token_serial, slot_id) and that the token is initialised"
    )]
    TokenNotFound {
        /// The label looked for.
        label: String,
        /// Labels of the tokens that are present.
        present: String,
    },
    /// The user PIN was refused. Not retried, so the token is not locked by us.
    #[error(
        "the token refused the user PIN ({0:?}); check the PIN source, and do not retry blindly: tokens lock after a few wrong PINs"
    )]
    PinRefused(RvError),
    /// The token reports that one more wrong PIN would lock it, or that it is locked, so
    /// the agent does not try the PIN at all: if it is wrong, trying locks the token.
    #[error(
        "the token reports {flag}: not trying the PIN ({why}); check the PIN source, then have the HSM's security officer reset the counter or unlock the PIN with the vendor's tool"
    )]
    PinNotTried {
        /// The token flag.
        flag: &'static str,
        /// What it means.
        why: &'static str,
    },
    /// The PIN could not be read from its source.
    #[error("cannot read the user PIN: {0}")]
    PinSource(String),
    /// No private key matches.
    #[error("no private key with {0} in the token")]
    KeyNotFound(String),
    /// More than one private key matches; signing with an arbitrary one would be wrong.
    #[error("{count} private keys match {what}; give each key a unique label or id")]
    KeyAmbiguous {
        /// The locator.
        what: String,
        /// How many matched.
        count: usize,
    },
    /// The key is not an RSA key of a size Maskinporten accepts.
    #[error("the key with {what} is {problem}; Maskinporten needs RSA keys of 2048 bits or more")]
    UnusableKey {
        /// The locator.
        what: String,
        /// What is wrong with it.
        problem: String,
    },
    /// No certificate object has the key's CKA_ID.
    #[error(
        "no certificate in the token has the CKA_ID {0} of the key; import it, or set certificate to a PEM file"
    )]
    CertificateNotFound(String),
    /// The token can sign with this hash neither directly nor over a DigestInfo.
    #[error("the token has neither the combined mechanism nor CKM_RSA_PKCS for RSA with {0:?}")]
    NoMechanism(Hash),
    /// A PKCS#11 call failed.
    #[error(transparent)]
    Call(#[from] FailedCall),
    /// The token is out of service while the agent recovers it, so a reload or a login
    /// cannot use it now.
    #[error(
        "the token is unavailable (being recovered, or waiting for an operator: see the agent log)"
    )]
    Unavailable,
    /// A thread for the session pool could not be started.
    #[error("the signing thread failed: cannot start a session thread: {0}")]
    SessionThread(#[source] std::io::Error),
}

impl HsmError {
    /// Whether the PIN was refused, or not tried for fear of locking the token: never to
    /// be retried with the same PIN, by the agent or by a supervisor restarting it.
    pub fn pin_refused(&self) -> bool {
        matches!(self, HsmError::PinRefused(_) | HsmError::PinNotTried { .. })
    }

    /// The failed PKCS#11 call, if that is what this is.
    pub(crate) fn call(&self) -> Option<&FailedCall> {
        match self {
            HsmError::Call(call) => Some(call),
            _ => None,
        }
    }
}

/// A failure signing one request, or checking the token between requests.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    /// A PKCS#11 call failed.
    #[error(transparent)]
    Call(#[from] FailedCall),
    /// The token is out of service while the agent recovers it. (What a caller should
    /// do about this and the next two is the agent's to say: `agent::SignError`.)
    #[error("the session pool is closed")]
    Unavailable,
    /// Too many requests are waiting for a session.
    #[error("the session queue is full ({queued} waiting)")]
    Busy {
        /// Requests ahead.
        queued: usize,
    },
    /// The caller's deadline would pass before a session is free.
    #[error("the deadline passes before a session is free")]
    Deadline,
}

impl RequestError {
    /// The failed PKCS#11 call, if that is what this is.
    pub(crate) fn call(&self) -> Option<&FailedCall> {
        match self {
            RequestError::Call(call) => Some(call),
            _ => None,
        }
    }

    /// What brings the token back after this error ([`Recovery::None`] for all but a
    /// failed call).
    pub(crate) fn recovery(&self) -> Recovery {
        self.call().map_or(Recovery::None, FailedCall::recovery)
    }
}

/// The way back from a failed PKCS#11 call, by the class of its return value. Vendors
/// fail differently (see docs/hsm-compatibility.md), and the cheapest remedy that works is
/// the right one: a full re-initialisation drops every session, and on a throttled HSM
/// (CloudHSM's CKR_DEVICE_ERROR) makes things worse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// The session is gone (SESSION_HANDLE_INVALID, SESSION_CLOSED): close it, open another.
    NewSession,
    /// The object handle is not valid in this session (OBJECT_HANDLE_INVALID,
    /// KEY_HANDLE_INVALID; handles are per session on AWS CloudHSM SDK 5): find the key
    /// again in the session.
    FindKeyAgain,
    /// The login is gone (USER_NOT_LOGGED_IN): log in again.
    LogInAgain,
    /// The HSM is overloaded or briefly unwell (DEVICE_ERROR, DEVICE_MEMORY): wait and
    /// retry; re-initialise only if it persists.
    BackOff,
    /// The token or the module is gone (TOKEN_NOT_PRESENT, DEVICE_REMOVED, GENERAL_ERROR,
    /// CRYPTOKI_NOT_INITIALIZED, ...): finalize, initialise, log in, find the keys again.
    Reinitialize,
    /// Not a fault of the token's state: the error stands.
    None,
}

impl Recovery {
    fn of(rv: RvError) -> Recovery {
        match rv {
            RvError::SessionHandleInvalid | RvError::SessionClosed => Recovery::NewSession,
            RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => Recovery::FindKeyAgain,
            RvError::UserNotLoggedIn => Recovery::LogInAgain,
            RvError::DeviceError | RvError::DeviceMemory => Recovery::BackOff,
            RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::DeviceRemoved
            | RvError::GeneralError
            | RvError::CryptokiNotInitialized
            | RvError::SlotIdInvalid => Recovery::Reinitialize,
            _ => Recovery::None,
        }
    }

    /// The `class` label of `grant_agent_pkcs11_errors_total`.
    pub(crate) fn class(self) -> &'static str {
        match self {
            Recovery::NewSession => "session",
            Recovery::FindKeyAgain => "handle",
            Recovery::LogInAgain => "login",
            Recovery::BackOff => "device",
            Recovery::Reinitialize => "token",
            Recovery::None => "other",
        }
    }
}

/// Every failed PKCS#11 call the agent met while signing or checking the token, by class
/// and return value, including those it recovered from without the caller noticing. Shared
/// by the pool's threads and the agent; it outlives a re-initialised token.
#[derive(Debug, Clone, Default)]
pub(crate) struct ErrorCounts(Arc<Mutex<BTreeMap<(&'static str, String), u64>>>);

impl ErrorCounts {
    /// Counts a failed call under its class and return value.
    pub(crate) fn count(&self, call: &FailedCall) {
        let mut counts = match self.0.lock() {
            Ok(counts) => counts,
            Err(poisoned) => poisoned.into_inner(),
        };
        *counts
            .entry((call.recovery().class(), call.rv_label()))
            .or_insert(0) += 1;
    }

    /// The counts so far: `(class, rv, count)`.
    pub(crate) fn snapshot(&self) -> Vec<(&'static str, String, u64)> {
        let counts = match self.0.lock() {
            Ok(counts) => counts,
            Err(poisoned) => poisoned.into_inner(),
        };
        counts
            .iter()
            .map(|((class, rv), n)| (*class, rv.clone(), *n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use cryptoki::context::Function;

    use super::*;

    #[test]
    fn a_failed_call_is_named_classed_and_counted_by_its_return_value() {
        let device = FailedCall {
            function: "C_Sign",
            source: Pkcs11Error::Pkcs11(RvError::DeviceError, Function::Sign),
        };
        assert_eq!(device.to_string(), "PKCS#11 C_Sign failed: DeviceError");
        assert_eq!(device.rv(), Some(RvError::DeviceError));
        assert_eq!(device.recovery(), Recovery::BackOff);
        // cryptoki failed without a return value: named by cryptoki's own error.
        let other = FailedCall {
            function: "C_Sign",
            source: Pkcs11Error::NullFunctionPointer,
        };
        assert_eq!(other.rv(), None);
        assert_eq!(other.recovery(), Recovery::None);
        let counts = ErrorCounts::default();
        counts.count(&device);
        counts.count(&other);
        counts.count(&device);
        assert_eq!(
            counts.snapshot(),
            [
                ("device", "DeviceError".to_owned(), 2),
                ("other", Pkcs11Error::NullFunctionPointer.to_string(), 1),
            ]
        );
        // Only a failed call needs a way back.
        assert_eq!(RequestError::from(device).recovery(), Recovery::BackOff);
        assert_eq!(RequestError::Busy { queued: 1 }.recovery(), Recovery::None);
    }
}
