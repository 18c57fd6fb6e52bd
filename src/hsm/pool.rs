//! A pool of PKCS#11 sessions, so concurrent requests sign in parallel.
//!
//! Sessions are opened lazily up to the configured size and reused. A semaphore bounds
//! how many are in use; the idle ones wait in a stack so the warmest is reused first.
//! Work runs on tokio's blocking threads: PKCS#11 calls never block an async worker.

use std::sync::{Arc, Mutex};

use cryptoki::{context::Pkcs11, session::Session, slot::Slot};
use tokio::sync::Semaphore;

use super::HsmError;

pub(super) struct SessionPool {
    pkcs11: Pkcs11,
    slot: Slot,
    idle: Arc<Mutex<Vec<Session>>>,
    permits: Arc<Semaphore>,
}

impl SessionPool {
    pub(super) fn new(pkcs11: Pkcs11, slot: Slot, size: usize) -> Self {
        SessionPool {
            pkcs11,
            slot,
            idle: Arc::new(Mutex::new(Vec::with_capacity(size))),
            permits: Arc::new(Semaphore::new(size)),
        }
    }

    /// Runs `work` with a session on a blocking thread, waiting for a free session first.
    pub(super) async fn run<T, F>(&self, work: F) -> Result<T, HsmError>
    where
        F: FnOnce(&Session) -> Result<T, HsmError> + Send + 'static,
        T: Send + 'static,
    {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| HsmError::Thread("the session pool is closed".into()))?;
        let checkout = Checkout {
            pkcs11: self.pkcs11.clone(),
            slot: self.slot,
            idle: Arc::clone(&self.idle),
        };
        tokio::task::spawn_blocking(move || {
            let result = checkout.with_session(work);
            drop(permit);
            result
        })
        .await
        .map_err(|e| HsmError::Thread(e.to_string()))?
    }

    /// Runs `work` with a session on the calling thread.
    pub(super) fn run_blocking<T>(
        &self,
        work: impl FnOnce(&Session) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        Checkout {
            pkcs11: self.pkcs11.clone(),
            slot: self.slot,
            idle: Arc::clone(&self.idle),
        }
        .with_session(work)
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
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(session);
        }
        result
    }
}
