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

use std::{
    fs::OpenOptions, io::Write, os::unix::fs::OpenOptionsExt, path::Path, sync::Mutex,
    time::Duration,
};

use serde::Serialize;
// The monotonic clock of the refusal window; tests with paused time move it.
use tokio::time::Instant;

use crate::config::CachedAudit;

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
    pub(crate) key: &'a str,
    pub(crate) certificate_sha256: &'a str,
    pub(crate) client_id: &'a str,
    pub(crate) scopes: &'a [String],
    pub(crate) environment: &'a str,
    pub(crate) resources: &'a [String],
    pub(crate) consumer_org: &'a str,
    /// The `type` of each authorization_details entry (the details themselves may name
    /// people or systems, and stay out of the trail).
    pub(crate) authorization_types: &'a [String],
    /// Whether the token was restricted to a person. The pid itself is personal data and
    /// never written.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) pid: bool,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub(crate) iss_onbehalfof: &'a str,
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
    /// The gRPC code sent to the caller ([`code_name`]).
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
    /// The gRPC code sent ([`code_name`]), empty for a connection.
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

/// Where audit lines are written.
pub(crate) struct AuditLog {
    sink: Mutex<Box<dyn Write + Send>>,
    refusals: Mutex<Window>,
    cached: CachedAudit,
    counts: Mutex<CachedCounts>,
}

impl AuditLog {
    /// Appends to `file` (created with mode 0600), or writes to stderr.
    pub(crate) fn open(file: Option<&Path>, cached: CachedAudit) -> std::io::Result<Self> {
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
        Ok(Self::with_sink(sink, cached))
    }

    /// Writes to `sink`.
    fn with_sink(sink: Box<dyn Write + Send>, cached: CachedAudit) -> Self {
        AuditLog {
            sink: Mutex::new(sink),
            refusals: Mutex::new(Window {
                start: Instant::now(),
                written: 0,
                suppressed: 0,
            }),
            cached,
            counts: Mutex::new(CachedCounts {
                since: crate::agent::rfc3339(crate::agent::unix_now()),
                callers: std::collections::HashMap::new(),
            }),
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
            self.write(&summary);
        }
    }

    /// Writes one decision line.
    pub(crate) fn record(&self, decision: &Decision<'_>) {
        self.write(decision);
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
        self.write(&refused);
    }

    /// Writes one line, in one `write` to the sink before the call returns, so a line is
    /// never held back (nothing to lose on any shutdown). A failing sink is reported in
    /// the log, never to the caller.
    fn write(&self, line: &impl Serialize) {
        thread_local! {
            /// The line being written, kept between calls so that a line costs no
            /// allocation once the thread has written one as long.
            static LINE: std::cell::RefCell<Vec<u8>> =
                std::cell::RefCell::new(Vec::with_capacity(1024));
        }
        let written = LINE.with_borrow_mut(|buffer| {
            buffer.clear();
            serde_json::to_writer(&mut *buffer, line).map_err(std::io::Error::from)?;
            buffer.push(b'\n');
            let written = match self.sink.lock() {
                Ok(mut sink) => sink.write_all(buffer).and_then(|()| sink.flush()),
                Err(poisoned) => {
                    let mut sink = poisoned.into_inner();
                    sink.write_all(buffer).and_then(|()| sink.flush())
                }
            };
            // A rare long line (many scopes, say) does not keep its buffer forever.
            buffer.shrink_to(4096);
            written
        });
        if let Err(error) = written {
            tracing::error!(%error, "cannot write the audit log");
        }
    }
}

/// The name of a gRPC code as audit lines spell it (`Ok`, `InvalidArgument`, ...: its
/// `Debug` form), without formatting it anew for every line.
pub(crate) fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::Value;

    use super::*;

    #[test]
    fn code_names_are_the_codes_debug_form() {
        for number in 0..=16 {
            let code = tonic::Code::from_i32(number);
            assert_eq!(code_name(code), format!("{code:?}"));
        }
    }

    /// A sink the test reads back.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        /// The lines written since the last call, each parsed.
        fn take(&self) -> Vec<Value> {
            let bytes = std::mem::take(&mut *self.0.lock().expect("sink"));
            let text = String::from_utf8(bytes).expect("UTF-8");
            assert!(
                text.is_empty() || text.ends_with('\n'),
                "whole lines: {text}"
            );
            text.lines()
                .map(|line| serde_json::from_str(line).expect("a JSON line"))
                .collect()
        }
    }

    fn audit(cached: CachedAudit) -> (AuditLog, Lines) {
        let lines = Lines::default();
        (AuditLog::with_sink(Box::new(lines.clone()), cached), lines)
    }

    fn refused(n: usize) -> Refused<'static> {
        Refused {
            audit: "connection",
            time: format!("refusal {n}"),
            caller: "",
            peer: "127.0.0.1:40000",
            outcome: "refused",
            code: "",
            reason: "TLS handshake failed".into(),
            suppressed: 0,
        }
    }

    #[test]
    fn a_decision_is_one_json_line_with_only_whether_there_was_a_pid() {
        let (log, lines) = audit(CachedAudit::Each);
        let scopes = ["nav:a".to_owned(), "nav:b".to_owned()];
        let decision = Decision {
            audit: "token",
            request_id: "r-1",
            time: "2026-12-02T10:00:00Z".into(),
            caller: "uid:1000",
            peer: "unix",
            key: "default",
            certificate_sha256: "ab12",
            client_id: "c",
            scopes: &scopes,
            environment: "test",
            resources: &[],
            consumer_org: "",
            authorization_types: &[],
            pid: true,
            iss_onbehalfof: "",
            jti: "j-1",
            expires_at: Some(1_800_000_000),
            attempt: None,
            outcome: "issued",
            code: "OK",
            reason: "",
        };
        log.record(&decision);
        let written = lines.take();
        assert_eq!(written.len(), 1);
        let line = &written[0];
        assert_eq!(line["audit"], "token");
        assert_eq!(line["caller"], "uid:1000");
        assert_eq!(line["scopes"], serde_json::json!(["nav:a", "nav:b"]));
        assert_eq!(line["outcome"], "issued");
        assert_eq!(line["expires_at"], 1_800_000_000);
        assert_eq!(
            line["pid"],
            Value::Bool(true),
            "whether, never which person"
        );
        // Empty optional fields are left out.
        for absent in ["iss_onbehalfof", "attempt"] {
            assert!(line.get(absent).is_none(), "{absent}: {line}");
        }
        log.record(&Decision {
            pid: false,
            attempt: Some(2),
            iss_onbehalfof: "kunde-1",
            ..decision
        });
        let line = &lines.take()[0];
        assert!(line.get("pid").is_none(), "{line}");
        assert_eq!(line["attempt"], 2);
        assert_eq!(line["iss_onbehalfof"], "kunde-1");
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_cut_at_the_rate_and_the_next_line_says_how_many_were_left_out() {
        let (log, lines) = audit(CachedAudit::Each);
        let per_second = usize::try_from(REFUSALS_PER_SECOND).expect("small");
        for n in 0..per_second + 5 {
            log.refused(refused(n));
        }
        let written = lines.take();
        assert_eq!(written.len(), per_second);
        assert!(written.iter().all(|line| line.get("suppressed").is_none()));
        assert_eq!(
            written[per_second - 1]["time"],
            format!("refusal {}", per_second - 1)
        );

        // The window is one second from its start: just before, still cut.
        tokio::time::advance(Duration::from_millis(999)).await;
        log.refused(refused(100));
        assert!(lines.take().is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        log.refused(refused(101));
        log.refused(refused(102));
        let written = lines.take();
        assert_eq!(written.len(), 2);
        assert_eq!(written[0]["time"], "refusal 101");
        assert_eq!(written[0]["suppressed"], 6);
        assert!(written[1].get("suppressed").is_none(), "counted once");
    }

    fn answer<'a>(caller: &'a str, scopes: &'a [String], jti: &'a str) -> CachedAnswer<'a> {
        CachedAnswer {
            caller,
            key: "default",
            client_id: "c",
            scopes,
            environment: "test",
            jti,
        }
    }

    #[test]
    fn cached_answers_are_summed_per_caller_and_shape_then_counted_afresh() {
        let (log, lines) = audit(CachedAudit::Summary(Duration::from_secs(60)));
        assert_eq!(log.summary_interval(), Some(Duration::from_secs(60)));
        assert_eq!(audit(CachedAudit::Each).0.summary_interval(), None);
        let (one, two) = (["a:b".to_owned()], ["a:b".to_owned(), "c:d".to_owned()]);
        for jti in ["j1", "j1", "j2"] {
            log.count_cached(&answer("uid:1000", &one, jti));
        }
        log.count_cached(&answer("uid:1000", &two, "j3"));
        log.count_cached(&answer("uid:1001", &one, "j1"));
        log.count_cached(&answer("uid:1001", &one, "j1"));
        assert!(lines.take().is_empty(), "counted, not written");

        log.write_cached_summaries();
        let mut written = lines.take();
        written.sort_by_key(|line| (line["caller"].to_string(), line["count"].to_string()));
        let summary = |line: &Value| {
            (
                line["caller"].as_str().map(str::to_owned),
                line["scopes"].clone(),
                line["count"].as_u64(),
                line["jti"].as_str().map(str::to_owned),
            )
        };
        let expected = [
            ("uid:1000", serde_json::json!(["a:b", "c:d"]), 1, "j3"),
            ("uid:1000", serde_json::json!(["a:b"]), 3, "j2"),
            ("uid:1001", serde_json::json!(["a:b"]), 2, "j1"),
        ];
        assert_eq!(written.len(), expected.len(), "{written:?}");
        for (line, (caller, scopes, count, jti)) in written.iter().zip(expected) {
            assert_eq!(
                summary(line),
                (Some(caller.into()), scopes, Some(count), Some(jti.into()))
            );
            assert_eq!(line["audit"], "token_cached");
            assert!(line["since"].is_string() && line["time"].is_string());
        }

        // Counting starts afresh, from when the last summary was written.
        log.write_cached_summaries();
        assert!(lines.take().is_empty());
        log.count_cached(&answer("uid:1000", &one, "j4"));
        log.write_cached_summaries();
        let written = lines.take();
        assert_eq!(written.len(), 1);
        assert_eq!(written[0]["count"], 1);
    }
}
