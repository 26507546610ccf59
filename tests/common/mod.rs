//! Shared harness: a simulator and a gateway on ephemeral ports, and a client for them.
#![allow(dead_code, unreachable_pub)]

pub mod binary;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, Uri},
    response::IntoResponse,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::{Value, json};
use synthome_gateway::{
    admin,
    credential::Credential,
    proto::{
        Execution, ExecutionState, GetExecutionStatusRequest,
        execution_status_service_client::ExecutionStatusServiceClient,
    },
    registry::PollSettings,
    server::{Gateway, GatewaySettings, RunningGateway},
    simulator::{RunningSimulator, SimulatorConfig},
    upstream::{UpstreamClient, UpstreamConfig},
    webhook::WebhookSecret,
};
use tokio::net::TcpListener;
use tonic::{Request, Status, transport::Channel};

pub const ALICE: &str = "sy_test_alice";
pub const BOB: &str = "sy_test_bob";

pub fn upstream_config(base_url: &str) -> UpstreamConfig {
    UpstreamConfig {
        base_url: base_url.parse().expect("test base URL"),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        max_body_bytes: 64 * 1024,
    }
}

/// Poll settings scaled down so that tests see changes within milliseconds.
pub fn fast_polling() -> PollSettings {
    PollSettings {
        interval: Duration::from_millis(50),
        max_interval: Duration::from_millis(200),
        linger: Duration::from_millis(100),
        outage_timeout: Duration::from_secs(5),
        min_refresh_gap: Duration::from_millis(20),
        ..PollSettings::default()
    }
}

/// Serves the gateway's operations listener (webhooks, probes, metrics) on a free port of
/// 127.0.0.1 for the rest of the test, and returns its address.
pub async fn serve_operations(
    gateway: &RunningGateway,
    webhook_secret: Option<WebhookSecret>,
) -> SocketAddr {
    let operations = admin::router(
        gateway.registry.clone(),
        gateway.health.clone(),
        webhook_secret,
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(admin::serve(listener, operations, std::future::pending()));
    addr
}

/// `message` as a request carrying ALICE's key.
pub fn with_key<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    let value = format!("Bearer {ALICE}").parse().expect("ascii key");
    request.metadata_mut().insert("authorization", value);
    request
}

/// Starts a gateway in front of `base_url`.
pub async fn gateway(config: UpstreamConfig, fallback_key: Option<&str>) -> RunningGateway {
    let upstream = UpstreamClient::new(&config).expect("upstream client");
    let settings = GatewaySettings {
        fallback_credential: fallback_key.and_then(Credential::new),
        poll: fast_polling(),
        ..GatewaySettings::default()
    };
    Gateway::new(Arc::new(upstream), settings)
        .spawn()
        .await
        .expect("gateway starts")
}

/// A simulator and a gateway in front of it.
pub struct Harness {
    pub simulator: RunningSimulator,
    pub gateway: RunningGateway,
    pub client: ExecutionStatusServiceClient<Channel>,
}

impl Harness {
    /// `time_scale` 0 makes jobs start at once; a large one holds executions in `pending`.
    pub async fn start(time_scale: f64) -> Self {
        Self::start_with(
            SimulatorConfig {
                time_scale,
                ..SimulatorConfig::default()
            },
            None,
        )
        .await
    }

    pub async fn start_with(config: SimulatorConfig, fallback_key: Option<&str>) -> Self {
        let simulator = synthome_gateway::simulator::Simulator::spawn(config)
            .await
            .expect("simulator starts");
        let gateway = gateway(upstream_config(&simulator.base_url()), fallback_key).await;
        let client = client(&gateway).await;
        Self {
            simulator,
            gateway,
            client,
        }
    }

    /// Creates an execution owned by `key` from a list of job nodes.
    pub fn create(&self, key: &str, jobs: Value) -> String {
        self.simulator
            .simulator
            .create_execution(key, json!({"executionPlan": {"jobs": jobs}, "options": {}}))
            .expect("simulator accepts the plan")
    }

    pub async fn get(&self, key: Option<&str>, execution_id: &str) -> Result<Execution, Status> {
        get(&self.client, key, execution_id).await
    }

    /// Reads the execution until `done` holds, for at most ten seconds.
    pub async fn wait_until(
        &self,
        key: &str,
        execution_id: &str,
        done: impl Fn(&Execution) -> bool,
    ) -> Execution {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let execution = self
                .get(Some(key), execution_id)
                .await
                .expect("status read");
            if done(&execution) {
                return execution;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not reached; last seen {execution:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn wait_for_state(&self, key: &str, id: &str, state: ExecutionState) -> Execution {
        self.wait_until(key, id, |e| e.state() == state).await
    }
}

pub async fn client(gateway: &RunningGateway) -> ExecutionStatusServiceClient<Channel> {
    ExecutionStatusServiceClient::connect(gateway.uri())
        .await
        .expect("client connects")
}

pub async fn get(
    client: &ExecutionStatusServiceClient<Channel>,
    key: Option<&str>,
    execution_id: &str,
) -> Result<Execution, Status> {
    let mut request = Request::new(GetExecutionStatusRequest {
        execution_id: execution_id.to_owned(),
    });
    if let Some(key) = key {
        let value = format!("Bearer {key}").parse().expect("ascii key");
        request.metadata_mut().insert("authorization", value);
    }
    let response = client.clone().get_execution_status(request).await?;
    Ok(response.into_inner().execution.expect("execution set"))
}

/// A job node for the simulator.
pub fn job(id: &str, operation: &str, simulate: Value, depends_on: &[&str]) -> Value {
    json!({"id": id, "type": operation, "params": {"simulate": simulate}, "dependsOn": depends_on})
}

/// One request a [`ScriptedUpstream`] received.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub path: String,
    pub authorization: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// An upstream that answers every request with one fixed response and records what it got:
/// for the answers the simulator never gives (403, redirects, bodies about another id).
pub struct ScriptedUpstream {
    pub addr: SocketAddr,
    pub seen: Seen,
}

type Script = (StatusCode, Vec<(&'static str, String)>, String);
type Seen = Arc<Mutex<Vec<SeenRequest>>>;

impl ScriptedUpstream {
    pub async fn start(status: u16, headers: &[(&'static str, &str)], body: &str) -> Self {
        let script: Script = (
            StatusCode::from_u16(status).expect("valid status"),
            headers.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            body.to_owned(),
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        let router = Router::new()
            .fallback(answer)
            .with_state((Arc::new(script), seen.clone()));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self { addr, seen }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/api/execute", self.addr)
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().expect("not poisoned").clone()
    }
}

async fn answer(
    State((script, seen)): State<(Arc<Script>, Seen)>,
    uri: Uri,
    headers: HeaderMap,
) -> impl IntoResponse {
    let header = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    seen.lock().expect("not poisoned").push(SeenRequest {
        path: uri.path().to_owned(),
        authorization: header("authorization"),
        traceparent: header("traceparent"),
        tracestate: header("tracestate"),
    });
    let (status, headers, body) = script.as_ref().clone();
    let mut response = (status, body).into_response();
    for (name, value) in headers {
        response
            .headers_mut()
            .insert(name, value.parse().expect("header value"));
    }
    response
}

/// A CA, a server certificate for localhost and a client certificate, all PEM.
pub struct Pki {
    pub ca: String,
    pub server: (String, String),
    pub client: (String, String),
}

pub fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let issue = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca,
        server: issue("localhost"),
        client: issue("synthome-client"),
    }
}
