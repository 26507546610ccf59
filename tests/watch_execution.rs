//! WatchExecution end to end: clients, the gateway, its webhook listener and the simulator,
//! each on its own socket on 127.0.0.1. Tests wait on messages and counters, never on
//! fixed sleeps.

mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use common::{ALICE, BOB, fast_polling, job, serve_operations, upstream_config};
use serde_json::{Value, json};
use synthome_gateway::{
    proto::{
        ExecutionState, WatchExecutionRequest, WatchExecutionResponse,
        execution_status_service_client::ExecutionStatusServiceClient,
    },
    registry::PollSettings,
    server::{Gateway, GatewaySettings, RunningGateway},
    simulator::{Faults, RunningSimulator, Simulator, SimulatorConfig},
    upstream::UpstreamClient,
    webhook::WebhookSecret,
};
use tokio::time::Instant;
use tonic::{Code, Request, Status, Streaming, transport::Channel};
use tonic_types::StatusExt;

const WEBHOOK_SECRET: &str = "whsec_test_secret";

type Client = ExecutionStatusServiceClient<Channel>;

/// A simulator, a gateway and its operations listener.
struct Setup {
    simulator: RunningSimulator,
    gateway: RunningGateway,
    admin_addr: SocketAddr,
}

impl Setup {
    async fn start(poll: PollSettings, heartbeat_interval: Duration) -> Self {
        let simulator = Simulator::spawn(SimulatorConfig {
            time_scale: 0.0,
            ..SimulatorConfig::default()
        })
        .await
        .unwrap();
        let upstream = UpstreamClient::new(&upstream_config(&simulator.base_url())).unwrap();
        let settings = GatewaySettings {
            poll,
            heartbeat_interval,
            ..GatewaySettings::default()
        };
        let gateway = Gateway::new(Arc::new(upstream), settings)
            .spawn()
            .await
            .unwrap();

        let admin_addr = serve_operations(&gateway, WebhookSecret::new(WEBHOOK_SECRET)).await;
        Self {
            simulator,
            gateway,
            admin_addr,
        }
    }

    async fn fast() -> Self {
        Self::start(fast_polling(), Duration::from_secs(30)).await
    }

    /// An execution owned by `key`, with a signed webhook to the gateway when `webhook`.
    fn create(&self, key: &str, jobs: Value, webhook: bool) -> String {
        let options = if webhook {
            json!({"webhook": format!("http://{}/webhooks/synthome", self.admin_addr),
                   "webhookSecret": WEBHOOK_SECRET})
        } else {
            json!({})
        };
        let request = json!({"executionPlan": {"jobs": jobs}, "options": options});
        self.simulator
            .simulator
            .create_execution(key, request)
            .unwrap()
    }

    async fn client(&self) -> Client {
        common::client(&self.gateway).await
    }

    fn upstream_reads(&self, id: &str) -> u64 {
        self.simulator.simulator.status_requests_for(id)
    }
}

fn watch_request(key: &str, id: &str, last_revision: u64) -> Request<WatchExecutionRequest> {
    let mut request = Request::new(WatchExecutionRequest {
        execution_id: id.to_owned(),
        last_revision,
    });
    let value = format!("Bearer {key}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

async fn watch(client: &Client, key: &str, id: &str) -> Streaming<WatchExecutionResponse> {
    client
        .clone()
        .watch_execution(watch_request(key, id, 0))
        .await
        .expect("the watch starts")
        .into_inner()
}

/// Reads a stream to its end: the messages, and the status it ended with (None for OK).
async fn read_to_end(
    stream: &mut Streaming<WatchExecutionResponse>,
) -> (Vec<WatchExecutionResponse>, Option<Status>) {
    let mut messages = Vec::new();
    let read = async {
        loop {
            match stream.message().await {
                Ok(Some(message)) => messages.push(message),
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    };
    let end = tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("the stream ends within 20 s");
    (messages, end)
}

fn state(message: &WatchExecutionResponse) -> ExecutionState {
    message.execution.as_ref().unwrap().state()
}

fn revision(message: &WatchExecutionResponse) -> u64 {
    message.execution.as_ref().unwrap().revision
}

fn reason(status: &Status) -> String {
    status.get_details_error_info().unwrap().reason
}

/// Waits, polling a condition, for at most ten seconds.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn slow_pipeline() -> Value {
    json!([job("job1", "generate", json!({"durationMs": 600_000}), &[])])
}

#[tokio::test]
async fn many_watchers_on_several_connections_share_one_upstream_poll_per_interval() {
    // Heartbeats every 500 ms give a readiness signal that time has passed for everyone.
    let setup = Setup::start(fast_polling(), Duration::from_millis(500)).await;
    let id = setup.create(ALICE, slow_pipeline(), false);

    let mut streams = Vec::new();
    for _connection in 0..4 {
        let client = setup.client().await;
        for _ in 0..75 {
            streams.push(watch(&client, ALICE, &id).await);
        }
    }
    let started = Instant::now();
    let reads_before = setup.upstream_reads(&id);
    for stream in &mut streams {
        let first = stream.message().await.unwrap().unwrap();
        assert!(!first.heartbeat);
    }
    for stream in &mut streams {
        let heartbeat = stream.message().await.unwrap().unwrap();
        assert!(
            heartbeat.heartbeat,
            "nothing changed, so only a heartbeat comes"
        );
    }
    let elapsed = started.elapsed();
    let reads = setup.upstream_reads(&id) - reads_before;

    // 300 watchers; one poller at 50 ms intervals (backing off to 200 ms) at most.
    let at_most = (elapsed.as_millis() / 50) as u64 + 2;
    assert!(reads <= at_most, "{reads} upstream reads in {elapsed:?}");
    assert_eq!(setup.gateway.registry.active_pollers(), 1);
}

#[tokio::test]
async fn the_first_message_does_not_wait_for_a_poll_tick() {
    let poll = PollSettings {
        interval: Duration::from_secs(30),
        max_interval: Duration::from_secs(30),
        ..fast_polling()
    };
    let setup = Setup::start(poll, Duration::from_secs(60)).await;
    let id = setup.create(ALICE, slow_pipeline(), false);
    let client = setup.client().await;

    let started = Instant::now();
    let mut first = watch(&client, ALICE, &id).await;
    first.message().await.unwrap().unwrap();
    let mut second = watch(&client, ALICE, &id).await;
    let message = second.message().await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(state(&message), ExecutionState::Processing);
    assert_eq!(
        setup.upstream_reads(&id),
        1,
        "the second watcher joined the first poller"
    );
}

#[tokio::test]
async fn a_watch_follows_the_execution_to_its_end_with_growing_revisions() {
    let setup = Setup::fast().await;
    let id = setup.create(
        ALICE,
        json!([
            job("job1", "generate", json!({"durationMs": 150}), &[]),
            job(
                "job2",
                "generateAudio",
                json!({"durationMs": 150}),
                &["job1"]
            ),
            job("job3", "merge", json!({"durationMs": 150}), &["job2"]),
        ]),
        false,
    );
    let client = setup.client().await;

    let (messages, end) = read_to_end(&mut watch(&client, ALICE, &id).await).await;
    assert!(end.is_none(), "the stream ends OK: {end:?}");
    assert!(messages.len() >= 2, "{messages:?}");
    assert!(messages.iter().all(|m| !m.heartbeat));
    let revisions: Vec<u64> = messages.iter().map(revision).collect();
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
    let executions: Vec<_> = messages
        .iter()
        .map(|m| m.execution.clone().unwrap())
        .collect();
    assert!(
        executions.windows(2).all(|w| w[0] != w[1]),
        "no snapshot is sent twice"
    );
    let last = messages.last().unwrap();
    assert_eq!(state(last), ExecutionState::Completed);
    assert_eq!(
        last.execution
            .as_ref()
            .unwrap()
            .progress
            .as_ref()
            .unwrap()
            .progress,
        100.0
    );
}

#[tokio::test]
async fn a_slow_reader_still_gets_the_final_state() {
    let setup = Setup::fast().await;
    let id = setup.create(
        ALICE,
        json!([
            job("job1", "generate", json!({"durationMs": 100}), &[]),
            job("job2", "merge", json!({"durationMs": 100}), &["job1"]),
        ]),
        false,
    );
    let client = setup.client().await;
    let mut slow = watch(&client, ALICE, &id).await;
    let first = slow.message().await.unwrap().unwrap();

    // Not reading `slow` while the execution runs to its end, as seen by another watcher.
    let (_, end) = read_to_end(&mut watch(&client, ALICE, &id).await).await;
    assert!(end.is_none());

    let (rest, end) = read_to_end(&mut slow).await;
    assert!(end.is_none(), "{end:?}");
    let last = rest.last().expect("the final state is delivered");
    assert_eq!(state(last), ExecutionState::Completed);
    assert!(revision(last) > revision(&first));
}

#[tokio::test]
async fn leaving_watchers_and_passed_deadlines_free_the_poller() {
    let setup = Setup::fast().await;
    let id = setup.create(ALICE, slow_pipeline(), false);
    let client = setup.client().await;
    let registry = setup.gateway.registry.clone();

    let mut streams = Vec::new();
    for _ in 0..10 {
        let mut stream = watch(&client, ALICE, &id).await;
        stream.message().await.unwrap().unwrap();
        streams.push(stream);
    }
    assert_eq!(registry.active_pollers(), 1);
    drop(streams);
    eventually("the poller stops after its linger", || {
        registry.active_pollers() == 0
    })
    .await;
    let reads = setup.upstream_reads(&id);

    let mut request = watch_request(ALICE, &id, 0);
    request.set_timeout(Duration::from_millis(300));
    let mut stream = client
        .clone()
        .watch_execution(request)
        .await
        .unwrap()
        .into_inner();
    let (messages, end) = read_to_end(&mut stream).await;
    assert_eq!(messages.len(), 1);
    let end = end.expect("the deadline ends the stream");
    assert_eq!(end.code(), Code::DeadlineExceeded, "{end:?}");
    eventually("the poller stops after the deadline", || {
        registry.active_pollers() == 0
    })
    .await;
    assert!(setup.upstream_reads(&id) > reads);
}

#[tokio::test]
async fn two_keys_never_share_a_poller_or_an_answer() {
    let setup = Setup::fast().await;
    let id = setup.create(
        ALICE,
        json!([job("job1", "generate", json!({"durationMs": 500}), &[])]),
        false,
    );
    let client = setup.client().await;

    let mut alices = watch(&client, ALICE, &id).await;
    let first = alices.message().await.unwrap().unwrap();
    assert_eq!(state(&first), ExecutionState::Processing);
    let (messages, end) = read_to_end(&mut watch(&client, BOB, &id).await).await;
    assert!(messages.is_empty(), "Bob sees nothing of Alice's execution");
    let end = end.unwrap();
    assert_eq!(end.code(), Code::NotFound);
    assert_eq!(reason(&end), "EXECUTION_NOT_FOUND");

    // Alice's stream goes on, untouched by Bob's failure, to its end.
    let (messages, end) = read_to_end(&mut alices).await;
    assert!(end.is_none(), "{end:?}");
    assert_eq!(state(messages.last().unwrap()), ExecutionState::Completed);
}

#[tokio::test]
async fn a_signed_webhook_delivers_the_end_long_before_the_next_poll() {
    let poll = PollSettings {
        interval: Duration::from_secs(30),
        max_interval: Duration::from_secs(30),
        ..fast_polling()
    };
    let setup = Setup::start(poll, Duration::from_secs(60)).await;
    let id = setup.create(
        ALICE,
        json!([job("job1", "generate", json!({"durationMs": 300}), &[])]),
        true,
    );
    let client = setup.client().await;

    let started = Instant::now();
    let (messages, end) = read_to_end(&mut watch(&client, ALICE, &id).await).await;
    assert!(end.is_none(), "{end:?}");
    assert_eq!(state(messages.last().unwrap()), ExecutionState::Completed);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "ended after {took:?}; the next poll was 30 s away"
    );
    assert_eq!(
        setup.upstream_reads(&id),
        2,
        "the first poll, then the webhook's refresh"
    );
}

#[tokio::test]
async fn forged_or_missing_webhook_signatures_are_refused() {
    let setup = Setup::fast().await;
    let id = setup.create(ALICE, slow_pipeline(), false);
    let url = format!("http://{}/webhooks/synthome", setup.admin_addr);
    let body = json!({"executionId": id, "status": "completed"}).to_string();
    let http = reqwest::Client::new();

    let forged = http
        .post(&url)
        .header("content-type", "application/json")
        .header("x-webhook-signature", format!("sha256={}", "ab".repeat(32)))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    let unsigned = http.post(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(unsigned.status(), 401);
    let oversized = http
        .post(&url)
        .body(vec![b'x'; 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(oversized.status(), 413);
}

#[tokio::test]
async fn a_short_outage_does_not_end_streams_and_a_long_one_does() {
    let setup = Setup::fast().await;
    let id = setup.create(
        ALICE,
        json!([job("job1", "generate", json!({"durationMs": 1_500}), &[])]),
        false,
    );
    let client = setup.client().await;
    let mut stream = watch(&client, ALICE, &id).await;
    stream.message().await.unwrap().unwrap();

    setup.simulator.simulator.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let reads = setup.upstream_reads(&id);
    eventually("three failed polls", || {
        setup.upstream_reads(&id) >= reads + 3
    })
    .await;
    setup.simulator.simulator.set_faults(Faults::default());

    let (messages, end) = read_to_end(&mut stream).await;
    assert!(
        end.is_none(),
        "a short outage must not end the stream: {end:?}"
    );
    assert_eq!(state(messages.last().unwrap()), ExecutionState::Completed);

    // Now an outage longer than the timeout.
    let poll = PollSettings {
        outage_timeout: Duration::from_millis(400),
        ..fast_polling()
    };
    let setup = Setup::start(poll, Duration::from_secs(30)).await;
    let id = setup.create(ALICE, slow_pipeline(), false);
    let client = setup.client().await;
    let mut stream = watch(&client, ALICE, &id).await;
    stream.message().await.unwrap().unwrap();
    setup.simulator.simulator.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let (_, end) = read_to_end(&mut stream).await;
    let end = end.expect("the outage ends the stream");
    assert_eq!(end.code(), Code::Unavailable);
    assert_eq!(reason(&end), "UPSTREAM_OUTAGE");
    assert!(end.get_details_retry_info().is_some());
}

#[tokio::test]
async fn a_reconnect_with_the_current_revision_gets_no_duplicate() {
    let setup = Setup::start(fast_polling(), Duration::from_millis(300)).await;
    let id = setup.create(ALICE, slow_pipeline(), false);
    let client = setup.client().await;
    let mut first = watch(&client, ALICE, &id).await;
    let seen = revision(&first.message().await.unwrap().unwrap());

    let mut resumed = client
        .clone()
        .watch_execution(watch_request(ALICE, &id, seen))
        .await
        .unwrap()
        .into_inner();
    let message = resumed.message().await.unwrap().unwrap();
    assert!(
        message.heartbeat,
        "the first message is held back until a heartbeat"
    );
    assert_eq!(revision(&message), seen);
}

#[tokio::test]
async fn a_watch_of_an_unknown_execution_ends_with_not_found() {
    let setup = Setup::fast().await;
    let client = setup.client().await;
    let (messages, end) = read_to_end(&mut watch(&client, ALICE, "exec_missing").await).await;
    assert!(messages.is_empty());
    assert_eq!(end.unwrap().code(), Code::NotFound);

    let invalid = client
        .clone()
        .watch_execution(watch_request(ALICE, "../x", 0))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert_eq!(setup.simulator.simulator.status_requests(), 1);
}

#[tokio::test]
async fn thousands_of_watches_fit_on_one_connection() {
    let setup = Setup::fast().await;
    let id = setup.create(ALICE, slow_pipeline(), false);
    let client = setup.client().await;

    let opened: Vec<_> = (0..10_000)
        .map(|_| {
            let client = client.clone();
            let id = id.clone();
            tokio::spawn(async move {
                let mut stream = watch(&client, ALICE, &id).await;
                let first = stream.message().await.unwrap().unwrap();
                (stream, first)
            })
        })
        .collect();
    let mut streams = Vec::new();
    for task in opened {
        let (stream, first) = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("every watch gets its first message")
            .unwrap();
        assert_eq!(state(&first), ExecutionState::Processing);
        streams.push(stream);
    }
    assert_eq!(streams.len(), 10_000);
    assert_eq!(setup.gateway.registry.active_pollers(), 1);
}

#[tokio::test]
async fn shutting_down_ends_open_watches_with_unavailable() {
    let setup = Setup::fast().await;
    let id = setup.create(ALICE, slow_pipeline(), false);
    let client = setup.client().await;
    let mut streams = Vec::new();
    for _ in 0..50 {
        let mut stream = watch(&client, ALICE, &id).await;
        stream.message().await.unwrap().unwrap();
        streams.push(stream);
    }

    let Setup { gateway, .. } = setup;
    let shutdown = tokio::spawn(gateway.shutdown());
    for stream in &mut streams {
        let (_, end) = read_to_end(stream).await;
        let end = end.expect("the drain ends the stream");
        assert_eq!(end.code(), Code::Unavailable);
        assert_eq!(reason(&end), "GATEWAY_SHUTTING_DOWN");
    }
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("the server stops once its streams have ended")
        .unwrap()
        .unwrap();
}
