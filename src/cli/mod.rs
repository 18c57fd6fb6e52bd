//! The commands that are more than a call into the library: talking to a running agent
//! (`client`), managing keys and certificates in the token (`key`, `cert`), and checking
//! the certificates before a rollout (`cert check`).

mod check;
mod client;
mod key;

pub(crate) use client::{ClientCommand, client};
pub(crate) use key::{CertCommand, KeyCommand, cert_command, key_command};
