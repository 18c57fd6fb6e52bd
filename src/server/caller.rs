//! Who is calling, as the transport proves it: the client certificate on mutual TLS, the
//! peer's uid and gid on the Unix socket (SO_PEERCRED), or `anonymous` on an insecure
//! loopback listener. Identities are strings in the policy's own form (`uri:...`,
//! `uid:1000`), so matching is plain comparison.
//!
//! A caller is identified once per connection, when it is accepted (`conn`), and every
//! request on that connection carries the result as a [`Peer`] extension.
//!
//! A `gid:` rule matches the peer's primary group only: SO_PEERCRED reports no
//! supplementary groups, and reading them from `/proc` would race with the peer's exit.

use std::sync::Arc;

use crate::{cert::ClientCertificate, config::IdentityField};

/// A caller's identities, strongest first. Empty when the transport proved nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    pub(crate) identities: Vec<String>,
}

impl Caller {
    /// The name used in audit lines and messages.
    pub(crate) fn name(&self) -> &str {
        self.identities
            .first()
            .map_or("unidentified", String::as_str)
    }

    /// A Unix socket peer, by its credentials.
    pub(crate) fn unix(uid: u32, gid: u32) -> Self {
        Caller {
            identities: vec![format!("uid:{uid}"), format!("gid:{gid}")],
        }
    }

    /// A peer on a plain listener: `anonymous` where `insecure` allows it, else nobody.
    pub(crate) fn plain(insecure: bool) -> Self {
        Caller {
            identities: if insecure {
                vec!["anonymous".to_owned()]
            } else {
                Vec::new()
            },
        }
    }

    /// A mutual-TLS peer, by the configured field of its (already verified) leaf
    /// certificate.
    pub(crate) fn certificate(leaf: &[u8], field: IdentityField) -> Self {
        let identities = ClientCertificate::parse(leaf)
            .map(|cert| match field {
                IdentityField::SanUri => prefixed("uri", cert.uris),
                IdentityField::SanDns => prefixed("dns", cert.dns_names),
                IdentityField::SubjectCn => prefixed("cn", cert.common_name.into_iter().collect()),
            })
            .unwrap_or_default();
        Caller { identities }
    }
}

/// The connection a request came on: who, and from where. Inserted into every request's
/// extensions by `conn`; shared, so that passing it on costs no allocation per request.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) caller: Arc<Caller>,
    /// `ip:port` on TCP, `unix` on the socket.
    pub(crate) address: Arc<str>,
}

impl Peer {
    pub(crate) fn new(caller: Caller, address: &str) -> Self {
        Peer {
            caller: Arc::new(caller),
            address: Arc::from(address),
        }
    }
}

fn prefixed(kind: &str, values: Vec<String>) -> Vec<String> {
    values.into_iter().map(|v| format!("{kind}:{v}")).collect()
}
