//! Each key version as an operator sees it: certificate, expiry, chain and revocation.
//! ListKeys sends it, `grant-agent cert check` prints it, health and metrics read it.

use crate::cert::{CertEnvironment, CertificateChain};

use super::{Agent, revocation::Record, revocation::Revocation};

/// One key version's status at one moment.
#[derive(Debug, Clone)]
pub struct KeyReport {
    /// The configured name.
    pub name: String,
    /// JWS algorithm.
    pub algorithm: &'static str,
    /// The leaf's subject (RFC 4514); empty for a `kid` key.
    pub subject: String,
    /// The leaf's issuer (RFC 4514).
    pub issuer: String,
    /// The organisation number in the certificate.
    pub organization_number: String,
    /// Unix seconds; 0 when unbounded.
    pub not_before: i64,
    /// Unix seconds; 0 when unbounded.
    pub not_after: i64,
    /// Lowercase hex SHA-256 of the leaf.
    pub certificate_sha256: String,
    /// The key a request without `key` gets.
    pub is_default: bool,
    /// "test", "prod" or "unknown"; empty for a `kid` key.
    pub environment: &'static str,
    /// Whole days until `not_after`.
    pub days_to_expiry: i64,
    /// `not_after` is within `expiry_warning_days`.
    pub expires_soon: bool,
    /// This version signs now for its name.
    pub active: bool,
    /// The registered key id of a `kid` key.
    pub kid: String,
    /// "valid", "untrusted" or "invalid"; empty for a `kid` key.
    pub chain_status: &'static str,
    /// The root reached, or what is wrong.
    pub chain_detail: String,
    /// "good", "revoked", "unknown", "unreachable", "not_checked"; empty for a `kid` key.
    pub revocation_status: &'static str,
    /// Unix seconds of the last check; 0 before the first.
    pub revocation_checked_at: i64,
    /// Unix seconds of the last good answer; 0 for none.
    pub revocation_last_good: i64,
    /// Unix seconds of the revocation; 0 unless revoked.
    pub revoked_at: i64,
    /// The CRL reason's name, when revoked.
    pub revocation_reason: &'static str,
    /// One line: source, time of check, last problem.
    pub revocation_detail: String,
}

impl Agent {
    /// Every key version, by name then file order, as it stands at `now`.
    pub fn report(&self, now: i64) -> Vec<KeyReport> {
        let keys = self.keys();
        let window = i64::from(keys.expiry_warning_days) * 86_400;
        keys.versions()
            .map(|key| {
                let (not_before, not_after) = key.validity();
                let chain = key.chain();
                let revocation = chain.map(|_| self.revocation.get(key.certificate_sha256()));
                let (revoked_at, revocation_reason) = match revocation.as_ref().map(|r| &r.state) {
                    Some(Revocation::Revoked { at, reason }) => (*at, reason.unwrap_or("")),
                    _ => (0, ""),
                };
                KeyReport {
                    name: key.name().to_owned(),
                    algorithm: key.algorithm().jws_name(),
                    subject: chain.map(CertificateChain::subject).unwrap_or_default(),
                    issuer: chain.map(CertificateChain::issuer).unwrap_or_default(),
                    organization_number: chain
                        .and_then(CertificateChain::organization_number)
                        .unwrap_or_default(),
                    not_before: not_before.unwrap_or_default(),
                    not_after: not_after.unwrap_or_default(),
                    certificate_sha256: key.certificate_sha256().to_owned(),
                    is_default: key.name() == keys.default_key(),
                    environment: key.environment().map_or("", CertEnvironment::name),
                    days_to_expiry: not_after.map_or(0, |t| (t - now).div_euclid(86_400)),
                    expires_soon: not_after.is_some_and(|t| t - now <= window),
                    active: keys
                        .select(key.name(), now)
                        .is_ok_and(|active| std::ptr::eq(active, key)),
                    kid: key.kid().unwrap_or_default().to_owned(),
                    chain_status: key.chain_status().map_or("", |s| s.name()),
                    chain_detail: key.chain_status().map(|s| s.detail()).unwrap_or_default(),
                    revocation_status: revocation.as_ref().map_or("", |r| r.state.name()),
                    revocation_checked_at: revocation
                        .as_ref()
                        .and_then(|r| r.checked_at)
                        .unwrap_or_default(),
                    revocation_last_good: revocation
                        .as_ref()
                        .and_then(|r| r.last_good)
                        .unwrap_or_default(),
                    revoked_at,
                    revocation_reason,
                    revocation_detail: revocation
                        .as_ref()
                        .map(Record::describe)
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Whether the key `name` can sign now: a version valid now and not revoked. What
    /// health says for the key's service name (`key/<name>`), beside the token's state.
    pub(crate) fn key_usable(&self, name: &str, now: i64) -> bool {
        self.keys().select(name, now).is_ok()
    }

    /// The configured key names.
    pub(crate) fn key_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .keys()
            .versions()
            .map(|k| k.name().to_owned())
            .collect();
        names.dedup();
        names
    }
}
