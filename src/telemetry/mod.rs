//! Logging and tracing. Logs are structured `tracing` events on stderr, as text for
//! people or JSON for collectors, at the level `RUST_LOG` gives (default `info`). Traces
//! are OpenTelemetry spans sent over OTLP/gRPC when the config has a `[tracing]` section
//! (`otlp`), continuing the caller's W3C trace context (`propagation`). Neither ever
//! carries a PIN, an assertion, a token or a pid.
//!
//! Without `[tracing]` no OpenTelemetry layer is installed at all: the spans only
//! traces need (`policy`, `queue_wait`, `C_Sign`, `token_fetch`, `token_exchange`) are
//! at TRACE level, which the log filter turns off, so they cost a disabled callsite
//! each; nothing is parsed from requests and nothing is added to them.

use clap::ValueEnum;
use tracing_subscriber::{
    EnvFilter, Layer, Registry, layer::SubscriberExt, util::SubscriberInitExt,
};

mod otlp;
mod propagation;

pub use otlp::{Telemetry, TelemetryError, TracingSettings};
pub(crate) use propagation::{adopt_parent, exporting, follow, inject};

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber for logs alone, in `format`: for commands that send
/// no traces. Call once, before anything logs.
pub fn init_logs(format: LogFormat) {
    tracing_subscriber::registry()
        .with(log_layer(format))
        .init();
}

/// Installs the global subscriber: logs in `format`, and traces to `tracing`'s collector
/// when given. Call once, before anything logs; keep the [`Telemetry`] until the agent
/// stops and then call [`Telemetry::shutdown`], so the last spans are sent.
pub fn init(
    format: LogFormat,
    tracing: Option<&TracingSettings>,
) -> Result<Telemetry, TelemetryError> {
    // Built first: a collector address that cannot be used fails before anything is installed.
    let (telemetry, traces) = match tracing {
        Some(settings) => {
            let (telemetry, layer) = otlp::start(settings)?;
            (telemetry, Some(layer))
        }
        None => (Telemetry::default(), None),
    };
    let layers: Vec<_> = std::iter::once(log_layer(format)).chain(traces).collect();
    tracing_subscriber::registry().with(layers).init();
    Ok(telemetry)
}

/// The stderr log layer with its own `RUST_LOG` filter, so the trace layer's filter is
/// independent of the log level.
fn log_layer(format: LogFormat) -> Box<dyn Layer<Registry> + Send + Sync> {
    // cryptoki logs every mechanism type it has no name for as an error; that is noise.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,cryptoki::mechanism=off"));
    // Colours only for a person at a terminal: journald, files and collectors get plain text.
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => layer.with_filter(filter).boxed(),
        LogFormat::Json => layer.json().flatten_event(true).with_filter(filter).boxed(),
    }
}
