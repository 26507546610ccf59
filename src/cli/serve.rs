//! `synthome-gateway serve`: the gateway itself, with its operations listener.
//!
//! Both listeners stop on one signal (SIGINT or SIGTERM). The gRPC server then drains
//! within `--shutdown-grace` (see `crate::server`), the operations listener finishes its
//! requests within the same grace, and the process exits 0.

use std::{
    error::Error, net::SocketAddr, num::NonZeroUsize, path::PathBuf, sync::Arc, time::Duration,
};

use clap::Args;
use reqwest::Url;
use tokio::{net::TcpListener, sync::watch};
use tracing::{info, warn};

use super::{DEFAULT_UPSTREAM_URL, parse_duration, shutdown_signal};
use crate::{
    admin,
    credential::Credential,
    registry::PollSettings,
    server::{Gateway, GatewaySettings, Limits, ServerTls},
    simulator::{Simulator, SimulatorConfig},
    upstream::{UpstreamClient, UpstreamConfig},
    webhook::WebhookSecret,
};

/// The key `serve --simulate` uses when none is given: the embedded simulator accepts any.
const SIMULATOR_DEMO_KEY: &str = "sy_test_simulator_demo";

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

    /// Address of the operations HTTP listener: Synthome webhooks (POST /webhooks/synthome)
    /// and probes (GET /healthz, /readyz).
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

    /// Health turns NOT_SERVING after Synthome has been unreachable for this long.
    #[arg(long, env = "SYNTHOME_GATEWAY_UNHEALTHY_AFTER", default_value = "30s", value_parser = parse_duration)]
    pub unhealthy_after: Duration,

    /// On SIGTERM/SIGINT, the longest the drain may take before open connections are closed.
    #[arg(long, env = "SYNTHOME_GATEWAY_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// A browser origin allowed to call over gRPC-Web (repeatable, or comma-separated in the
    /// environment). None by default: CORS stays closed.
    #[arg(
        long = "cors-allow-origin",
        env = "SYNTHOME_GATEWAY_CORS_ALLOW_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_allowed_origins: Vec<String>,

    #[command(flatten)]
    pub limits: LimitArgs,

    #[command(flatten)]
    pub tls: TlsArgs,

    #[command(flatten)]
    pub poll: PollArgs,

    #[command(flatten)]
    pub upstream: UpstreamArgs,
}

#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Watch streams open at once across all clients; more get RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "SYNTHOME_GATEWAY_MAX_WATCH_STREAMS",
        default_value = "100000"
    )]
    pub max_watch_streams: usize,

    /// HTTP/2 streams (calls and watches) one client connection may have open at once.
    #[arg(
        long,
        env = "SYNTHOME_GATEWAY_MAX_STREAMS_PER_CONNECTION",
        default_value = "20000"
    )]
    pub max_streams_per_connection: u32,

    /// Calls being answered at once per connection, none if unset. A watch counts until its
    /// stream opens, not while it stays open: --max-streams-per-connection bounds those.
    #[arg(long, env = "SYNTHOME_GATEWAY_CONCURRENCY_PER_CONNECTION")]
    pub concurrency_per_connection: Option<usize>,

    /// The longest a GetExecutionStatus call may take, whatever deadline the caller sent.
    #[arg(long, env = "SYNTHOME_GATEWAY_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Largest request message accepted, in bytes.
    #[arg(
        long,
        env = "SYNTHOME_GATEWAY_MAX_REQUEST_BYTES",
        default_value = "65536"
    )]
    pub max_request_bytes: usize,

    /// Largest response message sent, in bytes.
    #[arg(
        long,
        env = "SYNTHOME_GATEWAY_MAX_RESPONSE_BYTES",
        default_value = "16777216"
    )]
    pub max_response_bytes: usize,

    /// Interval of HTTP/2 keepalive pings to clients (0s to send none).
    #[arg(long, env = "SYNTHOME_GATEWAY_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "SYNTHOME_GATEWAY_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub keepalive_timeout: Duration,

    /// Connections older than this are asked to reconnect (GOAWAY), so that long-lived
    /// clients spread over replicas; unset for no limit.
    #[arg(long, env = "SYNTHOME_GATEWAY_MAX_CONNECTION_AGE", value_parser = parse_duration)]
    pub max_connection_age: Option<Duration>,

    /// After --max-connection-age, how long open streams may go on before the connection is
    /// closed.
    #[arg(long, env = "SYNTHOME_GATEWAY_MAX_CONNECTION_AGE_GRACE", value_parser = parse_duration)]
    pub max_connection_age_grace: Option<Duration>,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_watch_streams: self.max_watch_streams,
            max_streams_per_connection: self.max_streams_per_connection,
            concurrency_per_connection: self.concurrency_per_connection,
            unary_timeout: self.request_timeout,
            max_request_bytes: self.max_request_bytes,
            max_response_bytes: self.max_response_bytes,
            keepalive_interval: (!self.keepalive_interval.is_zero())
                .then_some(self.keepalive_interval),
            keepalive_timeout: self.keepalive_timeout,
            max_connection_age: self.max_connection_age,
            max_connection_age_grace: self.max_connection_age_grace,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// PEM certificate chain for serving gRPC over TLS (with --tls-key).
    #[arg(long, env = "SYNTHOME_GATEWAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "SYNTHOME_GATEWAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s): clients must present a certificate chaining to one (mutual TLS).
    #[arg(long, env = "SYNTHOME_GATEWAY_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    fn load(&self) -> Result<Option<ServerTls>, Box<dyn Error>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
        };
        Ok(Some(ServerTls {
            certificate_chain: read(cert)?,
            private_key: read(key)?,
            client_ca: self.tls_client_ca.as_ref().map(read).transpose()?,
        }))
    }
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

pub(super) async fn run(args: ServeArgs) -> Result<(), Box<dyn Error>> {
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
        limits: args.limits.limits(),
        tls: args.tls.load()?,
        cors_allowed_origins: args.cors_allowed_origins.clone(),
        unhealthy_after: args.unhealthy_after,
        shutdown_grace: args.shutdown_grace,
    };
    let gateway = Gateway::new(Arc::new(upstream), settings);
    let webhook_secret = args.webhook_secret.as_deref().and_then(WebhookSecret::new);
    let operations = admin::router(
        gateway.registry().clone(),
        gateway.health().clone(),
        webhook_secret,
    );
    let grpc_listener = TcpListener::bind(args.listen).await?;
    let admin_listener = TcpListener::bind(args.admin_listen).await?;

    // One signal stops both listeners.
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.send_replace(true);
    });
    let until_stopped = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    tokio::try_join!(
        async {
            let grpc = gateway.serve(grpc_listener, until_stopped(stopped.clone()));
            grpc.await.map_err(Box::<dyn Error>::from)
        },
        async {
            // axum's graceful shutdown waits for every request in flight, such as a webhook
            // whose body never comes: bound it by the same grace as the gRPC drain.
            let http = admin::serve(admin_listener, operations, until_stopped(stopped.clone()));
            let grace = args.shutdown_grace;
            tokio::select! {
                result = http => result.map_err(Box::<dyn Error>::from),
                () = async {
                    until_stopped(stopped.clone()).await;
                    tokio::time::sleep(grace).await;
                } => {
                    warn!(?grace, "operations requests still open after the grace; closing them");
                    Ok(())
                }
            }
        },
    )?;
    info!("gateway stopped");
    Ok(())
}
