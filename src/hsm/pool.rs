//! A pool of PKCS#11 sessions, so concurrent requests sign in parallel, with a bounded
//! queue in front of it.
//!
//! Sessions are opened lazily up to the configured size and reused. A semaphore bounds
//! how many are in use; the idle ones wait in a stack so the warmest is reused first.
//! Work runs on tokio's blocking threads: PKCS#11 calls never block an async worker.
//!
//! An HSM is slow and shared, so waiting is bounded twice: at most `queue` requests wait
//! for a session (more get [`HsmError::Busy`] at once), and a request whose deadline
//! cannot be met given the queue ahead of it and the recent signing time gets
//! [`HsmError::Deadline`] at once instead of occupying the token for an answer nobody
//! will read.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use cryptoki::{context::Pkcs11, session::Session, slot::Slot};
use tokio::sync::Semaphore;

use super::HsmError;

pub(super) struct SessionPool {
    pkcs11: Pkcs11,
    slot: Slot,
    size: usize,
    queue: usize,
    idle: Arc<Mutex<Vec<Session>>>,
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    /// Moving average of one operation, in nanoseconds, for deadline admission.
    average_nanos: Arc<AtomicU64>,
}

/// How full the pool is, for metrics.
#[derive(Debug, Clone, Copy)]
pub struct PoolLoad {
    /// Sessions in the pool.
    pub size: usize,
    /// Sessions signing now.
    pub busy: usize,
    /// Requests waiting for a session.
    pub waiting: usize,
}

/// Decrements the waiting count however the wait ends.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let _ = self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SessionPool {
    pub(super) fn new(pkcs11: Pkcs11, slot: Slot, size: usize, queue: usize) -> Self {
        SessionPool {
            pkcs11,
            slot,
            size,
            queue,
            idle: Arc::new(Mutex::new(Vec::with_capacity(size))),
            permits: Arc::new(Semaphore::new(size)),
            waiting: AtomicUsize::new(0),
            average_nanos: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(super) fn load(&self) -> PoolLoad {
        PoolLoad {
            size: self.size,
            busy: self.size - self.permits.available_permits(),
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }

    /// Runs `work` with a session on a blocking thread, waiting for a free session first
    /// (up to `deadline`). Returns the result and how long the request waited.
    pub(super) async fn run<T, F>(
        &self,
        deadline: Option<Instant>,
        work: F,
    ) -> Result<(T, Duration), HsmError>
    where
        F: FnOnce(&Session) -> Result<T, HsmError> + Send + 'static,
        T: Send + 'static,
    {
        let arrived = Instant::now();
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let ahead = self.waiting.fetch_add(1, Ordering::Relaxed);
                let _waiting = Waiting(&self.waiting);
                if ahead >= self.queue {
                    return Err(HsmError::Busy { queued: ahead });
                }
                let average = Duration::from_nanos(self.average_nanos.load(Ordering::Relaxed));
                // Our turn comes after the queue ahead drains through `size` sessions.
                let expected = average * u32::try_from(ahead / self.size + 2).unwrap_or(u32::MAX);
                let acquire = Arc::clone(&self.permits).acquire_owned();
                match deadline {
                    Some(deadline) if deadline.saturating_duration_since(arrived) < expected => {
                        return Err(HsmError::Deadline);
                    }
                    Some(deadline) => {
                        let budget = deadline.saturating_duration_since(Instant::now());
                        match tokio::time::timeout(budget.saturating_sub(average), acquire).await {
                            Ok(permit) => permit,
                            Err(_) => return Err(HsmError::Deadline),
                        }
                    }
                    None => acquire.await,
                }
                .map_err(|_| HsmError::Thread("the session pool is closed".into()))?
            }
        };
        let waited = arrived.elapsed();
        let checkout = Checkout {
            pkcs11: self.pkcs11.clone(),
            slot: self.slot,
            idle: Arc::clone(&self.idle),
        };
        let average = Arc::clone(&self.average_nanos);
        let sign = move || {
            let started = Instant::now();
            let result = checkout.with_session(work);
            let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            // Exponential moving average with weight 1/8; racing updates lose a sample, which is fine.
            let old = average.load(Ordering::Relaxed);
            let new = if old == 0 {
                took
            } else {
                old - old / 8 + took / 8
            };
            average.store(new, Ordering::Relaxed);
            drop(permit);
            result
        };
        let result = tokio::task::spawn_blocking(sign)
            .await
            .map_err(|e| HsmError::Thread(e.to_string()))??;
        Ok((result, waited))
    }

    /// Runs `work` with a session on the calling thread.
    pub(super) fn run_blocking<T>(
        &self,
        work: impl FnOnce(&Session) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        // Through the same permits as signing, so a reload or a command under load never
        // opens more sessions than the pool may: a token's session cap holds. In the
        // semaphore's queue like any request (a loop of try_acquire would never get a
        // permit while requests queue), parking this thread until its turn.
        let _permit = park_until(self.permits.acquire())
            .map_err(|_| HsmError::Thread("the session pool is closed".into()))?;
        Checkout {
            pkcs11: self.pkcs11.clone(),
            slot: self.slot,
            idle: Arc::clone(&self.idle),
        }
        .with_session(work)
    }
}

/// Runs `future` to completion on this thread, parking it between polls: for waiting on a
/// tokio semaphore (which needs no runtime) from blocking code.
fn park_until<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut context = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        std::thread::park();
    }
}

struct Checkout {
    pkcs11: Pkcs11,
    slot: Slot,
    idle: Arc<Mutex<Vec<Session>>>,
}

impl Checkout {
    fn with_session<T>(
        self,
        work: impl FnOnce(&Session) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let reused = self.idle.lock().map_or(None, |mut idle| idle.pop());
        let session = match reused {
            Some(session) => session,
            None => self
                .pkcs11
                .open_ro_session(self.slot)
                .map_err(HsmError::call("C_OpenSession"))?,
        };
        let result = work(&session);
        // Only a session that just worked goes back. One that failed may be closed, in an
        // operation the module did not end, or logged out; dropping it closes it, and the
        // next request opens a fresh one.
        if result.is_ok()
            && let Ok(mut idle) = self.idle.lock()
        {
            idle.push(session);
        }
        result
    }
}
