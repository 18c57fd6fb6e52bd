//! How to reach the token and find keys in it: plain data, filled in by the config.

use std::{fmt, path::PathBuf};

use super::PinSource;

/// How to reach the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 shared library.
    pub(crate) module: PathBuf,
    /// Which token: by label (slot numbers move; labels do not), serial number or slot id.
    pub(crate) token: TokenSelector,
    /// Where the user PIN comes from.
    pub pin: PinSource,
    /// Sessions in the signing pool.
    pub(crate) sessions: usize,
    /// Requests that may wait for a session; more are refused at once.
    pub(crate) queue: usize,
}

/// How the token is found among the module's slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenSelector {
    /// By token label (`token_label`).
    Label(String),
    /// By token serial number (`token_serial`).
    Serial(String),
    /// By slot id (`slot_id`), for modules whose slots are fixed (opencryptoki, some HSMs).
    Slot(u64),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(label) => write!(f, "labelled \"{label}\""),
            TokenSelector::Serial(serial) => write!(f, "with serial number \"{serial}\""),
            TokenSelector::Slot(slot) => write!(f, "in slot {slot}"),
        }
    }
}

/// How a private key is found in the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLocator {
    /// By `CKA_LABEL`.
    Label(String),
    /// By `CKA_ID` (bytes, given in the file as hex).
    Id(Vec<u8>),
}

impl std::fmt::Display for KeyLocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyLocator::Label(label) => write!(f, "label \"{label}\""),
            KeyLocator::Id(id) => write!(f, "id {}", crate::hex::encode(id)),
        }
    }
}
