//! W3C Trace Context (`traceparent`, `tracestate`) carried from a gRPC call to the upstream
//! requests it causes, so a trace that enters the gateway continues into Synthome.
//!
//! Only well-formed values are carried: `traceparent` must match the W3C format (version,
//! 32-hex trace id, 16-hex parent id, flags; all-zero ids and version `ff` are invalid), and
//! `tracestate` is kept only beside a valid `traceparent` and when it is short printable
//! ASCII. Anything else is dropped, so a caller cannot smuggle header content upstream.
//!
//! Upstream requests are shared by every caller of a poller, so a request carries one
//! caller's context: a fetch that a unary read asked for carries that read's context;
//! scheduled polls carry the context of the call that started the poller.
//!
//! Without trace export the gateway passes the context on unchanged, as the spec allows a
//! participant that records no span of its own. With OTLP export (cargo feature `otlp`)
//! the gateway takes part: the caller's context becomes the parent of the RPC's span, the
//! RPC's span the parent of the upstream requests it causes, and Synthome gets the upstream
//! request's span as its parent.

use tonic::metadata::MetadataMap;
use tracing::Span;

/// The longest `tracestate` carried; the spec allows 32 members of at most 256 characters,
/// but real ones are far shorter and the upstream request should stay small.
const MAX_TRACESTATE_LEN: usize = 512;

/// A validated trace context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    traceparent: String,
    tracestate: Option<String>,
}

impl TraceContext {
    /// The context of a call, when its metadata carries a valid one.
    pub fn from_metadata(metadata: &MetadataMap) -> Option<Self> {
        let traceparent = metadata.get("traceparent")?.to_str().ok()?;
        let traceparent = parse_traceparent(traceparent)?;
        let tracestate = metadata
            .get("tracestate")
            .and_then(|value| value.to_str().ok())
            .filter(|value| is_carryable_tracestate(value))
            .map(str::to_owned);
        Some(Self {
            traceparent,
            tracestate,
        })
    }

    /// The `traceparent` header value, lowercase.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }
}

/// Continues `caller`'s trace in `span`, and returns the context to hand on to work done
/// on its behalf: when traces are exported, `span` becomes the caller's child and its own
/// context is returned; otherwise the caller's context is returned unchanged.
pub fn continue_in(span: &Span, caller: Option<&TraceContext>) -> Option<TraceContext> {
    #[cfg(feature = "otlp")]
    {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        if let Some(caller) = caller {
            // Fails only for a span no exporter records: there is nothing to link then.
            let _ = span.set_parent(otel::extract(caller));
        }
        if let Some(own) = otel::inject(span) {
            return Some(own);
        }
    }
    #[cfg(not(feature = "otlp"))]
    let _ = span;
    caller.cloned()
}

#[cfg(feature = "otlp")]
mod otel {
    use std::collections::HashMap;

    use opentelemetry::{Context, propagation::TextMapPropagator};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use tracing::Span;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::{TraceContext, is_carryable_tracestate, parse_traceparent};

    pub(super) fn extract(context: &TraceContext) -> Context {
        let mut carrier = HashMap::from([("traceparent".to_owned(), context.traceparent.clone())]);
        if let Some(tracestate) = &context.tracestate {
            carrier.insert("tracestate".to_owned(), tracestate.clone());
        }
        TraceContextPropagator::new().extract(&carrier)
    }

    /// `span`'s own context, when it is exported; `None` for a span no exporter records.
    pub(super) fn inject(span: &Span) -> Option<TraceContext> {
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
        let traceparent = parse_traceparent(carrier.get("traceparent")?)?;
        let tracestate = carrier
            .remove("tracestate")
            .filter(|value| is_carryable_tracestate(value));
        Some(TraceContext {
            traceparent,
            tracestate,
        })
    }
}

/// The normalised (lowercase) `traceparent`, if `value` is a valid one. Versions other than
/// `00` may append fields after the flags, which are dropped, as the spec asks of a
/// participant that only knows version `00`.
fn parse_traceparent(value: &str) -> Option<String> {
    let value = value.trim().to_ascii_lowercase();
    let mut fields = value.split('-');
    let (version, trace_id, parent_id, flags) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let rest_allowed = version != "00" || fields.next().is_none();
    let valid = is_hex(version, 2)
        && version != "ff"
        && is_hex(trace_id, 32)
        && is_hex(parent_id, 16)
        && is_hex(flags, 2)
        && trace_id.bytes().any(|b| b != b'0')
        && parent_id.bytes().any(|b| b != b'0')
        && rest_allowed;
    valid.then(|| format!("00-{trace_id}-{parent_id}-{flags}"))
}

fn is_hex(field: &str, len: usize) -> bool {
    field.len() == len && field.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_carryable_tracestate(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_TRACESTATE_LEN
        && value.bytes().all(|b| (b' '..=b'~').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn metadata(traceparent: &str, tracestate: Option<&str>) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("traceparent", traceparent.parse().unwrap());
        if let Some(tracestate) = tracestate {
            metadata.insert("tracestate", tracestate.parse().unwrap());
        }
        metadata
    }

    #[test]
    fn carries_a_valid_context_normalised() {
        let context = TraceContext::from_metadata(&metadata(
            &VALID.to_uppercase(),
            Some("congo=t61rcWkgMzE"),
        ))
        .unwrap();
        assert_eq!(context.traceparent(), VALID);
        assert_eq!(context.tracestate(), Some("congo=t61rcWkgMzE"));
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn a_later_version_is_read_as_version_00() {
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        let context = TraceContext::from_metadata(&metadata(future, None)).unwrap();
        assert_eq!(context.traceparent(), VALID);
    }

    #[test]
    fn drops_what_is_not_a_valid_traceparent() {
        for invalid in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert_eq!(
                TraceContext::from_metadata(&metadata(invalid, None)),
                None,
                "{invalid:?}"
            );
        }
        assert_eq!(TraceContext::from_metadata(&MetadataMap::new()), None);
    }

    #[test]
    fn drops_an_oversized_tracestate_but_keeps_the_traceparent() {
        let long = "a=".to_owned() + &"b".repeat(MAX_TRACESTATE_LEN);
        let context = TraceContext::from_metadata(&metadata(VALID, Some(&long))).unwrap();
        assert_eq!(context.tracestate(), None);
    }
}
