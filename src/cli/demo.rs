//! `synthome-gateway demo`: a simulated Synthome, the gateway in front of it and many
//! watchers, all in this process; then a summary of what sharing the pollers saved.
//!
//! Everything talks over real sockets on 127.0.0.1 ephemeral ports: the watchers call the
//! gateway over gRPC (every stream on one HTTP/2 connection), the gateway polls the
//! simulator over HTTP, and the simulator posts signed webhooks to the gateway's
//! operations listener when an execution ends, so watchers learn of the end at once
//! rather than at the next poll.
//!
//! The figures in the summary are measured, never assumed: the upstream requests are the
//! simulator's own count, and the cost without the gateway is what each watcher would have
//! sent polling alone at the SDK's 1 s pace for as long as its watch lasted: ceil(seconds),
//! and at least one request.
//!
//! Limits: job durations are drawn at random, so figures vary a little from run to run;
//! the webhook secret is a fixed demo value, which is harmless because both ends of the
//! webhook live in this process and listen on 127.0.0.1 only.

use std::{
    error::Error,
    net::Ipv4Addr,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use indicatif::{MultiProgress, ProgressBar};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::oneshot, task::JoinSet};
use tonic::{Request, transport::Channel};
use tracing::warn;

use super::{
    client::GatewayArgs,
    output, parse_duration,
    watch::{self, Ending},
};
use crate::{
    admin,
    credential::Credential,
    proto::{
        Execution, ExecutionState, WatchExecutionRequest,
        execution_status_service_client::ExecutionStatusServiceClient,
    },
    registry::PollSettings,
    server::{Gateway, GatewaySettings, RunningGateway},
    simulator::{RunningSimulator, Simulator, SimulatorConfig, parse_time_scale},
    upstream::{UpstreamClient, UpstreamConfig},
    webhook::WebhookSecret,
};

/// The key the demo's executions belong to; the simulator accepts any.
const DEMO_KEY: &str = "sy_test_gateway_demo";

/// Signs the simulator's webhooks; see the module's limits for why a constant is fine.
const DEMO_WEBHOOK_SECRET: &str = "whsec_gateway_demo";

/// How often the Synthome SDK polls an execution on its own.
const SDK_POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Factor on the simulated job durations: 1.0 is realistic (a video job takes 4 to
    /// 8 seconds), 0.5 halves them.
    #[arg(long, default_value_t = 0.5, value_parser = parse_time_scale)]
    pub time_scale: f64,

    /// Delay between two status requests of the gateway's pollers while an execution
    /// changes.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// WatchExecution streams opened on each sample execution.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub watchers_per_execution: u32,
}

/// One sample pipeline and how it should end.
#[derive(Debug)]
struct Pipeline {
    label: &'static str,
    expected: ExecutionState,
    jobs: Value,
}

/// A sample pipeline started on the simulator.
#[derive(Debug)]
struct DemoExecution {
    id: String,
    pipeline: Pipeline,
}

/// What one watcher saw.
#[derive(Debug)]
struct WatchRecord {
    execution: usize,
    lasted: Duration,
    ending: Ending,
}

pub(super) async fn run(args: DemoArgs) -> Result<ExitCode, Box<dyn Error>> {
    let servers = Servers::start(&args).await?;
    let watchers = args.watchers_per_execution as usize;
    println!(
        "synthome-gateway demo: a simulated Synthome, the gateway in front of it, and \
         {watchers} watchers on each of {} sample pipelines.\n\
         The gateway polls each execution once for all its watchers (every {:?} while it \
         changes); the simulator's webhook announces each end.\n",
        sample_pipelines().len(),
        args.poll_interval,
    );

    let started = Instant::now();
    let executions = servers.create_pipelines()?;
    let records = watch_all(&servers.gateway, &executions, watchers).await?;
    let wall_time = started.elapsed();

    let upstream_requests = servers.simulator.simulator.status_requests();
    let as_expected = print_summary(&executions, &records, wall_time, upstream_requests);
    Ok(if as_expected {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The simulator, the gateway and its operations listener; all stop when dropped.
#[derive(Debug)]
struct Servers {
    simulator: RunningSimulator,
    gateway: RunningGateway,
    webhook_url: String,
    _stop_operations: oneshot::Sender<()>,
}

impl Servers {
    async fn start(args: &DemoArgs) -> Result<Self, Box<dyn Error>> {
        let simulator = Simulator::spawn(SimulatorConfig {
            time_scale: args.time_scale,
            ..SimulatorConfig::default()
        })
        .await?;
        let gateway = start_gateway(&simulator, args.poll_interval).await?;

        // The operations listener, so that the simulator's webhooks reach the pollers.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let webhook_url = format!("http://{}/webhooks/synthome", listener.local_addr()?);
        let router = admin::router(
            gateway.registry.clone(),
            gateway.health.clone(),
            WebhookSecret::new(DEMO_WEBHOOK_SECRET),
        );
        let (stop_operations, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let until_stopped = async {
                let _ = stopped.await;
            };
            if let Err(err) = admin::serve(listener, router, until_stopped).await {
                warn!(error = %err, "the demo's operations listener failed");
            }
        });

        Ok(Self {
            simulator,
            gateway,
            webhook_url,
            _stop_operations: stop_operations,
        })
    }

    /// Starts every sample pipeline, each asking for a signed webhook when it ends.
    fn create_pipelines(&self) -> Result<Vec<DemoExecution>, Box<dyn Error>> {
        let mut executions = Vec::new();
        for pipeline in sample_pipelines() {
            let request = json!({
                "executionPlan": { "jobs": pipeline.jobs },
                "options": { "webhook": self.webhook_url, "webhookSecret": DEMO_WEBHOOK_SECRET },
            });
            let id = self
                .simulator
                .simulator
                .create_execution(DEMO_KEY, request)?;
            executions.push(DemoExecution { id, pipeline });
        }
        Ok(executions)
    }
}

/// A gateway in front of `simulator`, using the demo key for every call.
async fn start_gateway(
    simulator: &RunningSimulator,
    poll_interval: Duration,
) -> Result<RunningGateway, Box<dyn Error>> {
    let upstream = UpstreamClient::new(&UpstreamConfig {
        base_url: simulator.base_url().parse()?,
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(10),
        max_body_bytes: 4 * 1024 * 1024,
    })?;
    let defaults = PollSettings::default();
    let settings = GatewaySettings {
        fallback_credential: Credential::new(DEMO_KEY),
        poll: PollSettings {
            interval: poll_interval,
            max_interval: defaults.max_interval.max(poll_interval),
            ..defaults
        },
        ..GatewaySettings::default()
    };
    Ok(Gateway::new(Arc::new(upstream), settings).spawn().await?)
}

/// Four pipelines: three that complete (video, image, audio) and one that fails.
fn sample_pipelines() -> Vec<Pipeline> {
    vec![
        Pipeline {
            label: "video",
            expected: ExecutionState::Completed,
            jobs: json!([
                { "id": "intro", "type": "generate", "params": { "prompt": "sunrise over a harbour" } },
                { "id": "outro", "type": "generate", "params": { "prompt": "boats leaving at dusk" } },
                { "id": "voiceover", "type": "generateAudio", "params": { "text": "A day at the harbour." } },
                { "id": "merged", "type": "merge", "params": {}, "dependsOn": ["intro", "outro", "voiceover"] },
                { "id": "subtitled", "type": "addSubtitles", "params": {}, "dependsOn": ["merged"] },
            ]),
        },
        Pipeline {
            label: "image",
            expected: ExecutionState::Completed,
            jobs: json!([
                { "id": "poster", "type": "generateImage", "params": { "prompt": "a lighthouse poster" } },
                { "id": "cutout", "type": "removeImageBackground", "params": {}, "dependsOn": ["poster"] },
            ]),
        },
        Pipeline {
            label: "audio",
            expected: ExecutionState::Completed,
            jobs: json!([
                { "id": "jingle", "type": "generateAudio", "params": { "text": "Welcome aboard." } },
            ]),
        },
        Pipeline {
            label: "failing",
            expected: ExecutionState::Failed,
            jobs: json!([
                { "id": "clip", "type": "generate", "params": { "prompt": "a talking parrot" } },
                { "id": "sync", "type": "lipSync", "dependsOn": ["clip"],
                  "params": { "simulate": { "fail": "face not detected in source video" } } },
                { "id": "final", "type": "merge", "params": {}, "dependsOn": ["sync"] },
            ]),
        },
    ]
}

/// Opens `per_execution` watch streams on every execution, on one connection, and waits
/// for all of them to end. The first watcher of each execution drives its display.
async fn watch_all(
    gateway: &RunningGateway,
    executions: &[DemoExecution],
    per_execution: usize,
) -> Result<Vec<WatchRecord>, Box<dyn Error>> {
    let connection = GatewayArgs::plaintext(gateway.uri());
    let client = connection.connect().await?;
    let lines = MultiProgress::new();

    let mut watchers = JoinSet::new();
    for (index, execution) in executions.iter().enumerate() {
        let display = ExecutionLine::new(&lines, execution.pipeline.label);
        for watcher in 0..per_execution {
            let request = Request::new(WatchExecutionRequest {
                execution_id: execution.id.clone(),
                last_revision: 0,
            });
            let display = (watcher == 0).then(|| display.clone());
            watchers.spawn(watch_one(client.clone(), request, index, display));
        }
    }
    let records = watchers.join_all().await;
    if !lines.is_hidden() {
        // indicatif leaves the cursor at the end of its last line.
        eprintln!();
    }
    Ok(records)
}

async fn watch_one(
    mut client: ExecutionStatusServiceClient<Channel>,
    request: Request<WatchExecutionRequest>,
    execution: usize,
    display: Option<ExecutionLine>,
) -> WatchRecord {
    let started = Instant::now();
    let ending = watch::follow(&mut client, request, |snapshot, heartbeat| {
        if let (Some(display), false) = (&display, heartbeat) {
            display.show(snapshot);
        }
    })
    .await;
    let lasted = started.elapsed();

    if let Some(display) = &display {
        display.finish(&ending);
    }
    WatchRecord {
        execution,
        lasted,
        ending,
    }
}

/// One execution's progress bar, or plain lines on stdout when stderr is no terminal.
#[derive(Debug, Clone)]
struct ExecutionLine {
    label: &'static str,
    bar: Option<ProgressBar>,
}

impl ExecutionLine {
    fn new(lines: &MultiProgress, label: &'static str) -> Self {
        let bar = (!lines.is_hidden()).then(|| {
            let bar = lines.add(ProgressBar::new(100).with_style(watch::execution_bar_style()));
            bar.enable_steady_tick(Duration::from_millis(120));
            bar.set_message(format!("{label:<8} waiting for the first snapshot"));
            bar
        });
        Self { label, bar }
    }

    fn show(&self, execution: &Execution) {
        let text = format!("{:<8} {}", self.label, watch::headline(execution));
        match &self.bar {
            Some(bar) => {
                bar.set_position(output::percent(execution));
                bar.set_message(text);
            }
            None => println!("{text}  ({}%)", output::percent(execution)),
        }
    }

    fn finish(&self, ending: &Ending) {
        let Some(bar) = &self.bar else {
            return;
        };
        let outcome = match ending {
            Ending::Final(execution) if execution.error.is_empty() => String::new(),
            Ending::Final(execution) => format!(": {}", execution.error),
            Ending::Refused { status, .. } => format!("  stream ended: {:?}", status.code()),
            Ending::Unfinished(_) => "  stream ended before a final state".to_owned(),
        };
        // Not `finish`, which would fill the bar of a failed execution to 100%.
        bar.abandon_with_message(format!("{}{outcome}", bar.message()));
    }
}

/// Prints the outcome of each execution and the cost comparison; returns whether every
/// execution ended as its pipeline expects, as seen by every one of its watchers.
fn print_summary(
    executions: &[DemoExecution],
    records: &[WatchRecord],
    wall_time: Duration,
    upstream_requests: u64,
) -> bool {
    println!("\nSummary");
    let mut as_expected = true;
    for (index, execution) in executions.iter().enumerate() {
        let seen: Vec<&Ending> = records
            .iter()
            .filter(|record| record.execution == index)
            .map(|record| &record.ending)
            .collect();
        as_expected &= print_execution(execution, &seen);
    }

    let durations: Vec<Duration> = records.iter().map(|record| record.lasted).collect();
    let solo_requests = solo_polling_cost(&durations);
    let watched: Duration = durations.iter().sum();
    println!();
    println!(
        "  watch streams                 {} ({} watcher-seconds in all)",
        records.len(),
        watched.as_secs()
    );
    println!(
        "  wall time                     {:.1} s",
        wall_time.as_secs_f64()
    );
    println!(
        "  upstream status requests      {upstream_requests} (sent by the gateway, counted by the simulator)"
    );
    println!(
        "  per-watcher polling at 1 s    {solo_requests} (each watcher polling alone, \
         ceil(watch seconds) requests each)"
    );
    println!(
        "  ratio                         {:.1}x fewer upstream requests through the gateway",
        solo_requests as f64 / upstream_requests.max(1) as f64
    );

    if as_expected {
        println!(
            "\nThe demo behaved as expected: the failing pipeline failed, the others completed."
        );
    } else {
        println!("\nThe demo did NOT behave as expected (see the lines marked UNEXPECTED above).");
    }
    as_expected
}

/// One summary line for an execution; whether all of its watchers saw the expected end.
fn print_execution(execution: &DemoExecution, seen: &[&Ending]) -> bool {
    let expected = execution.pipeline.expected;
    let ended_as_expected = |ending: &&Ending| matches!(ending, Ending::Final(snapshot) if snapshot.state() == expected);
    let all_as_expected = !seen.is_empty() && seen.iter().all(ended_as_expected);

    let outcome = match seen.first() {
        Some(Ending::Final(snapshot)) => final_outcome(snapshot),
        Some(Ending::Refused { status, .. }) => super::status::describe_error(status),
        Some(Ending::Unfinished(_)) => "stream ended before a final state".to_owned(),
        None => "no watcher".to_owned(),
    };
    let mark = if all_as_expected { "" } else { "  UNEXPECTED" };
    println!(
        "  {:<8} {}  {outcome}{mark}",
        execution.pipeline.label, execution.id
    );
    all_as_expected
}

/// `completed  https://…` or `failed     lipSync: …`.
fn final_outcome(execution: &Execution) -> String {
    let detail = match &execution.result {
        Some(result) => result.url.clone(),
        None => execution.error.clone(),
    };
    format!("{:<10} {detail}", output::state_text(execution))
}

/// Requests the watchers would have sent polling alone every [`SDK_POLL_INTERVAL`]: one
/// per started interval of each watch, and at least one.
fn solo_polling_cost(watch_durations: &[Duration]) -> u64 {
    watch_durations
        .iter()
        .map(|lasted| {
            let intervals = lasted.as_secs_f64() / SDK_POLL_INTERVAL.as_secs_f64();
            (intervals.ceil() as u64).max(1)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solo_polling_counts_every_started_second_and_at_least_one_request() {
        let durations = [
            Duration::ZERO,
            Duration::from_millis(300),
            Duration::from_secs(2),
            Duration::from_millis(2_001),
        ];
        assert_eq!(solo_polling_cost(&durations), 1 + 1 + 2 + 3);
    }

    #[test]
    fn exactly_one_sample_pipeline_fails() {
        let failing = sample_pipelines()
            .iter()
            .filter(|pipeline| pipeline.expected == ExecutionState::Failed)
            .count();
        assert_eq!(failing, 1);
    }
}
