//! The JSON of `GET {base}/{executionId}/status`, parsed tolerantly.
//!
//! Only `id` and `status` are required: everything else may be missing or `null`. Keys this
//! version does not know are kept in `extra` maps so they reach the caller. A field whose
//! value has an unexpected type (an `error` that is an object, say) is carried as JSON text
//! rather than failing the whole response: Synthome's job fields are free-form.

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

/// Body of a 200 answer from the status route.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StatusBody {
    pub id: String,
    pub status: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub jobs: Vec<JobBody>,
    /// A MediaResult object when the execution completed.
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default, deserialize_with = "lenient_text")]
    pub error: Option<String>,
    #[serde(default, rename = "createdAt")]
    pub created_at: Option<Value>,
    #[serde(default, rename = "completedAt")]
    pub completed_at: Option<Value>,
    /// Every other key, including the progress fields (`progress`, `totalJobs`,
    /// `completedJobs`, `currentJob`) that the SDK expects and the service does not send.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One entry of `jobs`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JobBody {
    #[serde(default, deserialize_with = "lenient_text")]
    pub id: Option<String>,
    #[serde(default, deserialize_with = "lenient_text")]
    pub operation: Option<String>,
    #[serde(default, deserialize_with = "lenient_text")]
    pub status: Option<String>,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default, deserialize_with = "lenient_text")]
    pub error: Option<String>,
    /// Every other key, such as a job's own `progress: {"percentage": …}`.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl JobBody {
    pub fn status(&self) -> &str {
        self.status.as_deref().unwrap_or_default()
    }

    pub fn id(&self) -> &str {
        self.id.as_deref().unwrap_or_default()
    }

    /// The job's own progress in percent, when it reports one as
    /// `progress: {"percentage": n}` (or as a bare number).
    pub fn reported_percentage(&self) -> Option<f64> {
        match self.extra.get("progress")? {
            Value::Object(progress) => progress.get("percentage")?.as_f64(),
            other => other.as_f64(),
        }
    }
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Strings as they are, `null` as absent, any other JSON as its compact text.
fn lenient_text<'de, D>(deserializer: D) -> Result<Option<String>, D::Error>
where
    D: Deserializer<'de>,
{
    Ok(match Value::deserialize(deserializer)? {
        Value::Null => None,
        Value::String(text) => Some(text),
        other => Some(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_documented_example() {
        let body: StatusBody = serde_json::from_value(json!({
            "id": "V1StGXR8Z5jdHi6BmyT12",
            "status": "processing",
            "jobs": [
                {"id": "job1", "operation": "generate", "status": "completed",
                 "result": {"url": "https://x/a.mp4", "status": "completed"}, "error": null},
                {"id": "job2", "operation": "merge", "status": "processing",
                 "result": null, "error": null}
            ],
            "result": null,
            "error": null,
            "createdAt": "2026-01-15T10:29:12.123Z",
            "completedAt": null
        }))
        .unwrap();
        assert_eq!(body.jobs.len(), 2);
        assert_eq!(body.jobs[1].status(), "processing");
        assert!(body.result.is_none() && body.extra.is_empty());
    }

    #[test]
    fn tolerates_missing_null_and_odd_fields() {
        let body: StatusBody = serde_json::from_value(json!({
            "id": "x", "status": "paused", "jobs": null,
            "error": {"code": 7}, "queuePosition": 3
        }))
        .unwrap();
        assert!(body.jobs.is_empty());
        assert_eq!(body.error.as_deref(), Some(r#"{"code":7}"#));
        assert_eq!(body.extra["queuePosition"], json!(3));

        let job: JobBody = serde_json::from_value(
            json!({"id": 5, "status": "queued", "progress": {"percentage": 40}}),
        )
        .unwrap();
        assert_eq!(job.id(), "5");
        assert_eq!(job.reported_percentage(), Some(40.0));
    }

    #[test]
    fn requires_id_and_status() {
        assert!(serde_json::from_value::<StatusBody>(json!({"status": "pending"})).is_err());
        assert!(serde_json::from_value::<StatusBody>(json!({"id": "x"})).is_err());
        assert!(serde_json::from_value::<StatusBody>(json!([1, 2])).is_err());
    }
}
