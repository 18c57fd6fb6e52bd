//! The audit trail: one JSON line per signing or token decision, allowed or not, with who asked,
//! for what, and what happened. Never the assertion, the PIN or a token: the grant is
//! identified by its `jti`. Lines go to a file (append-only, mode 0600) or to stderr.

use std::{fs::OpenOptions, io::Write, os::unix::fs::OpenOptionsExt, path::Path, sync::Mutex};

use serde::Serialize;

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
    pub(crate) peer: String,
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
    pub(crate) jti: &'a str,
    pub(crate) expires_at: Option<i64>,
    /// "signed" (a grant), "issued" or "cached" (a token), "denied" (policy), "refused"
    /// (bad request, or Maskinporten said no), "busy" (overload: the session queue was full
    /// or the deadline could not be met with the queue ahead) or "failed" (the token or
    /// Maskinporten failed).
    pub(crate) outcome: &'static str,
    /// The gRPC code sent to the caller.
    pub(crate) code: String,
    pub(crate) reason: String,
}

/// Where audit lines are written.
pub(crate) struct AuditLog {
    sink: Mutex<Box<dyn Write + Send>>,
}

impl AuditLog {
    /// Appends to `file` (created with mode 0600), or writes to stderr.
    pub(crate) fn open(file: Option<&Path>) -> std::io::Result<Self> {
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
        Ok(AuditLog {
            sink: Mutex::new(sink),
        })
    }

    /// Writes one line. A failing sink is reported in the log, never to the caller.
    pub(crate) fn record(&self, decision: &Decision<'_>) {
        let Ok(mut line) = serde_json::to_vec(decision) else {
            return;
        };
        line.push(b'\n');
        let written = match self.sink.lock() {
            Ok(mut sink) => sink.write_all(&line).and_then(|()| sink.flush()),
            Err(poisoned) => {
                let mut sink = poisoned.into_inner();
                sink.write_all(&line).and_then(|()| sink.flush())
            }
        };
        if let Err(error) = written {
            tracing::error!(%error, "cannot write the audit log");
        }
    }
}
