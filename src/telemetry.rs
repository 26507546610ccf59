//! Logs and traces.
//!
//! Logs: human-readable lines by default, one JSON object per line with
//! `--log-format json`, on stderr, at the level `RUST_LOG` sets.
//!
//! Traces (cargo feature `otlp`): with `--otlp-endpoint`, every span at or above the log
//! level is also exported over OTLP/gRPC: one span per RPC (`GetExecutionStatus`,
//! `WatchExecution`, with the execution id), one per upstream request. A call's W3C
//! `traceparent` becomes its span's parent, and the upstream request's span is sent on to
//! Synthome as its `traceparent` (see `crate::trace_context`). Spans are exported in
//! batches from a background thread, so a slow or absent collector never slows a call (a
//! full queue drops spans); [`Telemetry::shutdown`] flushes what is left, for at most 2 s.
//!
//! Nothing secret reaches a log line or a span: API keys live in `Credential`, whose
//! `Debug` prints a placeholder, webhook secrets in `WebhookSecret`, likewise; spans record
//! an allow-list of fields (`skip_all`), and upstream error text is redacted before it is
//! kept.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::{
    EnvFilter, Layer, Registry, layer::SubscriberExt, util::SubscriberInitExt,
};

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    Text,
    /// One JSON object per line, with the current span's fields, for log collectors.
    Json,
}

/// Where traces go, when they are exported.
#[derive(Debug, Clone, Default)]
pub struct TraceExport {
    /// An OTLP/gRPC collector, such as `http://otel-collector:4317`.
    pub otlp_endpoint: Option<String>,
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[cfg(feature = "otlp")]
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("a global subscriber is already installed: {0}")]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
}

/// The installed telemetry; [`Telemetry::shutdown`] flushes exported spans.
#[derive(Debug)]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the process-wide subscriber. `default_level` applies when `RUST_LOG` is
    /// unset. Call it inside the Tokio runtime: the OTLP exporter's connection lives there.
    pub fn install(
        format: LogFormat,
        default_level: &str,
        export: &TraceExport,
    ) -> Result<Self, TelemetryError> {
        let filter =
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
        let logs: BoxedLayer = match format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .boxed(),
        };

        #[cfg(feature = "otlp")]
        let (provider, traces) = match &export.otlp_endpoint {
            Some(endpoint) => {
                let (provider, layer) = otlp::layer(endpoint)?;
                (Some(provider), Some(layer))
            }
            None => (None, None),
        };
        #[cfg(not(feature = "otlp"))]
        let traces: Option<BoxedLayer> = {
            let _ = export;
            None
        };

        let layers: Vec<BoxedLayer> = std::iter::once(logs).chain(traces).collect();
        tracing_subscriber::registry()
            .with(layers)
            .with(filter)
            .try_init()?;
        Ok(Self {
            #[cfg(feature = "otlp")]
            provider,
        })
    }

    /// Exports the spans not yet sent and stops the exporter.
    pub async fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider {
            // Shutting down blocks until the export thread is done, and that export may
            // need this runtime's workers: block elsewhere.
            let flush = move || provider.shutdown_with_timeout(otlp::FLUSH_TIMEOUT);
            let shutdown = tokio::task::spawn_blocking(flush).await;
            if let Ok(Err(err)) = shutdown {
                eprintln!("warning: could not flush traces: {err}");
            }
        }
    }
}

#[cfg(feature = "otlp")]
mod otlp {
    use opentelemetry::trace::TracerProvider;
    use opentelemetry_otlp::{SpanExporter, WithExportConfig};
    use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
    use tracing_subscriber::Layer;

    use super::TelemetryError;

    /// The longest the last export may take at exit, so an unreachable collector cannot
    /// hold up a drained gateway for long.
    pub(super) const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

    /// The service name spans carry unless `OTEL_SERVICE_NAME` says otherwise.
    const SERVICE_NAME: &str = "synthome-gateway";

    pub(super) fn layer(
        endpoint: &str,
    ) -> Result<(SdkTracerProvider, super::BoxedLayer), TelemetryError> {
        let exporter = SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()?;
        let service_name =
            std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| SERVICE_NAME.to_owned());
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(service_name).build())
            .build();
        let tracer = provider.tracer(SERVICE_NAME);
        let layer = tracing_opentelemetry::layer().with_tracer(tracer).boxed();
        Ok((provider, layer))
    }
}
