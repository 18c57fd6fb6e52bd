//! The PKCS#11 token: loading the module, finding the token, logging in, finding keys and
//! signing in parallel on a pool of sessions.
//!
//! **The private key never leaves the token.** No type in this crate holds a token key's
//! bytes: keys are [`ObjectHandle`]s, signing sends data in and gets a signature out, and
//! keys are generated (or imported) with `CKA_SENSITIVE` true and `CKA_EXTRACTABLE` false.
//! The one way key material passes through the agent is *into* a token: `key import-p12`
//! moves an existing key in through `RsaKeyParts`, which borrows the parts for the one
//! `C_CreateObject` call; the caller wipes them right after.
//!
//! Usage rules that follow from PKCS#11 (see `shared/PKCS11.md`):
//! - Login belongs to the application, not the session, and closing the *last* session
//!   logs everything out, so [`Token`] keeps one anchor session open for its whole life.
//! - A `cryptoki::Session` is `Send` but not `Sync`: each session lives on a thread of
//!   its own in the pool, and requests queue for those threads.
//! - Every PKCS#11 call blocks; async callers go through `Token::sign`, which hands the
//!   call to a session's thread and awaits the answer, so no async worker ever waits on
//!   the token.
//! - A wrong PIN is never retried: tokens lock the user PIN after a few attempts.

mod error;
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

pub(crate) use cryptoki::object::ObjectHandle;
pub(crate) use error::{ErrorCounts, Recovery, RequestError};
pub use error::{FailedCall, HsmError};
pub use key::TokenKey;
pub(crate) use key::{KeyRef, MIN_RSA_BITS, rsa_public_key};
pub use mechanism::Hash;
pub(crate) use mechanism::SignPath;
pub(crate) use pin::exposed_pin_file;
pub use pin::{PinSource, read_pin};
pub(crate) use provision::{RsaKeyParts, TokenSigner, init_token};
pub(crate) use settings::TokenSelector;
pub use settings::{KeyLocator, Pkcs11Config};

pub(crate) use pool::PoolLoad;
use pool::SessionPool;

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
    pub(crate) fn open(
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
            .map_err(FailedCall::of("C_OpenSession"))?;
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

    /// Signs `data` with `key` on a pooled session, on that session's thread, if a session
    /// frees up before `deadline`, by `path` (from [`Token::sign_path`] when the key was
    /// found, so a request cannot fail on a missing mechanism). Returns the signature and
    /// the time spent queued.
    pub(crate) async fn sign(
        &self,
        key: KeyRef,
        hash: Hash,
        path: SignPath,
        data: Vec<u8>,
        deadline: Option<std::time::Instant>,
    ) -> Result<(Vec<u8>, std::time::Duration), RequestError> {
        self.pool
            .sign(key, deadline, move |session, handle| {
                mechanism::sign(session, handle, hash, path, &data)
            })
            .await
    }

    /// How this token signs `hash`: in the token, or over a DigestInfo.
    pub(crate) fn sign_path(&self, hash: Hash) -> Result<SignPath, HsmError> {
        self.mechanisms
            .path(hash)
            .ok_or(HsmError::NoMechanism(hash))
    }

    /// How busy the session pool is now.
    pub(crate) fn load(&self) -> PoolLoad {
        self.pool.load()
    }

    /// Signs and waits on the calling thread; for command-line tools that are not async.
    pub(crate) fn sign_blocking(
        &self,
        key: KeyRef,
        hash: Hash,
        path: SignPath,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, RequestError> {
        self.pool.sign_blocking(key, move |session, handle| {
            mechanism::sign(session, handle, hash, path, &data)
        })
    }

    /// Checks on the anchor session that `key` is still there: one attribute read, which
    /// fails when the token was removed, re-provisioned or lost its login. A handle the
    /// anchor session does not know is looked up again there first. Blocking; uses no
    /// pooled session.
    pub(crate) fn check(&self, key: &KeyRef) -> Result<(), RequestError> {
        let mut anchor = self.lock_anchor();
        let anchor = &mut *anchor;
        let Some(session) = anchor.session.as_ref() else {
            return Err(RequestError::Unavailable);
        };
        let handle = own_handle(&anchor.handles, key.handle);
        let error = match session.get_attributes(handle, &[cryptoki::object::AttributeType::Class])
        {
            Ok(_) => return Ok(()),
            Err(e) => FailedCall::of("C_GetAttributeValue")(e),
        };
        self.errors.count(&error);
        if error.recovery() != Recovery::FindKeyAgain {
            return Err(error.into());
        }
        let found = key::find_key(session, &key.locator).map_err(|_| error)?;
        remember(&mut anchor.handles, key.handle, found.handle);
        Ok(())
    }

    /// Logs in again on the anchor session after the token answered USER_NOT_LOGGED_IN (a
    /// network HSM that reconnected, or a logout elsewhere in the process). Checks the PIN
    /// flags first, and never tries a PIN the token has refused.
    pub(crate) fn log_in_again(&self, pin: &AuthPin) -> Result<(), HsmError> {
        let mut anchor = self.lock_anchor();
        if let Some(rv) = anchor.refused {
            return Err(HsmError::PinRefused(rv));
        }
        pin_flags(&slots::token_info(&self.module, self.slot)?)?;
        let session = anchor.session.as_ref().ok_or(HsmError::Unavailable)?;
        let result = log_in(session, pin);
        match &result {
            Err(HsmError::PinRefused(rv)) => anchor.refused = Some(*rv),
            Err(HsmError::Call(call)) => self.errors.count(call),
            Err(_) | Ok(()) => {}
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
        Ok(pkcs11.finalize().map_err(FailedCall::of("C_Finalize"))?)
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
        Err(e) => Err(FailedCall::of("C_Login")(e).into()),
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
