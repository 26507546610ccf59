//! Turns an upstream status body into the `Execution` message callers receive.
//!
//! Nothing the upstream sends is dropped: every key without a field of its own lands in a
//! `metadata` struct (of the execution, the job or the result), and a value whose type does
//! not fit its field (a `createdAt` that is not a timestamp, a `result` that is not an
//! object) goes there too, under its own key, instead of being thrown away.

use std::str::FromStr;

use prost_types::Timestamp;
use serde_json::{Map, Value};

use crate::{
    json,
    progress::{self, ReportedProgress},
    proto::{Execution, ExecutionState, Job, MediaResult},
    upstream::{JobBody, StatusBody},
};

/// 2^63: whole doubles in `-I64_BOUND..I64_BOUND` convert to i64 exactly.
const I64_BOUND: f64 = 9_223_372_036_854_775_808.0;

/// The seconds a google.protobuf.Timestamp may hold: 0001-01-01T00:00:00Z to
/// 9999-12-31T23:59:59Z. prost parses years beyond them (`+010000-01-01T00:00:00Z`, as
/// JavaScript writes year 10000), which other languages' runtimes refuse to read.
pub(crate) const TIMESTAMP_SECONDS: std::ops::RangeInclusive<i64> =
    -62_135_596_800..=253_402_300_799;

/// The state for an upstream status text; unknown text maps to `Unspecified`.
pub fn state_of(upstream_status: &str) -> ExecutionState {
    match upstream_status {
        "pending" => ExecutionState::Pending,
        "processing" => ExecutionState::Processing,
        "completed" => ExecutionState::Completed,
        "failed" => ExecutionState::Failed,
        _ => ExecutionState::Unspecified,
    }
}

/// Whether an execution in this state can still change.
pub fn is_final(state: ExecutionState) -> bool {
    matches!(state, ExecutionState::Completed | ExecutionState::Failed)
}

pub fn from_upstream(body: StatusBody) -> Execution {
    let StatusBody {
        id,
        status,
        jobs,
        result,
        error,
        created_at,
        completed_at,
        mut extra,
    } = body;

    let state = state_of(&status);
    let reported = ReportedProgress::take_from(&mut extra);
    let progress = progress::derive(state, &jobs, reported);
    let create_time = timestamp_or_keep(created_at, "createdAt", &mut extra);
    let complete_time = timestamp_or_keep(completed_at, "completedAt", &mut extra);
    let result = result.and_then(|value| media_result_or_keep(value, &mut extra));

    Execution {
        id,
        state: state.into(),
        upstream_status: status,
        progress: Some(progress),
        jobs: jobs.into_iter().map(job_from_upstream).collect(),
        result,
        error: error.unwrap_or_default(),
        create_time,
        complete_time,
        revision: 0,
        metadata: json::to_optional_struct(extra),
    }
}

fn job_from_upstream(job: JobBody) -> Job {
    Job {
        id: job.id.unwrap_or_default(),
        operation: job.operation.unwrap_or_default(),
        status: job.status.unwrap_or_default(),
        result: job.result.filter(|v| !v.is_null()).map(json::to_value),
        error: job.error.unwrap_or_default(),
        metadata: json::to_optional_struct(job.extra),
    }
}

/// A timestamp field: parsed when it is an ISO-8601 string, kept under `key` in `extra`
/// when it is anything else but null.
fn timestamp_or_keep(
    value: Option<Value>,
    key: &str,
    extra: &mut Map<String, Value>,
) -> Option<Timestamp> {
    match value? {
        Value::Null => None,
        Value::String(text) => match Timestamp::from_str(&text) {
            Ok(timestamp) if TIMESTAMP_SECONDS.contains(&timestamp.seconds) => Some(timestamp),
            _ => {
                extra.insert(key.to_owned(), Value::String(text));
                None
            }
        },
        other => {
            extra.insert(key.to_owned(), other);
            None
        }
    }
}

/// The execution's MediaResult. A result that is not an object is kept in `extra` as
/// `result`; known keys of the wrong type stay in the result's own metadata.
fn media_result_or_keep(value: Value, extra: &mut Map<String, Value>) -> Option<MediaResult> {
    let mut fields = match value {
        Value::Null => return None,
        Value::Object(fields) => fields,
        other => {
            extra.insert("result".to_owned(), other);
            return None;
        }
    };
    let mut take_text =
        |key: &str| json::take_if(&mut fields, key, |v| v.as_str().map(str::to_owned));
    let url = take_text("url").unwrap_or_default();
    let kind = take_text("type").unwrap_or_default();
    let format = take_text("format").unwrap_or_default();
    let duration = json::take_if(&mut fields, "duration", Value::as_f64);
    let size = json::take_if(&mut fields, "size", |v| {
        v.as_i64().or_else(|| {
            // `as` would saturate a whole number beyond i64 to i64::MAX: such a value stays
            // in metadata as it came instead.
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && (-I64_BOUND..I64_BOUND).contains(f))
                .map(|f| f as i64)
        })
    });

    Some(MediaResult {
        url,
        r#type: kind,
        duration,
        format,
        size,
        metadata: json::to_optional_struct(fields),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn convert(body: Value) -> Execution {
        from_upstream(serde_json::from_value(body).unwrap())
    }

    #[test]
    fn maps_a_completed_execution_without_losing_keys() {
        let execution = convert(json!({
            "id": "V1StGXR8Z5jdHi6BmyT12",
            "status": "completed",
            "jobs": [{"id": "job1", "operation": "generate", "status": "completed",
                      "result": {"url": "https://x/a.mp4"}, "error": null, "model": "minimax"}],
            "result": {"url": "https://x/a.mp4", "type": "video", "duration": 5.5,
                       "format": "mp4", "size": 1024, "width": 1920, "codec": {"v": "h264"}},
            "error": null,
            "createdAt": "2026-01-15T10:29:12.123Z",
            "completedAt": "2026-01-15T10:31:00Z",
            "region": "eu"
        }));

        assert_eq!(execution.state(), ExecutionState::Completed);
        let result = execution.result.as_ref().unwrap();
        assert_eq!(
            (result.url.as_str(), result.r#type.as_str()),
            ("https://x/a.mp4", "video")
        );
        assert_eq!((result.duration, result.size), (Some(5.5), Some(1024)));
        let metadata = json::from_struct(result.metadata.as_ref().unwrap());
        assert_eq!(metadata, json!({"width": 1920, "codec": {"v": "h264"}}));

        assert_eq!(execution.create_time.unwrap().seconds, 1_768_472_952);
        assert_eq!(execution.create_time.unwrap().nanos, 123_000_000);
        assert!(execution.complete_time.is_some());
        assert_eq!(
            json::from_struct(execution.metadata.as_ref().unwrap()),
            json!({"region": "eu"})
        );
        let job_metadata = json::from_struct(execution.jobs[0].metadata.as_ref().unwrap());
        assert_eq!(job_metadata, json!({"model": "minimax"}));
        assert_eq!(execution.progress.unwrap().progress, 100.0);
    }

    #[test]
    fn a_size_beyond_int64_is_kept_as_it_came_not_clamped() {
        for size in [
            json!(10_000_000_000_000_000_000u64),
            json!(1e19),
            json!(-1e19),
        ] {
            let execution = convert(json!({
                "id": "x", "status": "completed", "result": {"url": "u", "size": size}
            }));
            let result = execution.result.unwrap();
            assert_eq!(result.size, None, "{size}");
            assert_eq!(
                json::from_struct(result.metadata.as_ref().unwrap())["size"].as_f64(),
                size.as_f64()
            );
        }
        let whole_float = convert(json!({
            "id": "x", "status": "completed", "result": {"url": "u", "size": 2048.0}
        }));
        assert_eq!(whole_float.result.unwrap().size, Some(2048));
    }

    #[test]
    fn timestamps_in_any_rfc3339_form_parse_and_out_of_range_ones_are_kept() {
        let created =
            |text: &str| convert(json!({"id": "x", "status": "pending", "createdAt": text}));
        for (text, seconds, nanos) in [
            ("2026-01-15T10:29:12Z", 1_768_472_952, 0),
            ("2026-01-15T10:29:12.123Z", 1_768_472_952, 123_000_000),
            ("2026-01-15T12:29:12.123+02:00", 1_768_472_952, 123_000_000),
            ("0001-01-01T00:00:00Z", -62_135_596_800, 0),
            (
                "9999-12-31T23:59:59.999999999Z",
                253_402_300_799,
                999_999_999,
            ),
        ] {
            let time = created(text)
                .create_time
                .unwrap_or_else(|| panic!("{text}"));
            assert_eq!((time.seconds, time.nanos), (seconds, nanos), "{text}");
        }
        for text in [
            "+010000-01-01T00:00:00.000Z",
            "0000-12-31T23:59:59Z",
            "-000001-01-01T00:00:00.000Z",
            "9999-12-31T23:59:59-01:00",
        ] {
            let execution = created(text);
            assert_eq!(execution.create_time, None, "{text}");
            assert_eq!(
                json::from_struct(execution.metadata.as_ref().unwrap()),
                json!({"createdAt": text})
            );
        }
    }

    #[test]
    fn unknown_status_is_carried_as_text() {
        let execution = convert(json!({"id": "x", "status": "paused"}));
        assert_eq!(execution.state(), ExecutionState::Unspecified);
        assert_eq!(execution.upstream_status, "paused");
    }

    #[test]
    fn odd_values_are_kept_in_metadata_rather_than_dropped() {
        let execution = convert(json!({
            "id": "x", "status": "failed", "error": "merge: codec error",
            "createdAt": "yesterday", "result": "https://x/a.mp4"
        }));
        assert_eq!(execution.error, "merge: codec error");
        assert!(execution.create_time.is_none() && execution.result.is_none());
        assert_eq!(
            json::from_struct(execution.metadata.as_ref().unwrap()),
            json!({"createdAt": "yesterday", "result": "https://x/a.mp4"})
        );
    }
}
