//! The `synthome-gateway` command line: `serve`, `simulate`, `status`, `health`, `watch`
//! and `demo`.
//!
//! Every flag can also be set from the environment variable named in `--help`; the API key
//! flags hide their environment value from `--help` so a key never lands in a terminal
//! scroll-back or a CI log.

mod client;
mod demo;
mod health;
mod output;
mod serve;
mod status;
mod watch;

use std::{error::Error, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{
    simulator::{Simulator, SimulatorArgs},
    telemetry::{LogFormat, TraceExport},
};

/// Synthome's API base, as the SDK's default `apiUrl`.
pub const DEFAULT_UPSTREAM_URL: &str = "https://api.synthome.dev/api/execute";

/// A gRPC gateway in front of Synthome's execution status API.
#[derive(Debug, Parser)]
#[command(name = "synthome-gateway", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// How log lines on stderr are written: human-readable text, or one JSON object per
    /// line for log collectors. The level comes from RUST_LOG (default info).
    #[arg(
        long,
        global = true,
        env = "SYNTHOME_GATEWAY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// Export traces over OTLP/gRPC to this collector (e.g. http://otel-collector:4317):
    /// one span per RPC and per upstream request, parented by the caller's traceparent.
    #[cfg(feature = "otlp")]
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

impl Cli {
    /// Where traces are exported, if anywhere.
    pub fn traces(&self) -> TraceExport {
        #[cfg(feature = "otlp")]
        return TraceExport {
            otlp_endpoint: self.otlp_endpoint.clone(),
        };
        #[cfg(not(feature = "otlp"))]
        TraceExport::default()
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(Box<serve::ServeArgs>),
    /// Run a stand-in for Synthome's execution API, for demos, tests and benchmarks.
    Simulate(SimulatorArgs),
    /// Ask a running gateway for the status of one execution.
    Status(status::StatusArgs),
    /// Probe a running gateway's gRPC health; exits 0 only when it is SERVING.
    #[command(after_help = health::EXIT_CODES_HELP)]
    Health(health::HealthArgs),
    /// Follow one execution through a running gateway until it completes or fails.
    ///
    /// On a terminal it shows live progress bars (the execution and each of its jobs);
    /// otherwise it prints one line per change, or one JSON line per message with --json.
    #[command(after_help = watch::EXIT_CODES_HELP)]
    Watch(watch::WatchArgs),
    /// Run a simulated Synthome, the gateway and many watchers in this process for a few
    /// seconds, then show how many upstream requests the shared pollers saved.
    ///
    /// Four sample pipelines (video, image, audio, and one that fails on purpose) are each
    /// followed by many WatchExecution streams over real gRPC. The summary compares the
    /// status requests the gateway actually sent with what every watcher polling on its own
    /// at the SDK's 1 s pace would have sent. Exits 0 when the failing pipeline failed and
    /// the others completed, 1 otherwise.
    Demo(demo::DemoArgs),
}

impl Command {
    /// The log level used when `RUST_LOG` is not set. The demo draws progress bars on
    /// stderr, where its in-process servers would otherwise log their lifecycle at info.
    pub fn default_log_level(&self) -> &'static str {
        match self {
            Self::Demo(_) => "warn",
            _ => "info",
        }
    }
}

/// Runs a parsed command line to its end.
pub async fn run(cli: Cli) -> Result<ExitCode, Box<dyn Error>> {
    match cli.command {
        Command::Serve(args) => serve::run(*args).await.map(|()| ExitCode::SUCCESS),
        Command::Simulate(args) => simulate(args).await.map(|()| ExitCode::SUCCESS),
        Command::Status(args) => status::run(args).await,
        Command::Health(args) => health::run(args).await,
        Command::Watch(args) => watch::run(args).await,
        Command::Demo(args) => demo::run(args).await,
    }
}

async fn simulate(args: SimulatorArgs) -> Result<(), Box<dyn Error>> {
    let listener = TcpListener::bind(args.listen).await?;
    info!(addr = %listener.local_addr()?, "simulator listening; base URL is http://{}/api/execute", listener.local_addr()?);
    Simulator::new(args.config())
        .serve(listener, shutdown_signal())
        .await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {},
                    _ = terminate.recv() => {},
                }
            }
            Err(err) => {
                warn!(error = %err, "cannot listen for SIGTERM; stopping on SIGINT only");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    info!("shutdown signal received");
}

/// Parses durations such as `250ms`, `2s`, `5m` or `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit; use ms, s, m or h"))?;
    let (digits, unit) = text.split_at(split);
    let amount: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let seconds_per_unit = match unit {
        "ms" => return Ok(Duration::from_millis(amount)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{text:?} has an unknown unit; use ms, s, m or h")),
    };
    amount
        .checked_mul(seconds_per_unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long a duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1.5s").is_err());
        // Found by fuzzing (target duration): the multiplication overflowed, a panic in a
        // debug build and a wrapped, far shorter duration in a release build.
        assert!(parse_duration("111111111111111111h").is_err());
        assert!(parse_duration("18446744073709551615m").is_err());
        assert_eq!(
            parse_duration("18446744073709551615s"),
            Ok(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
