//! The `synthome-gateway` command line: `serve`, `simulate`, `status`, `watch` and `demo`.
//!
//! Every flag can also be set from the environment variable named in `--help`; the API key
//! flags hide their environment value from `--help` so a key never lands in a terminal
//! scroll-back or a CI log.

mod client;
mod demo;
mod output;
mod status;
mod watch;

use std::{
    error::Error, net::SocketAddr, num::NonZeroUsize, process::ExitCode, sync::Arc, time::Duration,
};

use clap::{Args, Parser, Subcommand};
use reqwest::Url;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{
    admin,
    credential::Credential,
    registry::PollSettings,
    server::{Gateway, GatewaySettings},
    simulator::{Simulator, SimulatorArgs, SimulatorConfig},
    upstream::{UpstreamClient, UpstreamConfig},
    webhook::WebhookSecret,
};

/// Synthome's API base, as the SDK's default `apiUrl`.
pub const DEFAULT_UPSTREAM_URL: &str = "https://api.synthome.dev/api/execute";

/// The key `serve --simulate` uses when none is given: the embedded simulator accepts any.
const SIMULATOR_DEMO_KEY: &str = "sy_test_simulator_demo";

/// A gRPC gateway in front of Synthome's execution status API.
#[derive(Debug, Parser)]
#[command(name = "synthome-gateway", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(Box<ServeArgs>),
    /// Run a stand-in for Synthome's execution API, for demos, tests and benchmarks.
    Simulate(SimulatorArgs),
    /// Ask a running gateway for the status of one execution.
    Status(status::StatusArgs),
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

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the gRPC server listens on.
    #[arg(
        long,
        env = "SYNTHOME_GATEWAY_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: SocketAddr,

    /// Start a built-in simulator of Synthome's API and use it as the upstream, seeded with
    /// sample executions whose ids are logged. No account needed; --upstream-url is ignored.
    #[arg(long, env = "SYNTHOME_GATEWAY_SIMULATE")]
    pub simulate: bool,

    /// Address of the operations HTTP listener (Synthome webhooks at POST /webhooks/synthome).
    #[arg(
        long,
        env = "SYNTHOME_GATEWAY_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub admin_listen: SocketAddr,

    /// Secret that Synthome signs webhooks with (HMAC-SHA256). When set, webhooks without a
    /// valid signature are refused; when not set, any webhook is taken as a hint to refresh.
    #[arg(long, env = "SYNTHOME_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// With no change for this long, a watch stream repeats its snapshot as a heartbeat so
    /// proxies with idle timeouts keep it open.
    #[arg(long, env = "SYNTHOME_GATEWAY_HEARTBEAT_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// HTTP/2 streams (calls and watches) one client connection may have open at once.
    #[arg(
        long,
        env = "SYNTHOME_GATEWAY_MAX_STREAMS_PER_CONNECTION",
        default_value = "20000"
    )]
    pub max_streams_per_connection: u32,

    #[command(flatten)]
    pub poll: PollArgs,

    #[command(flatten)]
    pub upstream: UpstreamArgs,
}

#[derive(Debug, Clone, Args)]
pub struct PollArgs {
    /// Delay between two status requests for an execution that is changing (the SDK's own
    /// pace is 1s). All callers of one execution with one key share these requests.
    #[arg(long, env = "SYNTHOME_GATEWAY_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// Longest delay between two requests, reached by backing off while an execution does
    /// not change or Synthome fails.
    #[arg(long, env = "SYNTHOME_GATEWAY_POLL_MAX_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub poll_max_interval: Duration,

    /// How long a poller goes on after its last watcher left, so a quick reconnect finds it.
    #[arg(long, env = "SYNTHOME_GATEWAY_POLLER_LINGER", default_value = "2s", value_parser = parse_duration)]
    pub poller_linger: Duration,

    /// How long Synthome may keep failing before open watches end with UNAVAILABLE.
    #[arg(long, env = "SYNTHOME_GATEWAY_UPSTREAM_OUTAGE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub upstream_outage_timeout: Duration,

    /// Shortest gap between two requests for one execution when webhooks or reads ask for a
    /// fresh status.
    #[arg(long, env = "SYNTHOME_GATEWAY_MIN_REFRESH_INTERVAL", default_value = "250ms", value_parser = parse_duration)]
    pub min_refresh_interval: Duration,

    /// Status requests to Synthome in flight at once, across all executions.
    #[arg(
        long,
        env = "SYNTHOME_GATEWAY_MAX_UPSTREAM_IN_FLIGHT",
        default_value = "64"
    )]
    pub max_upstream_in_flight: usize,

    /// How many ended (completed or failed) executions to remember; repeats of those are
    /// answered without asking Synthome.
    #[arg(
        long,
        env = "SYNTHOME_GATEWAY_ENDED_CACHE_SIZE",
        default_value = "10000"
    )]
    pub ended_cache_size: NonZeroUsize,
}

impl PollArgs {
    pub fn settings(&self) -> PollSettings {
        PollSettings {
            interval: self.poll_interval,
            max_interval: self.poll_max_interval.max(self.poll_interval),
            linger: self.poller_linger,
            outage_timeout: self.upstream_outage_timeout,
            min_refresh_gap: self.min_refresh_interval,
            max_in_flight: self.max_upstream_in_flight,
            ended_cache_size: self.ended_cache_size,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct UpstreamArgs {
    /// Base URL of Synthome's execution API; status is read from {url}/{executionId}/status.
    #[arg(long, env = "SYNTHOME_API_URL", default_value = DEFAULT_UPSTREAM_URL)]
    pub upstream_url: Url,

    /// API key used for calls that carry no `authorization: Bearer` metadata of their own.
    /// Without it, such calls fail with UNAUTHENTICATED.
    #[arg(long, env = "SYNTHOME_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Time allowed to open a connection to Synthome (e.g. 500ms, 2s).
    #[arg(long, env = "SYNTHOME_GATEWAY_UPSTREAM_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub upstream_connect_timeout: Duration,

    /// Time allowed for one whole request to Synthome, body included.
    #[arg(long, env = "SYNTHOME_GATEWAY_UPSTREAM_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,

    /// Largest response body accepted from Synthome, in bytes.
    #[arg(
        long,
        env = "SYNTHOME_GATEWAY_UPSTREAM_MAX_BODY_BYTES",
        default_value = "4194304"
    )]
    pub upstream_max_body_bytes: usize,
}

impl UpstreamArgs {
    fn config(&self, base_url: Url) -> UpstreamConfig {
        UpstreamConfig {
            base_url,
            connect_timeout: self.upstream_connect_timeout,
            request_timeout: self.upstream_timeout,
            max_body_bytes: self.upstream_max_body_bytes,
        }
    }
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
        Command::Serve(args) => serve(*args).await.map(|()| ExitCode::SUCCESS),
        Command::Simulate(args) => simulate(args).await.map(|()| ExitCode::SUCCESS),
        Command::Status(args) => status::run(args).await,
        Command::Watch(args) => watch::run(args).await,
        Command::Demo(args) => demo::run(args).await,
    }
}

async fn serve(args: ServeArgs) -> Result<(), Box<dyn Error>> {
    let mut fallback_key = args.upstream.api_key.clone();
    let mut base_url = args.upstream.upstream_url.clone();

    // The simulator lives as long as this function: it serves until the gateway stops.
    let _simulator = if args.simulate {
        let running = Simulator::spawn(SimulatorConfig::default()).await?;
        let key = fallback_key.get_or_insert_with(|| SIMULATOR_DEMO_KEY.to_owned());
        base_url = Url::parse(&running.base_url())?;
        info!(upstream = %base_url, "serving with the built-in simulator as upstream");
        for (execution_id, description) in running.simulator.seed_samples(key) {
            info!(%execution_id, %description, "sample execution started");
        }
        Some(running)
    } else {
        None
    };

    let fallback_credential = fallback_key.as_deref().and_then(Credential::new);
    if fallback_credential.is_none() {
        warn!("no --api-key: calls without `authorization` metadata will be refused");
    }
    let upstream = UpstreamClient::new(&args.upstream.config(base_url))?;
    let settings = GatewaySettings {
        fallback_credential,
        poll: args.poll.settings(),
        heartbeat_interval: args.heartbeat_interval,
        max_concurrent_streams_per_connection: args.max_streams_per_connection,
    };
    let gateway = Gateway::new(Arc::new(upstream), settings);
    let webhook_secret = args.webhook_secret.as_deref().and_then(WebhookSecret::new);
    let operations = admin::router(gateway.registry().clone(), webhook_secret);
    let grpc_listener = TcpListener::bind(args.listen).await?;
    let admin_listener = TcpListener::bind(args.admin_listen).await?;

    // One signal stops both listeners.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.send_replace(true);
    });
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    tokio::try_join!(
        async {
            let grpc = gateway.serve(grpc_listener, until_stopped(stopped.clone()));
            grpc.await.map_err(Box::<dyn Error>::from)
        },
        async {
            let http = admin::serve(admin_listener, operations, until_stopped(stopped.clone()));
            http.await.map_err(Box::<dyn Error>::from)
        },
    )?;
    info!("gateway stopped");
    Ok(())
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
    match unit {
        "ms" => Ok(Duration::from_millis(amount)),
        "s" => Ok(Duration::from_secs(amount)),
        "m" => Ok(Duration::from_secs(amount * 60)),
        "h" => Ok(Duration::from_secs(amount * 3600)),
        _ => Err(format!("{text:?} has an unknown unit; use ms, s, m or h")),
    }
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
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
