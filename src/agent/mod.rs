//! The signing agent: the configured keys, found in the token and bound to their
//! certificates, and the one operation everything else calls, `Agent::sign_grant`.
//!
//! Start-up checks what can be checked before the first request, so a misconfiguration
//! stops the agent with a message naming the key instead of failing calls later: each key
//! exists exactly once, is RSA-2048 or larger, its certificate's public key is the key's,
//! its key usage allows signing, and every key name has a version valid now.
//!
//! A key name may have several versions (a renewed certificate, a new registered key):
//! each request signs with the newest version valid at that moment, so renewal needs no
//! restart and no cut-over at midnight. `Agent::reload` swaps in a new key set built
//! from a new config; requests in flight finish with the set they started with.

mod error;
mod keys;
mod recovery;
mod report;
mod revocation;

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

pub use error::{SignError, StartError};
pub use keys::rfc3339;
pub(crate) use keys::{KeySet, SigningKey};
use recovery::DeviceErrorRun;
pub use report::KeyReport;

use cryptoki::types::AuthPin;

use crate::{
    config::{Config, Pkcs11Config},
    grant::{self, Algorithm, GrantParameters, ValidGrant},
    hsm::{ErrorCounts, HsmError, Recovery, RequestError, Token, read_pin},
};

/// A signed grant and the facts a caller may want without decoding it.
#[derive(Debug)]
pub struct SignedGrant {
    /// The compact JWS. A bearer credential for up to two minutes: never log it.
    pub assertion: String,
    /// The grant's unique id.
    pub(crate) jti: String,
    /// `iat`, Unix seconds.
    pub(crate) issued_at: i64,
    /// `exp`, Unix seconds.
    pub(crate) expires_at: i64,
    /// The JWS algorithm.
    pub(crate) algorithm: Algorithm,
    /// The key name that signed.
    pub(crate) key: String,
    /// SHA-256 of the leaf certificate in `x5c`; empty for a `kid` key.
    pub(crate) certificate_sha256: String,
    /// How long the request waited for a token session.
    pub(crate) queued: Duration,
}

/// The running agent. Share it behind an `Arc`; all methods take `&self`.
///
/// The token may go away under it (HSM restart, re-provisioned token, network HSM
/// disconnect). Then `token` is `None` while [`Agent::watch`] re-initialises the module,
/// logs in again and finds the keys again (their handles change); requests meanwhile fail
/// fast with `UNAVAILABLE` and `serving` says so to the health service.
pub struct Agent {
    token: RwLock<Option<Arc<Token>>>,
    pkcs11: Pkcs11Config,
    /// Kept (zeroizing) to log in again after the token comes back.
    pin: Arc<AuthPin>,
    /// The last config that loaded, to find the keys again after recovery.
    config: std::sync::Mutex<Config>,
    keys: RwLock<Arc<KeySet>>,
    serving: tokio::sync::watch::Sender<bool>,
    recover: tokio::sync::Notify,
    recoveries: std::sync::atomic::AtomicU64,
    /// When the token was lost and how long the last recovery took, for the metrics.
    losses: std::sync::Mutex<Losses>,
    /// Every PKCS#11 error met while signing or checking, by class and return value.
    errors: ErrorCounts,
    /// The token's DEVICE_ERROR answers since a sign last succeeded.
    device_errors: DeviceErrorRun,
    started: Instant,
    /// What is known of each certificate's revocation, across reloads.
    revocation: Arc<revocation::RevocationBook>,
}

/// Recovery times.
#[derive(Debug, Default)]
struct Losses {
    /// When the recovery under way started.
    since: Option<std::time::Instant>,
    /// How long the last completed recovery took.
    last: Option<std::time::Duration>,
}

/// How often an idle agent checks that its token is still there.
pub(crate) const TOKEN_CHECK_EVERY: Duration = Duration::from_secs(2);

/// How long DEVICE_ERROR may go on, with no sign succeeding, before it counts as a token
/// fault and the token is re-initialised. Shorter runs are an HSM throttling (AWS
/// CloudHSM), which a re-initialisation would make worse: requests back off instead.
pub(crate) const DEVICE_ERROR_PERSISTS: Duration = Duration::from_secs(5);
/// The first wait after a DEVICE_ERROR; it doubles on each retry of the same request.
const FIRST_DEVICE_BACKOFF: Duration = Duration::from_millis(20);
/// Most retries of one request after DEVICE_ERROR.
const DEVICE_RETRIES: u32 = 4;

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("serving", &*self.serving.borrow())
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Opens the token, logs in, and binds every configured key to its certificate.
    /// Blocking: call it before serving or from a blocking thread.
    pub fn start(config: &Config) -> Result<Agent, StartError> {
        let pin = read_pin(&config.pkcs11.pin).map_err(|source| StartError::Hsm {
            context: "pkcs11".into(),
            source,
        })?;
        Self::start_with_pin(config, pin)
    }

    /// [`Agent::start`] with the PIN already read (so the caller can clear its source).
    pub fn start_with_pin(config: &Config, pin: AuthPin) -> Result<Agent, StartError> {
        let hsm = |source| StartError::Hsm {
            context: "pkcs11".into(),
            source,
        };
        let errors = ErrorCounts::default();
        let token = Token::open(&config.pkcs11, &pin, errors.clone()).map_err(hsm)?;
        let book = Arc::new(revocation::RevocationBook::default());
        let keys = KeySet::load(&token, config, unix_now(), Arc::clone(&book))?;
        let agent = Agent {
            token: RwLock::new(Some(Arc::new(token))),
            pkcs11: config.pkcs11.clone(),
            pin: Arc::new(pin),
            config: std::sync::Mutex::new(config.clone()),
            keys: RwLock::new(Arc::new(keys)),
            serving: tokio::sync::watch::Sender::new(true),
            recover: tokio::sync::Notify::new(),
            recoveries: std::sync::atomic::AtomicU64::new(0),
            losses: std::sync::Mutex::new(Losses::default()),
            errors,
            device_errors: DeviceErrorRun::default(),
            started: Instant::now(),
            revocation: book,
        };
        agent.warn_about_expiry();
        Ok(agent)
    }

    /// Replaces the keys with those of `config`, or keeps the current ones and says why.
    /// Blocking (it reads the token).
    pub(crate) fn reload(&self, config: &Config) -> Result<(), StartError> {
        if config.pkcs11 != self.pkcs11 {
            return Err(StartError::TokenChanged);
        }
        let token = self.current_token().ok_or(StartError::Hsm {
            context: "reload".into(),
            source: HsmError::Unavailable,
        })?;
        let keys = Arc::new(KeySet::load(
            &token,
            config,
            unix_now(),
            Arc::clone(&self.revocation),
        )?);
        match self.keys.write() {
            Ok(mut current) => *current = keys,
            Err(poisoned) => *poisoned.into_inner() = keys,
        }
        match self.config.lock() {
            Ok(mut current) => *current = config.clone(),
            Err(poisoned) => *poisoned.into_inner() = config.clone(),
        }
        self.warn_about_expiry();
        self.revocation.recheck.notify_one();
        Ok(())
    }

    /// The current key set (a snapshot; a reload does not change it).
    pub(crate) fn keys(&self) -> Arc<KeySet> {
        match self.keys.read() {
            Ok(keys) => Arc::clone(&keys),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Builds a grant from a validated request, signs it in the token and returns it,
    /// unless the token cannot get to it before `deadline`. Every call signs a new grant
    /// with a new `jti`.
    pub(crate) async fn sign_grant(
        &self,
        grant: &ValidGrant,
        deadline: Option<std::time::Instant>,
    ) -> Result<SignedGrant, SignError> {
        // Every retry signs a new grant (a new jti): nothing was returned before it.
        let mut backoff = FIRST_DEVICE_BACKOFF;
        let (mut retries, mut logged_in, mut recovered) = (0, false, false);
        loop {
            let error = match self.try_sign(grant, deadline).await {
                Err(error) => error,
                Ok(signed) => {
                    if signed.is_ok() {
                        self.device_ok();
                    }
                    return signed;
                }
            };
            match self.next_step(&error) {
                Recovery::LogInAgain if !logged_in => {
                    logged_in = true;
                    if !self.log_in_again().await {
                        return Err(SignError::Unavailable);
                    }
                }
                Recovery::BackOff
                    if retries < DEVICE_RETRIES
                        && deadline.is_none_or(|d| Instant::now() + backoff < d) =>
                {
                    retries += 1;
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Recovery::NewSession | Recovery::FindKeyAgain | Recovery::Reinitialize
                    if !recovered =>
                {
                    recovered = true;
                    tracing::warn!(%error, "the token is gone; recovering");
                    if !self.await_recovery(deadline).await {
                        return Err(SignError::Unavailable);
                    }
                }
                _ => return Err(error.into()),
            }
        }
    }

    /// What to do about a failed sign. What a session can mend it has mended already, so a
    /// dead session or an unknown handle coming back here means the token changed; so does
    /// a DEVICE_ERROR that has gone on for [`DEVICE_ERROR_PERSISTS`].
    fn next_step(&self, error: &RequestError) -> Recovery {
        match error.recovery() {
            Recovery::BackOff => self.device_errors.next_step(self.started.elapsed()),
            other => other,
        }
    }

    /// A sign succeeded: a run of DEVICE_ERROR, if any, is over.
    fn device_ok(&self) {
        self.device_errors.end();
    }

    /// Logs in again after USER_NOT_LOGGED_IN. A refused PIN takes the token out of
    /// service for good (the PIN is never tried again); any other failure starts a
    /// recovery. False when the agent cannot sign now.
    async fn log_in_again(&self) -> bool {
        let Some(token) = self.current_token() else {
            return false;
        };
        let pin = Arc::clone(&self.pin);
        match tokio::task::spawn_blocking(move || token.log_in_again(&pin)).await {
            Ok(Ok(())) => {
                tracing::warn!("the token lost the login; logged in again");
                true
            }
            Ok(Err(error)) if error.pin_refused() => {
                tracing::error!(%error, "the token refused the PIN when logging in again; not retrying, so the token is not locked out. Fix the PIN and restart the agent");
                let _ = self.serving.send_replace(false);
                false
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "logging in again failed; recovering");
                self.await_recovery(None).await
            }
            Err(error) => {
                tracing::error!(%error, "the login task failed");
                false
            }
        }
    }

    /// One attempt. The outer error is the token's, which [`Agent::sign_grant`] may mend
    /// and try again; the inner one is the request's own, which stands.
    async fn try_sign(
        &self,
        grant: &ValidGrant,
        deadline: Option<std::time::Instant>,
    ) -> Result<Result<SignedGrant, SignError>, RequestError> {
        let token = self.current_token().ok_or(RequestError::Unavailable)?;
        let keys = self.keys();
        let (key, claims) = match keys.prepare(grant, unix_now()) {
            Ok(prepared) => prepared,
            Err(refused) => return Ok(Err(refused)),
        };
        let input = grant::signing_input(&key.header, &claims);
        let (signature, queued) = token
            .sign(
                key.key.clone(),
                keys::hash(key.algorithm()),
                key.path,
                input.as_bytes().to_vec(),
                deadline,
            )
            .await?;
        let mut grant = finish(key, claims, input, &signature);
        grant.queued = queued;
        Ok(Ok(grant))
    }

    /// `Agent::sign_grant` on the calling thread, for the command line.
    pub fn sign_grant_blocking(&self, params: &GrantParameters) -> Result<SignedGrant, SignError> {
        let grant = ValidGrant::new(params.clone()).map_err(|rejected| rejected.invalid)?;
        let token = self.current_token().ok_or(SignError::Unavailable)?;
        let keys = self.keys();
        let (key, claims) = keys.prepare(&grant, unix_now())?;
        let input = grant::signing_input(&key.header, &claims);
        let signature = token.sign_blocking(
            key.key.clone(),
            keys::hash(key.algorithm()),
            key.path,
            input.as_bytes().to_vec(),
        )?;
        Ok(finish(key, claims, input, &signature))
    }

    /// Logs a warning for every version in use that expires within the warning window.
    pub(crate) fn warn_about_expiry(&self) {
        let keys = self.keys();
        let now = unix_now();
        let window = i64::from(keys.expiry_warning_days) * 86_400;
        for key in keys.versions() {
            let (_, not_after) = key.validity();
            let Some(not_after) = not_after else { continue };
            let in_use = keys
                .select(key.name(), now)
                .is_ok_and(|active| std::ptr::eq(active, key));
            if in_use && not_after - now <= window {
                tracing::warn!(
                    key = %key.name(),
                    certificate_sha256 = key.certificate_sha256(),
                    kid = key.kid().unwrap_or_default(),
                    not_after = %rfc3339(not_after),
                    days_left = (not_after - now) / 86_400,
                    "the key in use expires soon; renew it (docs/operations.md)"
                );
            }
        }
    }

    /// Runs until dropped: checks the token every `TOKEN_CHECK_EVERY` (so health turns
    /// NOT_SERVING within seconds of a token loss even when no request comes), recovers
    /// the token when it or a request found it gone, logs when a key switches to another
    /// version (rollover), and repeats expiry warnings daily. Spawn it next to the server.
    pub async fn watch(self: Arc<Self>) {
        let mut active: BTreeMap<String, String> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        let mut check = tokio::time::interval(TOKEN_CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_warning = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = self.recover.notified() => {
                    Arc::clone(&self).recover_until_back().await;
                    continue;
                }
                _ = check.tick() => {
                    Arc::clone(&self).check_token().await;
                    continue;
                }
                _ = tick.tick() => {}
            }
            let keys = self.keys();
            let now = unix_now();
            let names: Vec<&str> = keys.versions().map(SigningKey::name).collect();
            for name in names {
                let current = keys.select(name, now).map_or_else(
                    |_| "none".to_owned(),
                    |k| format!("{}{}", k.certificate_sha256(), k.kid().unwrap_or_default()),
                );
                let previous = active.insert(name.to_owned(), current.clone());
                if previous.is_some_and(|p| p != current) {
                    tracing::info!(key = %name, now_signing_with = %current, "key rolled over to another version");
                }
            }
            if last_warning.elapsed() >= Duration::from_secs(86_400) {
                last_warning = tokio::time::Instant::now();
                self.warn_about_expiry();
            }
        }
    }

    /// One idle check of the token: reads an attribute of a key on the anchor session,
    /// and starts a recovery when the token is gone.
    async fn check_token(self: Arc<Self>) {
        if !*self.serving.borrow() {
            return;
        }
        let Some(token) = self.current_token() else {
            return;
        };
        let Some(key) = self.keys().versions().next().map(|k| k.key.clone()) else {
            return;
        };
        let checked = tokio::task::spawn_blocking(move || token.check(&key)).await;
        let Ok(Err(error)) = checked else {
            return;
        };
        match error.recovery() {
            Recovery::LogInAgain => {
                let _ = self.log_in_again().await;
            }
            Recovery::None | Recovery::BackOff => {
                tracing::debug!(%error, "the idle check of the token failed");
            }
            _ => {
                tracing::warn!(%error, "the token is gone (found by the idle check); recovering");
                let _ = self.await_recovery(Some(Instant::now())).await;
            }
        }
    }

    /// Logs out and finalizes the PKCS#11 module.
    pub fn close(self) -> Result<(), HsmError> {
        drop(self.keys);
        let token = match self.token.into_inner() {
            Ok(token) => token,
            Err(poisoned) => poisoned.into_inner(),
        };
        match token.map(Arc::try_unwrap) {
            Some(Ok(token)) => token.close(),
            Some(Err(_)) => {
                tracing::warn!("the token is still in use at exit; skipped C_Finalize");
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// How busy the token's session pool is; `None` while the token is being recovered.
    pub(crate) fn load(&self) -> Option<crate::hsm::PoolLoad> {
        self.current_token().map(|t| t.load())
    }

    /// How many times the token was found gone since start.
    pub(crate) fn recoveries(&self) -> u64 {
        self.recoveries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every PKCS#11 error met while signing, checking or recovering the token since
    /// start, as `(class, rv, count)`; the class is [`Recovery::class`]. Most never reach
    /// a caller: the agent mends the session, the handle or the login and signs again.
    pub(crate) fn pkcs11_errors(&self) -> Vec<(&'static str, String, u64)> {
        self.errors.snapshot()
    }

    /// How long the last completed recovery took, from the token found gone to serving
    /// again; `None` before the first.
    pub(crate) fn last_recovery(&self) -> Option<std::time::Duration> {
        self.lock_losses().last
    }

    fn lock_losses(&self) -> std::sync::MutexGuard<'_, Losses> {
        match self.losses.lock() {
            Ok(losses) => losses,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Follows whether the agent can sign (false while the token is being recovered).
    pub(crate) fn serving(&self) -> tokio::sync::watch::Receiver<bool> {
        self.serving.subscribe()
    }

    fn current_token(&self) -> Option<Arc<Token>> {
        match self.token.read() {
            Ok(token) => token.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

fn finish(key: &SigningKey, claims: grant::Claims, input: String, signature: &[u8]) -> SignedGrant {
    SignedGrant {
        assertion: grant::compact(input, signature),
        jti: claims.jti,
        issued_at: claims.iat,
        expires_at: claims.exp,
        algorithm: key.algorithm(),
        key: key.name().to_owned(),
        certificate_sha256: key.certificate_sha256().to_owned(),
        queued: Duration::ZERO,
    }
}

/// Now, as Unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
