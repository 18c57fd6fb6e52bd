//! A pool of PKCS#11 sessions, each kept by a thread of its own, with a bounded queue in
//! front of them.
//!
//! **One thread a session.** A `cryptoki::Session` may be used by one thread at a time,
//! and every PKCS#11 call blocks. Each session lives on its own thread, which takes the
//! next request from the queue the moment its sign returns: on a network HSM, where a sign
//! is a round trip of milliseconds, no session idles between requests waiting for an
//! async task to be scheduled and a blocking thread to be woken. Sessions are opened
//! lazily, by their thread, on its first request, and only ever there: the token's
//! session cap holds for signing, reloads and command-line tools alike.
//!
//! **Recovery in the session.** A failed session never serves again: its thread closes it
//! and opens a new one for the next request. A sign that meets a dead session
//! (SESSION_HANDLE_INVALID) is tried again on a new session, up to `NEW_SESSIONS` times;
//! one that meets a handle this session does not know (KEY_HANDLE_INVALID: handles are per
//! session on AWS CloudHSM SDK 5) finds the key again in this session, remembers the
//! handle for it, and is tried once more. Everything else goes back to the agent, which
//! knows what the other classes need (see [`Recovery`]).
//!
//! **Bounded waiting.** An HSM is slow and shared: at most `queue` requests wait (more get
//! [`RequestError::Busy`] at once), and a request whose deadline cannot be met given the
//! queue ahead of it and the recent signing time gets [`RequestError::Deadline`] at once
//! instead of occupying the token for an answer nobody will read. A request whose caller
//! went away or whose deadline passed while it waited is dropped unsigned.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use cryptoki::{context::Pkcs11, object::ObjectHandle, session::Session, slot::Slot};

use super::{
    ErrorCounts, FailedCall, HsmError, KeyRef, Recovery, RequestError, own_handle, remember,
};

/// The pool: the queue and the threads that serve it. Dropping it stops the threads
/// after the request each is on, closes their sessions, and fails the requests still
/// queued with [`RequestError::Unavailable`].
pub(super) struct SessionPool {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct Shared {
    pkcs11: Pkcs11,
    slot: Slot,
    size: usize,
    queue: usize,
    jobs: Mutex<Jobs>,
    ready: Condvar,
    busy: AtomicUsize,
    /// Moving average of one operation, in nanoseconds, for deadline admission.
    average_nanos: AtomicU64,
    errors: ErrorCounts,
}

#[derive(Default)]
struct Jobs {
    waiting: VecDeque<Job>,
    closed: bool,
    /// Session threads waiting on `ready`. A request wakes one only if one waits: when
    /// all are signing, the next to finish takes it, and the wake-up would be a wasted
    /// system call on every request of a busy pool.
    sleeping: usize,
}

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// How full the pool is, for metrics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolLoad {
    /// Sessions in the pool.
    pub(crate) size: usize,
    /// Sessions signing now.
    pub(crate) busy: usize,
    /// Requests waiting for a session.
    pub(crate) waiting: usize,
}

impl SessionPool {
    pub(super) fn new(
        pkcs11: Pkcs11,
        slot: Slot,
        size: usize,
        queue: usize,
        errors: ErrorCounts,
    ) -> Result<Self, HsmError> {
        let shared = Arc::new(Shared {
            pkcs11,
            slot,
            size,
            queue,
            jobs: Mutex::new(Jobs::default()),
            ready: Condvar::new(),
            busy: AtomicUsize::new(0),
            average_nanos: AtomicU64::new(0),
            errors,
        });
        let mut pool = SessionPool {
            shared,
            threads: Vec::with_capacity(size),
        };
        for n in 0..size {
            let shared = Arc::clone(&pool.shared);
            let thread = std::thread::Builder::new()
                .name(format!("pkcs11-session-{n}"))
                .spawn(move || serve(&shared))
                .map_err(HsmError::SessionThread)?;
            pool.threads.push(thread);
        }
        Ok(pool)
    }

    pub(super) fn load(&self) -> PoolLoad {
        PoolLoad {
            size: self.shared.size,
            busy: self.shared.busy.load(Ordering::Relaxed),
            waiting: self.shared.lock().waiting.len(),
        }
    }

    /// Signs on a session's thread, waiting for a free session first (up to `deadline`).
    /// Returns the signature and how long the request waited.
    pub(super) async fn sign(
        &self,
        key: KeyRef,
        deadline: Option<Instant>,
        sign: impl Fn(&Session, ObjectHandle) -> Result<Vec<u8>, FailedCall> + Send + 'static,
    ) -> Result<(Vec<u8>, Duration), RequestError> {
        let arrived = Instant::now();
        let (reply, answer) = tokio::sync::oneshot::channel();
        // Trace spans, disabled (and free) unless traces are exported: `queue_wait` from
        // here until a session thread takes the job; `C_Sign` on that thread, a child of
        // the request (held here so it stays open until the sign is done).
        let queue_wait = tracing::trace_span!("queue_wait");
        let request = if queue_wait.is_disabled() {
            tracing::Span::none()
        } else {
            tracing::Span::current()
        };
        let job: Job = Box::new(move |worker: &mut Worker| {
            drop(queue_wait);
            if reply.is_closed() {
                return;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let _ = reply.send(Err(RequestError::Deadline));
                return;
            }
            let waited = arrived.elapsed();
            let c_sign = tracing::trace_span!(
                parent: &request,
                "C_Sign",
                otel.status_code = tracing::field::Empty
            );
            let signed = c_sign.in_scope(|| worker.sign(&key, sign));
            if signed.is_err() {
                let _ = c_sign.record("otel.status_code", "ERROR");
            }
            let _ = reply.send(signed.map(|s| (s, waited)));
        });
        self.shared.submit(job, Some(deadline))?;
        let answer = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), answer)
                .await
                .map_err(|_| RequestError::Deadline)?,
            None => answer.await,
        };
        answer.map_err(|_| RequestError::Unavailable)?
    }

    /// [`SessionPool::sign`] for callers that are not async: waits here, in the queue
    /// like any request but never refused for its length.
    pub(super) fn sign_blocking(
        &self,
        key: KeyRef,
        sign: impl Fn(&Session, ObjectHandle) -> Result<Vec<u8>, FailedCall> + Send + 'static,
    ) -> Result<Vec<u8>, RequestError> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let job: Job = Box::new(move |worker: &mut Worker| {
            let _ = reply.send(worker.sign(&key, sign));
        });
        self.shared.submit(job, None)?;
        answer.recv().map_err(|_| RequestError::Unavailable)?
    }

    /// Runs `work` with a session, on that session's thread, and waits for it here. In
    /// the queue like any request but never refused for its length: a reload or a
    /// command waits its turn.
    pub(super) fn run_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Session) -> Result<T, HsmError> + Send + 'static,
    ) -> Result<T, HsmError> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let job: Job = Box::new(move |worker: &mut Worker| {
            let _ = reply.send(worker.with_session(work));
        });
        // Without admission the only refusal is a closed pool.
        self.shared
            .submit(job, None)
            .map_err(|_| HsmError::Unavailable)?;
        answer.recv().map_err(|_| HsmError::Unavailable)?
    }
}

impl Drop for SessionPool {
    fn drop(&mut self) {
        let queued = {
            let mut jobs = self.shared.lock();
            jobs.closed = true;
            std::mem::take(&mut jobs.waiting)
        };
        // Dropping a queued job drops its reply channel: its caller gets Unavailable.
        drop(queued);
        self.shared.ready.notify_all();
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("a PKCS#11 session thread panicked");
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Jobs> {
        match self.jobs.lock() {
            Ok(jobs) => jobs,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Queues `job`. `admission` is `Some(deadline)` for a request that may be refused
    /// (queue full, or its deadline out of reach), `None` for one that waits its turn.
    fn submit(&self, job: Job, admission: Option<Option<Instant>>) -> Result<(), RequestError> {
        let mut jobs = self.lock();
        if jobs.closed {
            return Err(RequestError::Unavailable);
        }
        if let Some(deadline) = admission {
            let ahead = jobs.waiting.len();
            let idle = self.size.saturating_sub(self.busy.load(Ordering::Relaxed));
            if ahead >= idle {
                if ahead >= self.queue {
                    return Err(RequestError::Busy { queued: ahead });
                }
                let average = Duration::from_nanos(self.average_nanos.load(Ordering::Relaxed));
                // Our turn comes after the queue ahead drains through `size` sessions.
                let expected = average * u32::try_from(ahead / self.size + 2).unwrap_or(u32::MAX);
                if deadline.is_some_and(|d| d.saturating_duration_since(Instant::now()) < expected)
                {
                    return Err(RequestError::Deadline);
                }
            }
        }
        jobs.waiting.push_back(job);
        let wake = jobs.sleeping > 0;
        drop(jobs);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    fn record(&self, took: Duration) {
        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        // Exponential moving average with weight 1/8; racing updates lose a sample, which is fine.
        let old = self.average_nanos.load(Ordering::Relaxed);
        let new = if old == 0 {
            took
        } else {
            old - old / 8 + took / 8
        };
        self.average_nanos.store(new, Ordering::Relaxed);
    }
}

/// A session thread: takes requests until the pool closes; its session closes with it.
fn serve(shared: &Arc<Shared>) {
    let mut worker = Worker {
        shared: Arc::clone(shared),
        session: None,
        handles: Vec::new(),
    };
    loop {
        let job = {
            let mut jobs = shared.lock();
            loop {
                if jobs.closed {
                    return;
                }
                if let Some(job) = jobs.waiting.pop_front() {
                    break job;
                }
                jobs.sleeping += 1;
                jobs = match shared.ready.wait(jobs) {
                    Ok(jobs) => jobs,
                    Err(poisoned) => poisoned.into_inner(),
                };
                jobs.sleeping -= 1;
            }
        };
        let _ = shared.busy.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        job(&mut worker);
        shared.record(started.elapsed());
        let _ = shared.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Most sessions one request opens after its session was dropped under it.
const NEW_SESSIONS: u32 = 3;

/// A session thread's state: its session, and the handles keys have in it where they
/// differ from the handles found at start.
struct Worker {
    shared: Arc<Shared>,
    session: Option<Session>,
    handles: Vec<(ObjectHandle, ObjectHandle)>,
}

impl Worker {
    /// The thread's session, opened if it has none.
    fn session(&mut self) -> Result<&Session, FailedCall> {
        let session = match self.session.take() {
            Some(session) => session,
            None => self
                .shared
                .pkcs11
                .open_ro_session(self.shared.slot)
                .map_err(FailedCall::of("C_OpenSession"))
                .inspect_err(|e| self.shared.errors.count(e))?,
        };
        Ok(self.session.insert(session))
    }

    /// Closes the session after a failure: one that failed may be closed, in an operation
    /// the module did not end, or logged out. The next request opens a fresh one.
    fn discard(&mut self) {
        self.session = None;
        self.handles.clear();
    }

    fn with_session<T>(
        &mut self,
        work: impl FnOnce(&Session) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let result = work(self.session()?);
        if let Err(HsmError::Call(call)) = &result {
            self.shared.errors.count(call);
            self.discard();
        }
        result
    }

    /// Signs with `key`, mending what this session can mend: a dead session (up to
    /// [`NEW_SESSIONS`] times: sessions drop one by one on a busy network HSM, and a token
    /// that is gone fails the opening of the next), a handle the session does not know
    /// (once).
    fn sign(
        &mut self,
        key: &KeyRef,
        sign: impl Fn(&Session, ObjectHandle) -> Result<Vec<u8>, FailedCall>,
    ) -> Result<Vec<u8>, RequestError> {
        let (mut new_sessions, mut find_again) = (0, true);
        loop {
            let handle = own_handle(&self.handles, key.handle);
            let error = match sign(self.session()?, handle) {
                Ok(signature) => return Ok(signature),
                Err(error) => error,
            };
            self.shared.errors.count(&error);
            match error.recovery() {
                Recovery::NewSession if new_sessions < NEW_SESSIONS => {
                    new_sessions += 1;
                    self.discard();
                }
                Recovery::FindKeyAgain if find_again => {
                    find_again = false;
                    let session = self.session()?;
                    match super::key::find_key(session, &key.locator) {
                        Ok(found) => {
                            remember(&mut self.handles, key.handle, found.handle);
                        }
                        Err(not_found) => {
                            tracing::debug!(error = %not_found, "the key is not in a new session either");
                            self.discard();
                            return Err(error.into());
                        }
                    }
                }
                _ => {
                    self.discard();
                    return Err(error.into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
