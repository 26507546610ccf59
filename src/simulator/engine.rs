//! Executions as a pure function of time.
//!
//! At creation every job gets a run window (start and end offsets from the
//! creation instant) and an outcome, drawn once. Reading a status then only
//! compares the elapsed time with those windows, so no task runs per job and the
//! same code works under `tokio::time::pause()`.
//!
//! Rules: a job without dependencies starts after the pending phase; a job with
//! dependencies starts when the last of them completes, and never starts when one
//! of them fails. The execution fails at the end of its first failing job and is
//! frozen at that instant: jobs that had not started stay `pending`, jobs that
//! were running stay `processing`, and nothing advances afterwards. Otherwise it
//! completes when its last job completes.

use std::ops::Range;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::model::{FailOverride, Plan, PlannedJob};
use super::timestamp::format_timestamp;

/// Time between creation and the start of jobs without dependencies, before
/// `time_scale`.
const PENDING_PHASE: Duration = Duration::from_millis(200);

/// Host of the URLs in generated results; `.invalid` so nobody fetches them.
const CDN_BASE: &str = "https://cdn.simulator.synthome.invalid";

/// Error text of a job failed with `"simulate": {"fail": true}`.
const STOCK_FAILURE: &str = "Simulated job failure";

/// How `time_scale` and randomness turn a plan into a schedule.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) time_scale: f64,
}

impl Timing {
    fn scaled(self, duration: Duration) -> Duration {
        Duration::try_from_secs_f64(duration.as_secs_f64() * self.time_scale)
            .unwrap_or(Duration::ZERO)
            .min(MAX_SCALED)
    }
}

/// Longest scaled duration of one step, so a huge `time_scale` cannot push
/// instants toward overflow.
const MAX_SCALED: Duration = Duration::from_secs(86_400);

/// One execution: its schedule, fixed at creation.
#[derive(Debug)]
pub(crate) struct Execution {
    pub(crate) id: String,
    created_at: Instant,
    created_wall: SystemTime,
    jobs: Vec<ScheduledJob>,
    /// Result of the execution once completed (the final job's MediaResult).
    result: Value,
    /// Offset of the first failing job's end, when some job fails.
    failed_at: Option<Duration>,
    /// Offset at which the execution completes or fails.
    finished_at: Duration,
    first_start: Duration,
}

#[derive(Debug)]
struct ScheduledJob {
    id: String,
    operation: String,
    window: Option<Range<Duration>>,
    outcome: Outcome,
}

#[derive(Debug)]
enum Outcome {
    Complete(Value),
    Fail(String),
}

/// `GET /status` body, in the field order and shape of the real service.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StatusBody {
    pub(crate) id: String,
    pub(crate) status: &'static str,
    pub(crate) jobs: Vec<JobBody>,
    pub(crate) result: Option<Value>,
    pub(crate) error: Option<String>,
    pub(crate) created_at: String,
    pub(crate) completed_at: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct JobBody {
    pub(crate) id: String,
    pub(crate) operation: String,
    pub(crate) status: &'static str,
    pub(crate) result: Option<Value>,
    pub(crate) error: Option<String>,
}

/// Body POSTed to `options.webhook` when the execution ends.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WebhookBody {
    pub(crate) execution_id: String,
    pub(crate) status: &'static str,
    pub(crate) result: Option<Value>,
    pub(crate) error: Option<String>,
    pub(crate) completed_at: Option<String>,
}

impl Execution {
    /// Draws the schedule of `plan`, created now.
    pub(crate) fn schedule(id: String, plan: &Plan, timing: Timing) -> Self {
        let mut windows: Vec<Option<Range<Duration>>> = vec![None; plan.jobs.len()];
        let mut outcomes: Vec<Option<Outcome>> = plan.jobs.iter().map(|_| None).collect();

        // Dependencies come first in `order`, so their windows are known.
        for &position in &plan.order {
            let job = &plan.jobs[position];
            let outcome = job_outcome(&id, job);
            windows[position] = job_window(job, &windows, &outcomes, timing);
            outcomes[position] = Some(outcome);
        }

        let jobs: Vec<ScheduledJob> = plan
            .jobs
            .iter()
            .zip(windows)
            .zip(outcomes)
            .map(|((job, window), outcome)| ScheduledJob {
                id: job.id.clone(),
                operation: job.operation.clone(),
                window,
                outcome: outcome.expect("every job is visited by the topological order"),
            })
            .collect();

        let result = execution_result(&id, &plan.jobs[plan.final_job]);
        Self::from_jobs(id, jobs, result)
    }

    fn from_jobs(id: String, jobs: Vec<ScheduledJob>, result: Value) -> Self {
        let failed_at = jobs
            .iter()
            .filter(|job| matches!(job.outcome, Outcome::Fail(_)))
            .filter_map(|job| job.window.as_ref().map(|window| window.end))
            .min();
        let last_end = jobs
            .iter()
            .filter_map(|job| job.window.as_ref().map(|window| window.end))
            .max()
            .unwrap_or_default();
        let first_start = jobs
            .iter()
            .filter_map(|job| job.window.as_ref().map(|window| window.start))
            .min()
            .unwrap_or_default();

        Self {
            id,
            created_at: Instant::now(),
            created_wall: SystemTime::now(),
            jobs,
            result,
            failed_at,
            finished_at: failed_at.unwrap_or(last_end),
            first_start,
        }
    }

    /// The instant at which the execution completes or fails.
    pub(crate) fn finishes_at(&self) -> Instant {
        self.created_at + self.finished_at
    }

    /// The 202 body of the create route.
    pub(crate) fn created_body(&self) -> Value {
        json!({
            "executionId": self.id,
            "status": "pending",
            "createdAt": format_timestamp(self.created_wall),
        })
    }

    /// The status as the real service would answer it at `now`.
    pub(crate) fn status_at(&self, now: Instant) -> StatusBody {
        let elapsed = now.saturating_duration_since(self.created_at);
        let frozen = self.failed_at.filter(|&failed_at| elapsed >= failed_at);
        let at = frozen.unwrap_or(elapsed);

        let jobs: Vec<JobBody> = self.jobs.iter().map(|job| job.body_at(at)).collect();
        let status = if frozen.is_some() {
            "failed"
        } else if elapsed >= self.finished_at {
            "completed"
        } else if elapsed >= self.first_start {
            "processing"
        } else {
            "pending"
        };

        let ended = matches!(status, "failed" | "completed");
        StatusBody {
            id: self.id.clone(),
            status,
            result: (status == "completed").then(|| self.result.clone()),
            error: (status == "failed").then(|| joined_errors(&jobs)),
            created_at: format_timestamp(self.created_wall),
            completed_at: ended.then(|| format_timestamp(self.created_wall + self.finished_at)),
            jobs,
        }
    }

    /// The webhook body, as of the end of the execution.
    pub(crate) fn webhook_body(&self) -> WebhookBody {
        let status = self.status_at(self.finishes_at());
        WebhookBody {
            execution_id: status.id,
            status: status.status,
            result: status.result,
            error: status.error,
            completed_at: status.completed_at,
        }
    }
}

impl ScheduledJob {
    fn body_at(&self, at: Duration) -> JobBody {
        let (status, result, error) = match (&self.window, &self.outcome) {
            (None, _) => ("pending", None, None),
            (Some(window), _) if at < window.start => ("pending", None, None),
            (Some(window), _) if at < window.end => ("processing", None, None),
            (Some(_), Outcome::Complete(result)) => ("completed", Some(result.clone()), None),
            (Some(_), Outcome::Fail(error)) => ("failed", None, Some(error.clone())),
        };

        JobBody {
            id: self.id.clone(),
            operation: self.operation.clone(),
            status,
            result,
            error,
        }
    }
}

fn job_window(
    job: &PlannedJob,
    windows: &[Option<Range<Duration>>],
    outcomes: &[Option<Outcome>],
    timing: Timing,
) -> Option<Range<Duration>> {
    let mut start = if job.depends_on.is_empty() {
        timing.scaled(PENDING_PHASE)
    } else {
        Duration::ZERO
    };
    for &dependency in &job.depends_on {
        let dependency_end = windows[dependency].as_ref()?.end;
        if matches!(outcomes[dependency], Some(Outcome::Fail(_))) {
            return None;
        }
        start = start.max(dependency_end);
    }

    let duration = match job.simulate.duration_ms {
        Some(ms) => Duration::from_millis(ms),
        None => timing.scaled(typical_duration(&job.operation)),
    };
    Some(start..start + duration)
}

fn job_outcome(execution_id: &str, job: &PlannedJob) -> Outcome {
    match &job.simulate.fail {
        Some(FailOverride::Flag(true)) => Outcome::Fail(STOCK_FAILURE.to_owned()),
        Some(FailOverride::Message(message)) => Outcome::Fail(message.clone()),
        Some(FailOverride::Flag(false)) | None => Outcome::Complete(match &job.simulate.result {
            Some(result) => result.clone(),
            None => json!({
                "url": media_url(execution_id, job),
                "status": "completed",
            }),
        }),
    }
}

/// The execution result: the final job's `simulate.result` when it is an object
/// with a `url`, otherwise a generated MediaResult with an extra `model` key so
/// callers can check that unknown keys survive.
fn execution_result(execution_id: &str, final_job: &PlannedJob) -> Value {
    match &final_job.simulate.result {
        Some(result) if result.get("url").is_some_and(Value::is_string) => result.clone(),
        _ => generated_media(execution_id, final_job),
    }
}

fn generated_media(execution_id: &str, job: &PlannedJob) -> Value {
    let kind = MediaKind::of(&job.operation);
    let mut media = json!({
        "url": media_url(execution_id, job),
        "type": kind.name(),
        "duration": kind.duration_secs(),
        "format": kind.format(),
        "size": fastrand::u64(200_000..40_000_000),
        "model": format!("simulator-{}-1", kind.name()),
    });
    if let (Some(object), Some((width, height))) = (media.as_object_mut(), kind.dimensions()) {
        object.insert("width".to_owned(), width.into());
        object.insert("height".to_owned(), height.into());
    }
    media
}

fn media_url(execution_id: &str, job: &PlannedJob) -> String {
    let extension = MediaKind::of(&job.operation).format();
    format!("{CDN_BASE}/{execution_id}/{}.{extension}", job.id)
}

/// Realistic run time of an operation before `time_scale`, drawn per job.
fn typical_duration(operation: &str) -> Duration {
    let range_ms = match operation {
        "generate" => 4_000..8_000,
        "lipSync" => 4_000..7_000,
        "removeBackground" => 3_000..6_000,
        "reframe" | "generateAudio" => 2_000..4_000,
        "generateImage" | "transcribe" | "addSubtitles" => 1_000..3_000,
        "merge" | "layer" => 1_000..2_000,
        "removeImageBackground" => 800..1_500,
        _ => 1_000..3_000,
    };
    Duration::from_millis(fastrand::u64(range_ms))
}

#[derive(Debug, Clone, Copy)]
enum MediaKind {
    Video,
    Audio,
    Image,
}

impl MediaKind {
    fn of(operation: &str) -> Self {
        match operation {
            "generateImage" | "removeImageBackground" => Self::Image,
            "generateAudio" | "transcribe" => Self::Audio,
            _ => Self::Video,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Video => "video",
            Self::Audio => "audio",
            Self::Image => "image",
        }
    }

    fn format(self) -> &'static str {
        match self {
            Self::Video => "mp4",
            Self::Audio => "mp3",
            Self::Image => "png",
        }
    }

    fn duration_secs(self) -> f64 {
        match self {
            Self::Image => 0.0,
            Self::Video | Self::Audio => f64::from(fastrand::u32(3..30)),
        }
    }

    fn dimensions(self) -> Option<(u32, u32)> {
        match self {
            Self::Video => Some((1920, 1080)),
            Self::Image => Some((1024, 1024)),
            Self::Audio => None,
        }
    }
}

fn joined_errors(jobs: &[JobBody]) -> String {
    jobs.iter()
        .filter_map(|job| {
            let error = job.error.as_deref()?;
            Some(format!("{}: {error}", job.operation))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use tokio::time::advance;

    use super::*;

    const UNSCALED: Timing = Timing { time_scale: 1.0 };

    fn execution(jobs: Value) -> Execution {
        let request = json!({ "executionPlan": { "jobs": jobs } });
        let plan = Plan::from_value(request).expect("valid test plan");
        Execution::schedule("exec_test".to_owned(), &plan, UNSCALED)
    }

    fn job_statuses(status: &StatusBody) -> Vec<&'static str> {
        status.jobs.iter().map(|job| job.status).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_run_after_pending_phase_and_their_dependencies() {
        let execution = execution(json!([
            { "id": "a", "type": "generate", "params": { "simulate": { "durationMs": 100 } } },
            { "id": "b", "type": "merge", "dependsOn": ["a"],
              "params": { "simulate": { "durationMs": 50 } } },
        ]));

        let status = execution.status_at(Instant::now());
        assert_eq!(status.status, "pending");
        assert_eq!(job_statuses(&status), ["pending", "pending"]);

        advance(Duration::from_millis(200)).await;
        let status = execution.status_at(Instant::now());
        assert_eq!(status.status, "processing");
        assert_eq!(job_statuses(&status), ["processing", "pending"]);

        advance(Duration::from_millis(100)).await;
        let status = execution.status_at(Instant::now());
        assert_eq!(job_statuses(&status), ["completed", "processing"]);
        assert!(status.completed_at.is_none());

        advance(Duration::from_millis(50)).await;
        let status = execution.status_at(Instant::now());
        assert_eq!(status.status, "completed");
        assert_eq!(job_statuses(&status), ["completed", "completed"]);
        assert!(status.completed_at.is_some());

        let result = status.result.expect("completed executions carry a result");
        assert_eq!(result["type"], "video");
        assert!(
            result["url"]
                .as_str()
                .is_some_and(|url| url.ends_with("/exec_test/b.mp4"))
        );
        assert!(result.get("model").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn failure_freezes_the_execution_at_its_instant() {
        let execution = execution(json!([
            { "id": "clip", "type": "generate", "params": { "simulate": { "durationMs": 1000 } } },
            { "id": "sync", "type": "lipSync", "params": { "simulate": { "durationMs": 50, "fail": "no face" } } },
            { "id": "final", "type": "merge", "dependsOn": ["clip", "sync"] },
        ]));

        advance(Duration::from_millis(250)).await;
        let at_failure = execution.status_at(Instant::now());
        advance(Duration::from_secs(60)).await;
        let much_later = execution.status_at(Instant::now());

        for status in [&at_failure, &much_later] {
            assert_eq!(status.status, "failed");
            assert_eq!(status.error.as_deref(), Some("lipSync: no face"));
            assert_eq!(job_statuses(status), ["processing", "failed", "pending"]);
            assert!(status.result.is_none());
        }
        assert_eq!(at_failure.completed_at, much_later.completed_at);
    }

    #[tokio::test(start_paused = true)]
    async fn overrides_replace_results_and_the_webhook_body_reports_the_end() {
        let media = json!({ "url": "https://example.invalid/x.mp4", "width": 7 });
        let execution = execution(json!([
            { "id": "only", "type": "generate",
              "params": { "simulate": { "durationMs": 10, "result": media } } },
        ]));

        let webhook = execution.webhook_body();
        assert_eq!(webhook.status, "completed");
        assert_eq!(webhook.result, Some(media.clone()));
        assert!(webhook.completed_at.is_some());

        advance(Duration::from_millis(210)).await;
        let status = execution.status_at(Instant::now());
        assert_eq!(status.jobs[0].result, Some(media));
    }

    #[tokio::test(start_paused = true)]
    async fn stock_failures_join_every_job_failing_at_the_same_instant() {
        let execution = execution(json!([
            { "id": "a", "type": "generate", "params": { "simulate": { "durationMs": 10, "fail": true } } },
            { "id": "b", "type": "generateImage", "params": { "simulate": { "durationMs": 10, "fail": "bad prompt" } } },
        ]));

        let webhook = execution.webhook_body();
        assert_eq!(webhook.status, "failed");
        assert_eq!(
            webhook.error.as_deref(),
            Some("generate: Simulated job failure; generateImage: bad prompt")
        );
    }

    #[test]
    fn zero_time_scale_finishes_generated_jobs_at_once() {
        let plan = Plan::from_value(json!({ "executionPlan": { "jobs": [
            { "id": "a", "type": "generate" },
            { "id": "b", "type": "merge", "dependsOn": ["a"] },
        ] } }))
        .expect("valid test plan");
        let execution = Execution::schedule("x".to_owned(), &plan, Timing { time_scale: 0.0 });

        assert_eq!(execution.finished_at, Duration::ZERO);
    }
}
