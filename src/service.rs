//! The gRPC surface: `synthome.status.v1.ExecutionStatusService`.
//!
//! Each call goes through the same steps: pick the credential (the call's own bearer key,
//! else the gateway's), validate the execution id, then ask the [`Registry`]. Both inputs
//! are checked before anything is sent upstream. A failure is logged once, where it is
//! handled, and turned into a status by [`CallError::report`].
//!
//! Deadlines: tonic itself ends a unary call whose `grpc-timeout` has passed, but reports
//! it as CANCELLED. The handler therefore stops waiting a little before the caller's
//! deadline, so the caller gets DEADLINE_EXCEEDED with details. For a watch, tonic's timer
//! only covers the response headers; the stream task ends the stream at the deadline.

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{Semaphore, mpsc, watch},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, metadata::MetadataMap};
use tracing::{Instrument, Span, field, info_span};

use crate::{
    credential::Credential,
    execution_id::ExecutionId,
    grpc_error::CallError,
    proto::{
        GetExecutionStatusRequest, GetExecutionStatusResponse, WatchExecutionRequest,
        execution_status_service_server::ExecutionStatusService,
    },
    registry::Registry,
    server::ConnectionInfo,
    trace_context::{self, TraceContext},
    watch::{RESPONSE_SLOTS, StreamItem, WatchStream},
};

/// How much of a caller's deadline is kept back to answer DEADLINE_EXCEEDED in time.
const DEADLINE_MARGIN: Duration = Duration::from_millis(20);

/// How the service treats calls.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// The gateway's own key, used for calls that bring none.
    pub fallback_credential: Option<Credential>,
    /// Quiet time after which a watch repeats its snapshot.
    pub heartbeat_interval: Duration,
    /// Watch streams open at once; more get RESOURCE_EXHAUSTED.
    pub max_watch_streams: usize,
    /// The longest a unary call may take, whatever deadline the caller sent.
    pub unary_timeout: Duration,
    /// Connections older than this are asked to go away (GOAWAY); watches on them then
    /// end with UNAVAILABLE, so that their clients reconnect on a new connection.
    pub max_connection_age: Option<Duration>,
    /// How long calls may go on after that GOAWAY before the connection is closed.
    pub max_connection_age_grace: Option<Duration>,
}

/// The implementation of `ExecutionStatusService`.
#[derive(Debug, Clone)]
pub struct ExecutionStatusApi {
    registry: Registry,
    settings: ServiceSettings,
    /// One permit per open watch stream.
    watch_permits: Arc<Semaphore>,
    /// Turns true when the gateway drains; open watches then end with UNAVAILABLE.
    draining: watch::Receiver<bool>,
}

impl ExecutionStatusApi {
    pub fn new(
        registry: Registry,
        settings: ServiceSettings,
        draining: watch::Receiver<bool>,
    ) -> Self {
        Self {
            registry,
            watch_permits: Arc::new(Semaphore::new(settings.max_watch_streams)),
            settings,
            draining,
        }
    }

    /// The credential and validated id of a call, recorded on the call's span.
    fn inputs(
        &self,
        metadata: &MetadataMap,
        raw_id: &str,
    ) -> Result<(Credential, ExecutionId), Status> {
        let inputs = Credential::for_call(metadata, self.settings.fallback_credential.as_ref())
            .map_err(CallError::from)
            .and_then(|credential| Ok((credential, ExecutionId::parse(raw_id)?)));
        match inputs {
            Ok((credential, execution_id)) => {
                Span::current().record("execution_id", field::display(&execution_id));
                Ok((credential, execution_id))
            }
            Err(err) => Err(err.report(None)),
        }
    }
}

/// Each RPC runs in a span named after it, created before anything else so that it can
/// continue the caller's trace (a span's parent is fixed once it has been entered).
#[tonic::async_trait]
impl ExecutionStatusService for ExecutionStatusApi {
    async fn get_execution_status(
        &self,
        request: Request<GetExecutionStatusRequest>,
    ) -> Result<Response<GetExecutionStatusResponse>, Status> {
        let span = info_span!("GetExecutionStatus", execution_id = field::Empty);
        let caller = TraceContext::from_metadata(request.metadata());
        let trace = trace_context::continue_in(&span, caller.as_ref());
        self.read_status(request, trace).instrument(span).await
    }

    type WatchExecutionStream = ReceiverStream<StreamItem>;

    async fn watch_execution(
        &self,
        request: Request<WatchExecutionRequest>,
    ) -> Result<Response<Self::WatchExecutionStream>, Status> {
        let span = info_span!("WatchExecution", execution_id = field::Empty);
        let caller = TraceContext::from_metadata(request.metadata());
        let trace = trace_context::continue_in(&span, caller.as_ref());
        self.start_watch(request, trace).instrument(span).await
    }
}

impl ExecutionStatusApi {
    async fn read_status(
        &self,
        request: Request<GetExecutionStatusRequest>,
        trace: Option<TraceContext>,
    ) -> Result<Response<GetExecutionStatusResponse>, Status> {
        let callers_budget = grpc_timeout(request.metadata())
            .map(|timeout| timeout.saturating_sub(DEADLINE_MARGIN))
            .unwrap_or(Duration::MAX);
        let budget = callers_budget.min(self.settings.unary_timeout);
        let (credential, execution_id) =
            self.inputs(request.metadata(), &request.get_ref().execution_id)?;

        let read = self
            .registry
            .get_traced(&credential, &execution_id, trace.as_ref());
        let outcome = match tokio::time::timeout(budget, read).await {
            Ok(result) => result.map_err(CallError::from),
            Err(_elapsed) => Err(CallError::DeadlineExceeded),
        };
        match outcome {
            Ok(execution) => Ok(Response::new(GetExecutionStatusResponse {
                execution: Some(execution.as_ref().clone()),
            })),
            Err(err) => Err(err.report(Some(&execution_id))),
        }
    }

    async fn start_watch(
        &self,
        request: Request<WatchExecutionRequest>,
        trace: Option<TraceContext>,
    ) -> Result<Response<ReceiverStream<StreamItem>>, Status> {
        let deadline = grpc_timeout(request.metadata()).map(|t| Instant::now() + t);
        let connection_ages = self.connection_ages(&request);
        let (credential, execution_id) =
            self.inputs(request.metadata(), &request.get_ref().execution_id)?;
        if *self.draining.borrow() {
            return Err(CallError::ShuttingDown.report(Some(&execution_id)));
        }
        let Ok(permit) = Arc::clone(&self.watch_permits).try_acquire_owned() else {
            let limit = self.settings.max_watch_streams;
            return Err(CallError::TooManyWatches { limit }.report(Some(&execution_id)));
        };

        let (responses, stream) = mpsc::channel(RESPONSE_SLOTS);
        let task = WatchStream {
            watcher: self
                .registry
                .watch_traced(&credential, &execution_id, trace.as_ref()),
            execution_id: execution_id.clone(),
            responses,
            last_sent: request.get_ref().last_revision,
            heartbeat_interval: self.settings.heartbeat_interval,
            deadline,
            connection_ages,
            draining: self.draining.clone(),
            _permit: permit,
            _open: self.registry.metrics().watch_stream_open(),
        };
        let span = info_span!("watch_stream", %execution_id);
        tokio::spawn(task.run().instrument(span));
        Ok(Response::new(ReceiverStream::new(stream)))
    }
}

/// How long after its connection's GOAWAY a watch ends. The GOAWAY must reach the client
/// first, so that its reconnection opens a new connection instead of landing on the old one.
const AFTER_GOAWAY: Duration = Duration::from_millis(250);

impl ExecutionStatusApi {
    /// When a watch on this call's connection should end because the connection aged:
    /// shortly after its GOAWAY, and well within the grace if there is one.
    fn connection_ages<T>(&self, request: &Request<T>) -> Option<Instant> {
        let age = self.settings.max_connection_age?;
        let established_at = Instant::from_std(ConnectionInfo::of(request)?.established_at);
        let after_goaway = self
            .settings
            .max_connection_age_grace
            .map_or(AFTER_GOAWAY, |grace| AFTER_GOAWAY.min(grace / 2));
        Some(established_at + age + after_goaway)
    }
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
    use std::{
        future::Future,
        pin::Pin,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use serde_json::json;
    use tokio::time::sleep;
    use tokio_stream::StreamExt;
    use tonic::Code;

    use super::*;
    use crate::{
        registry::PollSettings,
        upstream::{StatusBody, StatusSource, UpstreamError},
    };

    /// An execution that changes on every read.
    #[derive(Default)]
    struct Changing(AtomicUsize);

    impl StatusSource for Changing {
        fn fetch_status<'a>(
            &'a self,
            _: &'a Credential,
            execution_id: &'a ExecutionId,
            _: Option<&'a TraceContext>,
        ) -> Pin<Box<dyn Future<Output = Result<StatusBody, UpstreamError>> + Send + 'a>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            let jobs: Vec<_> = (0..4)
                .map(|i| {
                    let status = if i < n % 4 { "completed" } else { "pending" };
                    json!({"id": format!("job{i}"), "operation": "generate", "status": status})
                })
                .collect();
            let body =
                json!({"id": execution_id.to_string(), "status": "processing", "jobs": jobs});
            Box::pin(async move { Ok(serde_json::from_value(body).unwrap()) })
        }
    }

    fn api() -> (ExecutionStatusApi, Registry, watch::Sender<bool>) {
        let poll = PollSettings {
            interval: Duration::from_secs(1),
            linger: Duration::from_secs(1),
            ..PollSettings::default()
        };
        let registry = Registry::new(Arc::new(Changing::default()), poll);
        let (draining, draining_receiver) = watch::channel(false);
        let settings = ServiceSettings {
            fallback_credential: Credential::new("sy_test_alice"),
            heartbeat_interval: Duration::from_secs(5),
            max_watch_streams: 1,
            unary_timeout: Duration::from_secs(5),
            max_connection_age: None,
            max_connection_age_grace: None,
        };
        let api = ExecutionStatusApi::new(registry.clone(), settings, draining_receiver);
        (api, registry, draining)
    }

    fn watch_request(timeout: Option<&str>) -> Request<WatchExecutionRequest> {
        let mut request = Request::new(WatchExecutionRequest {
            execution_id: "exec_1".into(),
            last_revision: 0,
        });
        if let Some(timeout) = timeout {
            request
                .metadata_mut()
                .insert("grpc-timeout", timeout.parse().unwrap());
        }
        request
    }

    /// Reads what the client finally gets: some snapshots, then the status.
    async fn final_status(stream: &mut ReceiverStream<StreamItem>) -> Status {
        let mut last = None;
        while let Some(item) = stream.next().await {
            last = Some(item);
        }
        last.expect("a status").expect_err("an error status")
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_nobody_reads_still_ends_at_its_deadline_and_frees_everything() {
        let (api, registry, _draining) = api();
        let mut stream = api
            .watch_execution(watch_request(Some("10S")))
            .await
            .unwrap()
            .into_inner();

        // The client stops reading while the execution keeps changing.
        sleep(Duration::from_secs(30)).await;
        assert_eq!(
            registry.active_pollers(),
            0,
            "the stream let go of its poller"
        );
        let again = api.watch_execution(watch_request(None)).await;
        assert!(again.is_ok(), "the stream gave its place back");
        drop(again);

        let status = final_status(&mut stream).await;
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_gets_the_newest_snapshot_when_it_reads() {
        let (api, registry, _draining) = api();
        let mut stream = api
            .watch_execution(watch_request(None))
            .await
            .unwrap()
            .into_inner();
        let first = stream.next().await.unwrap().unwrap();

        // The execution changes several times while the client does not read.
        sleep(Duration::from_secs(10)).await;
        let newest = registry.watch(
            &Credential::new("sy_test_alice").unwrap(),
            &ExecutionId::parse("exec_1").unwrap(),
        );
        let newest = newest.updates.borrow().snapshot.as_ref().unwrap().revision;
        let revision =
            |item: Option<StreamItem>| item.unwrap().unwrap().execution.unwrap().revision;
        let mut seen = vec![first.execution.unwrap().revision];
        while seen.last() != Some(&newest) {
            seen.push(revision(stream.next().await));
            assert!(
                seen.len() <= 3,
                "stale snapshots before the newest: {seen:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_ends_a_watch_nobody_reads() {
        let (api, registry, draining) = api();
        let mut stream = api
            .watch_execution(watch_request(None))
            .await
            .unwrap()
            .into_inner();
        sleep(Duration::from_secs(10)).await;

        draining.send_replace(true);
        sleep(Duration::from_secs(5)).await;
        assert_eq!(
            registry.active_pollers(),
            0,
            "the stream let go of its poller"
        );
        let status = final_status(&mut stream).await;
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }

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
