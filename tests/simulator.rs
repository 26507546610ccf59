//! The simulator over a real socket: shapes, progression, errors, faults,
//! control routes and signed webhooks, as a gateway would meet them.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Sha256;
use synthome_gateway::simulator::{Faults, RunningSimulator, Simulator, SimulatorConfig};
use tokio::sync::mpsc;

const KEY: &str = "sy_test_alice";
const OTHER_KEY: &str = "sy_test_bob";

/// Upper bound on any wait for a simulated state, far above the durations used.
const WAIT_LIMIT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(10);

struct Harness {
    running: RunningSimulator,
    http: reqwest::Client,
}

impl Harness {
    async fn start(config: SimulatorConfig) -> Self {
        let running = Simulator::spawn(config).await.expect("simulator starts");
        Self {
            running,
            http: reqwest::Client::new(),
        }
    }

    fn simulator(&self) -> &Simulator {
        &self.running.simulator
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running.addr)
    }

    async fn create(&self, key: &str, request: Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(self.running.base_url())
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(request.to_string())
            .send()
            .await
            .expect("create request");
        let status = response.status();
        (status, parse(&response.text().await.expect("create body")))
    }

    async fn create_ok(&self, key: &str, jobs: Value) -> String {
        let (status, body) = self.create(key, plan(jobs)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["executionId"]
            .as_str()
            .expect("executionId")
            .to_owned()
    }

    async fn status_raw(&self, key: Option<&str>, id: &str) -> (StatusCode, HeaderMap, String) {
        let mut request = self
            .http
            .get(format!("{}/{id}/status", self.running.base_url()));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("status request");
        let status = response.status();
        let headers = response.headers().clone();
        (status, headers, response.text().await.expect("status body"))
    }

    async fn status(&self, key: &str, id: &str) -> (StatusCode, Value) {
        let (status, _, body) = self.status_raw(Some(key), id).await;
        (status, parse(&body))
    }

    /// Polls until `done` holds, returning every body seen (the last one satisfies it).
    async fn poll_until(&self, id: &str, done: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
        let mut seen = Vec::new();
        loop {
            let (status, body) = self.status(KEY, id).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let finished = done(&body);
            seen.push(body);
            if finished {
                return seen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gave up waiting; last status {:?}",
                seen.last()
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn control(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, self.url(path));
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        let response = request.send().await.expect("control request");
        let status = response.status();
        (status, parse(&response.text().await.expect("control body")))
    }
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body:?}"))
}

fn plan(jobs: Value) -> Value {
    json!({ "executionPlan": { "jobs": jobs }, "options": {} })
}

fn job(id: &str, operation: &str, duration_ms: u64, depends_on: &[&str]) -> Value {
    json!({
        "id": id,
        "type": operation,
        "params": { "simulate": { "durationMs": duration_ms } },
        "dependsOn": depends_on,
    })
}

fn keys(value: &Value) -> BTreeSet<&str> {
    value
        .as_object()
        .expect("a JSON object")
        .keys()
        .map(String::as_str)
        .collect()
}

fn is_terminal(body: &Value) -> bool {
    matches!(body["status"].as_str(), Some("completed" | "failed"))
}

fn job_status<'a>(body: &'a Value, id: &str) -> &'a str {
    body["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|job| job["id"] == id))
        .and_then(|job| job["status"].as_str())
        .expect("job present")
}

fn is_iso_millis(timestamp: &Value) -> bool {
    timestamp.as_str().is_some_and(|text| {
        text.len() == 24
            && text.ends_with('Z')
            && text.as_bytes()[10] == b'T'
            && text.as_bytes()[19] == b'.'
    })
}

#[tokio::test]
async fn create_and_status_have_the_documented_shapes() {
    let harness = Harness::start(SimulatorConfig::default()).await;

    let (status, created) = harness
        .create(KEY, plan(json!([job("clip", "generate", 20, &[])])))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        keys(&created),
        BTreeSet::from(["executionId", "status", "createdAt"])
    );
    assert_eq!(created["status"], "pending");
    assert!(is_iso_millis(&created["createdAt"]));
    let id = created["executionId"].as_str().expect("executionId");
    assert_eq!(id.len(), 21);
    assert!(id.bytes().all(|byte| byte.is_ascii_alphanumeric()));

    let seen = harness.poll_until(id, is_terminal).await;
    let done = seen.last().expect("at least one status");
    assert_eq!(
        keys(done),
        BTreeSet::from([
            "id",
            "status",
            "jobs",
            "result",
            "error",
            "createdAt",
            "completedAt"
        ])
    );
    assert_eq!(
        keys(&done["jobs"][0]),
        BTreeSet::from(["id", "operation", "status", "result", "error"])
    );
    assert_eq!(done["id"], id);
    assert_eq!(done["status"], "completed");
    assert_eq!(done["jobs"][0]["operation"], "generate");
    assert_eq!(done["jobs"][0]["result"]["status"], "completed");
    assert!(done["error"].is_null());
    assert_eq!(done["createdAt"], created["createdAt"]);
    assert!(is_iso_millis(&done["completedAt"]));

    let result = &done["result"];
    assert!(result["url"].is_string());
    assert_eq!(result["type"], "video");
    for key in ["duration", "format", "size", "model"] {
        assert!(result.get(key).is_some(), "result lacks {key}: {result}");
    }
}

#[tokio::test]
async fn executions_progress_from_pending_through_processing_to_completed() {
    let harness = Harness::start(SimulatorConfig::default()).await;
    let id = harness
        .create_ok(KEY, json!([job("a", "generateImage", 150, &[])]))
        .await;

    let seen = harness.poll_until(&id, is_terminal).await;
    let mut statuses: Vec<&str> = seen
        .iter()
        .filter_map(|body| body["status"].as_str())
        .collect();
    statuses.dedup();

    assert_eq!(statuses, ["pending", "processing", "completed"]);
    for body in &seen {
        assert_eq!(body["completedAt"].is_null(), !is_terminal(body));
    }
}

#[tokio::test]
async fn jobs_wait_for_their_dependencies() {
    let harness = Harness::start(SimulatorConfig {
        time_scale: 0.1,
        ..SimulatorConfig::default()
    })
    .await;
    let id = harness
        .create_ok(
            KEY,
            json!([
                job("merge", "merge", 60, &["a", "b"]),
                job("a", "generate", 60, &[]),
                job("b", "generate", 120, &[]),
            ]),
        )
        .await;

    let seen = harness.poll_until(&id, is_terminal).await;

    for body in &seen {
        if job_status(body, "merge") != "pending" {
            assert_eq!(job_status(body, "a"), "completed", "{body}");
            assert_eq!(job_status(body, "b"), "completed", "{body}");
        }
    }
    let done = seen.last().expect("at least one status");
    assert_eq!(done["status"], "completed");
    assert!(
        done["result"]["url"]
            .as_str()
            .is_some_and(|url| url.ends_with("/merge.mp4"))
    );
}

#[tokio::test]
async fn a_failed_job_fails_the_execution_with_joined_errors() {
    let harness = Harness::start(SimulatorConfig::default()).await;
    let id = harness
        .create_ok(
            KEY,
            json!([
                { "id": "voice", "type": "generateAudio",
                  "params": { "simulate": { "durationMs": 10, "fail": "voice model unavailable" } } },
                job("mix", "merge", 10, &["voice"]),
            ]),
        )
        .await;

    let seen = harness.poll_until(&id, is_terminal).await;
    let failed = seen.last().expect("at least one status");

    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"], "generateAudio: voice model unavailable");
    assert!(failed["result"].is_null());
    assert!(is_iso_millis(&failed["completedAt"]));
    assert_eq!(failed["jobs"][0]["error"], "voice model unavailable");
    assert_eq!(job_status(failed, "voice"), "failed");
    assert_eq!(job_status(failed, "mix"), "pending");
}

#[tokio::test]
async fn another_key_cannot_read_an_execution() {
    let harness = Harness::start(SimulatorConfig::default()).await;
    let id = harness
        .create_ok(KEY, json!([job("a", "generate", 10, &[])]))
        .await;

    let (status, body) = harness.status(OTHER_KEY, &id).await;

    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, json!({ "error": "Execution not found" }));
}

#[tokio::test]
async fn errors_use_the_upstream_bodies() {
    let harness = Harness::start(SimulatorConfig {
        api_keys: vec![KEY.to_owned()],
        ..SimulatorConfig::default()
    })
    .await;
    let id = harness
        .create_ok(KEY, json!([job("a", "generate", 10, &[])]))
        .await;
    let missing =
        json!({ "error": "Unauthorized", "message": "Missing or invalid Authorization header" });

    let (status, _, body) = harness.status_raw(None, &id).await;
    assert_eq!(
        (status, parse(&body)),
        (StatusCode::UNAUTHORIZED, missing.clone())
    );

    let garbled = harness
        .http
        .get(format!("{}/{id}/status", harness.running.base_url()))
        .header("authorization", format!("Token {KEY}"))
        .send()
        .await
        .expect("status request");
    assert_eq!(garbled.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(parse(&garbled.text().await.expect("body")), missing);

    let (status, body) = harness.status(OTHER_KEY, &id).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        body,
        json!({ "error": "Unauthorized", "message": "Invalid or inactive API key" })
    );

    let (status, body) = harness.status(KEY, "V1StGXR8Z5jdHi6BmyT12").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, json!({ "error": "Execution not found" }));
}

#[tokio::test]
async fn invalid_plans_are_refused_with_400() {
    let harness = Harness::start(SimulatorConfig::default()).await;
    let refused = [
        plan(json!([])),
        plan(json!([
            job("a", "generate", 1, &[]),
            job("a", "merge", 1, &[])
        ])),
        plan(json!([job("a", "merge", 1, &["ghost"])])),
        plan(json!([
            job("a", "merge", 1, &["b"]),
            job("b", "merge", 1, &["a"])
        ])),
        json!({ "executionPlan": "not a plan" }),
    ];

    for request in refused {
        let (status, body) = harness.create(KEY, request.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{request}");
        assert_eq!(body["error"], "Bad Request");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|message| !message.is_empty())
        );
    }
}

#[tokio::test]
async fn rate_limit_fault_answers_429_with_retry_after() {
    let harness = Harness::start(SimulatorConfig {
        faults: Faults {
            rate_limit_rate: 1.0,
            retry_after_secs: 7,
            ..Faults::default()
        },
        ..SimulatorConfig::default()
    })
    .await;
    let id = harness
        .create_ok(KEY, json!([job("a", "generate", 10, &[])]))
        .await;

    let (status, headers, body) = harness.status_raw(Some(KEY), &id).await;

    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("7")
    );
    let body = parse(&body);
    assert_eq!(body["error"], "Rate Limit Exceeded");
    assert_eq!(body["code"], "RATE_LIMIT_EXCEEDED");
    assert!(body["message"].is_string());
}

#[tokio::test]
async fn error_fault_answers_500() {
    let harness = Harness::start(SimulatorConfig::default()).await;
    let id = harness
        .create_ok(KEY, json!([job("a", "generate", 10, &[])]))
        .await;
    harness.simulator().set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });

    let (status, body) = harness.status(KEY, &id).await;

    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(keys(&body), BTreeSet::from(["error", "message"]));
    assert_eq!(body["error"], "Internal Server Error");
}

#[tokio::test]
async fn malformed_fault_answers_200_with_an_undocumented_body() {
    let harness = Harness::start(SimulatorConfig::default()).await;
    let id = harness
        .create_ok(KEY, json!([job("a", "generate", 10, &[])]))
        .await;
    harness.simulator().set_faults(Faults {
        malformed_rate: 1.0,
        ..Faults::default()
    });

    for _ in 0..8 {
        let (status, _, body) = harness.status_raw(Some(KEY), &id).await;
        assert_eq!(status, StatusCode::OK);
        let documented = serde_json::from_str::<Value>(&body).is_ok_and(|value| {
            value["id"].is_string() && value["status"].is_string() && value["jobs"].is_array()
        });
        assert!(!documented, "body looks valid: {body}");
    }
}

#[tokio::test]
async fn latency_fault_delays_every_status_answer() {
    let harness = Harness::start(SimulatorConfig::default()).await;
    harness.simulator().set_faults(Faults {
        latency_ms: 150,
        ..Faults::default()
    });

    let started = std::time::Instant::now();
    let (status, _, _) = harness.status_raw(None, "anything").await;

    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn control_routes_report_counters_and_replace_faults() {
    let harness = Harness::start(SimulatorConfig::default()).await;
    let id = harness
        .create_ok(KEY, json!([job("a", "generate", 10, &[])]))
        .await;
    harness.status(KEY, &id).await;
    harness.status(OTHER_KEY, &id).await;
    harness.status_raw(None, "unknown").await;

    let (status, stats) = harness
        .control(reqwest::Method::GET, "/_simulator/stats", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stats, json!({ "statusRequests": 3, "createRequests": 1 }));
    assert_eq!(harness.simulator().status_requests(), 3);
    assert_eq!(harness.simulator().status_requests_for(&id), 2);
    assert_eq!(harness.simulator().status_requests_for("unknown"), 1);

    let faults = json!({
        "errorRate": 0.25, "latencyMs": 5, "rateLimitRate": 0.5,
        "retryAfterSecs": 3, "malformedRate": 0.125,
    });
    let (status, echoed) = harness
        .control(
            reqwest::Method::PUT,
            "/_simulator/faults",
            Some(faults.clone()),
        )
        .await;
    assert_eq!((status, echoed), (StatusCode::OK, faults.clone()));
    let (_, read) = harness
        .control(reqwest::Method::GET, "/_simulator/faults", None)
        .await;
    assert_eq!(read, faults);
    assert_eq!(harness.simulator().faults().retry_after_secs, 3);

    let (status, body) = harness
        .control(
            reqwest::Method::PUT,
            "/_simulator/faults",
            Some(json!({ "errorRate": 3.0 })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "Bad Request");
    assert_eq!(harness.simulator().faults().retry_after_secs, 3);
}

#[tokio::test]
async fn webhook_is_delivered_with_a_valid_signature() {
    let (received_tx, mut received) = mpsc::unbounded_channel::<(HeaderMap, Bytes)>();
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let received_tx = received_tx.clone();
            async move {
                let _ = received_tx.send((headers, body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("receiver binds");
    let hook_url = format!(
        "http://{}/hook",
        listener.local_addr().expect("receiver addr")
    );
    tokio::spawn(async move { axum::serve(listener, receiver).await });

    let harness = Harness::start(SimulatorConfig::default()).await;
    let (status, created) = harness
        .create(
            KEY,
            json!({
                "executionPlan": { "jobs": [job("a", "generateImage", 20, &[])] },
                "options": { "webhook": hook_url, "webhookSecret": "whsec_test" },
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let (headers, body) = tokio::time::timeout(WAIT_LIMIT, received.recv())
        .await
        .expect("webhook arrives in time")
        .expect("receiver alive");

    assert_eq!(headers["content-type"], "application/json");
    let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec_test").expect("any key length");
    mac.update(&body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(headers["x-webhook-signature"], expected.as_str());

    let payload = parse(std::str::from_utf8(&body).expect("UTF-8 body"));
    assert_eq!(
        keys(&payload),
        BTreeSet::from(["executionId", "status", "result", "error", "completedAt"])
    );
    assert_eq!(payload["executionId"], created["executionId"]);
    assert_eq!(payload["status"], "completed");
    assert_eq!(payload["result"]["type"], "image");
    assert!(is_iso_millis(&payload["completedAt"]));
}

#[tokio::test]
async fn failed_webhook_deliveries_are_retried() {
    let (attempt_tx, mut attempts) = mpsc::unbounded_channel::<Bytes>();
    let refusals_left = Arc::new(AtomicUsize::new(2));
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: Bytes| {
            let attempt_tx = attempt_tx.clone();
            let refusals_left = Arc::clone(&refusals_left);
            async move {
                let _ = attempt_tx.send(body);
                let refuse = refusals_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                        left.checked_sub(1)
                    })
                    .is_ok();
                if refuse {
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("receiver binds");
    let hook_url = format!(
        "http://{}/hook",
        listener.local_addr().expect("receiver addr")
    );
    tokio::spawn(async move { axum::serve(listener, receiver).await });

    // A tiny time scale brings the 30 s retry period down to its floor.
    let harness = Harness::start(SimulatorConfig {
        time_scale: 0.000_1,
        ..SimulatorConfig::default()
    })
    .await;
    let (status, _) = harness
        .create(
            KEY,
            json!({
                "executionPlan": { "jobs": [job("a", "generate", 5, &[])] },
                "options": { "webhook": hook_url },
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let mut bodies = Vec::new();
    for _ in 0..3 {
        let body = tokio::time::timeout(WAIT_LIMIT, attempts.recv())
            .await
            .expect("another attempt arrives in time")
            .expect("receiver alive");
        bodies.push(body);
    }

    assert!(bodies.windows(2).all(|pair| pair[0] == pair[1]));
    let extra = tokio::time::timeout(Duration::from_millis(300), attempts.recv()).await;
    assert!(extra.is_err(), "delivery went on after a 200");
}

#[tokio::test]
async fn dropping_the_running_simulator_stops_serving() {
    let harness = Harness::start(SimulatorConfig::default()).await;
    let addr = harness.running.addr;
    drop(harness);

    let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still accepting connections"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
