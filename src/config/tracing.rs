//! The `[tracing]` section: OpenTelemetry traces over OTLP/gRPC. Without the section the
//! agent sends no traces and installs no trace layer.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Invalid, within};
use crate::telemetry::TracingSettings;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTracing {
    otlp_endpoint: Option<String>,
    service_name: Option<String>,
    sample_ratio: Option<f64>,
    export_timeout_seconds: Option<u64>,
}

/// Validates `[tracing]`; `None` when the section is absent.
pub(super) fn tracing(
    raw: Option<RawTracing>,
    invalid: Invalid<'_>,
) -> Result<Option<TracingSettings>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let example = "write it as \"http://127.0.0.1:4317\" (the collector's OTLP/gRPC port)";
    let Some(otlp_endpoint) = raw.otlp_endpoint else {
        return Err(invalid(
            "tracing.otlp_endpoint",
            "is required when [tracing] is present".to_owned(),
            example,
        ));
    };
    if !is_collector_address(&otlp_endpoint) {
        return Err(invalid(
            "tracing.otlp_endpoint",
            format!("{otlp_endpoint:?} is not an http:// or https:// address with a host"),
            example,
        ));
    }
    let service_name = raw.service_name.unwrap_or_else(|| "grant-agent".to_owned());
    if service_name.is_empty() || service_name.len() > 128 {
        return Err(invalid(
            "tracing.service_name",
            format!("{service_name:?} is empty or longer than 128 bytes"),
            "name the service, e.g. \"grant-agent\"",
        ));
    }
    let sample_ratio = match raw.sample_ratio {
        None => 1.0,
        Some(ratio) if (0.0..=1.0).contains(&ratio) => ratio,
        Some(ratio) => {
            return Err(invalid(
                "tracing.sample_ratio",
                format!("{ratio} is out of range"),
                "use 0.0 (only traces the caller samples) to 1.0 (every trace)",
            ));
        }
    };
    let seconds = within(
        "tracing.export_timeout_seconds",
        raw.export_timeout_seconds,
        1..=60,
        10,
        "use 1 to 60 seconds",
        invalid,
    )?;
    Ok(Some(TracingSettings {
        otlp_endpoint,
        service_name,
        sample_ratio,
        export_timeout: Duration::from_secs(seconds),
    }))
}

/// `http://host:port` or `https://host:port`, with nothing after the address but `/`:
/// the OTLP/gRPC exporter adds the service's path itself.
fn is_collector_address(text: &str) -> bool {
    let Ok(uri) = text.parse::<http::Uri>() else {
        return false;
    };
    matches!(uri.scheme_str(), Some("http" | "https"))
        && uri.host().is_some_and(|host| !host.is_empty())
        && matches!(uri.path(), "" | "/")
        && uri.query().is_none()
}
