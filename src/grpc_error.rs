//! The one table from a failed call to a gRPC status.
//!
//! Every status carries `google.rpc.ErrorInfo` with domain [`DOMAIN`] and a stable,
//! SCREAMING_CASE `reason` that clients can branch on, and `google.rpc.RetryInfo` where
//! retrying the same call later can succeed. Messages explain the failure in words and
//! never contain a credential: the variants below hold none.

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tracing::{info, warn};

use crate::{
    credential::CredentialError,
    execution_id::{ExecutionId, InvalidExecutionId},
    registry::ReadError,
    upstream::UpstreamError,
};

/// The `domain` of every ErrorInfo this gateway sends.
pub const DOMAIN: &str = "synthome-gateway";

/// The delay suggested for transient upstream failures that come without a `Retry-After`.
const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(1);

/// The delay suggested after an outage ended a watch: long enough not to pile onto a
/// struggling upstream.
const OUTAGE_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(transparent)]
    InvalidExecutionId(#[from] InvalidExecutionId),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("Synthome has been failing for {}s; last error: {last}", lasted.as_secs())]
    UpstreamOutage {
        lasted: Duration,
        last: UpstreamError,
    },
    #[error("the gateway stopped following this execution unexpectedly; retry")]
    Interrupted,
    #[error("the gateway is shutting down; reconnect, passing the last revision received")]
    ShuttingDown,
    #[error(
        "this connection reached the gateway's maximum connection age; reconnect, passing the \
         last revision received"
    )]
    ConnectionAged,
    #[error("this gateway already serves its limit of {limit} watch streams")]
    TooManyWatches { limit: usize },
    #[error("the call's deadline passed before Synthome answered")]
    DeadlineExceeded,
}

impl From<ReadError> for CallError {
    fn from(err: ReadError) -> Self {
        match err {
            ReadError::Upstream(upstream) => Self::Upstream(upstream),
            ReadError::Outage { lasted, last } => Self::UpstreamOutage { lasted, last },
            ReadError::Stopped => Self::Interrupted,
        }
    }
}

/// One row of the table.
struct Mapping {
    code: Code,
    reason: &'static str,
    retry_after: Option<Duration>,
    upstream_http_status: Option<u16>,
}

impl Mapping {
    fn new(code: Code, reason: &'static str) -> Self {
        Self {
            code,
            reason,
            retry_after: None,
            upstream_http_status: None,
        }
    }

    fn retry(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    fn http(mut self, status: u16) -> Self {
        self.upstream_http_status = Some(status);
        self
    }
}

impl CallError {
    fn mapping(&self) -> Mapping {
        use UpstreamError as U;
        match self {
            Self::Credential(CredentialError::Missing) => {
                Mapping::new(Code::Unauthenticated, "CREDENTIALS_MISSING")
            }
            Self::Credential(CredentialError::Malformed) => {
                Mapping::new(Code::Unauthenticated, "CREDENTIALS_MALFORMED")
            }
            Self::InvalidExecutionId(_) => {
                Mapping::new(Code::InvalidArgument, "INVALID_EXECUTION_ID")
            }
            Self::DeadlineExceeded => Mapping::new(Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
            Self::UpstreamOutage { .. } => {
                Mapping::new(Code::Unavailable, "UPSTREAM_OUTAGE").retry(OUTAGE_RETRY_DELAY)
            }
            Self::Interrupted => {
                Mapping::new(Code::Unavailable, "WATCH_INTERRUPTED").retry(DEFAULT_RETRY_DELAY)
            }
            Self::TooManyWatches { .. } => {
                Mapping::new(Code::ResourceExhausted, "TOO_MANY_WATCHES").retry(DEFAULT_RETRY_DELAY)
            }
            Self::ShuttingDown => {
                Mapping::new(Code::Unavailable, "GATEWAY_SHUTTING_DOWN").retry(Duration::ZERO)
            }
            Self::ConnectionAged => {
                Mapping::new(Code::Unavailable, "CONNECTION_MAX_AGE").retry(Duration::ZERO)
            }
            Self::Upstream(upstream) => match upstream {
                U::NotFound => Mapping::new(Code::NotFound, "EXECUTION_NOT_FOUND").http(404),
                U::Unauthenticated { .. } => {
                    Mapping::new(Code::Unauthenticated, "UPSTREAM_UNAUTHENTICATED").http(401)
                }
                U::PermissionDenied { .. } => {
                    Mapping::new(Code::PermissionDenied, "UPSTREAM_PERMISSION_DENIED").http(403)
                }
                U::RateLimited { retry_after, .. } => {
                    Mapping::new(Code::ResourceExhausted, "UPSTREAM_RATE_LIMITED")
                        .retry(retry_after.unwrap_or(DEFAULT_RETRY_DELAY))
                        .http(429)
                }
                U::ServerError { status, .. } => {
                    Mapping::new(Code::Unavailable, "UPSTREAM_SERVER_ERROR")
                        .retry(DEFAULT_RETRY_DELAY)
                        .http(*status)
                }
                U::Rejected { status, .. } => {
                    Mapping::new(Code::Internal, "UPSTREAM_REJECTED_REQUEST").http(*status)
                }
                U::Redirected { status } => {
                    Mapping::new(Code::Unavailable, "UPSTREAM_REDIRECTED").http(*status)
                }
                U::Unreachable(_) => Mapping::new(Code::Unavailable, "UPSTREAM_UNREACHABLE")
                    .retry(DEFAULT_RETRY_DELAY),
                U::TimedOut(_) => {
                    Mapping::new(Code::Unavailable, "UPSTREAM_TIMEOUT").retry(DEFAULT_RETRY_DELAY)
                }
                U::Malformed(_) => Mapping::new(Code::Unavailable, "UPSTREAM_MALFORMED_RESPONSE")
                    .retry(DEFAULT_RETRY_DELAY),
            },
        }
    }

    /// The gRPC code this failure is reported with.
    pub fn code(&self) -> Code {
        self.mapping().code
    }

    /// Whether the failure lies with Synthome or the way to it, rather than with the call:
    /// these are logged as warnings, the others as the caller's business.
    pub fn is_upstream_fault(&self) -> bool {
        !matches!(
            self,
            Self::ShuttingDown | Self::ConnectionAged | Self::TooManyWatches { .. }
        ) && matches!(
            self.code(),
            Code::Unavailable | Code::Internal | Code::ResourceExhausted
        )
    }

    /// Logs the failure, once, at a level that says whose fault it is, and returns its
    /// status. Call this where the failure is handled, and nowhere else.
    pub fn report(&self, execution_id: Option<&ExecutionId>) -> Status {
        let status = self.to_status(execution_id);
        if self.is_upstream_fault() {
            warn!(code = ?status.code(), error = %self, "call failed: upstream degraded");
        } else {
            info!(code = ?status.code(), error = %self, "call refused");
        }
        status
    }

    /// The status for this failure, with ErrorInfo (and RetryInfo or BadRequest) details.
    pub fn to_status(&self, execution_id: Option<&ExecutionId>) -> Status {
        let mapping = self.mapping();

        let mut metadata = HashMap::new();
        if let Some(id) = execution_id {
            metadata.insert("execution_id".to_owned(), id.to_string());
        }
        if let Some(status) = mapping.upstream_http_status {
            metadata.insert("upstream_http_status".to_owned(), status.to_string());
        }
        let mut details = ErrorDetails::with_error_info(mapping.reason, DOMAIN, metadata);
        if let Some(delay) = mapping.retry_after {
            details.set_retry_info(Some(delay));
        }
        if let Self::InvalidExecutionId(reason) = self {
            details.add_bad_request_violation("execution_id", reason.to_string());
        }

        let message = match execution_id {
            Some(id) => format!("execution {id}: {self}"),
            None => self.to_string(),
        };
        Status::with_error_details(mapping.code, message, details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason_of(status: &Status) -> String {
        status.get_details_error_info().unwrap().reason
    }

    #[test]
    fn upstream_failures_map_to_the_documented_codes() {
        let cases = [
            (UpstreamError::NotFound, Code::NotFound),
            (
                UpstreamError::Unauthenticated {
                    message: "m".into(),
                },
                Code::Unauthenticated,
            ),
            (
                UpstreamError::PermissionDenied {
                    message: "m".into(),
                },
                Code::PermissionDenied,
            ),
            (
                UpstreamError::RateLimited {
                    message: "m".into(),
                    retry_after: None,
                },
                Code::ResourceExhausted,
            ),
            (
                UpstreamError::ServerError {
                    status: 503,
                    message: "m".into(),
                },
                Code::Unavailable,
            ),
            (
                UpstreamError::Unreachable("refused".into()),
                Code::Unavailable,
            ),
            (
                UpstreamError::TimedOut(Duration::from_secs(1)),
                Code::Unavailable,
            ),
            (UpstreamError::Malformed("eof".into()), Code::Unavailable),
            (UpstreamError::Redirected { status: 302 }, Code::Unavailable),
        ];
        for (error, code) in cases {
            let status = CallError::from(error.clone()).to_status(None);
            assert_eq!(status.code(), code, "{error:?}");
            assert_eq!(status.get_details_error_info().unwrap().domain, DOMAIN);
        }
    }

    #[test]
    fn rate_limits_carry_the_upstream_retry_after() {
        let error = CallError::from(UpstreamError::RateLimited {
            message: "slow down".into(),
            retry_after: Some(Duration::from_secs(30)),
        });
        let status = error.to_status(None);
        assert_eq!(reason_of(&status), "UPSTREAM_RATE_LIMITED");
        let retry = status.get_details_retry_info().unwrap();
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(30)));
    }

    #[test]
    fn invalid_ids_name_the_field() {
        let id_error = crate::execution_id::ExecutionId::parse("../x").unwrap_err();
        let status = CallError::from(id_error).to_status(None);
        assert_eq!(status.code(), Code::InvalidArgument);
        let violations = status.get_details_bad_request().unwrap().field_violations;
        assert_eq!(violations[0].field, "execution_id");
        assert!(status.get_details_retry_info().is_none());
    }
}
