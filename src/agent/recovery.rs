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
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::{Agent, DEVICE_ERROR_PERSISTS, KeySet, StartError, unix_now};
use crate::hsm::{Recovery, Token};

/// Longest a request that found the token gone waits for it to come back before retrying.
const RETRY_WAIT: Duration = Duration::from_secs(5);
/// Longest recovery waits for requests still using the old sessions.
const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// Backoff between attempts while the token stays away.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A run of DEVICE_ERROR answers with no sign succeeding in between. A short run is an
/// HSM throttling (AWS CloudHSM), which a re-initialisation would make worse, so requests
/// back off; a run that has lasted [`DEVICE_ERROR_PERSISTS`] is a token fault.
///
/// Times are durations since the agent started, from the caller, so that the decision
/// is a function of its arguments.
#[derive(Debug, Default)]
pub(super) struct DeviceErrorRun {
    /// When the run started, in nanoseconds since the agent started, at least 1; 0 when
    /// there is no run.
    since: AtomicU64,
}

impl DeviceErrorRun {
    /// What to do about a DEVICE_ERROR at `now`: back off, or re-initialise the token
    /// once the run has lasted [`DEVICE_ERROR_PERSISTS`].
    pub(super) fn next_step(&self, now: Duration) -> Recovery {
        let now = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX).max(1);
        let since = match self
            .since
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => now,
            Err(since) => since,
        };
        if Duration::from_nanos(now.saturating_sub(since)) >= DEVICE_ERROR_PERSISTS {
            Recovery::Reinitialize
        } else {
            Recovery::BackOff
        }
    }

    /// A sign succeeded, or the token was re-initialised: the run, if any, is over.
    pub(super) fn end(&self) {
        if self.since.load(Ordering::Relaxed) != 0 {
            self.since.store(0, Ordering::Relaxed);
        }
    }
}

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
                    self.device_errors.end();
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
            .inspect_err(|error| {
                if let Some(call) = error.call() {
                    self.errors.count(call);
                }
            })
            .map_err(hsm)?;
        let config = match self.config.lock() {
            Ok(config) => config.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let keys = KeySet::load(&token, &config, unix_now(), Arc::clone(&self.revocation));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn a_device_error_backs_off_until_the_run_persists() {
        let run = DeviceErrorRun::default();
        // The run starts at the first DEVICE_ERROR, not when the agent started.
        assert_eq!(run.next_step(at(60_000)), Recovery::BackOff);
        assert_eq!(run.next_step(at(62_000)), Recovery::BackOff);
        assert_eq!(run.next_step(at(64_999)), Recovery::BackOff);
        assert_eq!(run.next_step(at(65_000)), Recovery::Reinitialize);
        assert_eq!(run.next_step(at(66_000)), Recovery::Reinitialize);
    }

    #[test]
    fn a_success_ends_the_run() {
        let run = DeviceErrorRun::default();
        assert_eq!(run.next_step(at(1_000)), Recovery::BackOff);
        run.end();
        // Without the end this would be 5 s into the run.
        assert_eq!(run.next_step(at(6_000)), Recovery::BackOff);
        assert_eq!(run.next_step(at(10_999)), Recovery::BackOff);
        assert_eq!(run.next_step(at(11_000)), Recovery::Reinitialize);
        run.end();
        assert_eq!(run.next_step(at(11_000)), Recovery::BackOff);
    }

    #[test]
    fn a_device_error_in_the_agents_first_instant_starts_a_run_too() {
        // 0 means "no run"; a run starting at 0 ns is kept as 1 ns.
        let run = DeviceErrorRun::default();
        assert_eq!(run.next_step(Duration::ZERO), Recovery::BackOff);
        assert_eq!(
            run.next_step(DEVICE_ERROR_PERSISTS + Duration::from_nanos(1)),
            Recovery::Reinitialize
        );
    }
}
