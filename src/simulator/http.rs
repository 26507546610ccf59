//! Routes of the simulated upstream, plus the `/_simulator` control routes.
//!
//! The status route answers in this order, mirroring where the real service
//! spends its time and where each failure arises: count the request, add the
//! configured latency, check the key (401), the usage limit (429), a simulated
//! internal error (500), find the caller's execution (404), and finally either a
//! malformed 200 or the documented body. Control routes need no key: they exist
//! for tests and benchmarks, never for a public deployment.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::debug;

use super::model::Plan;
use super::{Faults, Simulator, SimulatorError};

/// Builds every route on one simulator.
pub(crate) fn router(simulator: Simulator) -> Router {
    Router::new()
        .route("/api/execute", post(create_execution))
        .route("/api/execute/{execution_id}/status", get(execution_status))
        .route("/_simulator/stats", get(stats))
        .route("/_simulator/faults", get(get_faults).put(put_faults))
        .with_state(simulator)
}

async fn create_execution(
    State(simulator): State<Simulator>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    simulator.count_create_request();

    let created = simulator
        .authorize(bearer_key(&headers))
        .and_then(|owner| Ok(simulator.insert(owner, Plan::from_slice(&body)?)));

    match created {
        Ok(execution) => {
            (StatusCode::ACCEPTED, axum::Json(execution.created_body())).into_response()
        }
        Err(error) => error_response(&error),
    }
}

async fn execution_status(
    State(simulator): State<Simulator>,
    Path(execution_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    simulator.count_status_request(&execution_id);
    let faults = simulator.faults();
    if faults.latency_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(faults.latency_ms)).await;
    }

    let owner = match simulator.authorize(bearer_key(&headers)) {
        Ok(owner) => owner,
        Err(error) => return error_response(&error),
    };
    if let Some(fault) = injected_fault(&faults) {
        debug!(execution_id = %execution_id, ?fault, "injected status fault");
        return fault.response(&faults);
    }

    let Some(execution) = simulator.execution_for(&execution_id, &owner) else {
        return not_found();
    };
    if roll(faults.malformed_rate) {
        debug!(execution_id = %execution_id, "injected malformed status body");
        return malformed_body();
    }
    axum::Json(execution.status_at(Instant::now())).into_response()
}

async fn stats(State(simulator): State<Simulator>) -> Response {
    axum::Json(json!({
        "statusRequests": simulator.status_requests(),
        "createRequests": simulator.create_requests(),
    }))
    .into_response()
}

async fn get_faults(State(simulator): State<Simulator>) -> Response {
    axum::Json(simulator.faults()).into_response()
}

async fn put_faults(State(simulator): State<Simulator>, body: Bytes) -> Response {
    let faults = match serde_json::from_slice::<Faults>(&body) {
        Ok(faults) => faults,
        Err(err) => return bad_request(&format!("invalid faults: {err}")),
    };
    if let Err(error) = faults.check() {
        return error_response(&error);
    }

    simulator.set_faults(faults);
    axum::Json(simulator.faults()).into_response()
}

/// The key of an `Authorization: Bearer <key>` header, if present and non-empty.
fn bearer_key(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let key = value.strip_prefix("Bearer ")?.trim();
    (!key.is_empty()).then_some(key)
}

/// True with probability `rate`; exactly never at 0.0 (or NaN) and always at 1.0.
fn roll(rate: f64) -> bool {
    rate >= 1.0 || (rate > 0.0 && fastrand::f64() < rate)
}

#[derive(Debug, Clone, Copy)]
enum InjectedFault {
    RateLimited,
    InternalError,
}

fn injected_fault(faults: &Faults) -> Option<InjectedFault> {
    if roll(faults.rate_limit_rate) {
        Some(InjectedFault::RateLimited)
    } else if roll(faults.error_rate) {
        Some(InjectedFault::InternalError)
    } else {
        None
    }
}

impl InjectedFault {
    fn response(self, faults: &Faults) -> Response {
        match self {
            Self::RateLimited => rate_limited(faults.retry_after_secs),
            Self::InternalError => json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({
                    "error": "Internal Server Error",
                    "message": "Simulated internal error",
                }),
            ),
        }
    }
}

fn rate_limited(retry_after_secs: u64) -> Response {
    let mut response = json_error(
        StatusCode::TOO_MANY_REQUESTS,
        json!({
            "error": "Rate Limit Exceeded",
            "message": "Your organization has exceeded its usage limit",
            "code": "RATE_LIMIT_EXCEEDED",
        }),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    response
}

/// One of several bodies a broken proxy or a half-written response could give.
fn malformed_body() -> Response {
    let (content_type, body) = match fastrand::u8(0..4) {
        0 => ("application/json", r#"{"id": "truncated", "status": "proc"#),
        1 => (
            "application/json",
            r#"{"id": 42, "status": ["processing"], "jobs": "none"}"#,
        ),
        2 => ("text/html", "<html><body>502 Bad Gateway</body></html>"),
        _ => ("application/json", ""),
    };
    (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn not_found() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        json!({ "error": "Execution not found" }),
    )
}

fn bad_request(message: &str) -> Response {
    json_error(
        StatusCode::BAD_REQUEST,
        json!({ "error": "Bad Request", "message": message }),
    )
}

fn error_response(error: &SimulatorError) -> Response {
    match error {
        SimulatorError::MissingCredentials | SimulatorError::UnknownApiKey => json_error(
            StatusCode::UNAUTHORIZED,
            json!({ "error": "Unauthorized", "message": error.to_string() }),
        ),
        SimulatorError::InvalidPlan(_) | SimulatorError::InvalidFaults(_) => {
            bad_request(&error.to_string())
        }
    }
}

fn json_error(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolls_are_exact_at_the_ends() {
        assert!((0..1_000).all(|_| roll(1.0)));
        assert!((0..1_000).all(|_| !roll(0.0)));
        assert!(!roll(f64::NAN));
    }

    #[test]
    fn reads_only_well_formed_bearer_keys() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(value).expect("test header"),
            );
            bearer_key(&headers).map(str::to_owned)
        };

        assert_eq!(with("Bearer sy_test_1"), Some("sy_test_1".to_owned()));
        assert_eq!(with("Bearer   "), None);
        assert_eq!(with("Basic abc"), None);
        assert_eq!(bearer_key(&HeaderMap::new()), None);
    }
}
