//! Request traces exported over OTLP (`--otlp-endpoint`), and the logging
//! subscriber they share with the log lines.
//!
//! ```text
//!  request path (server, scheduler): tracing spans, target TRACE_TARGET
//!     ─▶ tracing-opentelemetry layer ─▶ SDK tracer provider (sampler,
//!        service name) ─▶ batch span processor (its own thread, bounded
//!        queue) ─▶ OTLP/gRPC exporter (tonic) ─▶ collector (Jaeger, …)
//!  every other event ─▶ fmt layer (text or JSON on stderr, --log-level)
//! ```
//!
//! The request spans are kept out of the log lines (the fmt layer never
//! sees them): with the export off no layer wants them, so `tracing` does
//! not even build them and the request path pays nothing. The export layer
//! sees only those spans, plus warnings and errors, which become events of
//! the span they happen in. docs/operations.md ("Tracing") lists the spans.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::filter::{FilterExt, filter_fn};
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry};

use crate::LogFormat;

/// The `tracing` target of every span of the request path: the one name
/// the export layer selects (and the log lines leave out).
pub const TRACE_TARGET: &str = "tickserve::request";

/// Where and how request traces are exported.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    /// OTLP/gRPC endpoint of the collector, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// The `service.name` resource attribute of every span.
    pub service_name: String,
    /// Fraction of new traces kept (0–1). A request carrying a
    /// `traceparent` follows its caller's sampled flag instead.
    pub sample_ratio: f64,
}

impl OtlpConfig {
    /// Every trace to `endpoint`, service name `tickserve`.
    pub fn new(endpoint: impl Into<String>) -> Self {
        OtlpConfig {
            endpoint: endpoint.into(),
            service_name: "tickserve".to_owned(),
            sample_ratio: 1.0,
        }
    }
}

/// The running trace export; [`TraceExport::shutdown`] sends what is
/// still buffered. Dropping it without shutting down may lose the last
/// spans.
#[derive(Debug)]
pub struct TraceExport {
    provider: SdkTracerProvider,
}

impl TraceExport {
    /// Sends every finished span now. Blocks: call it off the async
    /// runtime (`spawn_blocking`), which the exporter itself needs.
    pub fn flush(&self) -> Result<(), String> {
        self.provider.force_flush().map_err(|e| e.to_string())
    }

    /// Sends what is buffered and stops the export. Blocks like
    /// [`TraceExport::flush`].
    pub fn shutdown(self) -> Result<(), String> {
        self.provider.shutdown().map_err(|e| e.to_string())
    }
}

/// Why the trace export could not start.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("invalid OTLP sample ratio {0}: expected a number from 0 to 1")]
    SampleRatio(f64),
    #[error("cannot set up the OTLP exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
    #[error("invalid log level '{filter}': {message}")]
    Filter { filter: String, message: String },
    #[error("cannot install the tracing subscriber: {0}")]
    Install(String),
}

/// Installs the global `tracing` subscriber: log lines (text or JSON on
/// stderr, filtered by `filter` in `RUST_LOG` syntax) plus, when `otlp` is
/// given, the export of request spans. Must run inside a tokio runtime when `otlp` is
/// given (the gRPC exporter's connection lives on it).
pub fn init_logging_and_traces(
    format: LogFormat,
    filter: &str,
    otlp: Option<&OtlpConfig>,
) -> Result<Option<TraceExport>, TraceError> {
    let env_filter = EnvFilter::try_new(filter).map_err(|e| TraceError::Filter {
        filter: filter.to_owned(),
        message: e.to_string(),
    })?;
    let not_request_spans = filter_fn(|meta| !(meta.is_span() && meta.target() == TRACE_TARGET));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.with_filter(env_filter.and(not_request_spans)).boxed(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_filter(env_filter.and(not_request_spans))
            .boxed(),
    };
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![logs];
    let export = match otlp {
        None => None,
        Some(config) => {
            let (layer, export) = export_layer(config)?;
            layers.push(layer);
            Some(export)
        }
    };
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|e| TraceError::Install(e.to_string()))?;
    Ok(export)
}

/// The export layer and the provider behind it.
fn export_layer(
    config: &OtlpConfig,
) -> Result<(Box<dyn Layer<Registry> + Send + Sync>, TraceExport), TraceError> {
    if !(0.0..=1.0).contains(&config.sample_ratio) {
        return Err(TraceError::SampleRatio(config.sample_ratio));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.endpoint.clone())
        .build()
        .map_err(|e| TraceError::Exporter {
            endpoint: config.endpoint.clone(),
            message: e.to_string(),
        })?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("tickserve");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Span durations are what a trace shows; busy/idle counters,
        // thread and source location would only add bytes to every span.
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        .with_target(false)
        .with_level(false)
        .with_filter(filter_fn(|meta| {
            meta.target() == TRACE_TARGET
                || (meta.is_event() && *meta.level() <= tracing::Level::WARN)
        }))
        .boxed();
    Ok((layer, TraceExport { provider }))
}
