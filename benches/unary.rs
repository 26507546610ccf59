//! Unary benchmark: GetExecutionStatus through the real gateway and simulator on 127.0.0.1,
//! in one process.
//!
//! Prints, for an execution that has ended (answered from the gateway's memory) and for
//! one still running (answered from the shared poller's fresh snapshot):
//! - one caller at a time on one connection: latency percentiles;
//! - many callers at once over a few connections: calls per second, latency percentiles,
//!   and the status requests Synthome saw meanwhile.
//!
//! Run: `cargo bench --bench unary` (add `-- 5000` for more sequential calls).

use std::{sync::Arc, time::Duration};

use serde_json::json;
use synthome_gateway::{
    credential::Credential,
    proto::{
        ExecutionState, GetExecutionStatusRequest,
        execution_status_service_client::ExecutionStatusServiceClient,
    },
    server::{Gateway, GatewaySettings},
    simulator::{Simulator, SimulatorConfig},
    upstream::{UpstreamClient, UpstreamConfig},
};
use tokio::time::Instant;
use tonic::transport::Channel;

const KEY: &str = "sy_test_bench";
const CONNECTIONS: usize = 4;
const CONCURRENT_CALLERS: usize = 64;
const CALLS_PER_CALLER: usize = 500;

type Client = ExecutionStatusServiceClient<Channel>;

#[tokio::main]
async fn main() {
    let sequential_calls: usize = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse().ok())
        .unwrap_or(2_000);

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
        fallback_credential: Credential::new(KEY),
        ..GatewaySettings::default()
    };
    let gateway = Gateway::new(Arc::new(upstream), settings)
        .spawn()
        .await
        .expect("gateway");
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let channel = Channel::from_shared(gateway.uri())
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        clients.push(ExecutionStatusServiceClient::new(channel));
    }

    let plan = |duration_ms: u64| {
        json!({"executionPlan": {"jobs": [
            {"id": "job1", "type": "generate", "params": {"simulate": {"durationMs": duration_ms}}}
        ]}, "options": {}})
    };
    let ended = simulator
        .simulator
        .create_execution(KEY, plan(0))
        .expect("plan");
    let running = simulator
        .simulator
        .create_execution(KEY, plan(3_600_000))
        .expect("plan");
    wait_until_completed(&clients[0], &ended).await;

    println!(
        "{:<8} {:<34} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "state", "callers", "calls/s", "p50", "p99", "max", "upstream"
    );
    for (state, id) in [("ended", &ended), ("running", &running)] {
        let before = simulator.simulator.status_requests_for(id);
        let started = Instant::now();
        let latencies = calls(&clients[0], id, sequential_calls).await;
        report(
            state,
            "1 at a time, 1 connection",
            started.elapsed(),
            latencies,
            simulator.simulator.status_requests_for(id) - before,
        );

        let before = simulator.simulator.status_requests_for(id);
        let started = Instant::now();
        let tasks: Vec<_> = (0..CONCURRENT_CALLERS)
            .map(|n| {
                let client = clients[n % CONNECTIONS].clone();
                let id = id.clone();
                tokio::spawn(async move { calls(&client, &id, CALLS_PER_CALLER).await })
            })
            .collect();
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await.expect("task"));
        }
        report(
            state,
            &format!("{CONCURRENT_CALLERS} at once, {CONNECTIONS} connections"),
            started.elapsed(),
            latencies,
            simulator.simulator.status_requests_for(id) - before,
        );
    }
}

/// Makes `count` calls one after another; returns each call's latency.
async fn calls(client: &Client, id: &str, count: usize) -> Vec<Duration> {
    let mut client = client.clone();
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        let request = GetExecutionStatusRequest {
            execution_id: id.to_owned(),
        };
        let started = Instant::now();
        client.get_execution_status(request).await.expect("status");
        latencies.push(started.elapsed());
    }
    latencies
}

async fn wait_until_completed(client: &Client, id: &str) {
    let mut client = client.clone();
    loop {
        let request = GetExecutionStatusRequest {
            execution_id: id.to_owned(),
        };
        let response = client.get_execution_status(request).await.expect("status");
        let execution = response.into_inner().execution.expect("execution");
        if execution.state() == ExecutionState::Completed {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn report(state: &str, callers: &str, took: Duration, mut latencies: Vec<Duration>, upstream: u64) {
    latencies.sort();
    let at = |share: f64| latencies[((latencies.len() - 1) as f64 * share) as usize];
    let rate = latencies.len() as f64 / took.as_secs_f64();
    println!(
        "{state:<8} {callers:<34} {rate:>10.0} {:>9} {:>9} {:>9} {upstream:>9}",
        format!("{:.2?}", at(0.5)),
        format!("{:.2?}", at(0.99)),
        format!("{:.2?}", at(1.0)),
    );
}
