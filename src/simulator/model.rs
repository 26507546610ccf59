//! The body of `POST /api/execute`, parsed and checked into a [`Plan`].
//!
//! A plan is accepted only when it is a non-empty DAG of uniquely named jobs whose
//! `dependsOn` entries all name jobs of the same plan; anything else is a
//! [`PlanError`] that the HTTP layer answers with 400. Fields the simulator does
//! not act on (`output`, `baseExecutionId`, other options) are accepted and ignored,
//! as the real service ignores what it does not know.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;

use serde::Deserialize;
use serde_json::Value;

/// Upper bound on jobs per plan, so that one request cannot make the simulator
/// schedule an unbounded graph.
pub(crate) const MAX_JOBS: usize = 1_000;

/// Upper bound on `params.simulate.durationMs` (one day), which keeps every
/// scheduled instant far from `Instant` overflow.
pub(crate) const MAX_SIMULATED_DURATION_MS: u64 = 86_400_000;

/// Why a create request was refused; the `Display` text is the `message` of the
/// 400 body, so it names the offending job but never echoes secrets.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("invalid request body: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("executionPlan.jobs must not be empty")]
    NoJobs,
    #[error("executionPlan.jobs holds {count} jobs; the simulator accepts at most {MAX_JOBS}")]
    TooManyJobs { count: usize },
    #[error("job id {0:?} appears more than once")]
    DuplicateJobId(String),
    #[error("job {job:?} depends on unknown job {dependency:?}")]
    UnknownDependency { job: String, dependency: String },
    #[error("dependsOn forms a cycle through jobs {0:?}")]
    Cycle(Vec<String>),
    #[error("job {job:?} has invalid params.simulate: {reason}")]
    InvalidSimulate { job: String, reason: String },
    #[error("options.webhook is not an http(s) URL")]
    InvalidWebhook,
}

/// A checked execution plan: jobs in listed order, with dependencies as indices.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) jobs: Vec<PlannedJob>,
    /// Every job index, each after all of its dependencies.
    pub(crate) order: Vec<usize>,
    /// The job whose result becomes the execution's result: the last-listed job
    /// that no other job depends on.
    pub(crate) final_job: usize,
    pub(crate) webhook: Option<WebhookTarget>,
}

#[derive(Debug)]
pub(crate) struct PlannedJob {
    pub(crate) id: String,
    pub(crate) operation: String,
    pub(crate) depends_on: Vec<usize>,
    pub(crate) simulate: SimulateOverrides,
}

/// Test hooks read from a job's `params.simulate`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SimulateOverrides {
    /// Exact run time in milliseconds, never scaled by `time_scale`.
    pub(crate) duration_ms: Option<u64>,
    pub(crate) fail: Option<FailOverride>,
    /// Replaces the job's generated result.
    pub(crate) result: Option<Value>,
}

/// `true` fails the job with a stock message; a string fails it with that text.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum FailOverride {
    Flag(bool),
    Message(String),
}

/// Where and how to announce the end of an execution.
pub(crate) struct WebhookTarget {
    pub(crate) url: reqwest::Url,
    pub(crate) secret: Option<String>,
}

impl fmt::Debug for WebhookTarget {
    /// Shows neither the URL (it may carry credentials) nor the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookTarget")
            .field("host", &self.url.host_str())
            .field("signed", &self.secret.is_some())
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExecutionRequest {
    execution_plan: ExecutionPlanBody,
    #[serde(default)]
    options: Option<ExecutionOptions>,
}

#[derive(Deserialize)]
struct ExecutionPlanBody {
    jobs: Vec<JobNode>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobNode {
    id: String,
    #[serde(rename = "type")]
    operation: String,
    #[serde(default)]
    params: Option<Value>,
    #[serde(default)]
    depends_on: Option<Vec<String>>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExecutionOptions {
    webhook: Option<String>,
    webhook_secret: Option<String>,
}

impl Plan {
    /// Parses and checks a create request given as raw JSON bytes.
    pub(crate) fn from_slice(body: &[u8]) -> Result<Self, PlanError> {
        Self::from_request(serde_json::from_slice(body)?)
    }

    /// Parses and checks a create request given as a JSON value.
    pub(crate) fn from_value(body: Value) -> Result<Self, PlanError> {
        Self::from_request(serde_json::from_value(body)?)
    }

    fn from_request(request: ExecutionRequest) -> Result<Self, PlanError> {
        let nodes = request.execution_plan.jobs;
        if nodes.is_empty() {
            return Err(PlanError::NoJobs);
        }
        if nodes.len() > MAX_JOBS {
            return Err(PlanError::TooManyJobs { count: nodes.len() });
        }

        let index = index_job_ids(&nodes)?;
        let jobs = nodes
            .into_iter()
            .map(|node| plan_job(node, &index))
            .collect::<Result<Vec<_>, _>>()?;

        let order = topological_order(&jobs)?;
        let final_job = final_job(&jobs);
        let webhook = webhook_target(request.options.unwrap_or_default())?;

        Ok(Self {
            jobs,
            order,
            final_job,
            webhook,
        })
    }
}

fn index_job_ids(nodes: &[JobNode]) -> Result<HashMap<String, usize>, PlanError> {
    let mut index = HashMap::with_capacity(nodes.len());
    for (position, node) in nodes.iter().enumerate() {
        if index.insert(node.id.clone(), position).is_some() {
            return Err(PlanError::DuplicateJobId(node.id.clone()));
        }
    }
    Ok(index)
}

fn plan_job(node: JobNode, index: &HashMap<String, usize>) -> Result<PlannedJob, PlanError> {
    let depends_on = node
        .depends_on
        .unwrap_or_default()
        .into_iter()
        .map(|dependency| match index.get(&dependency) {
            Some(&position) => Ok(position),
            None => Err(PlanError::UnknownDependency {
                job: node.id.clone(),
                dependency,
            }),
        })
        .collect::<Result<Vec<_>, _>>()?;

    let simulate = simulate_overrides(&node.id, node.params.as_ref())?;

    Ok(PlannedJob {
        id: node.id,
        operation: node.operation,
        depends_on,
        simulate,
    })
}

fn simulate_overrides(job: &str, params: Option<&Value>) -> Result<SimulateOverrides, PlanError> {
    let invalid = |reason: String| PlanError::InvalidSimulate {
        job: job.to_owned(),
        reason,
    };

    let Some(raw) = params.and_then(|params| params.get("simulate")) else {
        return Ok(SimulateOverrides::default());
    };
    let overrides = SimulateOverrides::deserialize(raw).map_err(|err| invalid(err.to_string()))?;

    match overrides.duration_ms {
        Some(ms) if ms > MAX_SIMULATED_DURATION_MS => Err(invalid(format!(
            "durationMs {ms} exceeds {MAX_SIMULATED_DURATION_MS}"
        ))),
        _ => Ok(overrides),
    }
}

/// Kahn's algorithm; jobs left over once no job is ready are exactly those on or
/// behind a cycle.
fn topological_order(jobs: &[PlannedJob]) -> Result<Vec<usize>, PlanError> {
    let mut waiting_on: Vec<usize> = jobs.iter().map(|job| job.depends_on.len()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); jobs.len()];
    for (position, job) in jobs.iter().enumerate() {
        for &dependency in &job.depends_on {
            dependents[dependency].push(position);
        }
    }

    let mut ready: VecDeque<usize> = (0..jobs.len()).filter(|&j| waiting_on[j] == 0).collect();
    let mut order = Vec::with_capacity(jobs.len());
    while let Some(position) = ready.pop_front() {
        order.push(position);
        for &dependent in &dependents[position] {
            waiting_on[dependent] -= 1;
            if waiting_on[dependent] == 0 {
                ready.push_back(dependent);
            }
        }
    }

    if order.len() == jobs.len() {
        return Ok(order);
    }
    let placed: HashSet<usize> = order.into_iter().collect();
    let stuck = (0..jobs.len())
        .filter(|position| !placed.contains(position))
        .map(|position| jobs[position].id.clone())
        .collect();
    Err(PlanError::Cycle(stuck))
}

fn final_job(jobs: &[PlannedJob]) -> usize {
    let depended_on: HashSet<usize> = jobs
        .iter()
        .flat_map(|job| job.depends_on.iter().copied())
        .collect();
    (0..jobs.len())
        .rev()
        .find(|position| !depended_on.contains(position))
        .expect("an acyclic, non-empty plan always has a job nobody depends on")
}

fn webhook_target(options: ExecutionOptions) -> Result<Option<WebhookTarget>, PlanError> {
    let Some(raw) = options.webhook.filter(|url| !url.is_empty()) else {
        return Ok(None);
    };
    let url = reqwest::Url::parse(&raw).map_err(|_| PlanError::InvalidWebhook)?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(PlanError::InvalidWebhook);
    }

    Ok(Some(WebhookTarget {
        url,
        secret: options.webhook_secret.filter(|secret| !secret.is_empty()),
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn plan(jobs: Value) -> Result<Plan, PlanError> {
        Plan::from_value(json!({ "executionPlan": { "jobs": jobs }, "options": {} }))
    }

    #[test]
    fn orders_dependencies_first_and_picks_last_sink_as_final() {
        let plan = plan(json!([
            { "id": "merge", "type": "merge", "params": {}, "dependsOn": ["a", "b"] },
            { "id": "a", "type": "generate", "params": {} },
            { "id": "b", "type": "generate", "params": {} },
            { "id": "thumb", "type": "generateImage", "params": {}, "dependsOn": ["a"] },
        ]))
        .expect("valid plan");

        let position_of = |j: usize| plan.order.iter().position(|&p| p == j);
        assert!(position_of(1) < position_of(0));
        assert!(position_of(2) < position_of(0));
        assert_eq!(plan.final_job, 3);
    }

    #[test]
    fn refuses_invalid_graphs() {
        assert!(matches!(plan(json!([])), Err(PlanError::NoJobs)));
        assert!(matches!(
            plan(json!([{ "id": "a", "type": "x" }, { "id": "a", "type": "x" }])),
            Err(PlanError::DuplicateJobId(_))
        ));
        assert!(matches!(
            plan(json!([{ "id": "a", "type": "x", "dependsOn": ["zz"] }])),
            Err(PlanError::UnknownDependency { .. })
        ));
        assert!(matches!(
            plan(json!([
                { "id": "a", "type": "x", "dependsOn": ["b"] },
                { "id": "b", "type": "x", "dependsOn": ["a"] },
            ])),
            Err(PlanError::Cycle(_))
        ));
        assert!(matches!(
            plan(
                json!([{ "id": "a", "type": "x", "params": { "simulate": { "durationMs": "1" } } }])
            ),
            Err(PlanError::InvalidSimulate { .. })
        ));
    }

    #[test]
    fn refuses_non_http_webhooks() {
        let request = json!({
            "executionPlan": { "jobs": [{ "id": "a", "type": "generate" }] },
            "options": { "webhook": "ftp://example.invalid/hook" },
        });
        assert!(matches!(
            Plan::from_value(request),
            Err(PlanError::InvalidWebhook)
        ));
    }
}
