//! The PKCS#11 token: loading the module, finding the token, logging in, finding keys and
//! signing in parallel on a pool of sessions.
//!
//! **The private key never leaves the token.** No type in this crate holds a token key's
//! bytes: keys are [`ObjectHandle`]s, signing sends data in and gets a signature out, and
//! keys are generated (or imported) with `CKA_SENSITIVE` true and `CKA_EXTRACTABLE` false.
//! The one way key material passes through the agent is *into* a token: `key import-p12`
//! moves an existing key in through [`RsaKeyParts`], which borrows the parts for the one
//! `C_CreateObject` call; the caller wipes them right after.
//!
//! Usage rules that follow from PKCS#11 (see `shared/PKCS11.md`):
//! - Login belongs to the application, not the session, and closing the *last* session
//!   logs everything out, so [`Token`] keeps one anchor session open for its whole life.
//! - A `cryptoki::Session` is `Send` but not `Sync`: each call takes a session from the
//!   pool for its own thread and gives it back.
//! - Every PKCS#11 call blocks; async callers go through [`Token::sign`], which runs on
//!   tokio's blocking threads and never holds a session across an `.await`.
//! - A wrong PIN is never retried: tokens lock the user PIN after a few attempts.

mod key;
mod mechanism;
mod pin;
mod pool;
mod provision;
mod settings;
mod slots;

use std::{path::Path, sync::Mutex};

use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    error::{Error as Pkcs11Error, RvError},
    session::{Session, UserType},
    slot::Slot,
    types::AuthPin,
};

pub use cryptoki::object::ObjectHandle;
pub use key::{KeyObject, KeyRef, MIN_RSA_BITS, TokenKey, rsa_public_key};
pub use mechanism::{Hash, SignPath};
pub(crate) use pin::exposed_pin_file;
pub use pin::{PinSource, read_pin};
pub use provision::{RsaKeyParts, TokenSigner, init_token};
pub use settings::{KeyLocator, Pkcs11Config, TokenSelector};

pub use pool::PoolLoad;
use pool::SessionPool;

/// A failure talking to the token. The variants say what the operator should look at;
/// the cryptoki error, with the PKCS#11 function that failed, stays as the source.
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
    /// A PKCS#11 call failed.
    #[error("PKCS#11 {function} failed: {rv}")]
    Call {
        /// What was being done.
        function: &'static str,
        /// The return value.
        rv: String,
        /// The cryptoki error with the failing function.
        #[source]
        source: Pkcs11Error,
    },
    /// The token is out of service while the agent recovers it.
    #[error(
        "the token is unavailable (being recovered, or waiting for an operator: see the agent log)"
    )]
    Unavailable,
    /// The token can sign with this hash neither directly nor over a DigestInfo.
    #[error("the token has neither the combined mechanism nor CKM_RSA_PKCS for RSA with {0:?}")]
    NoMechanism(Hash),
    /// Too many requests are waiting for a session.
    #[error(
        "the token is busy: {queued} requests are already waiting for a session; retry with backoff"
    )]
    Busy {
        /// Requests ahead.
        queued: usize,
    },
    /// The caller's deadline would pass before a session is free.
    #[error("the caller's deadline cannot be met with the queue ahead of it")]
    Deadline,
    /// The blocking task running a PKCS#11 call did not finish.
    #[error("the signing thread failed: {0}")]
    Thread(String),
}

impl HsmError {
    /// Whether the PIN was refused, or not tried for fear of locking the token: never to
    /// be retried with the same PIN, by the agent or by a supervisor restarting it.
    pub fn pin_refused(&self) -> bool {
        matches!(self, HsmError::PinRefused(_) | HsmError::PinNotTried { .. })
    }

    /// What brings the token back after this error, and the class it is counted under.
    /// The one place a PKCS#11 return value is mapped to a way back: the pool, the agent
    /// and the metrics all ask here.
    pub fn recovery(&self) -> Recovery {
        match self {
            HsmError::Call {
                source: Pkcs11Error::Pkcs11(rv, _),
                ..
            } => Recovery::of(*rv),
            _ => Recovery::None,
        }
    }

    /// The PKCS#11 return value, for a failed call.
    pub fn rv(&self) -> Option<&str> {
        match self {
            HsmError::Call { rv, .. } => Some(rv),
            _ => None,
        }
    }

    fn call(function: &'static str) -> impl FnOnce(Pkcs11Error) -> HsmError {
        move |source| HsmError::Call {
            function,
            rv: match &source {
                Pkcs11Error::Pkcs11(rv, _) => format!("{rv:?}"),
                other => other.to_string(),
            },
            source,
        }
    }
}

/// The way back from a failed PKCS#11 call, by the class of its return value. Vendors
/// fail differently (see docs/hsm-compatibility.md), and the cheapest remedy that works is
/// the right one: a full re-initialisation drops every session, and on a throttled HSM
/// (CloudHSM's CKR_DEVICE_ERROR) makes things worse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
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
    pub fn class(self) -> &'static str {
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
pub struct ErrorCounts(
    std::sync::Arc<Mutex<std::collections::BTreeMap<(&'static str, String), u64>>>,
);

impl ErrorCounts {
    /// Counts `error` if it is a failed PKCS#11 call.
    pub fn count(&self, error: &HsmError) {
        if let Some(rv) = error.rv() {
            let class = error.recovery().class();
            let mut counts = match self.0.lock() {
                Ok(counts) => counts,
                Err(poisoned) => poisoned.into_inner(),
            };
            match counts.get_mut(&(class, rv.to_owned())) {
                Some(n) => *n += 1,
                None => {
                    let _ = counts.insert((class, rv.to_owned()), 1);
                }
            }
        }
    }

    /// The counts so far: `(class, rv, count)`.
    pub fn snapshot(&self) -> Vec<(&'static str, String, u64)> {
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

/// An open, logged-in token with a pool of sessions.
pub struct Token {
    pkcs11: Pkcs11,
    /// The module's path, to read the token's information (see `slots`).
    module: std::path::PathBuf,
    slot: Slot,
    mechanisms: mechanism::Mechanisms,
    pool: SessionPool,
    /// Keeps the login alive (see the module doc), logs in again when the login is lost,
    /// and checks the token when idle. Never used for signing.
    anchor: Mutex<Anchor>,
    errors: ErrorCounts,
}

/// The anchor session, the handles keys have in it where they differ from those found at
/// start, and a PIN the token refused, so it is never tried again.
struct Anchor {
    session: Option<Session>,
    handles: Vec<(ObjectHandle, ObjectHandle)>,
    refused: Option<RvError>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// Loads the module, finds the token by label and logs in with the user PIN. Blocking.
    ///
    /// On any failure after the module is initialised, the module is finalized before the
    /// error is returned. A module that stays loaded in the process (a vendor library, or
    /// OpenSC's pkcs11-spy in front of SoftHSM) would otherwise answer the next
    /// C_Initialize with CKR_CRYPTOKI_ALREADY_INITIALIZED and keep its stale slot list,
    /// and recovery would never see the token come back.
    /// PKCS#11 errors met while signing or checking are counted in `errors`.
    pub fn open(
        config: &Pkcs11Config,
        pin: &AuthPin,
        errors: ErrorCounts,
    ) -> Result<Token, HsmError> {
        let pkcs11 = load(&config.module)?;
        match Self::open_loaded(&pkcs11, config, pin, errors) {
            Ok(token) => Ok(token),
            Err(error) => {
                if let Err(finalize) = pkcs11.finalize() {
                    tracing::debug!(error = %finalize, "C_Finalize after a failed open");
                }
                Err(error)
            }
        }
    }

    /// [`Token::open`] on an initialised module.
    fn open_loaded(
        pkcs11: &Pkcs11,
        config: &Pkcs11Config,
        pin: &AuthPin,
        errors: ErrorCounts,
    ) -> Result<Token, HsmError> {
        let pkcs11 = pkcs11.clone();
        let slot = slots::find_token(&pkcs11, &config.module, &config.token)?;
        let mechanisms = mechanism::Mechanisms::detect(&pkcs11, slot)?;
        // The PIN flags, checked before any C_Login, and the token's session limit,
        // respected with one session kept for the anchor.
        let info = slots::token_info(&config.module, slot)?;
        pin_flags(&info)?;
        let sessions = match info.max_session_count() {
            slots::Limit::Max(max) => {
                let allowed = usize::try_from(max.saturating_sub(1))
                    .unwrap_or(usize::MAX)
                    .max(1);
                if allowed < config.sessions {
                    tracing::warn!(
                        configured = config.sessions,
                        allowed,
                        "the token allows fewer sessions; using fewer"
                    );
                }
                config.sessions.min(allowed)
            }
            slots::Limit::Unavailable | slots::Limit::Infinite => config.sessions,
        };
        let anchor = pkcs11
            .open_ro_session(slot)
            .map_err(HsmError::call("C_OpenSession"))?;
        log_in(&anchor, pin)?;
        Ok(Token {
            pool: SessionPool::new(pkcs11.clone(), slot, sessions, config.queue, errors.clone())?,
            mechanisms,
            pkcs11,
            module: config.module.clone(),
            slot,
            anchor: Mutex::new(Anchor {
                session: Some(anchor),
                handles: Vec::new(),
                refused: None,
            }),
            errors,
        })
    }

    /// Signs `data` with `key` on a pooled session, on a blocking thread, if a session
    /// frees up before `deadline`, by the token's [`SignPath`] for `hash`. Returns the
    /// signature and the time spent queued.
    pub async fn sign(
        &self,
        key: KeyRef,
        hash: Hash,
        data: Vec<u8>,
        deadline: Option<std::time::Instant>,
    ) -> Result<(Vec<u8>, std::time::Duration), HsmError> {
        let path = self.sign_path(hash)?;
        self.pool
            .sign(key, deadline, move |session, handle| {
                mechanism::sign(session, handle, hash, path, &data)
            })
            .await
    }

    /// How this token signs `hash`: in the token, or over a DigestInfo.
    pub fn sign_path(&self, hash: Hash) -> Result<SignPath, HsmError> {
        self.mechanisms
            .path(hash)
            .ok_or(HsmError::NoMechanism(hash))
    }

    /// How busy the session pool is now.
    pub fn load(&self) -> PoolLoad {
        self.pool.load()
    }

    /// Signs and waits on the calling thread; for command-line tools that are not async.
    pub fn sign_blocking(
        &self,
        key: KeyRef,
        hash: Hash,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, HsmError> {
        let path = self.sign_path(hash)?;
        self.pool.sign_blocking(key, move |session, handle| {
            mechanism::sign(session, handle, hash, path, &data)
        })
    }

    /// Checks on the anchor session that `key` is still there: one attribute read, which
    /// fails when the token was removed, re-provisioned or lost its login. A handle the
    /// anchor session does not know is looked up again there first. Blocking; uses no
    /// pooled session.
    pub fn check(&self, key: &KeyRef) -> Result<(), HsmError> {
        let mut anchor = self.lock_anchor();
        let anchor = &mut *anchor;
        let Some(session) = anchor.session.as_ref() else {
            return Err(HsmError::Unavailable);
        };
        let handle = own_handle(&anchor.handles, key.handle);
        let error = match session.get_attributes(handle, &[cryptoki::object::AttributeType::Class])
        {
            Ok(_) => return Ok(()),
            Err(e) => HsmError::call("C_GetAttributeValue")(e),
        };
        self.errors.count(&error);
        if error.recovery() != Recovery::FindKeyAgain {
            return Err(error);
        }
        let found = key::find_key(session, &key.locator).map_err(|_| error)?;
        remember(&mut anchor.handles, key.handle, found.handle);
        Ok(())
    }

    /// Logs in again on the anchor session after the token answered USER_NOT_LOGGED_IN (a
    /// network HSM that reconnected, or a logout elsewhere in the process). Checks the PIN
    /// flags first, and never tries a PIN the token has refused.
    pub fn log_in_again(&self, pin: &AuthPin) -> Result<(), HsmError> {
        let mut anchor = self.lock_anchor();
        if let Some(rv) = anchor.refused {
            return Err(HsmError::PinRefused(rv));
        }
        pin_flags(&slots::token_info(&self.module, self.slot)?)?;
        let session = anchor.session.as_ref().ok_or(HsmError::Unavailable)?;
        let result = log_in(session, pin);
        match &result {
            Err(HsmError::PinRefused(rv)) => anchor.refused = Some(*rv),
            Err(error) => self.errors.count(error),
            Ok(()) => {}
        }
        result
    }

    fn lock_anchor(&self) -> std::sync::MutexGuard<'_, Anchor> {
        match self.anchor.lock() {
            Ok(anchor) => anchor,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Closes every session (which logs out) and finalizes the module. cryptoki does not
    /// call C_Finalize on drop, so shutdown and re-initialisation must come through here.
    pub fn close(self) -> Result<(), HsmError> {
        let Token {
            pkcs11,
            pool,
            anchor,
            ..
        } = self;
        drop(pool);
        drop(anchor);
        pkcs11.finalize().map_err(HsmError::call("C_Finalize"))
    }
}

/// The handle a key has in a session: the one found at start, unless the session found
/// its own (`handles` maps one to the other; a session uses a few keys at most).
fn own_handle(
    handles: &[(ObjectHandle, ObjectHandle)],
    found_at_start: ObjectHandle,
) -> ObjectHandle {
    handles
        .iter()
        .find(|(start, _)| *start == found_at_start)
        .map_or(found_at_start, |(_, own)| *own)
}

fn remember(
    handles: &mut Vec<(ObjectHandle, ObjectHandle)>,
    found_at_start: ObjectHandle,
    own: ObjectHandle,
) {
    handles.retain(|(start, _)| *start != found_at_start);
    handles.push((found_at_start, own));
}

/// Refuses to try the PIN when the token says one more wrong PIN locks it, or that it is
/// locked: if the PIN is wrong, trying would lock the token.
fn pin_flags(info: &pkcs11_token_info::TokenInfo) -> Result<(), HsmError> {
    if info.user_pin_locked() {
        return Err(HsmError::PinNotTried {
            flag: "CKF_USER_PIN_LOCKED",
            why: "the user PIN is locked",
        });
    }
    if info.user_pin_final_try() {
        return Err(HsmError::PinNotTried {
            flag: "CKF_USER_PIN_FINAL_TRY",
            why: "one more wrong PIN locks it",
        });
    }
    Ok(())
}

/// C_Login as the user. Already logged in (by another session of this process) is
/// success; a refused PIN is [`HsmError::PinRefused`], never to be retried.
fn log_in(session: &Session, pin: &AuthPin) -> Result<(), HsmError> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(Pkcs11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(Pkcs11Error::Pkcs11(
            rv @ (RvError::PinIncorrect
            | RvError::PinLocked
            | RvError::PinExpired
            | RvError::PinInvalid
            | RvError::PinLenRange),
            _,
        )) => Err(HsmError::PinRefused(rv)),
        Err(e) => Err(HsmError::call("C_Login")(e)),
    }
}

/// Loads and initialises a module with OS locking (the agent signs from many threads).
fn load(module: &Path) -> Result<Pkcs11, HsmError> {
    let err = |source| HsmError::Module {
        module: module.display().to_string(),
        source,
    };
    let pkcs11 = Pkcs11::new(module).map_err(err)?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Another part of the process initialised it already; that is fine.
        Ok(()) | Err(Pkcs11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(pkcs11),
        Err(e) => Err(err(e)),
    }
}
