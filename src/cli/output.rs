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
    let state = match execution.state() {
        ExecutionState::Unspecified => {
            format!(
                "{:?} (a status this gateway does not know)",
                execution.upstream_status
            )
        }
        _ => execution.upstream_status.clone(),
    };
    let _ = writeln!(text, "execution {}  {state}", execution.id);
    if let Some(progress) = &execution.progress {
        let _ = write!(
            text,
            "progress  {:.0}%  ({}/{} jobs done)",
            progress.progress, progress.completed_jobs, progress.total_jobs
        );
        if !progress.current_job.is_empty() {
            let _ = write!(text, ", current job {}", progress.current_job);
        }
        text.push('\n');
    }
    for job in &execution.jobs {
        let _ = write!(
            text,
            "  {:<12} {:<20} {:<11}",
            job.id, job.operation, job.status
        );
        if !job.error.is_empty() {
            let _ = write!(text, " {}", job.error);
        }
        text.push('\n');
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
