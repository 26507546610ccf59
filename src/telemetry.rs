//! Logs: human-readable lines by default, one JSON object per line with
//! `--log-format json`, on stderr, at the level `RUST_LOG` sets.
//!
//! Nothing secret reaches a log line: API keys live in `Credential`, whose `Debug` prints a
//! placeholder, webhook secrets in `WebhookSecret`, likewise; spans record an allow-list of
//! fields (`skip_all`), and upstream error text is redacted before it is kept.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    Text,
    /// One JSON object per line, with the current span's fields, for log collectors.
    Json,
}

/// Installs the process-wide subscriber. `default_level` applies when `RUST_LOG` is unset.
pub fn init_logging(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}
