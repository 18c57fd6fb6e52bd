//! `[limits]`: what a peer may make the agent hold before (and after) it is known.
//!
//! Every resource a connection can tie up has a bound here, with a default chosen so
//! that the worst case of all defaults together stays a known figure (docs/security.md
//! gives the table and the formula). The defaults are for an agent serving a few hundred
//! services; an operator changes them only with a reason.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Invalid};

/// The connection and HTTP/2 limits of the gRPC listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Connections open at once over all listeners. Clamped at start to the open-files
    /// limit less a reserve for the token, the audit and the metrics.
    pub(crate) max_connections: usize,
    /// Connections open at once from one peer: an IP address on TCP, a uid on the socket.
    pub(crate) max_connections_per_peer: usize,
    /// Connections still in their TLS handshake or before their HTTP/2 preface. When
    /// full, the oldest of them is closed to make room, so junk that never speaks cannot
    /// keep a real caller out.
    pub(crate) max_unauthenticated: usize,
    /// From accept until the TLS handshake is done and the first bytes (the HTTP/2
    /// preface, or an HTTP/1.1 request line) have arrived.
    pub(crate) handshake_timeout: Duration,
    /// A connection with no call in flight for this long is closed (GOAWAY first).
    pub(crate) idle_timeout: Duration,
    /// HTTP/2 PING interval; a peer that does not answer within the same time is
    /// dropped, so a vanished peer does not hold its connection.
    pub(crate) keepalive_interval: Duration,
    /// HTTP/2 streams (calls) open at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub(crate) max_concurrent_streams: u32,
    /// HTTP/2 flow-control window of one stream: request bytes a peer may send on one
    /// call before the agent has read them.
    pub(crate) window_bytes: u32,
    /// HTTP/2 flow-control window of a whole connection. At least `window_bytes`. h2
    /// also sizes its allowance for small DATA frames from it (half the window): below
    /// ~128 KiB, a burst of cancelled calls trips that allowance and ends the connection
    /// with ENHANCE_YOUR_CALM, taking its other calls along.
    pub(crate) connection_window_bytes: u32,
    /// Largest header list of one request (SETTINGS_MAX_HEADER_LIST_SIZE).
    pub(crate) max_header_list_bytes: u32,
    /// Streams a peer may cancel before the agent has taken them up, per connection; more
    /// is an HTTP/2 rapid-reset attack and ends the connection. Set well above
    /// `max_concurrent_streams` (four times), so callers that give up on many calls at once
    /// (tiny deadlines), storm after storm on a busy machine, never cost the calls they did
    /// not give up. Each holds its request's headers until it is taken up.
    pub(crate) max_pending_resets: usize,
    /// Request bytes buffered at once over all calls, before their messages are decoded.
    /// A request that would go over is refused at once with RESOURCE_EXHAUSTED.
    pub(crate) max_buffered_request_bytes: usize,
    /// How long a call may take to send its whole request message; on HTTP/1.1 also its
    /// head, and how long a keep-alive connection may idle between requests.
    pub(crate) request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_connections_per_peer: 256,
            max_unauthenticated: 128,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            max_concurrent_streams: 100,
            window_bytes: 64 * 1024,
            connection_window_bytes: 128 * 1024,
            max_header_list_bytes: 8 * 1024,
            max_pending_resets: 400,
            max_buffered_request_bytes: 16 * 1024 * 1024,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// `[limits]` as written; every key optional.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    max_connections: Option<usize>,
    max_connections_per_peer: Option<usize>,
    max_unauthenticated: Option<usize>,
    handshake_timeout_seconds: Option<u64>,
    idle_timeout_seconds: Option<u64>,
    keepalive_interval_seconds: Option<u64>,
    max_concurrent_streams: Option<u32>,
    window_bytes: Option<u32>,
    connection_window_bytes: Option<u32>,
    max_header_list_bytes: Option<u32>,
    max_pending_resets: Option<usize>,
    max_buffered_request_bytes: Option<usize>,
    request_timeout_seconds: Option<u64>,
}

/// Largest request message accepted, far above any valid grant request (see `grant` for
/// the per-field limits), so an oversized message is refused before it is read.
pub(crate) const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Smallest HTTP/2 window (RFC 9113's initial value); the largest is 2^31 - 1.
const MIN_WINDOW: u32 = 65_535;

/// Smallest connection window: h2 allows a connection half its window in the overhead of
/// small DATA frames not yet read, and 64 KiB of it covers 256 cancelled gRPC requests.
const MIN_CONNECTION_WINDOW: u32 = 128 * 1024;

/// Validates `[limits]`; every key left out takes its default.
pub(super) fn limits(raw: Option<RawLimits>, invalid: Invalid<'_>) -> Result<Limits, ConfigError> {
    let raw = raw.unwrap_or_default();
    let d = Limits::default();
    let (window, connection_window, header) = http2_sizes(&raw, &d, invalid)?;
    // A count of at least 1, or the default.
    let count = |key: &str, value: Option<usize>, default: usize| {
        not_zero(key, value, "0 would refuse every caller", invalid).map(|n| n.unwrap_or(default))
    };
    let seconds = |key: &str, value: Option<u64>, default: Duration| {
        seconds_limit(key, value, default, invalid)
    };
    let streams = count(
        "max_concurrent_streams",
        raw.max_concurrent_streams.map(|n| n as usize),
        d.max_concurrent_streams as usize,
    )?;
    let limits = Limits {
        max_connections: count("max_connections", raw.max_connections, d.max_connections)?,
        max_connections_per_peer: count(
            "max_connections_per_peer",
            raw.max_connections_per_peer,
            d.max_connections_per_peer,
        )?,
        max_unauthenticated: count(
            "max_unauthenticated",
            raw.max_unauthenticated,
            d.max_unauthenticated,
        )?,
        handshake_timeout: seconds(
            "handshake_timeout_seconds",
            raw.handshake_timeout_seconds,
            d.handshake_timeout,
        )?,
        idle_timeout: seconds(
            "idle_timeout_seconds",
            raw.idle_timeout_seconds,
            d.idle_timeout,
        )?,
        keepalive_interval: seconds(
            "keepalive_interval_seconds",
            raw.keepalive_interval_seconds,
            d.keepalive_interval,
        )?,
        max_concurrent_streams: u32::try_from(streams).unwrap_or(u32::MAX),
        window_bytes: window,
        connection_window_bytes: connection_window,
        max_header_list_bytes: header,
        max_pending_resets: count(
            "max_pending_resets",
            raw.max_pending_resets,
            d.max_pending_resets,
        )?,
        max_buffered_request_bytes: count(
            "max_buffered_request_bytes",
            raw.max_buffered_request_bytes,
            d.max_buffered_request_bytes,
        )?,
        request_timeout: seconds(
            "request_timeout_seconds",
            raw.request_timeout_seconds,
            d.request_timeout,
        )?,
    };
    if limits.max_buffered_request_bytes < MAX_REQUEST_BYTES {
        return Err(invalid(
            "limits.max_buffered_request_bytes",
            format!(
                "{} bytes cannot hold one request of the largest size ({} bytes)",
                limits.max_buffered_request_bytes, MAX_REQUEST_BYTES
            ),
            "set at least 65536; the default is 16 MiB",
        ));
    }
    Ok(limits)
}

/// The HTTP/2 stream window, connection window and header list size, as
/// (`window_bytes`, `connection_window_bytes`, `max_header_list_bytes`).
fn http2_sizes(
    raw: &RawLimits,
    d: &Limits,
    invalid: Invalid<'_>,
) -> Result<(u32, u32, u32), ConfigError> {
    let window = raw.window_bytes.unwrap_or(d.window_bytes);
    if !(MIN_WINDOW..=i32::MAX.unsigned_abs()).contains(&window) {
        return Err(invalid(
            "limits.window_bytes",
            format!("{window} is outside HTTP/2's window range"),
            "set 65535 to 2147483647; the default, 65536, suits requests of a few KiB",
        ));
    }
    let connection_window = raw
        .connection_window_bytes
        .unwrap_or(d.connection_window_bytes.max(window));
    if !(window..=i32::MAX.unsigned_abs()).contains(&connection_window)
        || connection_window < MIN_CONNECTION_WINDOW
    {
        return Err(invalid(
            "limits.connection_window_bytes",
            format!(
                "{connection_window} is below window_bytes ({window}), below {MIN_CONNECTION_WINDOW}, or above 2147483647"
            ),
            "set at least the larger of window_bytes and 131072 (the default)",
        ));
    }
    let header = raw.max_header_list_bytes.unwrap_or(d.max_header_list_bytes);
    if header < 1024 {
        return Err(invalid(
            "limits.max_header_list_bytes",
            format!("{header} bytes is too small for a gRPC request's headers"),
            "set at least 1024; the default is 8192",
        ));
    }
    Ok((window, connection_window, header))
}

/// A time of 1 second to a day, or the default.
fn seconds_limit(
    key: &str,
    value: Option<u64>,
    default: Duration,
    invalid: Invalid<'_>,
) -> Result<Duration, ConfigError> {
    let zero = "0 seconds would close every connection at once";
    match not_zero(key, value, zero, invalid)? {
        Some(n) if n > 86_400 => Err(invalid(
            &format!("limits.{key}"),
            format!("{n} seconds is more than a day"),
            "set at most 86400",
        )),
        Some(n) => Ok(Duration::from_secs(n)),
        None => Ok(default),
    }
}

/// `value`, unless it is 0, which `problem` explains.
fn not_zero<T: PartialEq + From<u8>>(
    key: &str,
    value: Option<T>,
    problem: &str,
    invalid: Invalid<'_>,
) -> Result<Option<T>, ConfigError> {
    if value == Some(T::from(0)) {
        return Err(invalid(
            &format!("limits.{key}"),
            problem.to_owned(),
            "leave it out for the default, or set at least 1",
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Limits, String> {
        let raw: RawLimits = toml::from_str(text).map_err(|e| e.to_string())?;
        limits(Some(raw), &super::super::invalid_in("agent.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_overrides() {
        assert_eq!(parse("").unwrap(), Limits::default());
        let l =
            parse("max_connections = 10\nidle_timeout_seconds = 2\nwindow_bytes = 131072").unwrap();
        assert_eq!(l.max_connections, 10);
        assert_eq!(l.idle_timeout, Duration::from_secs(2));
        assert_eq!(l.window_bytes, 131_072);
    }

    #[test]
    fn errors_name_the_key() {
        for (text, key) in [
            ("max_connections = 0", "limits.max_connections"),
            ("idle_timeout_seconds = 0", "limits.idle_timeout_seconds"),
            ("window_bytes = 1000", "limits.window_bytes"),
            (
                "connection_window_bytes = 65536",
                "limits.connection_window_bytes",
            ),
            (
                "window_bytes = 1048576\nconnection_window_bytes = 262144",
                "limits.connection_window_bytes",
            ),
            ("max_header_list_bytes = 10", "limits.max_header_list_bytes"),
            (
                "max_buffered_request_bytes = 1000",
                "limits.max_buffered_request_bytes",
            ),
        ] {
            let error = parse(text).unwrap_err();
            assert!(error.contains(key), "{text}: {error}");
        }
        assert!(
            parse("max_streams = 3")
                .unwrap_err()
                .contains("max_streams")
        );
    }
}
