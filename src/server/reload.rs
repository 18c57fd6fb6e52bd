//! Reloading the config on SIGHUP: keys, certificates, environments, the default key
//! and the policy. The `[tls]` files are reloaded by `tls::TlsMaterial`, which listens
//! for SIGHUP too; what else a reload cannot apply is named in a warning.

use std::{path::PathBuf, sync::Arc};
use tokio::signal::unix::Signal;

use crate::{agent::Agent, config::Config};

use super::policy::Policy;

/// What a SIGHUP reload reads again and compares the new config with.
pub(super) struct Reload {
    pub(super) path: PathBuf,
    pub(super) access: crate::config::Access,
    pub(super) token: crate::config::TokenSettings,
    pub(super) limits: crate::config::Limits,
}

/// Why a SIGHUP reload changed nothing.
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    /// The file does not load or validate.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The agent refused the new keys (or a changed `[pkcs11]`).
    #[error(transparent)]
    Start(#[from] crate::agent::StartError),
    /// The blocking task that reads the file and the token did not finish.
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

/// Reloads the config on SIGHUP: keys, certificates, environments, the default key and
/// the policy take effect for the next request; in-flight requests finish with the old
/// ones. A config that fails to load or validate is logged and nothing changes.
pub(super) async fn reload_on_hangup(
    agent: Arc<Agent>,
    policy: Arc<Policy>,
    reload: Reload,
    mut hangup: Signal,
) {
    let Reload {
        path,
        access: running,
        token: running_token,
        limits: running_limits,
    } = reload;
    while hangup.recv().await.is_some() {
        let agent = Arc::clone(&agent);
        let file = path.clone();
        let result = tokio::task::spawn_blocking(move || {
            let config = Config::load(&file)?;
            agent.reload(&config)?;
            Ok::<_, ReloadError>(config)
        })
        .await
        .map_err(ReloadError::from)
        .and_then(|r| r);
        match result {
            Ok(config) => {
                policy.replace(&config.access.policy);
                tracing::info!(
                    config = %path.display(),
                    versions = config.keys.len(),
                    rules = config.access.policy.len(),
                    "reloaded"
                );
                let listeners_changed = config.access.listen != running.listen
                    || config.access.unix_socket != running.unix_socket
                    || config.access.tls != running.tls
                    || config.access.insecure != running.insecure
                    || config.access.audit_file != running.audit_file
                    || config.access.audit_fail_closed != running.audit_fail_closed;
                if listeners_changed {
                    tracing::warn!(
                        "listeners, [tls] paths or caller_identity, insecure or [audit] changed; restart the agent to apply them (the [tls] files themselves reload without one)"
                    );
                }
                if config.token != running_token {
                    tracing::warn!("[token] changed; restart the agent to apply it");
                }
                if config.limits != running_limits {
                    tracing::warn!("[limits] changed; restart the agent to apply them");
                }
            }
            Err(error) => {
                tracing::error!(config = %path.display(), %error, "reload failed; keeping the running keys");
            }
        }
    }
}
