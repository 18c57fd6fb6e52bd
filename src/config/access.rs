//! Who may reach the agent and what they may ask for: listeners, mutual TLS, the caller
//! policy and the audit log. Validated with the rest of the config, so an agent that would
//! accept unauthenticated callers on a network address never starts.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{ConfigError, Invalid};

/// Requests per second per caller when a policy rule sets no `requests_per_second`.
pub(crate) const DEFAULT_REQUESTS_PER_SECOND: u32 = 100;

/// Listeners and caller rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// TCP address, served with mutual TLS (or plain on loopback with `insecure`).
    pub listen: Option<SocketAddr>,
    /// Unix socket path and file mode; callers are known by their uid and gid.
    pub unix_socket: Option<UnixSocket>,
    /// Plain TCP on loopback, every caller `anonymous`. Logged as a warning at start-up.
    pub(crate) insecure: bool,
    /// Mutual TLS for the TCP listener.
    pub tls: Option<Tls>,
    /// Who may ask for what; default deny.
    pub policy: Vec<PolicyRule>,
    /// Where audit lines go; `None` is stderr.
    pub(crate) audit_file: Option<PathBuf>,
    /// How tokens served from the cache are audited.
    pub(crate) audit_cached: CachedAudit,
    /// `[audit] fail_closed`: a grant or token whose audit line cannot be written is
    /// refused (`UNAVAILABLE`) instead of answered; off, such lines are counted as lost.
    pub(crate) audit_fail_closed: bool,
}

/// How GetAccessToken answers served from the cache are audited. They are the agent's
/// most frequent answer and reveal nothing new (the grant behind the token is audited
/// when it is spent), so by default they are counted, not written one by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CachedAudit {
    /// One line per answer (`[audit] cached = "each"`).
    Each,
    /// One `"audit":"token_cached"` line per caller and request shape per interval, with
    /// the count (`[audit] cached = "summary"`, `summary_seconds`; the default, 60 s).
    Summary(std::time::Duration),
}

/// Default interval of cached-answer summaries.
const DEFAULT_AUDIT_SUMMARY_SECONDS: u64 = 60;

/// A Unix socket listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocket {
    /// Socket file path.
    pub path: PathBuf,
    /// File mode (e.g. 0o660: the agent's user and group).
    pub(crate) mode: u32,
}

/// Mutual TLS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// Server certificate chain (PEM).
    pub(crate) certificate: PathBuf,
    /// Server private key (PEM). The TLS key, not the signing key.
    pub(crate) key: PathBuf,
    /// CA bundle that caller certificates must chain to (PEM).
    pub(crate) client_ca: PathBuf,
    /// Which name in the caller's certificate identifies it.
    pub(crate) caller_identity: IdentityField,
}

/// The name in a client certificate that identifies the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdentityField {
    /// A subjectAltName URI (e.g. a SPIFFE id): `uri:...`.
    SanUri,
    /// A subjectAltName DNS name: `dns:...`.
    SanDns,
    /// The subject common name: `cn:...`.
    SubjectCn,
}

/// One policy rule: a caller and what it may request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    /// Who: `uri:`, `dns:`, `cn:`, `uid:`, `gid:` or `anonymous`.
    pub(crate) caller: String,
    /// Key names (empty request = the default key's name).
    pub(crate) keys: Vec<Pattern>,
    /// client_id values.
    pub(crate) client_ids: Vec<Pattern>,
    /// Scopes; every requested scope must match.
    pub(crate) scopes: Vec<Pattern>,
    /// Environment names.
    pub(crate) environments: Vec<Pattern>,
    /// Resources (audience-restricted token targets); every requested resource must match,
    /// and a request without resources is always fine.
    pub(crate) resources: Vec<Pattern>,
    /// consumer_org values a caller may delegate to; a request without one is always fine.
    pub(crate) consumer_orgs: Vec<Pattern>,
    /// authorization_details types a caller may ask for (e.g. `urn:altinn:systemuser`); a
    /// request without authorization_details is always fine.
    pub(crate) authorization_types: Vec<Pattern>,
    /// Whether a caller may ask for person-restricted tokens (`pid`); false unless set.
    pub(crate) allow_pid: bool,
    /// iss_onbehalfof values (customers) a supplier may act for; a request without one is
    /// always fine.
    pub(crate) iss_onbehalfof: Vec<Pattern>,
    /// Requests per second for each caller matching the rule, counted per caller identity
    /// (every uid matched by a `gid:` rule has its own).
    pub(crate) requests_per_second: u32,
    /// Requests a caller may make at once above the rate.
    pub(crate) burst: u32,
}

/// A value pattern: `*` (anything), `prefix*`, or an exact value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pattern(String);

impl Pattern {
    /// The one value an exact pattern matches; `None` for `*` and `prefix*`.
    pub(crate) fn exact(&self) -> Option<&str> {
        (!self.0.ends_with('*')).then_some(self.0.as_str())
    }

    /// Whether `value` matches.
    pub(crate) fn matches(&self, value: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => value.starts_with(prefix),
            None => value == self.0,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    certificate: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    caller_identity: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    caller: String,
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    client_ids: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    environments: Vec<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    consumer_orgs: Vec<String>,
    #[serde(default)]
    authorization_types: Vec<String>,
    #[serde(default)]
    allow_pid: bool,
    #[serde(default)]
    iss_onbehalfof: Vec<String>,
    requests_per_second: Option<u32>,
    burst: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    file: Option<PathBuf>,
    cached: Option<String>,
    summary_seconds: Option<u64>,
    #[serde(default)]
    fail_closed: bool,
}

/// The raw access settings, as they appear at the top level of the file.
pub(super) struct RawAccess {
    pub(super) listen: Option<String>,
    pub(super) unix_socket: Option<PathBuf>,
    pub(super) socket_mode: Option<String>,
    pub(super) insecure: bool,
    pub(super) tls: Option<RawTls>,
    pub(super) policy: Vec<RawPolicy>,
    pub(super) audit: Option<RawAudit>,
}

/// Validates the listeners, `[tls]`, `[[policy]]` and `[audit]`; relative paths resolve
/// against `base`.
pub(super) fn access(
    raw: RawAccess,
    base: &Path,
    invalid: Invalid<'_>,
) -> Result<Access, ConfigError> {
    let listen = listen(raw.listen.as_deref(), raw.unix_socket.is_some(), invalid)?;
    let tls = raw.tls.map(|t| tls(t, base, invalid)).transpose()?;
    check_transport(listen, tls.is_some(), raw.insecure, invalid)?;
    let unix_socket = match raw.unix_socket {
        None => None,
        Some(path) => Some(UnixSocket {
            path: base.join(path),
            mode: socket_mode(raw.socket_mode.as_deref(), invalid)?,
        }),
    };
    let policy = raw
        .policy
        .into_iter()
        .enumerate()
        .map(|(i, rule)| {
            policy_rule(
                rule,
                &|field| format!("policy[{i}].{field}"),
                raw.insecure,
                invalid,
            )
        })
        .collect::<Result<_, _>>()?;
    Ok(Access {
        listen,
        unix_socket,
        insecure: raw.insecure,
        tls,
        policy,
        audit_cached: cached_audit(raw.audit.as_ref(), invalid)?,
        audit_fail_closed: raw.audit.as_ref().is_some_and(|a| a.fail_closed),
        audit_file: raw.audit.and_then(|a| a.file).map(|f| base.join(f)),
    })
}

/// `listen`: an IP address and port; the default one unless only a Unix socket is set.
fn listen(
    text: Option<&str>,
    unix_socket: bool,
    invalid: Invalid<'_>,
) -> Result<Option<SocketAddr>, ConfigError> {
    let text = match (text, unix_socket) {
        (None, false) => super::DEFAULT_LISTEN,
        (None, true) => return Ok(None),
        (Some(text), _) => text,
    };
    text.parse::<SocketAddr>().map(Some).map_err(|_| {
        invalid(
            "listen",
            format!("{text:?} is not an IP address and port"),
            "write it as \"127.0.0.1:50051\" or \"[::1]:50051\"",
        )
    })
}

/// `[tls]`: the server's certificate and key, the CA of its callers, and the field that
/// names a caller.
fn tls(t: RawTls, base: &Path, invalid: Invalid<'_>) -> Result<Tls, ConfigError> {
    let caller_identity = match t.caller_identity.as_deref() {
        None | Some("san_uri") => IdentityField::SanUri,
        Some("san_dns") => IdentityField::SanDns,
        Some("subject_cn") => IdentityField::SubjectCn,
        Some(other) => {
            return Err(invalid(
                "tls.caller_identity",
                format!("{other:?} is not a certificate field the agent reads"),
                "use \"san_uri\", \"san_dns\" or \"subject_cn\"",
            ));
        }
    };
    Ok(Tls {
        certificate: base.join(t.certificate),
        key: base.join(t.key),
        client_ca: base.join(t.client_ca),
        caller_identity,
    })
}

/// A TCP listener identifies its callers by mutual TLS, or serves plain on loopback only
/// when `insecure` says so; `[tls]` needs a TCP listener and excludes `insecure`.
fn check_transport(
    listen: Option<SocketAddr>,
    tls: bool,
    insecure: bool,
    invalid: Invalid<'_>,
) -> Result<(), ConfigError> {
    match (listen, tls) {
        (Some(addr), false) if !addr.ip().is_loopback() => {
            return Err(invalid(
                "listen",
                format!(
                    "{addr} is not a loopback address, and there is no [tls]: anyone who reaches it could get grants"
                ),
                "configure [tls] with client_ca (mutual TLS), or serve callers on unix_socket",
            ));
        }
        (Some(addr), false) if !insecure => {
            return Err(invalid(
                "listen",
                format!("{addr} would serve plain TCP, where callers cannot be identified"),
                "configure [tls] with client_ca (mutual TLS), use unix_socket, or set insecure = true to accept every local process as `anonymous`",
            ));
        }
        (None, true) => {
            return Err(invalid(
                "tls",
                "is set but there is no TCP listener".into(),
                "set listen, or remove [tls]",
            ));
        }
        _ => {}
    }
    if insecure && tls {
        return Err(invalid(
            "insecure",
            "is set together with [tls]".into(),
            "remove insecure: with mutual TLS every caller is identified",
        ));
    }
    Ok(())
}

/// `socket_mode`: octal, with no access for others; 0660 by default.
fn socket_mode(text: Option<&str>, invalid: Invalid<'_>) -> Result<u32, ConfigError> {
    let Some(text) = text else {
        return Ok(0o660);
    };
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|m| *m <= 0o777 && m & 0o007 == 0)
        .ok_or_else(|| {
            invalid(
                "socket_mode",
                format!("{text:?} is not an octal mode without access for others"),
                "use \"0660\" (user and group) or \"0600\" (user only)",
            )
        })
}

/// One `[[policy]]` rule; `at` names its fields.
fn policy_rule(
    rule: RawPolicy,
    at: &dyn Fn(&str) -> String,
    insecure: bool,
    invalid: Invalid<'_>,
) -> Result<PolicyRule, ConfigError> {
    let caller = rule.caller;
    let known = match caller.split_once(':') {
        Some(("uri" | "dns" | "cn", rest)) => !rest.is_empty(),
        Some(("uid" | "gid", n)) => n.parse::<u32>().is_ok(),
        None => caller == "anonymous",
        Some(_) => false,
    };
    if !known {
        return Err(invalid(
            &at("caller"),
            format!("{caller:?} is not a caller the agent can identify"),
            "use uri:..., dns:..., cn:... (mutual TLS), uid:N or gid:N (unix socket), or anonymous (insecure loopback)",
        ));
    }
    if caller == "anonymous" && !insecure {
        return Err(invalid(
            &at("caller"),
            "anonymous callers exist only with insecure = true".into(),
            "identify the caller by certificate or uid, or set insecure = true on a loopback listener",
        ));
    }
    let requests_per_second = rule
        .requests_per_second
        .unwrap_or(DEFAULT_REQUESTS_PER_SECOND);
    if requests_per_second == 0 || rule.burst == Some(0) {
        return Err(invalid(
            &at("requests_per_second"),
            "a rate of 0 refuses everything".into(),
            "remove the rule to refuse the caller, or set a rate of at least 1",
        ));
    }
    let patterns = |field: &str, values: Vec<String>| patterns(values, &at(field), invalid);
    Ok(PolicyRule {
        caller,
        keys: patterns("keys", rule.keys)?,
        client_ids: patterns("client_ids", rule.client_ids)?,
        scopes: patterns("scopes", rule.scopes)?,
        environments: patterns("environments", rule.environments)?,
        resources: patterns("resources", rule.resources)?,
        consumer_orgs: patterns("consumer_orgs", rule.consumer_orgs)?,
        authorization_types: patterns("authorization_types", rule.authorization_types)?,
        allow_pid: rule.allow_pid,
        iss_onbehalfof: patterns("iss_onbehalfof", rule.iss_onbehalfof)?,
        requests_per_second,
        burst: rule.burst.unwrap_or(requests_per_second),
    })
}

/// A policy list's values: exact, a prefix ending in `*`, or `*`.
fn patterns(
    values: Vec<String>,
    key: &str,
    invalid: Invalid<'_>,
) -> Result<Vec<Pattern>, ConfigError> {
    values
        .into_iter()
        .map(|v| {
            if v.is_empty() || v[..v.len() - 1].contains('*') {
                Err(invalid(
                    key,
                    format!("{v:?} is not a pattern"),
                    "use an exact value, a prefix ending in * (\"nav:*\"), or \"*\"",
                ))
            } else {
                Ok(Pattern(v))
            }
        })
        .collect()
}

fn cached_audit(raw: Option<&RawAudit>, invalid: Invalid<'_>) -> Result<CachedAudit, ConfigError> {
    let seconds = raw
        .and_then(|a| a.summary_seconds)
        .unwrap_or(DEFAULT_AUDIT_SUMMARY_SECONDS);
    if !(1..=3600).contains(&seconds) {
        return Err(invalid(
            "audit.summary_seconds",
            format!("{seconds} is outside 1..=3600"),
            "summaries are written every summary_seconds; 60 is the default",
        ));
    }
    match raw.and_then(|a| a.cached.as_deref()) {
        None | Some("summary") => Ok(CachedAudit::Summary(std::time::Duration::from_secs(
            seconds,
        ))),
        Some("each") => Ok(CachedAudit::Each),
        Some(other) => Err(invalid(
            "audit.cached",
            format!("{other:?} is not a choice"),
            "use \"summary\" (counts per caller per summary_seconds) or \"each\" (one line per answer)",
        )),
    }
}
