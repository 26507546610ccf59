//! The contract, proven from other languages: a Python client (grpcio, stubs generated
//! from `proto/` at test time) and a Node client (`@grpc/grpc-js` + `@grpc/proto-loader`)
//! run as child processes against a real simulator and real gateways started here on
//! 127.0.0.1:0, and the snippets quoted in `docs/clients.md` are checked against the
//! files those suites run.
//!
//! `tests/clients/setup.sh` installs the Python venv and the Node modules (pinned, and
//! skipped when already installed); it needs python3 >= 3.11 with venv and node >= 20.

mod common;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path as UrlPath, State},
    routing::get,
};
use common::{ALICE, fast_polling, upstream_config};
use serde_json::{Value, json};
use synthome_gateway::{
    credential::Credential,
    registry::{PollSettings, Registry},
    server::{Gateway, GatewaySettings, RunningGateway},
    simulator::{RunningSimulator, Simulator, SimulatorConfig},
    upstream::UpstreamClient,
};
use tokio::{net::TcpListener, process::Command};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The longest one suite may run before the test gives up on it.
const SUITE_TIMEOUT: Duration = Duration::from_secs(240);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the setup script once per test process; the script itself is idempotent and
/// locked, so concurrent test processes are safe too.
async fn setup() {
    static SETUP: OnceLock<Result<String, String>> = OnceLock::new();
    let outcome = tokio::task::spawn_blocking(|| {
        SETUP
            .get_or_init(|| {
                let output = std::process::Command::new("bash")
                    .arg(repo().join("tests/clients/setup.sh"))
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|err| format!("cannot run tests/clients/setup.sh: {err}"))?;
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
                if output.status.success() {
                    Ok(text)
                } else {
                    Err(format!(
                        "tests/clients/setup.sh failed ({}); it needs python3 >= 3.11 with \
                         venv and node >= 20 with npm:\n{text}",
                        output.status
                    ))
                }
            })
            .clone()
    })
    .await
    .expect("setup task");
    match outcome {
        Ok(log) => println!("{log}"),
        Err(message) => panic!("{message}"),
    }
}

/// Starts a gateway in front of `simulator` with `poll` settings.
async fn gateway(
    simulator: &RunningSimulator,
    fallback_key: Option<&str>,
    poll: PollSettings,
) -> RunningGateway {
    let upstream = UpstreamClient::new(&upstream_config(&simulator.base_url())).expect("upstream");
    let settings = GatewaySettings {
        fallback_credential: fallback_key.and_then(Credential::new),
        poll,
        heartbeat_interval: Duration::from_millis(300),
        ..GatewaySettings::default()
    };
    let gateway = Gateway::new(Arc::new(upstream), settings)
        .spawn()
        .await
        .expect("gateway starts");
    // The listener is bound already; wait until the server answers SERVING for the
    // service over gRPC, so the suites start against the steady state.
    let channel = tonic::transport::Endpoint::from_shared(gateway.uri())
        .expect("gateway uri")
        .connect()
        .await
        .expect("gateway accepts connections");
    let request = HealthCheckRequest {
        service: "synthome.status.v1.ExecutionStatusService".to_owned(),
    };
    let mut statuses = HealthClient::new(channel)
        .watch(request)
        .await
        .expect("health watch")
        .into_inner();
    while let Some(status) = statuses.message().await.expect("health status") {
        if status.status() == ServingStatus::Serving {
            break;
        }
    }
    gateway
}

/// What the suites are run against.
struct Stack {
    /// Accepts only [`ALICE`]; jobs with `params.simulate.durationMs` are exact, and
    /// the pending phase lasts 10 ms.
    simulator: RunningSimulator,
    /// Holds executions in `pending` for minutes (time scale 1000).
    slow_simulator: RunningSimulator,
    /// The gateway under test; its own key is ALICE.
    main: RunningGateway,
    /// No key of its own: calls without `authorization` fail with CREDENTIALS_MISSING.
    no_key: RunningGateway,
    /// In front of the slow simulator.
    slow: RunningGateway,
    /// Ends watches with UNAVAILABLE UPSTREAM_OUTAGE after 300 ms of upstream failure.
    short_outage: RunningGateway,
    /// HTTP probe into the stack's internals for the suites.
    probe: std::net::SocketAddr,
}

impl Stack {
    async fn start() -> Self {
        let config = |time_scale| SimulatorConfig {
            api_keys: vec![ALICE.to_owned()],
            time_scale,
            ..SimulatorConfig::default()
        };
        let simulator = Simulator::spawn(config(0.05)).await.expect("simulator");
        let slow_simulator = Simulator::spawn(config(1000.0)).await.expect("simulator");
        let main = gateway(&simulator, Some(ALICE), fast_polling()).await;
        let no_key = gateway(&simulator, None, fast_polling()).await;
        let slow = gateway(&slow_simulator, Some(ALICE), fast_polling()).await;
        let short_outage = gateway(
            &simulator,
            Some(ALICE),
            PollSettings {
                outage_timeout: Duration::from_millis(300),
                ..fast_polling()
            },
        )
        .await;
        let probe = probe(ProbeState {
            simulator: simulator.simulator.clone(),
            registries: HashMap::from([
                ("main", main.registry.clone()),
                ("no_key", no_key.registry.clone()),
                ("short_outage", short_outage.registry.clone()),
            ]),
        })
        .await;
        Self {
            simulator,
            slow_simulator,
            main,
            no_key,
            slow,
            short_outage,
            probe,
        }
    }

    /// The environment a suite reads its addresses from. Test keys only: the suites
    /// never print them.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SYNTHOME_GATEWAY_ADDR", self.main.addr.to_string()),
            ("SYNTHOME_GATEWAY_NO_KEY_ADDR", self.no_key.addr.to_string()),
            ("SYNTHOME_GATEWAY_SLOW_ADDR", self.slow.addr.to_string()),
            (
                "SYNTHOME_GATEWAY_SHORT_OUTAGE_ADDR",
                self.short_outage.addr.to_string(),
            ),
            (
                "SYNTHOME_SIMULATOR_URL",
                format!("http://{}", self.simulator.addr),
            ),
            (
                "SYNTHOME_SLOW_SIMULATOR_URL",
                format!("http://{}", self.slow_simulator.addr),
            ),
            ("SYNTHOME_PROBE_URL", format!("http://{}", self.probe)),
            ("SYNTHOME_TEST_API_KEY", ALICE.to_owned()),
        ]
    }

    fn all_pollers(&self) -> usize {
        [&self.main, &self.no_key, &self.slow, &self.short_outage]
            .iter()
            .map(|gateway| gateway.registry.active_pollers())
            .sum()
    }
}

#[derive(Clone)]
struct ProbeState {
    simulator: Simulator,
    registries: HashMap<&'static str, Registry>,
}

/// `GET /pollers/{gateway}` → `{"activePollers": n}`;
/// `GET /status-requests/{execution_id}` → `{"statusRequests": n}` (main simulator).
async fn probe(state: ProbeState) -> std::net::SocketAddr {
    async fn pollers(
        State(state): State<ProbeState>,
        UrlPath(name): UrlPath<String>,
    ) -> Json<Value> {
        let active = state
            .registries
            .get(name.as_str())
            .map(Registry::active_pollers);
        Json(json!({ "activePollers": active }))
    }
    async fn status_requests(
        State(state): State<ProbeState>,
        UrlPath(id): UrlPath<String>,
    ) -> Json<Value> {
        Json(json!({ "statusRequests": state.simulator.status_requests_for(&id) }))
    }
    let router = Router::new()
        .route("/pollers/{gateway}", get(pollers))
        .route("/status-requests/{execution_id}", get(status_requests))
        .with_state(state);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind probe");
    let addr = listener.local_addr().expect("probe addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// Runs a suite to its end and fails with its output unless it passed.
async fn run_suite(name: &str, mut command: Command, stack: &Stack) {
    command
        .envs(stack.env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start the {name} suite: {err}"));
    let output = tokio::time::timeout(SUITE_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("the {name} suite ran longer than {SUITE_TIMEOUT:?}"))
        .expect("suite output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("---- {name} suite stdout\n{stdout}\n---- {name} suite stderr\n{stderr}");
    assert!(
        output.status.success(),
        "the {name} suite failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
}

/// Waits (at most five seconds) until no gateway of the stack runs a poller.
async fn assert_pollers_drain(stack: &Stack) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while stack.all_pollers() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pollers still running after the suite: {}",
            stack.all_pollers()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_suite() {
    setup().await;
    let stack = Stack::start().await;
    let python: PathBuf = repo().join("target/clients/venv/bin/python");
    let mut command = Command::new(python);
    command
        .current_dir(repo())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args(["-m", "pytest", "-p", "no:cacheprovider", "-v"])
        .arg("tests/clients/python");
    run_suite("Python", command, &stack).await;
    assert_pollers_drain(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_client_suite() {
    setup().await;
    let stack = Stack::start().await;
    let mut command = Command::new("node");
    let node_dir = repo().join("tests/clients/node");
    command
        .current_dir(&node_dir)
        // docs/examples/node/watch.js lives outside the package: let it find the modules.
        .env("NODE_PATH", node_dir.join("node_modules"))
        .args(["--test", "--test-concurrency=1", "--test-reporter=spec"])
        .args(["test/unary.test.js", "test/watch.test.js"]);
    run_suite("Node", command, &stack).await;
    // The Node suite checked, through the probe, that its cancelled watch freed the
    // gateway's poller while Node was still connected; nothing may be left over either.
    assert_pollers_drain(&stack).await;
}

/// Each block of docs/clients.md that follows `<!-- snippet: PATH -->` must be the file
/// at PATH, byte for byte, so the guide quotes exactly the code CI runs.
#[test]
fn doc_snippets_are_the_files_ci_runs() {
    let guide = std::fs::read_to_string(repo().join("docs/clients.md")).expect("docs/clients.md");
    let marker = "<!-- snippet: ";
    let mut checked = Vec::new();
    for (position, _) in guide.match_indices(marker) {
        let rest = &guide[position + marker.len()..];
        let path = &rest[..rest.find(" -->").expect("snippet marker closed")];
        let after_marker = &rest[rest.find('\n').expect("line after marker") + 1..];
        assert!(
            after_marker.starts_with("```"),
            "a fenced block must follow the marker of {path}"
        );
        let body = &after_marker[after_marker.find('\n').expect("fence line") + 1..];
        let quoted = &body[..body.find("\n```\n").expect("closing fence") + 1];
        let file = std::fs::read_to_string(repo().join(path))
            .unwrap_or_else(|err| panic!("{path} quoted in docs/clients.md: {err}"));
        assert!(
            quoted == file,
            "docs/clients.md quotes {path}, but the quote differs from the file; copy the \
             file into the guide again"
        );
        checked.push(path.to_owned());
    }
    for expected in [
        "docs/examples/service_config.json",
        "docs/examples/python/watch_robustly.py",
        "docs/examples/node/watch.js",
    ] {
        assert!(
            checked.iter().any(|path| path == expected),
            "docs/clients.md does not quote {expected}; checked {checked:?}"
        );
    }
}
