//! Who is calling, as the transport proves it: the client certificate on mutual TLS, the
//! peer's uid and gid on the Unix socket (SO_PEERCRED), or `anonymous` on an insecure
//! loopback listener. Identities are strings in the policy's own form (`uri:...`,
//! `uid:1000`), so matching is plain comparison.

use tonic::{Request, transport::server::UdsConnectInfo};

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
}

/// How callers are identified on this agent's listeners.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Identification {
    pub(crate) field: IdentityField,
    pub(crate) insecure: bool,
}

impl Identification {
    pub(crate) fn identify<T>(&self, request: &Request<T>) -> Caller {
        if let Some(info) = request.extensions().get::<UdsConnectInfo>() {
            let identities = info
                .peer_cred
                .map(|cred| vec![format!("uid:{}", cred.uid()), format!("gid:{}", cred.gid())])
                .unwrap_or_default();
            return Caller { identities };
        }
        if let Some(chain) = request.peer_certs() {
            let identities = chain
                .first()
                .and_then(|leaf| ClientCertificate::parse(leaf.as_ref()).ok())
                .map(|cert| match self.field {
                    IdentityField::SanUri => prefixed("uri", cert.uris),
                    IdentityField::SanDns => prefixed("dns", cert.dns_names),
                    IdentityField::SubjectCn => {
                        prefixed("cn", cert.common_name.into_iter().collect())
                    }
                })
                .unwrap_or_default();
            return Caller { identities };
        }
        Caller {
            identities: if self.insecure {
                vec!["anonymous".to_owned()]
            } else {
                Vec::new()
            },
        }
    }
}

fn prefixed(kind: &str, values: Vec<String>) -> Vec<String> {
    values.into_iter().map(|v| format!("{kind}:{v}")).collect()
}
