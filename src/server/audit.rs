//! The audit trail: one JSON line per signing or token decision, allowed or not, with who asked,
//! for what, and what happened. Never the assertion, the PIN or a token: the grant is
//! identified by its `jti`. Lines go to a file (append-only, mode 0600) or to stderr.
//!
//! Tokens served from the cache are, by default, counted instead: one `token_cached` line
//! per caller and request shape per interval ([`CachedAudit`]), since they are the most
//! frequent answer and the grant behind each token has its own line when it is spent.
//!
//! Refusals made before a request is read (a caller no rule names, a malformed or
//! oversized message, a connection refused at its TLS handshake) cost a peer nothing to
//! send, so their lines are rate-limited: at most [`REFUSALS_PER_SECOND`] a second, and
//! the first line after a cut says how many were left out (`suppressed`).
//!
//! # The writer
//!
//! A line is serialised on the caller's thread and queued, without waiting, on a bounded
//! channel ([`QUEUE_LINES`]) to one writer thread, which writes what is queued in one
//! `write` and one flush per batch; a slow disk never blocks an async worker. A line is
//! lost, and counted in `grant_agent_audit_dropped_total` (with an error log at most every
//! [`LOST_LOG_EVERY`]), when the queue is full (`queue_full`) or its write fails
//! (`write_failed`). With `[audit] fail_closed = true`, a decision line also carries a
//! [`Receipt`] that the writer answers once the line is written (or not), and the service
//! answers a grant only when it was: an answer the trail does not hold never leaves the
//! agent. [`AuditLog::close`] (and dropping the log) writes what is queued and stops the
//! thread.

use std::{
    fs::OpenOptions,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::Path,
    sync::{
        Arc, Mutex,
        mpsc::{Receiver, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::Duration,
};

use serde::Serialize;
// The monotonic clock of the refusal window; tests with paused time move it.
use tokio::time::Instant;

use prometheus_client::metrics::counter::Counter;

use crate::{config::CachedAudit, metrics::Metrics};

use super::policy::Ask;

/// Lines queued for the writer at most; one more is lost (or, with `fail_closed`, its
/// request refused). About a second of the agent's peak rate.
pub(crate) const QUEUE_LINES: usize = 4096;

/// Lines written in one `write` and flush at most.
const BATCH_LINES: u64 = 256;

/// How long the writer lets lines gather after a write, unless requests wait for their
/// line (`fail_closed`). Without it, at thousands of grants a second, each line wakes the
/// writer thread on its own: a futex wake on the request's worker and a thread switch, a
/// fifth of the agent's CPU per grant in a profile. With it the writer wakes at most
/// about 500 times a second, and a line reaches the sink at most this much later.
const LINGER: Duration = Duration::from_millis(2);

/// Least time between two error logs about lost lines.
pub(crate) const LOST_LOG_EVERY: Duration = Duration::from_secs(10);

/// One decision.
#[derive(Debug, Serialize)]
pub(crate) struct Decision<'a> {
    /// "grant" (SignGrant) or "token" (GetAccessToken), to pick audit lines out of a
    /// mixed stream.
    pub(crate) audit: &'static str,
    /// Ties the line to the log lines of the same request.
    pub(crate) request_id: &'a str,
    pub(crate) time: String,
    pub(crate) caller: &'a str,
    pub(crate) peer: &'a str,
    /// What was asked, as the policy judged it: the same fields, so the trail says exactly
    /// what was allowed or refused.
    #[serde(flatten)]
    pub(crate) ask: Ask<'a>,
    pub(crate) certificate_sha256: &'a str,
    pub(crate) jti: &'a str,
    pub(crate) expires_at: Option<i64>,
    /// For a grant signed to fetch a token: which try of the fetch it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) attempt: Option<u32>,
    /// "signed" (a grant), "issued" or "cached" (a token), "denied" (policy), "refused"
    /// (bad request, or Maskinporten said no), "busy" (overload: the session queue was full
    /// or the deadline could not be met with the queue ahead) or "failed" (the token or
    /// Maskinporten failed).
    pub(crate) outcome: &'static str,
    /// The gRPC code sent to the caller ([`code_name`](super::status::code_name)).
    pub(crate) code: &'static str,
    pub(crate) reason: &'a str,
}

/// A refusal before any request message was read.
#[derive(Debug, Serialize)]
pub(crate) struct Refused<'a> {
    /// "connection" (refused at accept or the TLS handshake), or the call's "grant",
    /// "token" or "keys".
    pub(crate) audit: &'static str,
    pub(crate) time: String,
    pub(crate) caller: &'a str,
    pub(crate) peer: &'a str,
    /// "denied" (no rule names the caller), "refused" (malformed input) or "busy".
    pub(crate) outcome: &'static str,
    /// The gRPC code sent ([`code_name`](super::status::code_name)), empty for a connection.
    pub(crate) code: &'static str,
    pub(crate) reason: String,
    /// Refusals left out of the trail since the previous refusal line.
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) suppressed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Most refusal lines written in one second; the rest are counted.
pub(crate) const REFUSALS_PER_SECOND: u32 = 20;

/// The refusal lines' one-second window.
struct Window {
    start: Instant,
    written: u32,
    suppressed: u64,
}

/// Cached answers of one shape for one caller since the last summary.
#[derive(Debug, Serialize)]
pub(crate) struct CachedSummary {
    audit: &'static str,
    time: String,
    /// When the counting started.
    since: String,
    caller: String,
    key: String,
    client_id: String,
    scopes: Vec<String>,
    environment: String,
    /// Answers served from the cache.
    count: u64,
    /// The jti of the grant behind the last token served.
    jti: String,
}

/// What a cached answer is counted under.
pub(crate) struct CachedAnswer<'a> {
    pub(crate) caller: &'a str,
    pub(crate) key: &'a str,
    pub(crate) client_id: &'a str,
    pub(crate) scopes: &'a [String],
    pub(crate) environment: &'a str,
    pub(crate) jti: &'a str,
}

/// The counts since the last summary: by caller, then a short list of shapes (a caller
/// asks for few), so that counting allocates only for a shape not yet seen.
struct CachedCounts {
    since: String,
    callers: std::collections::HashMap<String, Vec<CachedSummary>>,
}

/// What the writer thread is sent.
enum Queued {
    /// One serialised line, ending in a newline; with `fail_closed`, where to say whether
    /// it was written.
    Line(Vec<u8>, Option<tokio::sync::oneshot::Sender<bool>>),
    /// Answer once everything queued before is written (tests wait on it).
    #[cfg(test)]
    Flush(std::sync::mpsc::SyncSender<()>),
    /// Write what is queued before, then stop.
    Stop,
}

/// Whether a decision line reached the sink: with `fail_closed`, the request waits for it
/// before answering; without, it is lost at worst (and counted).
#[derive(Debug)]
pub(crate) enum Receipt {
    /// Not waited for (`fail_closed` is off).
    Unconfirmed,
    /// Queued; the writer answers once it tried to write it.
    Queued(tokio::sync::oneshot::Receiver<bool>),
    /// It could not be queued (the queue was full or closed).
    Lost,
}

/// The audit line of an answer could not be written, and `fail_closed` is on.
#[derive(Debug, thiserror::Error)]
#[error("the audit trail cannot be written")]
pub(crate) struct AuditUnavailable;

impl Receipt {
    /// Waits until the line is written: `Err` if it was not (and `fail_closed` is on).
    pub(crate) async fn written(self) -> Result<(), AuditUnavailable> {
        match self {
            Receipt::Unconfirmed => Ok(()),
            Receipt::Queued(written) => match written.await {
                Ok(true) => Ok(()),
                Ok(false) | Err(_) => Err(AuditUnavailable),
            },
            Receipt::Lost => Err(AuditUnavailable),
        }
    }
}

/// Audit lines lost: counted by reason, and logged at most every [`LOST_LOG_EVERY`].
struct Losses {
    queue_full: Counter,
    write_failed: Counter,
    /// When the last error line was logged.
    logged: Mutex<Option<std::time::Instant>>,
}

impl Losses {
    fn new(metrics: &Metrics) -> Self {
        Losses {
            queue_full: metrics.audit_dropped("queue_full"),
            write_failed: metrics.audit_dropped("write_failed"),
            logged: Mutex::new(None),
        }
    }

    /// Counts `lines` lost to a full (or closed) queue.
    fn queue_full(&self, lines: u64) {
        let _ = self.queue_full.inc_by(lines);
        self.log(|| {
            tracing::error!(
                total = self.queue_full.get(),
                "audit lines lost: the audit writer's queue is full (a slow or stuck disk?)"
            )
        });
    }

    /// Counts `lines` whose write failed.
    fn write_failed(&self, lines: u64, error: &std::io::Error) {
        let _ = self.write_failed.inc_by(lines);
        self.log(|| {
            tracing::error!(
                %error,
                total = self.write_failed.get(),
                "audit lines lost: cannot write the audit log"
            )
        });
    }

    /// Runs `log` unless it ran less than [`LOST_LOG_EVERY`] ago; counting goes on meanwhile.
    fn log(&self, log: impl FnOnce()) {
        let mut logged = match self.logged.lock() {
            Ok(logged) => logged,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now = std::time::Instant::now();
        if logged.is_some_and(|at| now.duration_since(at) < LOST_LOG_EVERY) {
            return;
        }
        *logged = Some(now);
        drop(logged);
        log();
    }
}

/// Where audit lines are written: a queue to the writer thread. Dropping it writes what is
/// queued and stops the thread, as [`close`](Self::close) does.
pub(crate) struct AuditLog {
    queue: SyncSender<Queued>,
    writer: Mutex<Option<JoinHandle<()>>>,
    losses: Arc<Losses>,
    fail_closed: bool,
    refusals: Mutex<Window>,
    cached: CachedAudit,
    counts: Mutex<CachedCounts>,
}

/// How the audit log behaves, from `[audit]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AuditSettings {
    pub(crate) cached: CachedAudit,
    pub(crate) fail_closed: bool,
}

impl AuditLog {
    /// Appends to `file` (created with mode 0600), or writes to stderr, from a writer
    /// thread; lost lines are counted in `metrics`.
    pub(crate) fn open(
        file: Option<&Path>,
        settings: AuditSettings,
        metrics: &Metrics,
    ) -> std::io::Result<Self> {
        let sink: Box<dyn Write + Send> = match file {
            Some(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(path)?,
            ),
            None => Box::new(std::io::stderr()),
        };
        Self::with_sink(sink, settings, QUEUE_LINES, metrics)
    }

    /// Writes to `sink` from a new writer thread, with room for `queue` lines.
    fn with_sink(
        sink: Box<dyn Write + Send>,
        settings: AuditSettings,
        queue: usize,
        metrics: &Metrics,
    ) -> std::io::Result<Self> {
        let losses = Arc::new(Losses::new(metrics));
        let (sender, receiver) = std::sync::mpsc::sync_channel(queue);
        // A request that waits for its line must not wait for others to gather.
        let linger = if settings.fail_closed {
            Duration::ZERO
        } else {
            LINGER
        };
        let writer = {
            let losses = Arc::clone(&losses);
            std::thread::Builder::new()
                .name("audit-writer".into())
                .spawn(move || write_lines(&receiver, sink, &losses, linger))?
        };
        Ok(AuditLog {
            queue: sender,
            writer: Mutex::new(Some(writer)),
            losses,
            fail_closed: settings.fail_closed,
            refusals: Mutex::new(Window {
                start: Instant::now(),
                written: 0,
                suppressed: 0,
            }),
            cached: settings.cached,
            counts: Mutex::new(CachedCounts {
                since: crate::agent::rfc3339(crate::agent::unix_now()),
                callers: std::collections::HashMap::new(),
            }),
        })
    }

    /// Writes what is queued, then stops the writer thread; lines queued later are lost
    /// (and counted). Blocks until the writer is done: call it once serving has stopped.
    pub(crate) fn close(&self) {
        let writer = match self.writer.lock() {
            Ok(mut writer) => writer.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some(writer) = writer else { return };
        // A blocking send: the writer drains the queue, so there will be room.
        if self.queue.send(Queued::Stop).is_ok() && writer.join().is_err() {
            tracing::error!("the audit writer thread panicked");
        }
    }

    /// Waits until everything queued so far is written.
    #[cfg(test)]
    fn flush(&self) {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        if self.queue.send(Queued::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }

    /// How often cached answers are summarised; `None` when each is written.
    pub(crate) fn summary_interval(&self) -> Option<Duration> {
        match self.cached {
            CachedAudit::Each => None,
            CachedAudit::Summary(every) => Some(every),
        }
    }

    /// Counts a cached answer for the next summary.
    pub(crate) fn count_cached(&self, answer: &CachedAnswer<'_>) {
        let mut counts = match self.counts.lock() {
            Ok(counts) => counts,
            Err(poisoned) => poisoned.into_inner(),
        };
        let shapes = match counts.callers.get_mut(answer.caller) {
            Some(shapes) => shapes,
            None => counts.callers.entry(answer.caller.to_owned()).or_default(),
        };
        let same = |s: &&mut CachedSummary| {
            s.key == answer.key
                && s.client_id == answer.client_id
                && s.environment == answer.environment
                && s.scopes == answer.scopes
        };
        match shapes.iter_mut().find(same) {
            Some(shape) => {
                shape.count += 1;
                if shape.jti != answer.jti {
                    answer.jti.clone_into(&mut shape.jti);
                }
            }
            None => shapes.push(CachedSummary {
                audit: "token_cached",
                time: String::new(),
                since: String::new(),
                caller: answer.caller.to_owned(),
                key: answer.key.to_owned(),
                client_id: answer.client_id.to_owned(),
                scopes: answer.scopes.to_vec(),
                environment: answer.environment.to_owned(),
                count: 1,
                jti: answer.jti.to_owned(),
            }),
        }
    }

    /// Writes the summaries of the cached answers counted since the last call, one line
    /// per caller and shape, and starts counting afresh. Call it every interval and at
    /// shutdown.
    pub(crate) fn write_cached_summaries(&self) {
        let now = crate::agent::rfc3339(crate::agent::unix_now());
        let (since, callers) = {
            let mut counts = match self.counts.lock() {
                Ok(counts) => counts,
                Err(poisoned) => poisoned.into_inner(),
            };
            (
                std::mem::replace(&mut counts.since, now.clone()),
                std::mem::take(&mut counts.callers),
            )
        };
        for mut summary in callers.into_values().flatten() {
            summary.time.clone_from(&now);
            summary.since.clone_from(&since);
            let _ = self.write(&summary, None);
        }
    }

    /// Queues one decision line. With `fail_closed`, the receipt says when it is written
    /// and the answer must wait for it; else it is [`Receipt::Unconfirmed`].
    pub(crate) fn record(&self, decision: &Decision<'_>) -> Receipt {
        if !self.fail_closed {
            let _ = self.write(decision, None);
            return Receipt::Unconfirmed;
        }
        let (written, receipt) = tokio::sync::oneshot::channel();
        if self.write(decision, Some(written)) {
            Receipt::Queued(receipt)
        } else {
            Receipt::Lost
        }
    }

    /// Writes a refusal line, unless [`REFUSALS_PER_SECOND`] were written this second;
    /// then it is only counted, and the next line written carries the count.
    pub(crate) fn refused(&self, mut refused: Refused<'_>) {
        {
            let mut window = match self.refusals.lock() {
                Ok(window) => window,
                Err(poisoned) => poisoned.into_inner(),
            };
            let now = Instant::now();
            if now.duration_since(window.start) >= Duration::from_secs(1) {
                window.start = now;
                window.written = 0;
            }
            if window.written >= REFUSALS_PER_SECOND {
                window.suppressed += 1;
                return;
            }
            window.written += 1;
            refused.suppressed = std::mem::take(&mut window.suppressed);
        }
        let _ = self.write(&refused, None);
    }

    /// Serialises one line and queues it for the writer, without waiting: false (and
    /// counted) when the queue is full or closed.
    fn write(
        &self,
        line: &impl Serialize,
        written: Option<tokio::sync::oneshot::Sender<bool>>,
    ) -> bool {
        thread_local! {
            /// The line being serialised, kept between calls so that serialising costs
            /// no allocation beyond the queued copy once the thread has written one as long.
            static LINE: std::cell::RefCell<Vec<u8>> =
                std::cell::RefCell::new(Vec::with_capacity(1024));
        }
        let bytes = LINE.with_borrow_mut(|buffer| {
            buffer.clear();
            let serialised = serde_json::to_writer(&mut *buffer, line);
            buffer.push(b'\n');
            let bytes = serialised.map(|()| buffer.clone());
            // A rare long line (many scopes, say) does not keep its buffer forever.
            buffer.shrink_to(4096);
            bytes
        });
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(error) => {
                self.losses.write_failed(1, &std::io::Error::from(error));
                return false;
            }
        };
        match self.queue.try_send(Queued::Line(bytes, written)) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.losses.queue_full(1);
                false
            }
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer thread: takes what is queued, up to [`BATCH_LINES`] lines, writes it in one
/// `write` and flush, then tells each waiting request whether its line was written, and
/// lets the next lines gather for `linger`. Ends at [`Queued::Stop`] (after writing
/// everything queued before it) or when every sender is gone.
fn write_lines(
    queue: &Receiver<Queued>,
    mut sink: Box<dyn Write + Send>,
    losses: &Losses,
    linger: Duration,
) {
    let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut waiting = Vec::new();
    #[cfg(test)]
    let mut flushed = Vec::new();
    while let Ok(first) = queue.recv() {
        let mut next = Some(first);
        let mut lines = 0_u64;
        let mut stop = false;
        while let Some(queued) = next.take() {
            match queued {
                Queued::Line(bytes, written) => {
                    batch.extend_from_slice(&bytes);
                    lines += 1;
                    waiting.extend(written);
                }
                #[cfg(test)]
                Queued::Flush(done) => flushed.push(done),
                Queued::Stop => {
                    stop = true;
                    break;
                }
            }
            if lines < BATCH_LINES {
                next = queue.try_recv().ok();
            }
        }
        let ok = lines == 0
            || match sink.write_all(&batch).and_then(|()| sink.flush()) {
                Ok(()) => true,
                Err(error) => {
                    losses.write_failed(lines, &error);
                    false
                }
            };
        for written in waiting.drain(..) {
            // The request may have gone (its caller cancelled): nothing to tell.
            let _ = written.send(ok);
        }
        #[cfg(test)]
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
        batch.clear();
        batch.shrink_to(1 << 20);
        if stop {
            return;
        }
        if lines > 0 && lines < BATCH_LINES {
            std::thread::sleep(linger);
        }
    }
}

#[cfg(test)]
mod tests;
