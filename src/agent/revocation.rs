//! What the agent knows of each certificate's revocation, by leaf SHA-256, so that it
//! outlives a reload: checked at start-up and then on a timer ([`Agent::watch_revocation`]),
//! read when signing (a revoked certificate never signs), by ListKeys, health, metrics
//! and `cert check`.
//!
//! Only a verified answer changes what is known. A responder that does not answer leaves
//! the last verified answer standing for `[revocation] good_for_seconds`; past that the
//! state is `unreachable`, which warns and still signs: an outage at the CA must not stop
//! every grant, and Maskinporten itself is the final judge.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
    time::Duration,
};

use crate::{
    config::RevocationSettings,
    revocation::{Answer, Checker, NoAnswer, Status},
};

use super::{Agent, rfc3339, unix_now};

/// A certificate's revocation state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Revocation {
    /// Not checked yet, or it cannot be: why.
    NotChecked(String),
    /// A responder said good.
    Good,
    /// A responder said revoked.
    Revoked {
        /// When, Unix seconds.
        at: i64,
        /// The CRL reason code's name, e.g. "keyCompromise".
        reason: Option<&'static str>,
    },
    /// The responder does not know the certificate (OCSP "unknown"), and no CRL said more.
    Unknown,
    /// No verified answer counts any more: every responder failed, the last good answer
    /// (if any) is older than `good_for`.
    Unreachable,
}

impl Revocation {
    /// "not_checked", "good", "revoked", "unknown" or "unreachable".
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Revocation::NotChecked(_) => "not_checked",
            Revocation::Good => "good",
            Revocation::Revoked { .. } => "revoked",
            Revocation::Unknown => "unknown",
            Revocation::Unreachable => "unreachable",
        }
    }
}

/// One certificate's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    /// What counts now.
    pub(crate) state: Revocation,
    /// The last check, answered or not (Unix seconds).
    pub(crate) checked_at: Option<i64>,
    /// The last verified good answer (Unix seconds).
    pub(crate) last_good: Option<i64>,
    /// Where the answer that counts came from: "ocsp http://…" or "crl http://…".
    pub(crate) source: String,
    /// What went wrong at the last check, when it did (every responder tried).
    pub(crate) problem: String,
}

impl Record {
    fn not_checked(why: &str) -> Record {
        Record {
            state: Revocation::NotChecked(why.to_owned()),
            checked_at: None,
            last_good: None,
            source: String::new(),
            problem: String::new(),
        }
    }

    /// One line for people: the state, its source, when, and the last problem.
    pub(crate) fn describe(&self) -> String {
        let mut line = match &self.state {
            Revocation::NotChecked(why) => format!("not checked: {why}"),
            Revocation::Good => format!("good ({})", self.source),
            Revocation::Revoked { at, reason } => format!(
                "REVOKED on {} (reason {}; {})",
                rfc3339(*at),
                reason.unwrap_or("not given"),
                self.source
            ),
            Revocation::Unknown => format!("unknown to the responder ({})", self.source),
            Revocation::Unreachable => "no responder answered".to_owned(),
        };
        let answerable = !matches!(self.state, Revocation::NotChecked(_));
        if let (Some(at), true) = (self.checked_at, answerable) {
            line.push_str(&format!(", checked {}", rfc3339(at)));
        }
        if !self.problem.is_empty() {
            line.push_str(&format!("; last check: {}", self.problem));
        }
        line
    }
}

/// Every certificate's record, and a counter that moves on every change (health follows it).
#[derive(Debug)]
pub(crate) struct RevocationBook {
    /// Read on every grant (a revoked version never signs), written once a check.
    records: RwLock<HashMap<String, Record>>,
    changed: tokio::sync::watch::Sender<u64>,
    /// Wakes the timer for a check now (after a reload brought new certificates).
    pub(super) recheck: tokio::sync::Notify,
}

impl Default for RevocationBook {
    fn default() -> Self {
        RevocationBook {
            records: RwLock::new(HashMap::new()),
            changed: tokio::sync::watch::Sender::new(0),
            recheck: tokio::sync::Notify::new(),
        }
    }
}

impl RevocationBook {
    /// The record of the certificate whose leaf has this SHA-256; `not checked` when
    /// there is none.
    pub(crate) fn get(&self, sha256: &str) -> Record {
        self.read()
            .get(sha256)
            .cloned()
            .unwrap_or_else(|| Record::not_checked("no check has run yet"))
    }

    /// When the certificate was revoked and why, if a verified answer said so.
    pub(crate) fn revoked(&self, sha256: &str) -> Option<(i64, Option<&'static str>, String)> {
        match self.read().get(sha256) {
            Some(Record {
                state: Revocation::Revoked { at, reason },
                source,
                ..
            }) => Some((*at, *reason, source.clone())),
            _ => None,
        }
    }

    /// Moves on every change of any record.
    pub(crate) fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn set(&self, sha256: &str, record: Record) {
        let changed = self
            .records
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(sha256.to_owned(), record.clone())
            != Some(record);
        if changed {
            self.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Record>> {
        self.records
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The record after a check at `now` that gave `result`, from the record before.
fn next(before: Record, result: Result<Answer, NoAnswer>, now: i64, good_for: Duration) -> Record {
    match result {
        Ok(answer) => {
            let source = format!("{} {}", answer.source.name(), answer.url);
            let (state, last_good) = match answer.status {
                Status::Good => (Revocation::Good, Some(now)),
                Status::Revoked { at, reason } => (
                    Revocation::Revoked {
                        at,
                        reason: reason.map(|r| r.name()),
                    },
                    before.last_good,
                ),
                Status::Unknown => (Revocation::Unknown, before.last_good),
            };
            Record {
                state,
                checked_at: Some(now),
                last_good,
                source,
                problem: String::new(),
            }
        }
        // The certificate names no responder: nothing to ask, nothing went wrong.
        Err(no_answer) if no_answer.attempts.is_empty() => Record {
            state: Revocation::NotChecked(no_answer.to_string()),
            checked_at: Some(now),
            ..Record::not_checked("")
        },
        Err(no_answer) => {
            let counts = before
                .last_good
                .is_some_and(|t| now - t <= i64::try_from(good_for.as_secs()).unwrap_or(i64::MAX));
            let state = match before.state {
                // A revocation does not wear off because the responder went quiet.
                Revocation::Revoked { .. } => before.state,
                Revocation::Good if counts => Revocation::Good,
                _ => Revocation::Unreachable,
            };
            Record {
                state,
                checked_at: Some(now),
                last_good: before.last_good,
                source: before.source,
                problem: no_answer.to_string(),
            }
        }
    }
}

impl Agent {
    /// Checks every certificate's revocation once, now: at start-up (before serving) and
    /// from [`Agent::watch_revocation`]. Logs each change, an error for a revocation.
    pub(crate) async fn check_revocation(&self, checker: &Checker, good_for: Duration) {
        let keys = self.keys();
        // One certificate may serve several key names: asked about once a round.
        let mut asked = HashSet::new();
        for key in keys.versions() {
            let Some(chain) = key.chain() else { continue };
            let sha256 = key.certificate_sha256();
            if !asked.insert(sha256) {
                continue;
            }
            let before = self.revocation.get(sha256);
            let Some(issuer) = key.issuer() else {
                self.revocation.set(
                    sha256,
                    Record::not_checked(
                        "the issuer's certificate is not known: add the intermediate to the key's certificate chain, or the issuer's root to [trust]",
                    ),
                );
                continue;
            };
            let leaf = chain.der().next().unwrap_or_default();
            let now = unix_now();
            let after = next(
                before.clone(),
                checker.check(leaf, issuer, now).await,
                now,
                good_for,
            );
            log_change(key.name(), sha256, &before, &after);
            self.revocation.set(sha256, after);
        }
    }

    /// Records that no certificate is checked, and why.
    pub(crate) fn revocation_not_checked(&self, why: &str) {
        for key in self.keys().versions().filter(|k| k.chain().is_some()) {
            self.revocation
                .set(key.certificate_sha256(), Record::not_checked(why));
        }
    }

    /// Checks revocation every `[revocation] interval_seconds`, and at once after a
    /// reload (new keys), until the runtime stops.
    pub(crate) async fn watch_revocation(
        self: Arc<Self>,
        checker: Checker,
        settings: RevocationSettings,
    ) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(settings.interval) => {}
                () = self.revocation.recheck.notified() => {}
            }
            self.check_revocation(&checker, settings.good_for).await;
        }
    }

    /// What is known of revocation, for each certificate.
    pub(crate) fn revocation(&self) -> &RevocationBook {
        &self.revocation
    }
}

/// Logs a record that changed state, or a check that failed.
fn log_change(key: &str, sha256: &str, before: &Record, after: &Record) {
    let line = after.describe();
    match &after.state {
        Revocation::Revoked { .. } => tracing::error!(
            key,
            certificate_sha256 = sha256,
            status = %line,
            "the certificate is revoked: this key no longer signs (docs/operations.md, \"A revoked certificate\")"
        ),
        state if !after.problem.is_empty() => tracing::warn!(
            key,
            certificate_sha256 = sha256,
            revocation = state.name(),
            status = %line,
            "revocation check got no answer"
        ),
        Revocation::Unknown if before.state != Revocation::Unknown => tracing::warn!(
            key,
            certificate_sha256 = sha256,
            status = %line,
            "the CA's responder does not know this certificate: check that the chain is the one the CA issued (the key still signs)"
        ),
        state if *state != before.state => tracing::info!(
            key,
            certificate_sha256 = sha256,
            revocation = state.name(),
            status = %line,
            "revocation checked"
        ),
        _ => {
            tracing::debug!(key, certificate_sha256 = sha256, status = %line, "revocation checked")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Record, Revocation, next};
    use crate::revocation::{Answer, Attempt, NoAnswer, Reason, Source, Status};

    const DAY: i64 = 86_400;

    fn answer(status: Status) -> Result<Answer, NoAnswer> {
        Ok(Answer {
            status,
            source: Source::Ocsp,
            url: "http://ocsp.example/".into(),
            this_update: 0,
            next_update: None,
        })
    }

    fn silence() -> Result<Answer, NoAnswer> {
        Err(NoAnswer {
            attempts: vec![Attempt {
                url: "http://ocsp.example/".into(),
                problem: "connection refused".into(),
            }],
        })
    }

    #[test]
    fn a_good_answer_counts_for_good_for_then_the_state_is_unreachable() {
        let good_for = Duration::from_secs(7 * 86_400);
        let first = next(
            Record::not_checked("new"),
            answer(Status::Good),
            10 * DAY,
            good_for,
        );
        assert_eq!(first.state, Revocation::Good);
        assert_eq!(first.last_good, Some(10 * DAY));
        assert_eq!(first.source, "ocsp http://ocsp.example/");

        let quiet = next(first, silence(), 16 * DAY, good_for);
        assert_eq!(
            quiet.state,
            Revocation::Good,
            "within good_for the answer stands"
        );
        assert_eq!(
            quiet.problem,
            silence().err().map(|e| e.to_string()).unwrap_or_default()
        );
        assert!(
            quiet.describe().contains("last check"),
            "{}",
            quiet.describe()
        );

        let stale = next(quiet, silence(), 18 * DAY, good_for);
        assert_eq!(stale.state, Revocation::Unreachable);
        assert_eq!(
            stale.last_good,
            Some(10 * DAY),
            "the last good answer is kept"
        );
        assert_eq!(stale.checked_at, Some(18 * DAY));
    }

    #[test]
    fn a_revocation_stands_when_the_responder_goes_quiet() {
        let good_for = Duration::from_secs(DAY as u64);
        let revoked = next(
            Record::not_checked("new"),
            answer(Status::Revoked {
                at: 5 * DAY,
                reason: Some(Reason::KeyCompromise),
            }),
            6 * DAY,
            good_for,
        );
        assert_eq!(
            revoked.state,
            Revocation::Revoked {
                at: 5 * DAY,
                reason: Some("keyCompromise")
            }
        );
        let later = next(revoked.clone(), silence(), 30 * DAY, good_for);
        assert_eq!(later.state, revoked.state);
        assert!(
            later
                .describe()
                .starts_with("REVOKED on 1970-01-06T00:00:00Z (reason keyCompromise"),
            "{}",
            later.describe()
        );
    }

    #[test]
    fn never_answered_is_unreachable_and_no_responder_is_not_checked() {
        let good_for = Duration::from_secs(DAY as u64);
        let none = next(Record::not_checked("new"), silence(), DAY, good_for);
        assert_eq!(none.state, Revocation::Unreachable);
        let nowhere = next(
            Record::not_checked("new"),
            Err(NoAnswer {
                attempts: Vec::new(),
            }),
            DAY,
            good_for,
        );
        assert_eq!(nowhere.state.name(), "not_checked");
        let unknown = next(nowhere, answer(Status::Unknown), DAY, good_for);
        assert_eq!(unknown.state, Revocation::Unknown);
        assert_eq!(unknown.last_good, None);
    }
}
