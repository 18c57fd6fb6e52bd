//! The commands that are more than a call into the library: talking to a running agent
//! (`client`) and managing keys and certificates in the token (`key`, `cert`).

mod client;
mod key;

pub(crate) use client::{ClientCommand, client};
pub(crate) use key::{CertCommand, KeyCommand, cert_command, key_command};
