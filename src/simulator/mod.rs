//! An in-process stand-in for the Synthome execution API, so that the gateway,
//! its tests and its benchmarks run without an account.
//!
//! The simulator serves the upstream routes under `/api/execute` with the JSON
//! shapes, error bodies and webhooks described in `UPSTREAM.md`:
//! `POST /api/execute` creates an execution from a job DAG and
//! `GET /api/execute/{id}/status` reports it. Tests in other processes reach
//! `/_simulator/stats` (request counters) and `/_simulator/faults` (fault knobs).
//!
//! Design:
//! - Executions are a pure function of time (`engine`): every job's run window
//!   and outcome are drawn at creation, and a status read compares the elapsed
//!   `tokio::time::Instant` with them. Nothing runs per job, and paused Tokio time
//!   drives the simulation in unit tests.
//! - Durations are realistic per operation (a video several seconds, an image one
//!   to three) times `time_scale`; `params.simulate` in a job overrides duration,
//!   failure and result, which is how tests make executions fast and exact.
//! - Faults (`Faults`) apply to status reads only: latency, 429, 500 and malformed
//!   200 bodies, each at a configured rate; rates 0.0 and 1.0 are exact.
//! - Webhooks run as one task per execution that asked for one (`webhook`).
//!
//! Differences from the real service, on purpose:
//! - Executions belong to the API key that created them, and a status read with
//!   another key gets 404. The real service looks executions up by id alone and
//!   does not check ownership; the gateway must therefore isolate its callers
//!   itself, and this check lets tests prove that it does.
//! - With no configured keys any non-empty key is accepted.
//! - When an execution fails, jobs that were running at that instant stay
//!   `processing` forever; the real service may later record their end.
//!
//! Limits: executions and per-id request counters stay in memory for the life of
//! the simulator and are never evicted, which suits tests and demos but not a
//! long-running public server. `createRequests` counts HTTP create requests only,
//! not calls of [`Simulator::create_execution`]. API keys and webhook secrets are
//! never logged and are redacted from every `Debug` output.

mod engine;
mod http;
mod model;
mod timestamp;
mod webhook;

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use engine::{Execution, Timing};
use model::Plan;
use webhook::Dispatcher;

pub use model::PlanError;

/// Length of generated execution ids, as the real service's nanoid.
const EXECUTION_ID_LENGTH: usize = 21;

const EXECUTION_ID_ALPHABET: &[u8] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Per-id counters are kept only for ids up to this length, so junk paths cannot
/// grow the counter map with arbitrarily long keys.
const MAX_COUNTED_ID_LENGTH: usize = 64;

/// Flags of the `simulate` subcommand.
#[derive(Clone, clap::Args)]
pub struct SimulatorArgs {
    /// Address the simulated Synthome API listens on.
    #[arg(
        long,
        env = "SYNTHOME_SIMULATOR_LISTEN",
        default_value = "127.0.0.1:8787"
    )]
    pub listen: SocketAddr,

    /// API key the simulator accepts; repeat the flag (or separate with commas in
    /// the environment) for several. With none, any non-empty key is accepted.
    #[arg(
        long = "api-key",
        env = "SYNTHOME_SIMULATOR_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// Factor applied to simulated job durations; 0.1 runs ten times faster.
    #[arg(long, env = "SYNTHOME_SIMULATOR_TIME_SCALE", default_value_t = 1.0, value_parser = parse_time_scale)]
    pub time_scale: f64,

    /// Fraction (0.0 to 1.0) of status reads answered 500.
    #[arg(long, env = "SYNTHOME_SIMULATOR_ERROR_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub error_rate: f64,

    /// Milliseconds added before every status answer.
    #[arg(long, env = "SYNTHOME_SIMULATOR_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,

    /// Fraction (0.0 to 1.0) of status reads answered 429 RATE_LIMIT_EXCEEDED.
    #[arg(long, env = "SYNTHOME_SIMULATOR_RATE_LIMIT_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub rate_limit_rate: f64,

    /// Seconds sent in the Retry-After header of 429 answers.
    #[arg(long, env = "SYNTHOME_SIMULATOR_RETRY_AFTER_SECS", default_value_t = 1)]
    pub retry_after_secs: u64,

    /// Fraction (0.0 to 1.0) of status reads answered 200 with a malformed body.
    #[arg(long, env = "SYNTHOME_SIMULATOR_MALFORMED_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub malformed_rate: f64,
}

impl fmt::Debug for SimulatorArgs {
    /// Counts the API keys instead of showing them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatorArgs")
            .field("listen", &self.listen)
            .field("api_keys", &self.api_keys.len())
            .field("time_scale", &self.time_scale)
            .field("error_rate", &self.error_rate)
            .field("latency_ms", &self.latency_ms)
            .field("rate_limit_rate", &self.rate_limit_rate)
            .field("retry_after_secs", &self.retry_after_secs)
            .field("malformed_rate", &self.malformed_rate)
            .finish()
    }
}

impl SimulatorArgs {
    /// The simulator configuration these flags describe.
    pub fn config(&self) -> SimulatorConfig {
        SimulatorConfig {
            api_keys: self.api_keys.clone(),
            time_scale: self.time_scale,
            faults: Faults {
                error_rate: self.error_rate,
                latency_ms: self.latency_ms,
                rate_limit_rate: self.rate_limit_rate,
                retry_after_secs: self.retry_after_secs,
                malformed_rate: self.malformed_rate,
            },
        }
    }
}

fn parse_rate(raw: &str) -> Result<f64, String> {
    let rate: f64 = raw.parse().map_err(|err| format!("{err}"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err("must be a fraction between 0.0 and 1.0".to_owned())
    }
}

/// Parses a `--time-scale` flag: a finite, non-negative factor on job durations.
pub(crate) fn parse_time_scale(raw: &str) -> Result<f64, String> {
    let scale: f64 = raw.parse().map_err(|err| format!("{err}"))?;
    if scale.is_finite() && scale >= 0.0 {
        Ok(scale)
    } else {
        Err("must be a finite, non-negative factor".to_owned())
    }
}

/// What a simulator accepts and how it behaves.
#[derive(Clone)]
pub struct SimulatorConfig {
    /// Keys accepted in `Authorization: Bearer`; empty accepts any non-empty key.
    pub api_keys: Vec<String>,
    /// Factor on generated durations (not on `params.simulate.durationMs`);
    /// a negative or non-finite value is replaced by 1.0.
    pub time_scale: f64,
    /// Faults injected into status reads from the start.
    pub faults: Faults,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            time_scale: 1.0,
            faults: Faults::default(),
        }
    }
}

impl fmt::Debug for SimulatorConfig {
    /// Counts the API keys instead of showing them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatorConfig")
            .field("api_keys", &self.api_keys.len())
            .field("time_scale", &self.time_scale)
            .field("faults", &self.faults)
            .finish()
    }
}

/// Faults injected into status reads; the default injects none.
///
/// Rates are fractions of status reads; 0.0 never and 1.0 always applies.
/// When several apply, 429 wins over 500, and both win over a malformed body.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Faults {
    /// Fraction answered 500 Internal Server Error.
    pub error_rate: f64,
    /// Delay added before every status answer, whatever its outcome.
    pub latency_ms: u64,
    /// Fraction answered 429 Rate Limit Exceeded.
    pub rate_limit_rate: f64,
    /// Value of the `Retry-After` header on 429 answers.
    pub retry_after_secs: u64,
    /// Fraction answered 200 with a body that is not the documented JSON.
    pub malformed_rate: f64,
}

impl Faults {
    /// Refuses rates outside 0.0..=1.0 (NaN included).
    pub fn check(&self) -> Result<(), SimulatorError> {
        let rates = [
            ("errorRate", self.error_rate),
            ("rateLimitRate", self.rate_limit_rate),
            ("malformedRate", self.malformed_rate),
        ];
        match rates
            .into_iter()
            .find(|(_, rate)| !(0.0..=1.0).contains(rate))
        {
            Some((name, _)) => Err(SimulatorError::InvalidFaults(name)),
            None => Ok(()),
        }
    }

    /// Clamps every rate into 0.0..=1.0, NaN to 0.0.
    fn clamped(self) -> Self {
        let clamp = |rate: f64| {
            if rate.is_nan() {
                0.0
            } else {
                rate.clamp(0.0, 1.0)
            }
        };
        Self {
            error_rate: clamp(self.error_rate),
            rate_limit_rate: clamp(self.rate_limit_rate),
            malformed_rate: clamp(self.malformed_rate),
            ..self
        }
    }
}

/// Why the simulator refused a request; the `Display` text is the `message` the
/// HTTP routes answer with.
#[derive(Debug, thiserror::Error)]
pub enum SimulatorError {
    #[error(transparent)]
    InvalidPlan(#[from] PlanError),
    #[error("Missing or invalid Authorization header")]
    MissingCredentials,
    #[error("Invalid or inactive API key")]
    UnknownApiKey,
    #[error("{0} must be a fraction between 0.0 and 1.0")]
    InvalidFaults(&'static str),
}

/// An API key; its `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Cheap to clone handle on the simulator's shared state.
#[derive(Clone, Debug)]
pub struct Simulator {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    api_keys: Vec<ApiKey>,
    timing: Timing,
    /// A std mutex: it is held only to copy or replace the settings, never across
    /// an await.
    faults: Mutex<Faults>,
    executions: Mutex<HashMap<String, StoredExecution>>,
    status_requests: AtomicU64,
    create_requests: AtomicU64,
    status_requests_by_id: Mutex<HashMap<String, u64>>,
    webhooks: Dispatcher,
}

#[derive(Debug)]
struct StoredExecution {
    owner: ApiKey,
    execution: Arc<Execution>,
}

/// Locks `mutex`, carrying on after a panic elsewhere: every guarded value is
/// replaced or incremented whole, so a poisoned one is still consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Simulator {
    /// A simulator with no executions, configured by `config`.
    pub fn new(config: SimulatorConfig) -> Self {
        let time_scale = if config.time_scale.is_finite() && config.time_scale >= 0.0 {
            config.time_scale
        } else {
            warn!(
                time_scale = config.time_scale,
                "invalid time scale; using 1.0"
            );
            1.0
        };

        let shared = Shared {
            api_keys: config.api_keys.into_iter().map(ApiKey).collect(),
            timing: Timing { time_scale },
            faults: Mutex::new(config.faults.clamped()),
            executions: Mutex::default(),
            status_requests: AtomicU64::new(0),
            create_requests: AtomicU64::new(0),
            status_requests_by_id: Mutex::default(),
            webhooks: Dispatcher::new(time_scale),
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    /// All routes (upstream and control), for embedding in another server.
    pub fn router(&self) -> axum::Router {
        http::router(self.clone())
    }

    /// Serves on the listener until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let addr = listener.local_addr()?;
        info!(%addr, "simulator listening");

        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await?;

        info!(%addr, "simulator stopped");
        Ok(())
    }

    /// Binds 127.0.0.1:0 and serves in a background task; for tests, demos and
    /// `serve --simulate`.
    pub async fn spawn(config: SimulatorConfig) -> std::io::Result<RunningSimulator> {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let simulator = Self::new(config);
        let (shutdown, stop) = oneshot::channel::<()>();

        let server = simulator.clone().serve(listener, async {
            // Either an explicit stop or a dropped sender ends serving.
            let _ = stop.await;
        });
        let task = tokio::spawn(async move {
            if let Err(error) = server.await {
                tracing::error!(%error, "simulator server failed");
            }
        });

        Ok(RunningSimulator {
            simulator,
            addr,
            shutdown: Some(shutdown),
            task: Some(task),
        })
    }

    /// Replaces the fault settings; rates outside 0.0..=1.0 are clamped.
    pub fn set_faults(&self, faults: Faults) {
        let faults = faults.clamped();
        info!(?faults, "simulator faults changed");
        *lock(&self.shared.faults) = faults;
    }

    /// The current fault settings.
    pub fn faults(&self) -> Faults {
        lock(&self.shared.faults).clone()
    }

    /// Status requests received so far, whatever their outcome.
    pub fn status_requests(&self) -> u64 {
        self.shared.status_requests.load(Ordering::Relaxed)
    }

    /// Status requests received so far for `execution_id`, whatever their outcome.
    pub fn status_requests_for(&self, execution_id: &str) -> u64 {
        lock(&self.shared.status_requests_by_id)
            .get(execution_id)
            .copied()
            .unwrap_or(0)
    }

    /// Creates an execution as if POSTed by `api_key`; `request` is the same JSON
    /// as the POST route's body. Returns the execution id.
    pub fn create_execution(
        &self,
        api_key: &str,
        request: Value,
    ) -> Result<String, SimulatorError> {
        let owner = self.authorize(Some(api_key).filter(|key| !key.is_empty()))?;
        let execution = self.insert(owner, Plan::from_value(request)?);
        Ok(execution.id.clone())
    }

    /// Creates a few sample pipelines owned by `api_key` (without checking it
    /// against the configured keys) and returns each id with a one-line
    /// description.
    pub fn seed_samples(&self, api_key: &str) -> Vec<(String, String)> {
        let owner = ApiKey(api_key.to_owned());
        sample_requests()
            .into_iter()
            .map(|(description, request)| {
                let plan = Plan::from_value(request).expect("sample plans are valid");
                let execution = self.insert(owner.clone(), plan);
                (execution.id.clone(), description.to_owned())
            })
            .collect()
    }

    /// Create requests received over HTTP so far.
    fn create_requests(&self) -> u64 {
        self.shared.create_requests.load(Ordering::Relaxed)
    }

    fn count_create_request(&self) {
        self.shared.create_requests.fetch_add(1, Ordering::Relaxed);
    }

    fn count_status_request(&self, execution_id: &str) {
        self.shared.status_requests.fetch_add(1, Ordering::Relaxed);
        if execution_id.len() <= MAX_COUNTED_ID_LENGTH {
            *lock(&self.shared.status_requests_by_id)
                .entry(execution_id.to_owned())
                .or_insert(0) += 1;
        }
    }

    /// The owner identity of a presented key, under the configured key list.
    fn authorize(&self, presented: Option<&str>) -> Result<ApiKey, SimulatorError> {
        let key = ApiKey(
            presented
                .ok_or(SimulatorError::MissingCredentials)?
                .to_owned(),
        );
        let keys = &self.shared.api_keys;
        if keys.is_empty() || keys.contains(&key) {
            Ok(key)
        } else {
            Err(SimulatorError::UnknownApiKey)
        }
    }

    /// Schedules `plan` as a new execution of `owner` and starts its webhook.
    fn insert(&self, owner: ApiKey, mut plan: Plan) -> Arc<Execution> {
        let webhook = plan.webhook.take();
        let mut executions = lock(&self.shared.executions);

        let id = loop {
            let candidate = new_execution_id();
            if !executions.contains_key(&candidate) {
                break candidate;
            }
        };
        let execution = Arc::new(Execution::schedule(id.clone(), &plan, self.shared.timing));
        executions.insert(
            id,
            StoredExecution {
                owner,
                execution: Arc::clone(&execution),
            },
        );
        drop(executions);

        debug!(
            execution_id = %execution.id,
            jobs = plan.jobs.len(),
            webhook = webhook.is_some(),
            "execution created"
        );
        if let Some(target) = webhook {
            self.shared
                .webhooks
                .schedule(Arc::clone(&execution), target);
        }
        execution
    }

    /// The execution `execution_id` if `owner` created it.
    fn execution_for(&self, execution_id: &str, owner: &ApiKey) -> Option<Arc<Execution>> {
        let executions = lock(&self.shared.executions);
        let stored = executions.get(execution_id)?;
        (stored.owner == *owner).then(|| Arc::clone(&stored.execution))
    }
}

/// A 21-character nanoid over `0-9A-Za-z`, like the real service's ids.
fn new_execution_id() -> String {
    (0..EXECUTION_ID_LENGTH)
        .map(|_| char::from(EXECUTION_ID_ALPHABET[fastrand::usize(..EXECUTION_ID_ALPHABET.len())]))
        .collect()
}

fn sample_requests() -> Vec<(&'static str, Value)> {
    let plan = |jobs: Value| json!({ "executionPlan": { "jobs": jobs }, "options": {} });
    vec![
        (
            "video pipeline: two generated clips and a voiceover, merged",
            plan(json!([
                { "id": "intro", "type": "generate", "params": { "prompt": "sunrise over a harbour" } },
                { "id": "outro", "type": "generate", "params": { "prompt": "boats leaving at dusk" } },
                { "id": "voiceover", "type": "generateAudio", "params": { "text": "A day at the harbour." } },
                { "id": "final", "type": "merge", "params": {}, "dependsOn": ["intro", "outro", "voiceover"] },
            ])),
        ),
        (
            "quick image: one generateImage job",
            plan(json!([
                { "id": "poster", "type": "generateImage", "params": { "prompt": "a lighthouse poster" } },
            ])),
        ),
        (
            "audio: one generateAudio job",
            plan(json!([
                { "id": "jingle", "type": "generateAudio", "params": { "text": "Welcome aboard." } },
            ])),
        ),
        (
            "failing pipeline: lipSync fails after generate, merge never starts",
            plan(json!([
                { "id": "clip", "type": "generate", "params": { "prompt": "a talking parrot" } },
                { "id": "sync", "type": "lipSync", "dependsOn": ["clip"],
                  "params": { "simulate": { "fail": "face not detected in source video" } } },
                { "id": "final", "type": "merge", "params": {}, "dependsOn": ["sync"] },
            ])),
        ),
    ]
}

/// A simulator serving on a local port; stops serving when dropped.
#[derive(Debug)]
pub struct RunningSimulator {
    pub simulator: Simulator,
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl RunningSimulator {
    /// The upstream base URL, `http://127.0.0.1:PORT/api/execute`.
    pub fn base_url(&self) -> String {
        format!("http://{}/api/execute", self.addr)
    }

    /// Stops serving and waits until open connections have finished.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RunningSimulator {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        simulator: SimulatorArgs,
    }

    #[test]
    fn flags_parse_into_a_config() {
        Cli::command().debug_assert();

        let cli = Cli::try_parse_from([
            "simulate",
            "--api-key",
            "sy_test_a",
            "--api-key",
            "sy_test_b",
            "--time-scale",
            "0.5",
            "--rate-limit-rate",
            "1",
        ])
        .expect("valid flags");
        let config = cli.simulator.config();

        assert_eq!(config.api_keys, ["sy_test_a", "sy_test_b"]);
        assert_eq!(config.time_scale, 0.5);
        assert_eq!(config.faults.rate_limit_rate, 1.0);
        assert_eq!(config.faults.retry_after_secs, 1);
        assert!(Cli::try_parse_from(["simulate", "--error-rate", "1.5"]).is_err());
    }

    #[test]
    fn debug_output_never_shows_api_keys() {
        let config = SimulatorConfig {
            api_keys: vec!["sy_live_secret".to_owned()],
            ..SimulatorConfig::default()
        };
        let simulator = Simulator::new(config.clone());

        assert!(!format!("{config:?}").contains("sy_live_secret"));
        assert!(!format!("{simulator:?}").contains("sy_live_secret"));
    }

    #[test]
    fn faults_outside_fractions_are_refused_or_clamped() {
        let faults = Faults {
            error_rate: 2.0,
            malformed_rate: f64::NAN,
            ..Faults::default()
        };
        assert!(faults.check().is_err());

        let simulator = Simulator::new(SimulatorConfig::default());
        simulator.set_faults(faults);
        assert_eq!(simulator.faults().error_rate, 1.0);
        assert_eq!(simulator.faults().malformed_rate, 0.0);
    }

    #[test]
    fn executions_are_owned_by_their_creator() {
        let simulator = Simulator::new(SimulatorConfig::default());
        let samples = simulator.seed_samples("sy_test_owner");
        assert_eq!(samples.len(), 4);

        let (id, _) = &samples[0];
        let owner = ApiKey("sy_test_owner".to_owned());
        let stranger = ApiKey("sy_test_stranger".to_owned());
        assert!(simulator.execution_for(id, &owner).is_some());
        assert!(simulator.execution_for(id, &stranger).is_none());
        assert_eq!(id.len(), EXECUTION_ID_LENGTH);
        assert!(id.bytes().all(|byte| byte.is_ascii_alphanumeric()));
    }
}
