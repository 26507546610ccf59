//! Fan-out benchmark: many WatchExecution streams on one execution, through the real gateway
//! and simulator on 127.0.0.1, in one process.
//!
//! Prints, for each number of watchers: the time until every watcher has its first message,
//! the time from the execution's end until every watcher has the final message, the
//! upstream status requests the gateway made against what per-watcher polling at the same
//! interval would have cost, and the resident memory added per open stream (client and
//! server sides together, since both live in this process).
//!
//! Run: `cargo bench --bench watch_fanout` (add `-- 1000 5000` to choose the sizes).

use std::{sync::Arc, time::Duration};

use serde_json::json;
use synthome_gateway::{
    proto::{
        WatchExecutionRequest, WatchExecutionResponse,
        execution_status_service_client::ExecutionStatusServiceClient,
    },
    registry::PollSettings,
    server::{Gateway, GatewaySettings},
    simulator::{Simulator, SimulatorConfig},
    upstream::{UpstreamClient, UpstreamConfig},
};
use tokio::time::Instant;
use tonic::{Request, Streaming, transport::Channel};

const KEY: &str = "sy_test_bench";
const POLL_INTERVAL: Duration = Duration::from_millis(200);
const CONNECTIONS: usize = 4;

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|arg| arg.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100, 1_000, 10_000]
    } else {
        sizes
    };

    println!(
        "{:>8} {:>14} {:>14} {:>10} {:>12} {:>9} {:>13}",
        "watchers", "first msg all", "end to all", "upstream", "per-watcher", "saved", "KiB/stream"
    );
    for watchers in sizes {
        run(watchers).await;
    }
}

async fn run(watchers: usize) {
    let simulator = Simulator::spawn(SimulatorConfig::default())
        .await
        .expect("simulator");
    let upstream = UpstreamClient::new(&UpstreamConfig {
        base_url: simulator.base_url().parse().expect("url"),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        max_body_bytes: 1 << 20,
    })
    .expect("client");
    let settings = GatewaySettings {
        poll: PollSettings {
            interval: POLL_INTERVAL,
            max_interval: POLL_INTERVAL,
            ..PollSettings::default()
        },
        ..GatewaySettings::default()
    };
    let gateway = Gateway::new(Arc::new(upstream), settings)
        .spawn()
        .await
        .expect("gateway");

    // A job long enough to open every stream, then short enough to end the run.
    let job_ms = 2_000 + watchers as u64 / 2;
    let plan = json!({"executionPlan": {"jobs": [
        {"id": "job1", "type": "generate", "params": {"simulate": {"durationMs": job_ms}}}
    ]}, "options": {}});
    let id = simulator
        .simulator
        .create_execution(KEY, plan)
        .expect("plan");

    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let channel = Channel::from_shared(gateway.uri())
            .expect("uri")
            .initial_connection_window_size(16 * 1024 * 1024)
            .connect()
            .await
            .expect("connect");
        clients.push(ExecutionStatusServiceClient::new(channel));
    }

    let memory_before = resident_kib();
    let started = Instant::now();
    let opening: Vec<_> = (0..watchers)
        .map(|n| {
            let client = clients[n % CONNECTIONS].clone();
            let id = id.clone();
            tokio::spawn(async move { open(client, &id).await })
        })
        .collect();
    let mut streams = Vec::with_capacity(watchers);
    for task in opening {
        streams.push(task.await.expect("task"));
    }
    let first_to_all = started.elapsed();
    let memory_per_stream = resident_kib().saturating_sub(memory_before) as f64 / watchers as f64;

    let finishing: Vec<_> = streams
        .into_iter()
        .map(|stream| tokio::spawn(read_to_end(stream)))
        .collect();
    let mut last_end = started;
    for task in finishing {
        last_end = last_end.max(task.await.expect("task"));
    }
    let execution_end = started + Duration::from_millis(job_ms);
    let end_to_all = last_end.saturating_duration_since(execution_end);

    let upstream = simulator.simulator.status_requests_for(&id);
    let watched = last_end.duration_since(started);
    let per_watcher =
        watchers as u64 * watched.as_millis().div_ceil(POLL_INTERVAL.as_millis()) as u64;
    println!(
        "{watchers:>8} {:>14} {:>14} {upstream:>10} {per_watcher:>12} {:>8.0}x {memory_per_stream:>13.1}",
        format!("{first_to_all:.2?}"),
        format!("{end_to_all:.2?}"),
        per_watcher as f64 / upstream.max(1) as f64,
    );
}

async fn open(
    mut client: ExecutionStatusServiceClient<Channel>,
    id: &str,
) -> Streaming<WatchExecutionResponse> {
    let mut request = Request::new(WatchExecutionRequest {
        execution_id: id.to_owned(),
        last_revision: 0,
    });
    let bearer = format!("Bearer {KEY}").parse().expect("ascii");
    request.metadata_mut().insert("authorization", bearer);
    let mut stream = client
        .watch_execution(request)
        .await
        .expect("watch")
        .into_inner();
    stream.message().await.expect("first").expect("a message");
    stream
}

/// Reads to the end of the stream; returns when the last message arrived.
async fn read_to_end(mut stream: Streaming<WatchExecutionResponse>) -> Instant {
    let mut last = Instant::now();
    while let Some(_message) = stream.message().await.expect("stream ends OK") {
        last = Instant::now();
    }
    last
}

/// Resident set size of this process, from /proc (0 where it is not available).
fn resident_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .unwrap_or(0);
    pages * 4
}
