//! Sending spans to an OpenTelemetry collector over OTLP/gRPC.
//!
//! The exporter runs on a small tokio runtime of its own (one thread): the batch span
//! processor exports from a thread of its own and needs a runtime for tonic's channel,
//! and the agent's runtime is shut down before the last spans are flushed. Spans wait in
//! the processor's bounded queue; when the collector is slow or gone they are dropped,
//! never the requests.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    trace::{Sampler, SdkTracerProvider},
};
use tracing_subscriber::{Layer, Registry, filter::filter_fn};

use super::propagation;

/// `[tracing]`: where spans go and how many.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    /// The collector's OTLP/gRPC address, `http://host:4317` (or `https://`, checked
    /// against the system's and the Mozilla roots).
    pub otlp_endpoint: String,
    /// `service.name` on every span.
    pub service_name: String,
    /// Share of new traces recorded, 0.0 to 1.0. A request that arrives with a W3C
    /// `traceparent` follows its caller's decision instead.
    pub sample_ratio: f64,
    /// How long one export may take, and how long the flush at exit may wait.
    pub export_timeout: Duration,
}

/// The running exporter, if any. [`Telemetry::shutdown`] sends the spans still queued;
/// without `[tracing]` it holds nothing and does nothing.
#[derive(Default)]
#[must_use = "call shutdown when the agent stops, or the last spans are lost"]
pub struct Telemetry {
    exporter: Option<Exporter>,
}

struct Exporter {
    provider: SdkTracerProvider,
    runtime: tokio::runtime::Runtime,
    timeout: Duration,
}

/// Tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The exporter's runtime thread could not start.
    #[error("tracing: cannot start the OTLP exporter's thread: {0}")]
    Runtime(#[source] std::io::Error),
    /// The exporter refused its settings.
    #[error("tracing.otlp_endpoint: {0}")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
}

impl Telemetry {
    /// Sends the spans still queued (within the export timeout) and stops the exporter.
    /// Call after serving ends, outside any async runtime.
    pub fn shutdown(self) {
        let Some(exporter) = self.exporter else {
            return;
        };
        if let Err(error) = exporter.provider.shutdown_with_timeout(exporter.timeout) {
            tracing::warn!(%error, "tracing: the last spans may not have reached the collector");
        }
        exporter.runtime.shutdown_timeout(exporter.timeout);
    }
}

/// Starts the exporter and makes the layer that feeds it.
pub(super) fn start(
    settings: &TracingSettings,
) -> Result<(Telemetry, Box<dyn Layer<Registry> + Send + Sync>), TelemetryError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(TelemetryError::Runtime)?;
    let exporter = {
        // tonic's channel is made on the runtime it is built in.
        let _entered = runtime.enter();
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(settings.otlp_endpoint.as_str())
            .with_timeout(settings.export_timeout);
        if settings.otlp_endpoint.starts_with("https:") {
            builder = builder
                .with_tls_config(tonic::transport::ClientTlsConfig::new().with_enabled_roots());
        }
        builder.build().map_err(TelemetryError::Exporter)?
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sample_ratio,
        ))))
        .with_resource(
            Resource::builder_empty()
                .with_service_name(settings.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("grant-agent");
    // The agent's own spans, and its events at INFO and above as span events: never the
    // HTTP/2 and TLS libraries' (the exporter's own calls among them).
    let ours = filter_fn(|meta| {
        meta.target().starts_with("grant_agent")
            && (meta.is_span() || *meta.level() <= tracing::Level::INFO)
    });
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_filter(ours)
        .boxed();
    propagation::set_exporting();
    let timeout = settings.export_timeout;
    let exporter = Exporter {
        provider,
        runtime,
        timeout,
    };
    Ok((
        Telemetry {
            exporter: Some(exporter),
        },
        layer,
    ))
}
