//! The `[token]` section: how the agent reaches Maskinporten's token endpoint and how long
//! it keeps access tokens. Also the check for token endpoint URLs, shared with
//! `[environments]`.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::{ConfigError, Invalid, within};

/// Token exchange and cache settings, with the defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSettings {
    /// HTTP(S) proxy for every token request (e.g. `http://proxy.internal:3128`). Without
    /// it the standard `HTTPS_PROXY`/`NO_PROXY` environment variables apply.
    pub(crate) proxy: Option<String>,
    /// Hosts reached without the proxy, comma-separated as in `NO_PROXY`.
    pub(crate) no_proxy: Option<String>,
    /// Extra trust anchors (PEM) besides the system's and the Mozilla roots: a
    /// TLS-inspecting proxy's CA, or a test CA for a local Maskinporten.
    pub(crate) ca_file: Option<PathBuf>,
    /// How long a request may take in all, retries included, when the caller sends no
    /// deadline.
    pub(crate) timeout: Duration,
    /// Tries per request (the first and the retries); each try signs a new grant.
    pub(crate) attempts: u32,
    /// A cached token is used until this long before it expires (at most a quarter of
    /// its lifetime), so callers never get a token about to lapse in flight.
    pub(crate) expiry_margin: Duration,
    /// A cached token used within this long of going stale (at most a quarter of its
    /// lifetime) is refreshed in the background, so hot entries never wait for Maskinporten.
    pub(crate) refresh_ahead: Duration,
    /// Most cache entries; beyond it expired, then least recently used, entries go.
    pub(crate) cache_entries: usize,
}

impl Default for TokenSettings {
    fn default() -> Self {
        TokenSettings {
            proxy: None,
            no_proxy: None,
            ca_file: None,
            timeout: Duration::from_secs(30),
            attempts: 4,
            expiry_margin: Duration::from_secs(30),
            refresh_ahead: Duration::from_secs(60),
            cache_entries: 10_000,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawToken {
    proxy: Option<String>,
    no_proxy: Option<String>,
    ca_file: Option<PathBuf>,
    timeout_seconds: Option<u64>,
    attempts: Option<u32>,
    expiry_margin_seconds: Option<u64>,
    refresh_ahead_seconds: Option<u64>,
    cache_entries: Option<usize>,
}

/// Validates `[token]`; a relative `ca_file` resolves against `base`.
pub(super) fn token(
    raw: Option<RawToken>,
    base: &Path,
    invalid: Invalid<'_>,
) -> Result<TokenSettings, ConfigError> {
    let defaults = TokenSettings::default();
    let Some(raw) = raw else {
        return Ok(defaults);
    };
    if let Some(proxy) = &raw.proxy {
        let ok = reqwest::Url::parse(proxy)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !ok {
            return Err(invalid(
                "token.proxy",
                format!("{proxy:?} is not an http(s) proxy URL"),
                "write it as \"http://proxy.example.no:3128\"",
            ));
        }
    }
    let seconds = |key: &str, value: Option<u64>, default: Duration, range: (u64, u64)| match value
    {
        None => Ok(default),
        Some(s) if (range.0..=range.1).contains(&s) => Ok(Duration::from_secs(s)),
        Some(s) => Err(invalid(
            &format!("token.{key}"),
            format!("{s} is out of range"),
            &format!("use {} to {} seconds", range.0, range.1),
        )),
    };
    let attempts = within(
        "token.attempts",
        raw.attempts,
        1..=10,
        defaults.attempts,
        "use 1 (no retries) to 10",
        invalid,
    )?;
    let cache_entries = within(
        "token.cache_entries",
        raw.cache_entries,
        1..=1_000_000,
        defaults.cache_entries,
        "use 1 to 1000000",
        invalid,
    )?;
    Ok(TokenSettings {
        proxy: raw.proxy,
        no_proxy: raw.no_proxy,
        ca_file: raw.ca_file.map(|f| base.join(f)),
        timeout: seconds(
            "timeout_seconds",
            raw.timeout_seconds,
            defaults.timeout,
            (1, 600),
        )?,
        attempts,
        expiry_margin: seconds(
            "expiry_margin_seconds",
            raw.expiry_margin_seconds,
            defaults.expiry_margin,
            (0, 3600),
        )?,
        refresh_ahead: seconds(
            "refresh_ahead_seconds",
            raw.refresh_ahead_seconds,
            defaults.refresh_ahead,
            (0, 3600),
        )?,
        cache_entries,
    })
}

/// Why `url` cannot be a token endpoint or issuer, if it cannot: it must be HTTPS, or plain
/// HTTP to a loopback address (a local Maskinporten), since the assertion it carries is a
/// credential.
pub(crate) fn endpoint_problem(url: &str) -> Option<String> {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return Some(format!("{url:?} is not a URL"));
    };
    match parsed.scheme() {
        "https" if parsed.host().is_some() => None,
        "http" => {
            let host = parsed.host_str().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let loopback =
                host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
            (!loopback).then(|| {
                format!("{url:?} is plain HTTP to another host, which would expose grants")
            })
        }
        _ => Some(format!("{url:?} is not an https URL")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_https_or_loopback_http() {
        assert_eq!(endpoint_problem("https://test.maskinporten.no/token"), None);
        assert_eq!(endpoint_problem("http://127.0.0.1:9000/token"), None);
        assert_eq!(endpoint_problem("http://[::1]:9000/"), None);
        assert_eq!(endpoint_problem("http://localhost:9000/"), None);
        assert!(
            endpoint_problem("http://maskinporten.no/token")
                .is_some_and(|p| p.contains("plain HTTP"))
        );
        assert!(endpoint_problem("ftp://x/").is_some_and(|p| p.contains("not an https URL")));
        assert!(endpoint_problem("token").is_some_and(|p| p.contains("not a URL")));
    }
}
