//! The checking functions of the fuzz targets in `fuzz/`: each feeds one input to the code
//! that handles hostile input, the way a request or an upstream answer reaches it, and
//! panics when a property that code promises does not hold.
//!
//! Not part of the gateway's API. They live in the library, not in `fuzz/`, so that the
//! unit tests below run them over the committed seeds (`fuzz/seeds/<target>/`) on stable
//! Rust, and so that they can reach the few private functions they need without those
//! becoming public.

use std::time::Duration;

use prost::Message;
use reqwest::{
    StatusCode, Url,
    header::{self, HeaderMap, HeaderValue},
};
use tonic::metadata::{MetadataMap, MetadataValue};

use crate::{
    cli::parse_duration,
    credential::Credential,
    execution::{self, TIMESTAMP_SECONDS},
    execution_id::ExecutionId,
    grpc_error::CallError,
    proto::Execution,
    trace_context::TraceContext,
    upstream::{self, MAX_RETRY_AFTER, UpstreamError},
    webhook::WebhookSecret,
};

/// The longest status message, in bytes, that a hostile upstream may cause. gRPC carries
/// the message in a header, so it must stay far below HTTP/2's header limits.
const MAX_STATUS_MESSAGE_BYTES: usize = 2048;

/// The id asked for when the input does not name a valid one.
const DEFAULT_ID: &str = "exec_abc123";

/// Target `status_body`: a 200 body from the upstream, parsed, turned into an `Execution`,
/// encoded and decoded again.
///
/// The execution asked for is the body's own `id` when that is a valid id, so that most
/// inputs get past the "is this the execution asked for" check.
pub fn status_body(data: &[u8]) {
    let asked = serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .and_then(|value| ExecutionId::parse(value.get("id")?.as_str()?).ok())
        .unwrap_or_else(|| ExecutionId::parse(DEFAULT_ID).unwrap());
    let body = match upstream::parse_status_body(data, &asked) {
        Ok(body) => body,
        Err(UpstreamError::Malformed(message)) => {
            assert!(
                message.len() <= MAX_STATUS_MESSAGE_BYTES,
                "a {}-byte Malformed message",
                message.len()
            );
            return;
        }
        Err(other) => panic!("parse_status_body failed with {other:?}"),
    };
    assert_eq!(body.id, asked.as_str());
    let jobs = body.jobs.len();

    let execution = execution::from_upstream(body);
    assert_eq!(execution.jobs.len(), jobs);
    let progress = execution.progress.as_ref().expect("progress is always set");
    assert!(
        (0.0..=100.0).contains(&progress.progress),
        "progress {}",
        progress.progress
    );
    assert!(
        progress.completed_jobs <= progress.total_jobs,
        "{} of {} jobs completed",
        progress.completed_jobs,
        progress.total_jobs
    );
    for time in [&execution.create_time, &execution.complete_time]
        .into_iter()
        .flatten()
    {
        assert!(TIMESTAMP_SECONDS.contains(&time.seconds), "{time:?}");
        assert!((0..1_000_000_000).contains(&time.nanos), "{time:?}");
    }

    let encoded = execution.encode_to_vec();
    let decoded = Execution::decode(encoded.as_slice())
        .unwrap_or_else(|err| panic!("the encoded Execution does not decode: {err}"));
    assert_eq!(decoded, execution, "the Execution does not round-trip");
}

/// Target `error_mapping`: a non-2xx answer from the upstream, as the lines
/// `<status code>\n<Retry-After value>\n<API key suffix>\n<body>`, mapped to the gRPC status
/// a caller gets.
///
/// The key is `sy_live_` followed by the suffix's `[A-Za-z0-9_-]` characters, as real keys
/// look, so that it cannot occur in the fixed text of a message.
pub fn error_mapping(data: &[u8]) {
    let mut lines = data.splitn(4, |&b| b == b'\n');
    let mut line = || lines.next().unwrap_or_default();
    let (status_line, retry_line, key_line, body) = (line(), line(), line(), line());

    let status = std::str::from_utf8(status_line)
        .ok()
        .and_then(|text| text.trim().parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_success() {
        return; // 2xx bodies are status_body's.
    }

    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(retry_line) {
        headers.insert(header::RETRY_AFTER, value);
    }
    let retry_after = upstream::retry_after(&headers);
    let digits = headers
        .get(header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()));
    assert_eq!(retry_after.is_some(), digits.is_some(), "{retry_line:?}");
    if let Some(digits) = digits {
        let expected = digits.parse::<u64>().map_or(MAX_RETRY_AFTER, |seconds| {
            Duration::from_secs(seconds).min(MAX_RETRY_AFTER)
        });
        assert_eq!(retry_after, Some(expected), "{digits:?}");
    }

    let suffix: String = String::from_utf8_lossy(key_line)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        .take(100)
        .collect();
    let key = format!("sy_live_{suffix}");
    let credential = Credential::new(&key).unwrap();

    let error = upstream::error_for(status, body, retry_after, &credential);
    let id = ExecutionId::parse(DEFAULT_ID).unwrap();
    for execution_id in [None, Some(&id)] {
        let mapped = CallError::from(error.clone()).to_status(execution_id);
        let message = mapped.message();
        assert!(
            message.len() <= MAX_STATUS_MESSAGE_BYTES,
            "a {}-byte message",
            message.len()
        );
        assert!(
            !reveals(message.as_bytes(), &key),
            "the key shows in {message:?}"
        );
        assert!(
            !reveals(mapped.details(), &key),
            "the key shows in the details"
        );
        let retry_info = tonic_types::StatusExt::get_details_retry_info(&mapped);
        if let Some(delay) = retry_info.and_then(|info| info.retry_delay) {
            assert!(delay <= MAX_RETRY_AFTER, "RetryInfo of {delay:?}");
        }
    }
}

/// Target `execution_id`: an id as a caller sends it. Accepted ids are exactly the 1 to 128
/// characters of `[A-Za-z0-9_-]`, and an accepted id is one URL path segment as it is.
pub fn execution_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // gRPC strings are UTF-8; prost refuses anything else.
    };
    let expected = (1..=128).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match ExecutionId::parse(text) {
        Ok(id) => {
            assert!(expected, "{text:?} was accepted");
            assert_eq!(id.as_str(), text);
            let url = Url::parse(&format!("https://upstream.invalid/api/execute/{id}/status"))
                .expect("an accepted id makes a valid URL");
            let segments: Vec<_> = url.path_segments().unwrap().collect();
            assert_eq!(segments, ["api", "execute", text, "status"]);
        }
        Err(err) => {
            assert!(!expected, "{text:?} was refused: {err}");
            use crate::execution_id::InvalidExecutionId as E;
            match err {
                E::Empty => assert!(text.is_empty()),
                E::TooLong(length) => {
                    assert!(length > 128 && length == text.chars().count())
                }
                E::BadCharacter(c, position) => {
                    assert_eq!(text.chars().nth(position), Some(c));
                    assert!(!(c.is_ascii_alphanumeric() || c == '_' || c == '-'));
                }
            }
        }
    }
}

/// Target `trace_context`: `traceparent` and `tracestate` metadata as the lines
/// `<traceparent>\n<tracestate>` (no newline: no tracestate). Accepted contexts are the
/// W3C ones, normalised to lowercase version 00, round-trip through metadata, and are valid
/// header values for the upstream request.
pub fn trace_context(data: &[u8]) {
    let (traceparent, tracestate) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    let metadata = trace_metadata(traceparent, tracestate);
    let context = TraceContext::from_metadata(&metadata);

    let sent_traceparent = metadata
        .get("traceparent")
        .and_then(|value| value.to_str().ok());
    let expected = sent_traceparent.and_then(reference_traceparent);
    assert_eq!(
        context.as_ref().map(TraceContext::traceparent),
        expected.as_deref(),
        "{sent_traceparent:?}"
    );
    let Some(context) = context else {
        return;
    };
    assert_eq!(context.trace_id(), &context.traceparent()[3..35]);

    let sent_tracestate = metadata
        .get("tracestate")
        .and_then(|value| value.to_str().ok())
        .filter(|value| {
            !value.is_empty() && value.len() <= 512 && value.bytes().all(|b| (32..127).contains(&b))
        });
    assert_eq!(context.tracestate(), sent_tracestate);

    HeaderValue::from_str(context.traceparent()).expect("traceparent is a valid header value");
    if let Some(tracestate) = context.tracestate() {
        HeaderValue::from_str(tracestate).expect("tracestate is a valid header value");
    }
    let again = TraceContext::from_metadata(&trace_metadata(
        context.traceparent().as_bytes(),
        context.tracestate().map(str::as_bytes),
    ));
    assert_eq!(
        again.as_ref(),
        Some(&context),
        "the context does not round-trip"
    );
}

fn trace_metadata(traceparent: &[u8], tracestate: Option<&[u8]>) -> MetadataMap {
    let mut metadata = MetadataMap::new();
    if let Ok(value) = MetadataValue::try_from(traceparent) {
        metadata.insert("traceparent", value);
    }
    if let Some(Ok(value)) = tracestate.map(MetadataValue::try_from) {
        metadata.insert("tracestate", value);
    }
    metadata
}

/// The W3C algorithm, by position, written apart from the gateway's: after trimming and
/// lowercasing, `vv-<32 hex>-<16 hex>-<2 hex>`, version not `ff`, ids not all zero, and
/// either exactly that (version 00) or, for a later version, that followed by the end or
/// `-`.
fn reference_traceparent(value: &str) -> Option<String> {
    let value = value.trim().to_ascii_lowercase();
    let bytes = value.as_bytes();
    let hex = |range: std::ops::Range<usize>| {
        bytes
            .get(range)
            .is_some_and(|part| part.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    };
    let zero = |range: std::ops::Range<usize>| bytes[range].iter().all(|&b| b == b'0');
    let well_formed = bytes.len() >= 55
        && hex(0..2)
        && hex(3..35)
        && hex(36..52)
        && hex(53..55)
        && [2, 35, 52].iter().all(|&at| bytes[at] == b'-')
        && &value[..2] != "ff"
        && !zero(3..35)
        && !zero(36..52)
        && if &value[..2] == "00" {
            bytes.len() == 55
        } else {
            bytes.len() == 55 || bytes[55] == b'-'
        };
    well_formed.then(|| format!("00{}", &value[2..55]))
}

/// Target `credential`: `authorization` metadata, a text to redact the key from, and a
/// webhook body with its signature, as the lines `<authorization>\n<text>\n<secret>\n<body>`.
pub fn credential(data: &[u8]) {
    let mut lines = data.splitn(4, |&b| b == b'\n');
    let mut line = || lines.next().unwrap_or_default();
    let (authorization, text, secret, body) = (line(), line(), line(), line());

    let mut metadata = MetadataMap::new();
    if let Ok(value) = MetadataValue::try_from(authorization) {
        metadata.insert("authorization", value);
    }
    if let Ok(credential) = Credential::for_call(&metadata, None) {
        let header = credential.bearer_header();
        let key = header.strip_prefix("Bearer ").unwrap();
        assert!(!key.is_empty() && key.bytes().all(|b| b.is_ascii_graphic()));
        HeaderValue::from_str(&header).expect("the bearer header is a valid header value");

        let text = String::from_utf8_lossy(text);
        let redacted = credential.redact(&text);
        // The marker itself may spell a short key ("ed"): look between the markers.
        for part in redacted.split("<redacted>") {
            assert!(
                !reveals(part.as_bytes(), key),
                "the key shows in {redacted:?}"
            );
        }
    }

    let raw_secret = std::str::from_utf8(secret).unwrap_or_default();
    if let Some(secret) = WebhookSecret::new(raw_secret) {
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(raw_secret.as_bytes()).unwrap();
        mac.update(body);
        let digest = hex::encode(mac.finalize().into_bytes());
        assert!(secret.verifies(body, &digest));
        assert!(secret.verifies(body, &format!("sha256={digest}")));
        assert!(secret.verifies(body, &digest.to_uppercase()));
        // The body's own text as a signature: garbage, never a panic.
        let _ = secret.verifies(body, &String::from_utf8_lossy(body));
    }
}

/// Target `duration`: a command-line duration such as `250ms`. An accepted one is exactly the
/// number times its unit; one too large to hold is refused, not wrapped.
pub fn duration(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_duration(text);
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let millis_per_unit: Option<u128> = match unit {
        "ms" => Some(1),
        "s" => Some(1000),
        "m" => Some(60_000),
        "h" => Some(3_600_000),
        _ => None,
    };
    let expected = digits
        .parse::<u64>()
        .ok()
        .zip(millis_per_unit)
        .map(|(amount, per_unit)| u128::from(amount) * per_unit)
        .filter(|&millis| millis <= Duration::MAX.as_millis());
    match parsed {
        Ok(duration) => assert_eq!(Some(duration.as_millis()), expected, "{text:?}"),
        Err(_) => assert_eq!(expected, None, "{text:?} was refused"),
    }
}

/// Whether `haystack` shows `key`: in any letter case, or with any byte percent-encoded
/// once (what `Credential::redact` promises to remove).
fn reveals(haystack: &[u8], key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    let contains = |text: &[u8]| {
        text.to_ascii_lowercase()
            .windows(key.len())
            .any(|window| window == key.as_bytes())
    };
    contains(haystack) || contains(&percent_decoded(haystack))
}

fn percent_decoded(text: &[u8]) -> Vec<u8> {
    let mut decoded = Vec::with_capacity(text.len());
    let mut at = 0;
    while at < text.len() {
        let byte = text
            .get(at + 1..at + 3)
            .filter(|_| text[at] == b'%')
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match byte {
            Some(byte) => {
                decoded.push(byte);
                at += 3;
            }
            None => {
                decoded.push(text[at]);
                at += 1;
            }
        }
    }
    decoded
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// Runs `check` over every seed of `target` in `fuzz/seeds/`, so that CI, on stable
    /// Rust, holds the seeds (and past crashes) to the fuzz targets' properties.
    fn over_seeds(target: &str, check: fn(&[u8])) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds")
            .join(target);
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|err| panic!("{dir:?}: {err}")) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            eprintln!("checking {}", path.display());
            check(&data);
            count += 1;
        }
        assert!(count > 0, "no seeds in {dir:?}");
    }

    #[test]
    fn status_body_seeds() {
        over_seeds("status_body", super::status_body);
    }

    #[test]
    fn error_mapping_seeds() {
        over_seeds("error_mapping", super::error_mapping);
    }

    #[test]
    fn execution_id_seeds() {
        over_seeds("execution_id", super::execution_id);
    }

    #[test]
    fn trace_context_seeds() {
        over_seeds("trace_context", super::trace_context);
    }

    #[test]
    fn credential_seeds() {
        over_seeds("credential", super::credential);
    }

    #[test]
    fn duration_seeds() {
        over_seeds("duration", super::duration);
    }
}
