//! `GET /metrics` on the operations listener, scraped as Prometheus would, after real calls
//! through a gateway in front of the simulator. Values that settle after a client leaves
//! are awaited by scraping again, never by sleeping.

mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use common::{ALICE, fast_polling, job, serve_operations, upstream_config, with_key};
use serde_json::json;
use synthome_gateway::{
    proto::{
        ExecutionState, GetExecutionStatusRequest, WatchExecutionRequest,
        execution_status_service_client::ExecutionStatusServiceClient,
    },
    server::{Gateway, GatewaySettings, RunningGateway},
    simulator::{RunningSimulator, Simulator, SimulatorConfig},
    upstream::UpstreamClient,
    webhook::WebhookSecret,
};
use tokio::time::Instant;
use tonic::{Code, Request, transport::Channel};

const SERVICE: &str = "synthome.status.v1.ExecutionStatusService";

struct Setup {
    simulator: RunningSimulator,
    gateway: RunningGateway,
    admin_addr: SocketAddr,
}

impl Setup {
    async fn start() -> Self {
        let simulator = Simulator::spawn(SimulatorConfig {
            time_scale: 0.0,
            ..SimulatorConfig::default()
        })
        .await
        .unwrap();
        let upstream = UpstreamClient::new(&upstream_config(&simulator.base_url())).unwrap();
        let settings = GatewaySettings {
            poll: fast_polling(),
            ..GatewaySettings::default()
        };
        let gateway = Gateway::new(Arc::new(upstream), settings)
            .spawn()
            .await
            .unwrap();
        let admin_addr = serve_operations(&gateway, WebhookSecret::new("whsec_metrics_test")).await;
        Self {
            simulator,
            gateway,
            admin_addr,
        }
    }

    async fn client(&self) -> ExecutionStatusServiceClient<Channel> {
        ExecutionStatusServiceClient::connect(self.gateway.uri())
            .await
            .unwrap()
    }

    fn execution(&self, duration_ms: u64) -> String {
        let jobs = json!([job(
            "job1",
            "generate",
            json!({"durationMs": duration_ms}),
            &[]
        )]);
        self.simulator
            .simulator
            .create_execution(ALICE, json!({"executionPlan": {"jobs": jobs}}))
            .unwrap()
    }

    async fn scrape(&self) -> Scrape {
        let response = reqwest::get(format!("http://{}/metrics", self.admin_addr))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(content_type.starts_with("application/openmetrics-text"));
        Scrape(response.text().await.unwrap())
    }

    /// Scrapes until `done` holds, for at most ten seconds.
    async fn scrape_until(&self, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let scrape = self.scrape().await;
            if done(&scrape) {
                return scrape;
            }
            assert!(
                Instant::now() < deadline,
                "{what} never held:\n{}",
                scrape.0
            );
            tokio::task::yield_now().await;
        }
    }
}

/// One scrape's text.
struct Scrape(String);

impl Scrape {
    /// The value of the sample `name` whose labels include every one of `labels`; 0 when
    /// there is none (a counter that was never incremented has no series).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.rsplit_once(' '))
            .find(|(series, _)| {
                let (series_name, rest) = series.split_once('{').unwrap_or((series, ""));
                series_name == name
                    && labels
                        .iter()
                        .all(|(key, value)| rest.contains(&format!("{key}=\"{value}\"")))
            })
            .map_or(0.0, |(_, value)| value.parse().unwrap())
    }

    fn rpcs(&self, method: &str, code: &str) -> f64 {
        self.value(
            "synthome_gateway_rpc_requests_total",
            &[("service", SERVICE), ("method", method), ("code", code)],
        )
    }
}

fn get_request(id: &str) -> Request<GetExecutionStatusRequest> {
    with_key(GetExecutionStatusRequest {
        execution_id: id.to_owned(),
    })
}

fn watch_request(id: &str) -> Request<WatchExecutionRequest> {
    with_key(WatchExecutionRequest {
        execution_id: id.to_owned(),
        last_revision: 0,
    })
}

#[tokio::test]
async fn rpcs_are_counted_by_method_and_the_code_the_client_got() {
    let setup = Setup::start().await;
    let mut client = setup.client().await;
    let done = setup.execution(0);

    // A job of 0 ms: the execution is completed by the first or second read.
    let execution = loop {
        let execution = client
            .get_execution_status(get_request(&done))
            .await
            .unwrap()
            .into_inner()
            .execution
            .unwrap();
        if execution.state() == ExecutionState::Completed {
            break execution;
        }
    };
    assert_eq!(execution.state(), ExecutionState::Completed);
    let not_found = client
        .get_execution_status(get_request("NoSuchExecution00001"))
        .await
        .unwrap_err();
    assert_eq!(not_found.code(), Code::NotFound);
    let invalid = client
        .get_execution_status(get_request("../etc"))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);

    let scrape = setup.scrape().await;
    let ok_reads = scrape.rpcs("GetExecutionStatus", "OK");
    assert!(ok_reads >= 1.0);
    assert_eq!(scrape.rpcs("GetExecutionStatus", "NOT_FOUND"), 1.0);
    assert_eq!(scrape.rpcs("GetExecutionStatus", "INVALID_ARGUMENT"), 1.0);
    assert_eq!(
        scrape.value(
            "synthome_gateway_rpc_duration_seconds_count",
            &[("method", "GetExecutionStatus")]
        ),
        ok_reads + 2.0,
        "every call is timed"
    );
    assert!(
        scrape.value(
            "synthome_gateway_upstream_requests_total",
            &[("outcome", "not_found")]
        ) == 1.0,
        "the unknown id cost one upstream request; the invalid one none"
    );

    // An ended execution is remembered: another read is a cache hit, not a request.
    let requests_before = scrape.value(
        "synthome_gateway_upstream_requests_total",
        &[("outcome", "ok")],
    );
    client
        .get_execution_status(get_request(&done))
        .await
        .unwrap();
    let scrape = setup.scrape().await;
    assert_eq!(
        scrape.value("synthome_gateway_cache_hits_total", &[("cache", "ended")]),
        1.0
    );
    assert_eq!(
        scrape.value(
            "synthome_gateway_upstream_requests_total",
            &[("outcome", "ok")]
        ),
        requests_before
    );
    assert!(!scrape.0.contains(ALICE), "no key in any series");
}

#[tokio::test]
async fn watches_are_counted_while_open_and_by_how_they_ended() {
    let setup = Setup::start().await;
    let client = setup.client().await;
    let execution_id = setup.execution(400);

    // Five watchers to the end, and one that leaves after its first message.
    let mut finished = Vec::new();
    for _ in 0..5 {
        let mut stream = client
            .clone()
            .watch_execution(watch_request(&execution_id))
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().expect("first message");
        finished.push(stream);
    }
    let mut leaving = client
        .clone()
        .watch_execution(watch_request(&execution_id))
        .await
        .unwrap()
        .into_inner();
    leaving.message().await.unwrap().expect("first message");

    let scrape = setup.scrape().await;
    assert_eq!(
        scrape.value("synthome_gateway_open_watch_streams", &[]),
        6.0
    );
    assert_eq!(scrape.value("synthome_gateway_active_pollers", &[]), 1.0);
    drop(leaving);

    for mut stream in finished {
        while let Some(message) = stream.message().await.unwrap() {
            if message.execution.unwrap().state() == ExecutionState::Completed {
                assert!(stream.message().await.unwrap().is_none());
                break;
            }
        }
    }

    let scrape = setup
        .scrape_until("every watch ended and the poller stopped", |scrape| {
            scrape.value("synthome_gateway_open_watch_streams", &[]) == 0.0
                && scrape.value("synthome_gateway_active_pollers", &[]) == 0.0
                && scrape.rpcs("WatchExecution", "CANCELLED") == 1.0
        })
        .await;
    assert_eq!(scrape.rpcs("WatchExecution", "OK"), 5.0);
    let requests = scrape.value(
        "synthome_gateway_upstream_requests_total",
        &[("outcome", "ok")],
    );
    let served = scrape.value("synthome_gateway_upstream_poll_watchers_total", &[]);
    let saved = scrape.value("synthome_gateway_upstream_requests_saved_total", &[]);
    assert!(requests >= 1.0);
    assert!(
        served > requests,
        "{served} watchers served by {requests} requests"
    );
    assert!(saved > 0.0 && saved <= served - 1.0, "saved {saved}");
}

#[tokio::test]
async fn webhooks_are_counted_by_result() {
    let setup = Setup::start().await;
    let url = format!("http://{}/webhooks/synthome", setup.admin_addr);
    let http = reqwest::Client::new();

    let forged = http
        .post(&url)
        .header("x-webhook-signature", "sha256=00")
        .body(r#"{"executionId":"exec_abc123"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    let too_large = http
        .post(&url)
        .body(vec![b' '; 300 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(too_large.status(), 413);

    let scrape = setup.scrape().await;
    let webhooks = |result| {
        scrape.value(
            "synthome_gateway_webhook_deliveries_total",
            &[("result", result)],
        )
    };
    assert_eq!(webhooks("bad_signature"), 1.0);
    assert_eq!(webhooks("too_large"), 1.0);
    assert_eq!(webhooks("accepted"), 0.0);
    assert!(!scrape.0.contains("whsec_metrics_test"));
}

/// One gRPC-Web frame: flags byte, big-endian length, payload.
fn grpc_web_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test]
async fn grpc_web_and_rejected_calls_are_counted_with_their_code() {
    use prost::Message;
    let setup = Setup::start().await;
    let http = reqwest::Client::builder().http1_only().build().unwrap();
    let web_call = |method: &str, body: Vec<u8>| {
        http.post(format!("{}/{SERVICE}/{method}", setup.gateway.uri()))
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .header("authorization", format!("Bearer {ALICE}"))
            .body(grpc_web_frame(&body))
            .send()
    };
    let missing = GetExecutionStatusRequest {
        execution_id: "NoSuchExecution00001".into(),
    };
    let answer = web_call("GetExecutionStatus", missing.encode_to_vec())
        .await
        .unwrap();
    let _ = answer.bytes().await.unwrap();
    let done = setup.execution(0);
    let watch = WatchExecutionRequest {
        execution_id: done,
        last_revision: 0,
    };
    let answer = web_call("WatchExecution", watch.encode_to_vec())
        .await
        .unwrap();
    let body = answer.bytes().await.unwrap();
    assert!(String::from_utf8_lossy(&body).contains("grpc-status:0"));

    let mut client = setup.client().await;
    let huge = client
        .get_execution_status(get_request(&"a".repeat(100_000)))
        .await
        .unwrap_err();
    assert_eq!(huge.code(), Code::OutOfRange);

    let scrape = setup
        .scrape_until("every call counted", |scrape| {
            scrape.rpcs("WatchExecution", "OK") == 1.0
        })
        .await;
    assert_eq!(
        scrape.rpcs("GetExecutionStatus", "NOT_FOUND"),
        1.0,
        "{}",
        scrape.0
    );
    assert_eq!(
        scrape.rpcs("GetExecutionStatus", "OUT_OF_RANGE"),
        1.0,
        "{}",
        scrape.0
    );
    assert_eq!(
        scrape.rpcs("WatchExecution", "CANCELLED"),
        0.0,
        "{}",
        scrape.0
    );
}
