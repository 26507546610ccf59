//! How the command-line clients print an execution.
//!
//! `--json` follows protobuf's canonical JSON mapping (lowerCamelCase names, enum names as
//! strings, RFC 3339 timestamps, 64-bit integers as strings), so it reads the same as what
//! other gRPC tooling prints for the message.

use std::fmt::Write;

use serde_json::{Value, json};

use crate::{
    json::{from_struct, from_value},
    proto::{Execution, ExecutionState, Job, MediaResult},
};

pub(super) fn execution_json(execution: &Execution) -> Value {
    let mut object = json!({
        "id": execution.id,
        "state": execution.state().as_str_name(),
        "upstreamStatus": execution.upstream_status,
        "jobs": execution.jobs.iter().map(job_json).collect::<Vec<_>>(),
        "error": execution.error,
        "revision": execution.revision.to_string(),
    });
    let fields = object.as_object_mut().expect("built as an object");
    if let Some(progress) = &execution.progress {
        fields.insert(
            "progress".into(),
            json!({
                "currentJob": progress.current_job,
                "progress": progress.progress,
                "totalJobs": progress.total_jobs,
                "completedJobs": progress.completed_jobs,
            }),
        );
    }
    if let Some(result) = &execution.result {
        fields.insert("result".into(), media_json(result));
    }
    if let Some(time) = &execution.create_time {
        fields.insert("createTime".into(), json!(time.to_string()));
    }
    if let Some(time) = &execution.complete_time {
        fields.insert("completeTime".into(), json!(time.to_string()));
    }
    if let Some(metadata) = &execution.metadata {
        fields.insert("metadata".into(), from_struct(metadata));
    }
    object
}

fn job_json(job: &Job) -> Value {
    let mut object = json!({
        "id": job.id, "operation": job.operation, "status": job.status, "error": job.error,
    });
    let fields = object.as_object_mut().expect("built as an object");
    if let Some(result) = &job.result {
        fields.insert("result".into(), from_value(result));
    }
    if let Some(metadata) = &job.metadata {
        fields.insert("metadata".into(), from_struct(metadata));
    }
    object
}

fn media_json(result: &MediaResult) -> Value {
    let mut object = json!({"url": result.url, "type": result.r#type, "format": result.format});
    let fields = object.as_object_mut().expect("built as an object");
    if let Some(duration) = result.duration {
        fields.insert("duration".into(), json!(duration));
    }
    if let Some(size) = result.size {
        fields.insert("size".into(), json!(size.to_string()));
    }
    if let Some(metadata) = &result.metadata {
        fields.insert("metadata".into(), from_struct(metadata));
    }
    object
}

/// A few lines for a person: state, progress, one line per job, then result or error.
pub(super) fn summary(execution: &Execution) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "execution {}  {}",
        execution.id,
        state_text(execution)
    );
    if execution.progress.is_some() {
        let _ = writeln!(text, "progress  {}", progress_text(execution));
    }
    for job in &execution.jobs {
        let _ = writeln!(text, "  {}", job_line(job));
    }
    if let Some(result) = &execution.result {
        let _ = writeln!(text, "result    {} {}", result.url, media_details(result));
    }
    if !execution.error.is_empty() {
        let _ = writeln!(text, "error     {}", execution.error);
    }
    if let Some(created) = &execution.create_time {
        let _ = write!(text, "created   {created}");
        if let Some(completed) = &execution.complete_time {
            let _ = write!(text, ", ended {completed}");
        }
        text.push('\n');
    }
    text
}

/// The state as Synthome wrote it, flagged when this gateway does not know it.
pub(super) fn state_text(execution: &Execution) -> String {
    match execution.state() {
        ExecutionState::Unspecified => {
            format!(
                "{:?} (a status this gateway does not know)",
                execution.upstream_status
            )
        }
        _ => execution.upstream_status.clone(),
    }
}

/// `50%  (1/2 jobs done), current job outro`; empty when the execution has no progress.
pub(super) fn progress_text(execution: &Execution) -> String {
    let Some(progress) = &execution.progress else {
        return String::new();
    };
    let mut text = format!(
        "{:.0}%  ({}/{} jobs done)",
        progress.progress, progress.completed_jobs, progress.total_jobs
    );
    if !progress.current_job.is_empty() {
        let _ = write!(text, ", current job {}", progress.current_job);
    }
    text
}

/// The overall progress as a whole percent from 0 to 100, for a progress bar.
pub(super) fn percent(execution: &Execution) -> u64 {
    let progress = execution.progress.as_ref().map_or(0.0, |p| p.progress);
    // `as` saturates and maps NaN (not excluded by the contract) to 0.
    progress.clamp(0.0, 100.0).round() as u64
}

/// One job in aligned columns: id, operation, status, then its error when it has one.
pub(super) fn job_line(job: &Job) -> String {
    let mut text = format!("{:<12} {:<20} {:<11}", job.id, job.operation, job.status);
    if !job.error.is_empty() {
        let _ = write!(text, " {}", job.error);
    }
    text.trim_end().to_owned()
}

fn media_details(result: &MediaResult) -> String {
    let mut parts = Vec::new();
    if !result.r#type.is_empty() {
        parts.push(result.r#type.clone());
    }
    if !result.format.is_empty() {
        parts.push(result.format.clone());
    }
    if let Some(duration) = result.duration {
        parts.push(format!("{duration:.1}s"));
    }
    if let Some(size) = result.size {
        parts.push(format!("{size} bytes"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("({})", parts.join(", "))
    }
}
