//! The certificate, key and client CA that new handshakes use, read again on SIGHUP and
//! when the `[tls]` files change, so certificates can rotate without a restart.
//!
//! A connection keeps the configuration it was handshaken with: a reload touches only
//! connections made after it. A reload that fails (a file unreadable, garbled, a key that
//! is not the certificate's, a CA bundle without a usable CA) keeps the previous material
//! and logs one error line naming the file, so a half-written rotation never takes the
//! listener down.
//!
//! The files are polled rather than watched with inotify: Kubernetes secret volumes and
//! spiffe-helper replace them by renaming or by swapping a symlink (`..data`), which a
//! watch on the file itself misses and a watch on its folder sees as a burst of events.
//! Reading three small files once a second sees every way of replacing them, with no
//! descriptor per folder and no dependency.

use std::{
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::{
    config::Tls,
    metrics::Metrics,
    server::{conn::lock, policy::Policy},
};

use super::super::ServeError;

/// How often the files are compared with what was last loaded.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// How long the files must stay the same after a change before they are loaded: a
/// rotation writes the certificate, the key and the bundle one after the other, and
/// loading between two of those writes would log a mismatch that fixes itself.
const SETTLE: Duration = Duration::from_millis(300);

/// The bytes of the certificate, key and client CA files (`None`: unreadable).
type Contents = [Option<Vec<u8>>; 3];

/// The TLS configuration new handshakes use, swapped whole on a successful reload.
pub(in crate::server) struct TlsMaterial {
    settings: Tls,
    policy: Arc<Policy>,
    metrics: Arc<Metrics>,
    current: RwLock<Arc<rustls::ServerConfig>>,
    /// The files as last loaded or tried, so a broken file is reported once, not at
    /// every poll.
    seen: Mutex<Contents>,
}

impl TlsMaterial {
    /// Reads the files of `settings`; at start-up a failure stops the agent.
    pub(in crate::server) fn load(
        settings: &Tls,
        policy: Arc<Policy>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, ServeError> {
        let seen = contents(settings);
        let loaded = super::load(settings, Arc::clone(&policy))?;
        metrics.tls_certificate(loaded.sha256.clone(), loaded.not_after);
        tracing::info!(
            subject = %loaded.subject,
            certificate_sha256 = %loaded.sha256,
            not_after = %crate::agent::rfc3339(loaded.not_after),
            "TLS certificate loaded"
        );
        Ok(Arc::new(TlsMaterial {
            settings: settings.clone(),
            policy,
            metrics,
            current: RwLock::new(loaded.config),
            seen: Mutex::new(seen),
        }))
    }

    /// An acceptor with the material current now, for one handshake.
    pub(in crate::server) fn acceptor(&self) -> TlsAcceptor {
        let current = match self.current.read() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        TlsAcceptor::from(Arc::clone(&current))
    }

    /// Reloads on SIGHUP and when the files change, until `stopped` changes.
    /// `hangup` is `None` where SIGHUP cannot be listened for.
    pub(in crate::server) async fn watch(
        self: Arc<Self>,
        mut stopped: watch::Receiver<bool>,
        mut hangup: Option<tokio::signal::unix::Signal>,
    ) {
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let hung_up = async {
                match hangup.as_mut() {
                    Some(hangup) => hangup.recv().await,
                    None => std::future::pending().await,
                }
            };
            let trigger = tokio::select! {
                _ = stopped.changed() => return,
                Some(()) = hung_up => Trigger::Hangup,
                _ = tick.tick() => Trigger::Poll,
            };
            let material = Arc::clone(&self);
            if let Err(error) = tokio::task::spawn_blocking(move || material.check(trigger)).await {
                tracing::error!(%error, "the TLS reload task failed");
            }
        }
    }

    /// On a poll, reloads when the files changed and then held still for [`SETTLE`]; on
    /// SIGHUP, reloads whatever they hold.
    fn check(&self, trigger: Trigger) {
        let now = contents(&self.settings);
        if let Trigger::Poll = trigger {
            if now == *lock(&self.seen) {
                return;
            }
            std::thread::sleep(SETTLE);
            if contents(&self.settings) != now {
                return;
            }
        }
        *lock(&self.seen) = now;
        self.reload(trigger);
    }

    /// Loads the files; on success new handshakes use them, on failure the previous
    /// material stays and the error (naming the file) is logged.
    fn reload(&self, trigger: Trigger) {
        match super::load(&self.settings, Arc::clone(&self.policy)) {
            Ok(loaded) => {
                *match self.current.write() {
                    Ok(current) => current,
                    Err(poisoned) => poisoned.into_inner(),
                } = loaded.config;
                self.metrics.tls_reload("ok");
                self.metrics
                    .tls_certificate(loaded.sha256.clone(), loaded.not_after);
                tracing::info!(
                    trigger = trigger.name(),
                    subject = %loaded.subject,
                    certificate_sha256 = %loaded.sha256,
                    not_after = %crate::agent::rfc3339(loaded.not_after),
                    "TLS files reloaded; new connections use them"
                );
            }
            Err(error) => {
                self.metrics.tls_reload("failed");
                tracing::error!(
                    trigger = trigger.name(),
                    %error,
                    "TLS reload failed; new connections keep the previous certificate, key and client CA"
                );
            }
        }
    }
}

/// What made the agent look at the files.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    Hangup,
    Poll,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Trigger::Hangup => "SIGHUP",
            Trigger::Poll => "file change",
        }
    }
}

fn contents(settings: &Tls) -> Contents {
    [&settings.certificate, &settings.key, &settings.client_ca].map(|path| std::fs::read(path).ok())
}
