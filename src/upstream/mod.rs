//! The client for Synthome's execution API: `GET {base}/{executionId}/status`.
//!
//! Design decisions:
//! - One `reqwest` client (one connection pool, rustls) serves the whole process.
//! - Redirects are never followed: a redirect could carry the caller's API key to another
//!   host, so a 3xx answer is reported as an upstream failure instead.
//! - Every request has a connect timeout and a total timeout, and the body is read up to a
//!   cap, so a slow or hostile upstream cannot hold a task or memory without bound.
//! - Errors keep the upstream's own `message` text (trimmed to a sane length) because it is
//!   what a caller needs to act on; they never hold the API key, and transport errors are
//!   stripped of their URL.
//!
//! Limits: `Retry-After` is read in its seconds form; the HTTP-date form (which Synthome does
//! not send) is treated as absent, and callers fall back to their own backoff.

pub mod model;

use std::{future::Future, pin::Pin, time::Duration};

use reqwest::{StatusCode, Url, header};

use crate::{credential::Credential, execution_id::ExecutionId, trace_context::TraceContext};
pub use model::{JobBody, StatusBody};

/// How long an upstream message may be before it is cut when passed on to a caller.
const MAX_MESSAGE_CHARS: usize = 300;

/// A source of execution status bodies. The HTTP client is the real one; tests of the
/// snapshot and polling logic plug in their own.
pub trait StatusSource: Send + Sync + 'static {
    /// Reads one execution's status; `trace` is the context of the call that caused the
    /// request, to be passed on.
    fn fetch_status<'a>(
        &'a self,
        credential: &'a Credential,
        execution_id: &'a ExecutionId,
        trace: Option<&'a TraceContext>,
    ) -> Pin<Box<dyn Future<Output = Result<StatusBody, UpstreamError>> + Send + 'a>>;
}

/// Why a status read failed. Each variant maps to one gRPC code in `crate::grpc_error`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpstreamError {
    #[error("Synthome has no execution with this id")]
    NotFound,
    #[error("Synthome rejected the API key: {message}")]
    Unauthenticated { message: String },
    #[error("Synthome refused access: {message}")]
    PermissionDenied { message: String },
    #[error("Synthome rate-limited this API key: {message}")]
    RateLimited {
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("Synthome answered {status}: {message}")]
    ServerError { status: u16, message: String },
    #[error("Synthome refused the request with {status}: {message}")]
    Rejected { status: u16, message: String },
    #[error("Synthome answered with a redirect ({status}), which the gateway does not follow")]
    Redirected { status: u16 },
    #[error("Synthome could not be reached: {0}")]
    Unreachable(String),
    #[error("Synthome did not answer within {0:?}")]
    TimedOut(Duration),
    #[error("Synthome's answer is not the documented status JSON: {0}")]
    Malformed(String),
}

impl UpstreamError {
    /// A short, stable name of the failure, for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::Unauthenticated { .. } => "unauthenticated",
            Self::PermissionDenied { .. } => "permission_denied",
            Self::RateLimited { .. } => "rate_limited",
            Self::ServerError { .. } => "server_error",
            Self::Rejected { .. } => "rejected",
            Self::Redirected { .. } => "redirected",
            Self::Unreachable(_) => "unreachable",
            Self::TimedOut(_) => "timeout",
            Self::Malformed(_) => "malformed",
        }
    }
}

/// Settings of the upstream client.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The API base, such as `https://api.synthome.dev/api/execute`.
    pub base_url: Url,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
}

/// Why the upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the upstream URL must use http or https, not {0:?}")]
    Scheme(String),
    #[error("the upstream URL must not carry a user name or password; pass the key with --api-key")]
    Credentials,
    #[error("the upstream URL must not have a query or fragment")]
    QueryOrFragment,
    #[error("could not build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The HTTP client for Synthome's status route.
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    http: reqwest::Client,
    /// The base URL without a trailing slash.
    base: String,
    request_timeout: Duration,
    max_body_bytes: usize,
}

impl UpstreamClient {
    pub fn new(config: &UpstreamConfig) -> Result<Self, ConfigError> {
        let url = &config.base_url;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ConfigError::Scheme(url.scheme().to_owned()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(ConfigError::Credentials);
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(ConfigError::QueryOrFragment);
        }

        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("synthome-gateway/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base: url.as_str().trim_end_matches('/').to_owned(),
            request_timeout: config.request_timeout,
            max_body_bytes: config.max_body_bytes,
        })
    }

    /// Reads one execution's status. The id is validated, so it is safe in the path as is.
    pub async fn status(
        &self,
        credential: &Credential,
        execution_id: &ExecutionId,
        trace: Option<&TraceContext>,
    ) -> Result<StatusBody, UpstreamError> {
        let url = format!("{}/{execution_id}/status", self.base);
        let mut request = self
            .http
            .get(url)
            .header(header::AUTHORIZATION, credential.bearer_header())
            .header(header::ACCEPT, "application/json");
        if let Some(trace) = trace {
            request = request.header("traceparent", trace.traceparent());
            if let Some(tracestate) = trace.tracestate() {
                request = request.header("tracestate", tracestate);
            }
        }
        let response = request
            .send()
            .await
            .map_err(|err| self.transport_error(err))?;

        let status = response.status();
        let retry_after = retry_after(response.headers());
        let body = self.read_capped(response).await?;
        if status.is_success() {
            parse_status_body(&body, execution_id)
        } else {
            Err(error_for(status, &body, retry_after, credential))
        }
    }

    async fn read_capped(&self, mut response: reqwest::Response) -> Result<Vec<u8>, UpstreamError> {
        let too_large = || {
            UpstreamError::Malformed(format!(
                "the body is larger than the {}-byte limit",
                self.max_body_bytes
            ))
        };
        if response
            .content_length()
            .is_some_and(|length| length > self.max_body_bytes as u64)
        {
            return Err(too_large());
        }

        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|err| self.transport_error(err))?
        {
            if body.len() + chunk.len() > self.max_body_bytes {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn transport_error(&self, err: reqwest::Error) -> UpstreamError {
        if err.is_timeout() {
            return UpstreamError::TimedOut(self.request_timeout);
        }
        UpstreamError::Unreachable(error_chain(&err.without_url()))
    }
}

impl StatusSource for UpstreamClient {
    fn fetch_status<'a>(
        &'a self,
        credential: &'a Credential,
        execution_id: &'a ExecutionId,
        trace: Option<&'a TraceContext>,
    ) -> Pin<Box<dyn Future<Output = Result<StatusBody, UpstreamError>> + Send + 'a>> {
        Box::pin(self.status(credential, execution_id, trace))
    }
}

/// Parses a 200 body and checks that it describes the execution asked for.
pub(crate) fn parse_status_body(
    body: &[u8],
    asked: &ExecutionId,
) -> Result<StatusBody, UpstreamError> {
    // serde_json quotes a mistyped string whole in its error, so the text is cut like an
    // upstream message: a status message of tens of kilobytes breaks the caller's HTTP/2
    // connection instead of reaching it.
    let parsed: StatusBody = serde_json::from_slice(body)
        .map_err(|err| UpstreamError::Malformed(truncate(&err.to_string(), MAX_MESSAGE_CHARS)))?;
    if parsed.id != asked.as_str() {
        return Err(UpstreamError::Malformed(format!(
            "asked for execution {asked:?} but the answer describes {:?}",
            truncate(&parsed.id, 64)
        )));
    }
    Ok(parsed)
}

/// Maps a non-2xx answer to an error, keeping the upstream's message.
/// An upstream message could echo the key it refused, so the key is redacted from it.
pub(crate) fn error_for(
    status: StatusCode,
    body: &[u8],
    retry_after: Option<Duration>,
    credential: &Credential,
) -> UpstreamError {
    // Redact before cutting: a key that straddles the cut would otherwise leave its
    // first characters in the message.
    let message = match error_message(body) {
        Some(text) => truncate(&credential.redact(&text), MAX_MESSAGE_CHARS),
        None => status.canonical_reason().unwrap_or("no message").to_owned(),
    };
    match status.as_u16() {
        404 => UpstreamError::NotFound,
        401 => UpstreamError::Unauthenticated { message },
        403 => UpstreamError::PermissionDenied { message },
        429 => UpstreamError::RateLimited {
            message,
            retry_after,
        },
        code @ 300..=399 => UpstreamError::Redirected { status: code },
        code @ 500..=599 => UpstreamError::ServerError {
            status: code,
            message,
        },
        code => UpstreamError::Rejected {
            status: code,
            message,
        },
    }
}

/// The most useful text of an error body: `message`, else `error`. A field that is not a
/// string (an object or a list of validation problems, say) is passed on as its JSON text
/// rather than costing the other field, or the whole message.
fn error_message(body: &[u8]) -> Option<String> {
    let serde_json::Value::Object(fields) = serde_json::from_slice(body).ok()? else {
        return None;
    };
    let text = |key: &str| fields.get(key).and_then(|v| v.as_str()).map(str::to_owned);
    let json = |key: &str| {
        fields
            .get(key)
            .filter(|v| !v.is_null())
            .map(|v| v.to_string())
    };
    text("message")
        .or_else(|| text("error"))
        .or_else(|| json("message"))
        .or_else(|| json("error"))
}

/// The longest `Retry-After` honoured, by the pollers and in the RetryInfo passed on.
/// Longer values, even beyond u64, are read as this one: they still mean "not any time
/// soon", a day is long enough to stop polling, and a delay near u64::MAX seconds would
/// overflow an `Instant`.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

pub(crate) fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let seconds = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if seconds.is_empty() || !seconds.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds = seconds.parse::<u64>().unwrap_or(u64::MAX);
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// An error with its sources, which is where reqwest keeps the useful part
/// ("connection refused" and the like).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Credential {
        Credential::new("sy_test_key").unwrap()
    }

    #[test]
    fn an_echoed_key_is_redacted_from_the_message() {
        let body = br#"{"error":"Unauthorized","message":"key sy_test_key is inactive"}"#;
        assert_eq!(
            error_for(StatusCode::UNAUTHORIZED, body, None, &key()),
            UpstreamError::Unauthenticated {
                message: "key <redacted> is inactive".into()
            }
        );
    }

    #[test]
    fn a_key_cut_by_the_length_limit_leaves_no_part_behind() {
        let credential = Credential::new("sy_live_0123456789abcdef").unwrap();
        let padding = "x".repeat(MAX_MESSAGE_CHARS - 10);
        let body = format!(r#"{{"message":"{padding} sy_live_0123456789abcdef is inactive"}}"#);
        let UpstreamError::Unauthenticated { message } =
            error_for(StatusCode::UNAUTHORIZED, body.as_bytes(), None, &credential)
        else {
            panic!("not Unauthenticated");
        };
        assert!(!message.contains("sy_live_0"), "{message}");
        assert!(message.ends_with('…'), "still cut: {message}");
    }

    #[test]
    fn error_fields_that_are_not_strings_do_not_cost_the_message() {
        let message_of = |body: &str| match error_for(
            StatusCode::INTERNAL_SERVER_ERROR,
            body.as_bytes(),
            None,
            &key(),
        ) {
            UpstreamError::ServerError { message, .. } => message,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            message_of(r#"{"error":"Database unavailable","message":{"retry":true}}"#),
            "Database unavailable"
        );
        assert_eq!(
            message_of(r#"{"error":{"code":"DB","detail":"pool exhausted"}}"#),
            r#"{"code":"DB","detail":"pool exhausted"}"#
        );
        assert_eq!(
            message_of(r#"{"message":null,"error":null}"#),
            "Internal Server Error"
        );
        assert_eq!(message_of("[1]"), "Internal Server Error");
    }

    #[test]
    fn maps_each_documented_error_body() {
        let unauthorized = br#"{"error":"Unauthorized","message":"Invalid or inactive API key"}"#;
        assert_eq!(
            error_for(StatusCode::UNAUTHORIZED, unauthorized, None, &key()),
            UpstreamError::Unauthenticated {
                message: "Invalid or inactive API key".into()
            }
        );
        assert_eq!(
            error_for(
                StatusCode::NOT_FOUND,
                br#"{"error":"Execution not found"}"#,
                None,
                &key()
            ),
            UpstreamError::NotFound
        );
        let limited = br#"{"error":"Rate Limit Exceeded","message":"Usage limit","code":"RATE_LIMIT_EXCEEDED"}"#;
        assert_eq!(
            error_for(
                StatusCode::TOO_MANY_REQUESTS,
                limited,
                Some(Duration::from_secs(7)),
                &key()
            ),
            UpstreamError::RateLimited {
                message: "Usage limit".into(),
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            error_for(StatusCode::BAD_GATEWAY, b"<html>oops</html>", None, &key()),
            UpstreamError::ServerError {
                status: 502,
                message: "Bad Gateway".into()
            }
        );
        assert_eq!(
            error_for(StatusCode::FOUND, b"", None, &key()),
            UpstreamError::Redirected { status: 302 }
        );
    }

    #[test]
    fn an_answer_about_another_execution_is_refused() {
        let asked = ExecutionId::parse("exec_abc123").unwrap();
        let err =
            parse_status_body(br#"{"id":"exec_other","status":"pending"}"#, &asked).unwrap_err();
        assert!(matches!(err, UpstreamError::Malformed(text) if text.contains("exec_other")));
        assert!(parse_status_body(b"not json", &asked).is_err());
    }

    #[test]
    fn retry_after_is_read_in_seconds_and_capped() {
        let read = |value: &str| {
            let mut headers = header::HeaderMap::new();
            headers.insert(header::RETRY_AFTER, value.parse().unwrap());
            retry_after(&headers)
        };
        assert_eq!(read("0"), Some(Duration::ZERO));
        assert_eq!(read(" 120 "), Some(Duration::from_secs(120)));
        let max = Some(MAX_RETRY_AFTER);
        assert_eq!(read("18446744073709551615"), max);
        assert_eq!(read("99999999999999999999999"), max);
        for junk in [
            "-5",
            "+5",
            "1.5",
            "soon",
            "",
            "Wed, 21 Oct 2026 07:28:00 GMT",
        ] {
            assert_eq!(read(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn long_messages_are_cut() {
        let long = "x".repeat(1000);
        assert_eq!(truncate(&long, 10), format!("{}…", "x".repeat(10)));
        assert_eq!(truncate("short", 10), "short");
    }
}
