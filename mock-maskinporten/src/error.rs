//! Why the mock cannot start: its config, its TLS files, its address or its key.

use std::net::SocketAddr;

use grant_agent::config::ConfigError;

/// Why the mock cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MockError {
    /// The config file is unreadable or invalid; the message names the file, key and fix.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS certificate or key cannot be used.
    #[error("{file}: {problem}")]
    Tls {
        /// The PEM file.
        file: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No signing key is configured and generating one failed.
    #[error("cannot generate the access-token signing key: {0}")]
    KeyGeneration(String),
}
