//! The gRPC surface: `synthome.status.v1.ExecutionStatusService`.
//!
//! Each call goes through the same steps: pick the credential (the call's own bearer key,
//! else the gateway's), validate the execution id, then ask [`Snapshots`]. Both inputs are
//! checked before anything is sent upstream. A failure is logged here, once, and turned
//! into a status by [`CallError::to_status`].
//!
//! Deadlines: tonic itself ends a call whose `grpc-timeout` has passed, but reports it as
//! CANCELLED. The handler therefore stops waiting on the upstream a little before the
//! caller's deadline, so the caller gets DEADLINE_EXCEEDED with details.

use std::{sync::Arc, time::Duration};

use tonic::{Request, Response, Status, metadata::MetadataMap};
use tracing::{Span, field, info, instrument, warn};

use crate::{
    credential::Credential,
    execution_id::ExecutionId,
    grpc_error::CallError,
    proto::{
        GetExecutionStatusRequest, GetExecutionStatusResponse,
        execution_status_service_server::ExecutionStatusService,
    },
    snapshots::Snapshots,
};

/// How much of a caller's deadline is kept back to answer DEADLINE_EXCEEDED in time.
const DEADLINE_MARGIN: Duration = Duration::from_millis(20);

/// The implementation of `ExecutionStatusService`.
#[derive(Debug, Clone)]
pub struct ExecutionStatusApi {
    snapshots: Arc<Snapshots>,
    /// The gateway's own key, used for calls that bring none.
    fallback_credential: Option<Credential>,
}

impl ExecutionStatusApi {
    pub fn new(snapshots: Arc<Snapshots>, fallback_credential: Option<Credential>) -> Self {
        Self {
            snapshots,
            fallback_credential,
        }
    }

    /// The credential and validated id of a call.
    fn inputs(
        &self,
        metadata: &MetadataMap,
        raw_id: &str,
    ) -> Result<(Credential, ExecutionId), CallError> {
        let credential = Credential::for_call(metadata, self.fallback_credential.as_ref())?;
        let execution_id = ExecutionId::parse(raw_id)?;
        Span::current().record("execution_id", field::display(&execution_id));
        Ok((credential, execution_id))
    }
}

#[tonic::async_trait]
impl ExecutionStatusService for ExecutionStatusApi {
    #[instrument(name = "GetExecutionStatus", skip_all, fields(execution_id = field::Empty))]
    async fn get_execution_status(
        &self,
        request: Request<GetExecutionStatusRequest>,
    ) -> Result<Response<GetExecutionStatusResponse>, Status> {
        let budget = grpc_timeout(request.metadata()).map(|t| t.saturating_sub(DEADLINE_MARGIN));
        let (credential, execution_id) = self
            .inputs(request.metadata(), &request.get_ref().execution_id)
            .map_err(|err| reject(&err, None))?;

        let fetch = self.snapshots.get(&credential, &execution_id);
        let outcome = match budget {
            Some(budget) => match tokio::time::timeout(budget, fetch).await {
                Ok(result) => result.map_err(CallError::from),
                Err(_elapsed) => Err(CallError::DeadlineExceeded),
            },
            None => fetch.await.map_err(CallError::from),
        };
        match outcome {
            Ok(execution) => Ok(Response::new(GetExecutionStatusResponse {
                execution: Some(execution.as_ref().clone()),
            })),
            Err(err) => Err(reject(&err, Some(&execution_id))),
        }
    }
}

/// Logs a failed call once, at a level that matches whose fault it is, and builds its status.
fn reject(err: &CallError, execution_id: Option<&ExecutionId>) -> Status {
    let status = err.to_status(execution_id);
    if err.is_upstream_fault() {
        warn!(code = ?status.code(), error = %err, "call failed: upstream degraded");
    } else {
        info!(code = ?status.code(), error = %err, "call refused");
    }
    status
}

/// The caller's timeout from the `grpc-timeout` header: up to eight digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`), as the gRPC over HTTP/2 spec defines it. A malformed
/// header counts as none, as tonic treats it.
fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().unwrap());
        metadata
    }

    #[test]
    fn reads_every_grpc_timeout_unit() {
        for (value, expected) in [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("3S", Duration::from_secs(3)),
            ("250m", Duration::from_millis(250)),
            ("7u", Duration::from_micros(7)),
            ("99999999n", Duration::from_nanos(99_999_999)),
        ] {
            assert_eq!(
                grpc_timeout(&with_timeout(value)),
                Some(expected),
                "{value}"
            );
        }
    }

    #[test]
    fn ignores_malformed_timeouts() {
        for value in ["", "S", "123456789S", "10x", "-1S", "1.5S"] {
            let metadata = if value.is_empty() {
                MetadataMap::new()
            } else {
                with_timeout(value)
            };
            assert_eq!(grpc_timeout(&metadata), None, "{value:?}");
        }
    }
}
