//! Traces exported over OTLP (cargo feature `otlp`): a fake collector on 127.0.0.1 receives
//! the spans of one call, and the trace runs from the caller through the gateway to the
//! upstream request. Run with `cargo test --features otlp --test otlp`.
#![cfg(feature = "otlp")]

mod common;

use std::sync::{Arc, Mutex};

use common::{ALICE, ScriptedUpstream, gateway, upstream_config};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::Span,
};
use synthome_gateway::{
    proto::GetExecutionStatusRequest,
    telemetry::{LogFormat, Telemetry, TraceExport},
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";

/// Keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|resource| resource.scope_spans)
            .flat_map(|scope| scope.spans);
        self.spans.lock().unwrap().extend(spans);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?;
    match value.value.as_ref()? {
        Value::StringValue(text) => Some(text.clone()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_trace_runs_through_the_rpc_span_to_the_upstream_request() {
    let collector = Collector::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let export = TraceExport {
        otlp_endpoint: Some(format!("http://{collector_addr}")),
    };
    let telemetry = Telemetry::install(LogFormat::Text, "info", &export).unwrap();

    let body = r#"{"id":"exec_abc123","status":"processing","jobs":[]}"#;
    let upstream = ScriptedUpstream::start(200, &[], body).await;
    let gateway = gateway(upstream_config(&upstream.base_url()), None).await;
    let mut client = common::client(&gateway).await;
    let mut request = Request::new(GetExecutionStatusRequest {
        execution_id: "exec_abc123".into(),
    });
    let metadata = request.metadata_mut();
    metadata.insert("authorization", format!("Bearer {ALICE}").parse().unwrap());
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01");
    metadata.insert("traceparent", traceparent.parse().unwrap());
    client.get_execution_status(request).await.unwrap();
    drop(gateway);

    telemetry.shutdown().await;
    let spans = collector.spans.lock().unwrap().clone();
    let named = |name: &str| {
        spans
            .iter()
            .find(|span| span.name == name)
            .unwrap_or_else(|| panic!("no {name} span among {spans:#?}"))
    };
    let rpc = named("GetExecutionStatus");
    let upstream_request = named("upstream_request");

    assert_eq!(hex::encode(&rpc.trace_id), TRACE_ID);
    assert_eq!(hex::encode(&rpc.parent_span_id), CALLER_SPAN_ID);
    assert_eq!(
        attribute(rpc, "execution_id").as_deref(),
        Some("exec_abc123")
    );
    assert_eq!(hex::encode(&upstream_request.trace_id), TRACE_ID);
    assert_eq!(upstream_request.parent_span_id, rpc.span_id);

    let sent = upstream.seen()[0]
        .traceparent
        .clone()
        .expect("traceparent sent");
    assert_eq!(
        sent,
        format!(
            "00-{TRACE_ID}-{}-01",
            hex::encode(&upstream_request.span_id)
        ),
        "Synthome's parent is the gateway's upstream request span"
    );
    for span in &spans {
        let text = format!("{span:?}");
        assert!(!text.contains(ALICE), "a key reached a span: {text}");
    }
}
