//! Prometheus metrics, served as text on the operations listener at `GET /metrics`.
//!
//! Every name starts with `synthome_gateway_`. One [`Metrics`] belongs to one gateway (the
//! registry of pollers owns it), not to the process, so gateways started side by side in
//! tests or the demo count apart. The crate is `prometheus-client`, the Prometheus
//! project's own Rust client: typed label sets, no global state.
//!
//! Labels are closed sets of `&'static str` chosen by the gateway (gRPC method names from
//! an allow-list, status code names, outcome kinds): never an execution id, a key or
//! anything else a caller controls, so the number of series stays bounded and no secret can
//! reach a label.
//!
//! RPCs are measured by [`RpcMetricsLayer`] around the whole gRPC server, so every call is
//! counted with the code the client really got: the status of a trailers-only answer, the
//! `grpc-status` trailer at the end of a stream, or `CANCELLED` when the client went away
//! before the end. A watch's duration is its whole life, so the latency histogram has
//! buckets up to minutes.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http_body::{Body, Frame, SizeHint};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tonic::Code;
use tower::{Layer, Service};

/// The content type of the text exposition served at `/metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    service: &'static str,
    method: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    service: &'static str,
    method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    cache: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

/// Where a read was answered without a request of its own to Synthome.
#[derive(Debug, Clone, Copy)]
pub enum CacheHit {
    /// The execution had ended and was remembered.
    Ended,
    /// A snapshot younger than the poll interval was reused.
    Fresh,
}

/// What became of one webhook delivery.
#[derive(Debug, Clone, Copy)]
pub enum WebhookResult {
    Accepted,
    BadSignature,
    Malformed,
    TooLarge,
}

/// The gateway's metrics. Cloning shares them.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    rpcs: Family<RpcLabels, Counter>,
    rpc_duration: HistogramFamily<MethodLabels>,
    open_watch_streams: Gauge,
    active_pollers: Gauge,
    upstream_requests: Family<OutcomeLabels, Counter>,
    upstream_duration: Histogram,
    poll_audience: Counter,
    upstream_requests_saved: Counter,
    cache_hits: Family<CacheLabels, Counter>,
    webhooks: Family<ResultLabels, Counter>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("synthome_gateway");
        let inner = Inner {
            rpcs: Family::default(),
            // 0.5 ms to about 4.4 minutes: unary calls at the low end, watches at the high.
            rpc_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 20))
            }),
            open_watch_streams: Gauge::default(),
            active_pollers: Gauge::default(),
            upstream_requests: Family::default(),
            // 1 ms to about 16 s, past the default upstream timeout of 10 s.
            upstream_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            poll_audience: Counter::default(),
            upstream_requests_saved: Counter::default(),
            cache_hits: Family::default(),
            webhooks: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "rpc_requests",
            "gRPC calls finished, by service, method and the status code the client got",
            inner.rpcs.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "Time from a call's arrival to its status; for a watch, the stream's whole life",
            inner.rpc_duration.clone(),
        );
        registry.register(
            "open_watch_streams",
            "WatchExecution streams open now",
            inner.open_watch_streams.clone(),
        );
        registry.register(
            "active_pollers",
            "Upstream pollers running now, one per (API key, execution) being followed",
            inner.active_pollers.clone(),
        );
        registry.register(
            "upstream_requests",
            "Status requests sent to Synthome, by outcome",
            inner.upstream_requests.clone(),
        );
        registry.register(
            "upstream_request_duration_seconds",
            "Time for one status request to Synthome, body included",
            inner.upstream_duration.clone(),
        );
        registry.register(
            "upstream_poll_watchers",
            "Watchers and readers that upstream status requests served: each request adds \
             how many were waiting on it. Divided by upstream_requests, the watchers served \
             per upstream request",
            inner.poll_audience.clone(),
        );
        registry.register(
            "upstream_requests_saved",
            "Status requests that sharing saved: for each upstream request, the watchers and \
             readers it served beyond the first",
            inner.upstream_requests_saved.clone(),
        );
        registry.register(
            "cache_hits",
            "Reads answered without an upstream request: from the ended-execution cache, or \
             from a snapshot younger than the poll interval",
            inner.cache_hits.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Webhooks received on /webhooks/synthome, by result",
            inner.webhooks.clone(),
        );
        Self {
            inner: Arc::new(Inner { registry, ..inner }),
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// Counts one status request to Synthome that served `audience` watchers and readers.
    pub fn upstream_request(&self, outcome: &'static str, seconds: f64, audience: usize) {
        let inner = &self.inner;
        inner
            .upstream_requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        inner.upstream_duration.observe(seconds);
        inner.poll_audience.inc_by(audience as u64);
        inner
            .upstream_requests_saved
            .inc_by(audience.saturating_sub(1) as u64);
    }

    pub fn cache_hit(&self, hit: CacheHit) {
        let cache = match hit {
            CacheHit::Ended => "ended",
            CacheHit::Fresh => "fresh",
        };
        self.inner
            .cache_hits
            .get_or_create(&CacheLabels { cache })
            .inc();
    }

    pub fn webhook(&self, result: WebhookResult) {
        let result = match result {
            WebhookResult::Accepted => "accepted",
            WebhookResult::BadSignature => "bad_signature",
            WebhookResult::Malformed => "malformed",
            WebhookResult::TooLarge => "too_large",
        };
        self.inner
            .webhooks
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Marks a poller as running until the guard is dropped.
    pub fn poller_running(&self) -> GaugeGuard {
        GaugeGuard::new(self.inner.active_pollers.clone())
    }

    /// Marks a watch stream as open until the guard is dropped.
    pub fn watch_stream_open(&self) -> GaugeGuard {
        GaugeGuard::new(self.inner.open_watch_streams.clone())
    }

    fn rpc_finished(&self, method: MethodLabels, code: Code, started: Instant) {
        let inner = &self.inner;
        inner
            .rpcs
            .get_or_create(&RpcLabels {
                service: method.service,
                method: method.method,
                code: code_name(code),
            })
            .inc();
        inner
            .rpc_duration
            .get_or_create(&method)
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Adds one to a gauge for as long as it lives.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The gRPC methods this server has, as (service, method) label values. Anything else is
/// counted as `unknown`, so a client cannot create series by calling made-up paths.
const KNOWN_METHODS: &[(&str, &str)] = &[
    (
        "synthome.status.v1.ExecutionStatusService",
        "GetExecutionStatus",
    ),
    (
        "synthome.status.v1.ExecutionStatusService",
        "WatchExecution",
    ),
    ("grpc.health.v1.Health", "Check"),
    ("grpc.health.v1.Health", "Watch"),
    (
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
    ),
];

fn method_labels(path: &str) -> MethodLabels {
    let named = path
        .strip_prefix('/')
        .and_then(|path| path.split_once('/'))
        .and_then(|(service, method)| {
            KNOWN_METHODS
                .iter()
                .find(|known| known.0 == service && known.1 == method)
        });
    let (service, method) = named.copied().unwrap_or(("unknown", "unknown"));
    MethodLabels { service, method }
}

/// The canonical name of a status code, as gRPC's specification spells it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The `grpc-status` in a header map (of a trailers-only answer, or of the trailers).
fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(value.parse().ok()?))
}

/// Counts every gRPC call with the code its client got, and times it.
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer {
    metrics: Metrics,
}

impl RpcMetricsLayer {
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`RpcMetricsLayer`] wraps around the gRPC server.
#[derive(Debug, Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for RpcMetricsService<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<MeteredBody<ResponseBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let mut call = CallRecord {
            metrics: self.metrics.clone(),
            method: method_labels(request.uri().path()),
            started: Instant::now(),
            finished: false,
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            if let Some(code) = grpc_status(response.headers()) {
                call.finish(code);
            }
            Ok(response.map(|body| MeteredBody { inner: body, call }))
        })
    }
}

/// One call being measured; it is counted exactly once, at its status or when dropped.
#[derive(Debug)]
struct CallRecord {
    metrics: Metrics,
    method: MethodLabels,
    started: Instant,
    finished: bool,
}

impl CallRecord {
    fn finish(&mut self, code: Code) {
        if !self.finished {
            self.finished = true;
            let method = self.method.clone();
            self.metrics.rpc_finished(method, code, self.started);
        }
    }
}

impl Drop for CallRecord {
    /// A call dropped before its status was sent: the client cancelled or went away.
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

pin_project_lite::pin_project! {
    /// A response body that reports the call's status when its trailers pass.
    #[derive(Debug)]
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        call: CallRecord,
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.call.finish(code);
                }
            }
            Some(Err(_)) => this.call.finish(Code::Internal),
            // A gRPC answer always ends with a status; a body without one is broken.
            None => this.call.finish(Code::Unknown),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_methods_get_their_own_labels() {
        let watch = method_labels("/synthome.status.v1.ExecutionStatusService/WatchExecution");
        assert_eq!(
            (watch.service, watch.method),
            (
                "synthome.status.v1.ExecutionStatusService",
                "WatchExecution"
            )
        );
        for path in [
            "/synthome.status.v1.ExecutionStatusService/Other",
            "/made.up/Path",
            "/",
            "",
            "no-slash",
        ] {
            let labels = method_labels(path);
            assert_eq!(
                (labels.service, labels.method),
                ("unknown", "unknown"),
                "{path}"
            );
        }
    }

    #[test]
    fn an_upstream_request_counts_what_sharing_saved() {
        let metrics = Metrics::new();
        metrics.upstream_request("ok", 0.01, 5);
        metrics.upstream_request("ok", 0.01, 0);
        metrics.upstream_request("server_error", 0.5, 1);

        let text = metrics.encode();
        assert!(text.contains("synthome_gateway_upstream_requests_total{outcome=\"ok\"} 2"));
        assert!(
            text.contains("synthome_gateway_upstream_requests_total{outcome=\"server_error\"} 1")
        );
        assert!(text.contains("synthome_gateway_upstream_poll_watchers_total 6"));
        assert!(text.contains("synthome_gateway_upstream_requests_saved_total 4"));
    }

    #[test]
    fn guards_give_back_what_they_add() {
        let metrics = Metrics::new();
        let first = metrics.watch_stream_open();
        let second = metrics.watch_stream_open();
        drop(first);
        assert!(
            metrics
                .encode()
                .contains("synthome_gateway_open_watch_streams 1")
        );
        drop(second);
        assert!(
            metrics
                .encode()
                .contains("synthome_gateway_open_watch_streams 0")
        );
    }
}
