//! Healing after the token went away: an HSM restart, a re-provisioned token, a network
//! HSM that dropped the connection. SoftHSM (like some HSM client libraries) caches token
//! state per process, so re-opening sessions is not enough: the robust path is to drain
//! the requests in flight, finalize the module, initialise it again, log in again, and find
//! the keys again, because object handles change when a token is re-provisioned.
//!
//! While that happens the token is out of service: requests fail fast with `UNAVAILABLE`
//! and the health service says NOT_SERVING. Attempts repeat with backoff until the token
//! is back, except after a refused PIN, which is never retried: tokens lock the user PIN
//! after a few wrong attempts, and a loop would do exactly that.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{Agent, KeySet, StartError, unix_now};
use crate::hsm::Token;

/// Longest a request that found the token gone waits for it to come back before retrying.
const RETRY_WAIT: Duration = Duration::from_secs(5);
/// Longest recovery waits for requests still using the old sessions.
const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// Backoff between attempts while the token stays away.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Agent {
    /// Takes the token out of service and asks the watcher to recover it; then waits (up
    /// to the caller's deadline, at most [`RETRY_WAIT`]) for it to come back.
    pub(super) async fn await_recovery(&self, deadline: Option<Instant>) -> bool {
        let mut serving = self.serving.subscribe();
        if self.serving.send_replace(false) {
            let _ = self
                .recoveries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.lock_losses().since = Some(Instant::now());
            self.recover.notify_one();
        }
        let wait = deadline.map_or(RETRY_WAIT, |d| {
            d.saturating_duration_since(Instant::now()).min(RETRY_WAIT)
        });
        matches!(
            tokio::time::timeout(wait, serving.wait_for(|up| *up)).await,
            Ok(Ok(_))
        )
    }

    /// Repeats recovery attempts with backoff until the token is back, or a PIN is refused.
    pub(super) async fn recover_until_back(self: Arc<Self>) {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0_u32;
        loop {
            attempt += 1;
            let agent = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || agent.recover_once()).await {
                Ok(Ok(())) => {
                    let took = {
                        let mut losses = self.lock_losses();
                        let took = losses.since.take().map(|since| since.elapsed());
                        losses.last = took.or(losses.last);
                        took
                    };
                    tracing::info!(
                        attempt,
                        seconds = took.map_or(0.0, |t| t.as_secs_f64()),
                        "the token is back; serving again"
                    );
                    // A new period: DEVICE_ERROR must persist again before the next one.
                    self.device_errors_since
                        .store(0, std::sync::atomic::Ordering::Relaxed);
                    let _ = self.serving.send_replace(true);
                    return;
                }
                Ok(Err(StartError::Hsm { source, .. })) if source.pin_refused() => {
                    tracing::error!(
                        error = %source,
                        "the token refused the PIN while recovering; not retrying, so the token is not locked out. Fix the PIN and restart the agent"
                    );
                    return;
                }
                Ok(Err(error)) => {
                    tracing::warn!(attempt, %error, retry_in_ms = backoff.as_millis(), "the token is still unavailable");
                }
                Err(error) => tracing::error!(%error, "the recovery task failed"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One attempt: drain and finalize the old token, open it again, find the keys again.
    fn recover_once(&self) -> Result<(), StartError> {
        let old = match self.token.write() {
            Ok(mut token) => token.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(old) = old {
            let started = Instant::now();
            while Arc::strong_count(&old) > 1 && started.elapsed() < DRAIN_WAIT {
                std::thread::sleep(Duration::from_millis(10));
            }
            match Arc::try_unwrap(old) {
                Ok(token) => {
                    if let Err(error) = token.close() {
                        tracing::debug!(%error, "finalizing the old token");
                    }
                }
                Err(_) => tracing::warn!(
                    "requests still hold old sessions; initialising again without C_Finalize"
                ),
            }
        }
        let hsm = |source| StartError::Hsm {
            context: "recovery".into(),
            source,
        };
        let token = Token::open(&self.pkcs11, &self.pin, self.errors.clone())
            .inspect_err(|error| self.errors.count(error))
            .map_err(hsm)?;
        let config = match self.config.lock() {
            Ok(config) => config.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let keys = KeySet::load(&token, &config, unix_now());
        let keys = match keys {
            Ok(keys) => keys,
            Err(error) => {
                // Keep the module finalized between attempts, so the next one starts clean.
                let _ = token.close();
                return Err(error);
            }
        };
        match self.keys.write() {
            Ok(mut current) => *current = Arc::new(keys),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(keys),
        }
        match self.token.write() {
            Ok(mut current) => *current = Some(Arc::new(token)),
            Err(poisoned) => *poisoned.into_inner() = Some(Arc::new(token)),
        }
        Ok(())
    }
}
