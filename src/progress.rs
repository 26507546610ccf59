//! `PipelineProgress`, derived from the jobs because Synthome's status route does not send it.
//!
//! The SDK's `waitForCompletion` reads `progress`, `totalJobs`, `completedJobs` and
//! `currentJob` from the status response, but the service never sends them. The gateway
//! derives each one from `jobs`, and uses any of the four that a future version of the
//! service does send in place of its own value.

use serde_json::{Map, Value};

use crate::{
    json,
    proto::{ExecutionState, PipelineProgress},
    upstream::JobBody,
};

/// Progress as the upstream reported it, field by field. Each present field wins over the
/// derived one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportedProgress {
    pub progress: Option<f64>,
    pub total_jobs: Option<u32>,
    pub completed_jobs: Option<u32>,
    pub current_job: Option<String>,
}

impl ReportedProgress {
    /// Takes the four progress keys out of a response's extra keys, leaving any value of an
    /// unexpected type where it was so that it is still passed on, not lost.
    pub fn take_from(extra: &mut Map<String, Value>) -> Self {
        let count = |value: &Value| value.as_u64().and_then(|n| u32::try_from(n).ok());
        Self {
            progress: json::take_if(extra, "progress", Value::as_f64),
            total_jobs: json::take_if(extra, "totalJobs", count),
            completed_jobs: json::take_if(extra, "completedJobs", count),
            current_job: json::take_if(extra, "currentJob", |v| v.as_str().map(str::to_owned)),
        }
    }
}

/// Derives the progress of an execution in `state` from its `jobs`:
/// - `total_jobs` is the number of jobs, `completed_jobs` those whose status is "completed";
/// - `progress` is 100 for a completed execution; otherwise the completed share of the
///   jobs in percent, where a processing job that reports its own percentage counts for
///   that fraction of a job (a failed pipeline keeps the share it reached);
/// - `current_job` is the first processing job, else the first pending one, else empty.
pub fn derive(
    state: ExecutionState,
    jobs: &[JobBody],
    reported: ReportedProgress,
) -> PipelineProgress {
    let total = jobs.len();
    let completed = jobs
        .iter()
        .filter(|job| job.status() == "completed")
        .count();

    let derived_percent = if state == ExecutionState::Completed {
        100.0
    } else if total == 0 {
        0.0
    } else {
        let partial: f64 = jobs
            .iter()
            .filter(|job| job.status() == "processing")
            .filter_map(JobBody::reported_percentage)
            .map(|percent| percent.clamp(0.0, 100.0) / 100.0)
            .sum();
        (completed as f64 + partial) / total as f64 * 100.0
    };

    let current_job = jobs
        .iter()
        .find(|job| job.status() == "processing")
        .or_else(|| jobs.iter().find(|job| job.status() == "pending"))
        .map(|job| job.id().to_owned())
        .unwrap_or_default();

    let total_jobs = reported.total_jobs.unwrap_or(saturating_u32(total));
    // Reported and derived counts can disagree with each other (`totalJobs: 2` beside five
    // completed jobs): a client must never see more jobs completed than there are.
    let completed_jobs = reported
        .completed_jobs
        .unwrap_or(saturating_u32(completed))
        .min(total_jobs);
    PipelineProgress {
        current_job: reported.current_job.unwrap_or(current_job),
        progress: reported
            .progress
            .unwrap_or(derived_percent)
            .clamp(0.0, 100.0),
        total_jobs,
        completed_jobs,
    }
}

fn saturating_u32(count: usize) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn jobs(statuses: &[&str]) -> Vec<JobBody> {
        statuses
            .iter()
            .enumerate()
            .map(|(i, status)| {
                serde_json::from_value(json!({"id": format!("job{}", i + 1), "status": status}))
                    .unwrap()
            })
            .collect()
    }

    fn derive_plain(state: ExecutionState, statuses: &[&str]) -> PipelineProgress {
        derive(state, &jobs(statuses), ReportedProgress::default())
    }

    #[test]
    fn counts_jobs_and_completed_share() {
        let progress = derive_plain(
            ExecutionState::Processing,
            &["completed", "processing", "pending", "pending"],
        );
        assert_eq!(progress.total_jobs, 4);
        assert_eq!(progress.completed_jobs, 1);
        assert_eq!(progress.progress, 25.0);
        assert_eq!(progress.current_job, "job2");
    }

    #[test]
    fn current_job_falls_back_to_the_first_pending_then_to_none() {
        let waiting = derive_plain(
            ExecutionState::Processing,
            &["completed", "pending", "pending"],
        );
        assert_eq!(waiting.current_job, "job2");
        let done = derive_plain(ExecutionState::Completed, &["completed", "completed"]);
        assert_eq!(done.current_job, "");
    }

    #[test]
    fn a_completed_execution_is_at_100_even_when_jobs_lag() {
        let progress = derive_plain(ExecutionState::Completed, &["completed", "processing"]);
        assert_eq!(progress.progress, 100.0);
        assert_eq!(progress.completed_jobs, 1);
    }

    #[test]
    fn zero_jobs() {
        let pending = derive_plain(ExecutionState::Pending, &[]);
        assert_eq!((pending.total_jobs, pending.progress), (0, 0.0));
        assert_eq!(pending.current_job, "");
        assert_eq!(derive_plain(ExecutionState::Completed, &[]).progress, 100.0);
    }

    #[test]
    fn a_failed_pipeline_keeps_the_share_it_reached() {
        let progress = derive_plain(ExecutionState::Failed, &["completed", "failed", "pending"]);
        assert!((progress.progress - 100.0 / 3.0).abs() < 1e-9);
        assert_eq!(progress.completed_jobs, 1);
        assert_eq!(progress.current_job, "job3");
    }

    #[test]
    fn a_running_job_counts_its_own_percentage() {
        let mut jobs = jobs(&["completed", "processing"]);
        jobs[1]
            .extra
            .insert("progress".into(), json!({"percentage": 50}));
        let progress = derive(
            ExecutionState::Processing,
            &jobs,
            ReportedProgress::default(),
        );
        assert_eq!(progress.progress, 75.0);
    }

    #[test]
    fn completed_jobs_never_exceed_total_jobs() {
        // Found by fuzzing (target status_body): reported counts that disagree.
        let reported = |total, completed| ReportedProgress {
            total_jobs: total,
            completed_jobs: completed,
            ..ReportedProgress::default()
        };
        let three_done = jobs(&["completed", "completed", "completed"]);
        for (reported, expected) in [
            (reported(Some(2), Some(5)), (2, 2)),
            (reported(Some(1), None), (1, 1)),
            (reported(None, Some(7)), (3, 3)),
            (reported(Some(9), Some(4)), (9, 4)),
        ] {
            let progress = derive(ExecutionState::Processing, &three_done, reported);
            assert_eq!((progress.total_jobs, progress.completed_jobs), expected);
        }
    }

    #[test]
    fn reported_values_win_field_by_field() {
        let mut extra = serde_json::from_value::<Map<String, Value>>(json!({
            "progress": 42.5, "currentJob": "job9", "totalJobs": "seven", "other": 1
        }))
        .unwrap();
        let reported = ReportedProgress::take_from(&mut extra);
        let progress = derive(
            ExecutionState::Processing,
            &jobs(&["processing", "pending"]),
            reported,
        );

        assert_eq!(progress.progress, 42.5);
        assert_eq!(progress.current_job, "job9");
        assert_eq!(
            progress.total_jobs, 2,
            "a non-numeric totalJobs is not used"
        );
        assert!(extra.contains_key("totalJobs") && extra.contains_key("other"));
        assert!(!extra.contains_key("progress"));
    }
}
