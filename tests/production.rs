//! What a platform team relies on: health, reflection, gRPC-Web, CORS, TLS and mutual TLS,
//! limits, and drain. Real servers on 127.0.0.1, waiting on answers, never on sleeps.

mod common;

use std::{sync::Arc, time::Duration};

use common::{ALICE, fast_polling, job, pki, serve_operations, upstream_config, with_key};
use prost::Message;
use serde_json::json;
use synthome_gateway::{
    proto::{
        ExecutionState, GetExecutionStatusRequest, WatchExecutionRequest, WatchExecutionResponse,
        execution_status_service_client::ExecutionStatusServiceClient,
    },
    server::{Gateway, GatewaySettings, Limits, RunningGateway, ServerTls},
    simulator::{Faults, RunningSimulator, Simulator, SimulatorConfig},
    upstream::UpstreamClient,
};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::{
    Code, Request, Streaming,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt;

const SERVICE: &str = "synthome.status.v1.ExecutionStatusService";

async fn simulator() -> RunningSimulator {
    Simulator::spawn(SimulatorConfig {
        time_scale: 0.0,
        ..SimulatorConfig::default()
    })
    .await
    .unwrap()
}

async fn start(simulator: &RunningSimulator, settings: GatewaySettings) -> RunningGateway {
    let upstream = UpstreamClient::new(&upstream_config(&simulator.base_url())).unwrap();
    let settings = GatewaySettings {
        poll: fast_polling(),
        ..settings
    };
    Gateway::new(Arc::new(upstream), settings)
        .spawn()
        .await
        .unwrap()
}

async fn channel(gateway: &RunningGateway) -> Channel {
    Endpoint::from_shared(gateway.uri())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn watch_request(id: &str) -> Request<WatchExecutionRequest> {
    with_key(WatchExecutionRequest {
        execution_id: id.to_owned(),
        last_revision: 0,
    })
}

fn slow_execution(simulator: &RunningSimulator) -> String {
    let jobs = json!([job("job1", "generate", json!({"durationMs": 600_000}), &[])]);
    simulator
        .simulator
        .create_execution(ALICE, json!({"executionPlan": {"jobs": jobs}}))
        .unwrap()
}

/// Opens `count` watches of `id` on `client`, each past its first message.
async fn open_watches(
    client: &mut ExecutionStatusServiceClient<Channel>,
    id: &str,
    count: usize,
) -> Vec<Streaming<WatchExecutionResponse>> {
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        let mut stream = client
            .watch_execution(watch_request(id))
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().unwrap();
        streams.push(stream);
    }
    streams
}

/// Reads a stream to its end: the status it ended with, or `None` for OK.
async fn end_of(stream: &mut Streaming<WatchExecutionResponse>) -> Option<tonic::Status> {
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => return None,
            Err(status) => return Some(status),
        }
    }
}

/// A watch from a client that grants no flow-control window: nothing can be sent to it,
/// not even the status that would end its stream.
async fn stuck_watch(gateway: &RunningGateway, id: &str) -> Streaming<WatchExecutionResponse> {
    let stuck_channel = Endpoint::from_shared(gateway.uri())
        .unwrap()
        .initial_stream_window_size(Some(0))
        .connect()
        .await
        .unwrap();
    ExecutionStatusServiceClient::new(stuck_channel)
        .watch_execution(watch_request(id))
        .await
        .unwrap()
        .into_inner()
}

/// Settings under which connections age after 300 ms, then have `grace`.
fn aging_connections(grace: Duration) -> GatewaySettings {
    GatewaySettings {
        limits: Limits {
            max_connection_age: Some(Duration::from_millis(300)),
            max_connection_age_grace: Some(grace),
            ..Limits::default()
        },
        ..GatewaySettings::default()
    }
}

async fn check(channel: &Channel, service: &str) -> Result<ServingStatus, tonic::Status> {
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    let response = HealthClient::new(channel.clone()).check(request).await?;
    Ok(response.into_inner().status())
}

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_service() {
    let simulator = simulator().await;
    let gateway = start(&simulator, GatewaySettings::default()).await;
    let channel = channel(&gateway).await;

    assert_eq!(check(&channel, "").await.unwrap(), ServingStatus::Serving);
    assert_eq!(
        check(&channel, SERVICE).await.unwrap(),
        ServingStatus::Serving
    );
    let unknown = check(&channel, "no.such.Service").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn health_turns_not_serving_while_the_upstream_is_down_and_back_after() {
    let simulator = simulator().await;
    let settings = GatewaySettings {
        unhealthy_after: Duration::from_millis(200),
        ..GatewaySettings::default()
    };
    let gateway = start(&simulator, settings).await;
    let channel = channel(&gateway).await;
    let id = slow_execution(&simulator);
    let mut client = ExecutionStatusServiceClient::new(channel.clone());
    let mut watch = client
        .watch_execution(watch_request(&id))
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().unwrap();

    let mut statuses = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: SERVICE.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next_status = async || statuses.next().await.unwrap().unwrap().status();
    assert_eq!(next_status().await, ServingStatus::Serving);

    simulator.simulator.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    assert_eq!(next_status().await, ServingStatus::NotServing);
    assert!(!gateway.health.is_serving(), "/readyz follows gRPC health");

    simulator.simulator.set_faults(Faults::default());
    assert_eq!(next_status().await, ServingStatus::Serving);
}

#[tokio::test]
async fn reflection_lists_the_services_in_both_protocol_versions() {
    use tonic_reflection::pb::{v1, v1alpha};
    let simulator = simulator().await;
    let gateway = start(&simulator, GatewaySettings::default()).await;
    let channel = channel(&gateway).await;

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = v1::server_reflection_client::ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&SERVICE), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    // Older tools ask v1alpha; they also need the files the contract imports.
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                SERVICE.to_owned(),
            ),
        ),
    };
    let mut responses =
        v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone())
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("not a file descriptor answer");
    };
    let names: Vec<String> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap())
        .map(|file| file.name().to_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.ends_with("execution_status.proto")),
        "{names:?}"
    );
}

/// One gRPC-Web frame: flags byte, big-endian length, payload.
fn grpc_web_frame(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![flags];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test]
async fn a_browser_can_stream_a_watch_over_grpc_web_on_http1() {
    let simulator = simulator().await;
    let gateway = start(&simulator, GatewaySettings::default()).await;
    let jobs = json!([job("job1", "generate", json!({"durationMs": 100}), &[])]);
    let id = simulator
        .simulator
        .create_execution(ALICE, json!({"executionPlan": {"jobs": jobs}}))
        .unwrap();

    let request = WatchExecutionRequest {
        execution_id: id.clone(),
        last_revision: 0,
    };
    let http = reqwest::Client::builder().http1_only().build().unwrap();
    let response = http
        .post(format!("{}/{SERVICE}/WatchExecution", gateway.uri()))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("authorization", format!("Bearer {ALICE}"))
        .body(grpc_web_frame(0, &request.encode_to_vec()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    let body = response.bytes().await.unwrap();

    let (mut messages, mut trailers, mut rest) = (Vec::new(), String::new(), &body[..]);
    while rest.len() >= 5 {
        let length = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let payload = &rest[5..5 + length];
        if rest[0] & 0x80 == 0 {
            messages.push(WatchExecutionResponse::decode(payload).unwrap());
        } else {
            trailers = String::from_utf8(payload.to_vec()).unwrap();
        }
        rest = &rest[5 + length..];
    }
    let last = messages.last().expect("at least one message");
    assert_eq!(
        last.execution.as_ref().unwrap().state(),
        ExecutionState::Completed
    );
    assert!(trailers.contains("grpc-status:0"), "{trailers:?}");
}

async fn preflight(gateway: &RunningGateway) -> reqwest::Response {
    reqwest::Client::new()
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/{SERVICE}/WatchExecution", gateway.uri()),
        )
        .header("origin", "https://dashboard.internal")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type,x-grpc-web")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn cors_is_closed_by_default_and_opens_to_configured_origins() {
    let simulator = simulator().await;
    let closed = start(&simulator, GatewaySettings::default()).await;
    let answer = preflight(&closed).await;
    assert!(
        answer
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    let settings = GatewaySettings {
        cors_allowed_origins: vec!["https://dashboard.internal".into()],
        ..GatewaySettings::default()
    };
    let open = start(&simulator, settings).await;
    let answer = preflight(&open).await;
    assert_eq!(
        answer.headers()["access-control-allow-origin"],
        "https://dashboard.internal"
    );
}

async fn tls_get(
    gateway: &RunningGateway,
    tls: ClientTlsConfig,
    id: &str,
) -> Result<(), tonic::Status> {
    let endpoint = Endpoint::from_shared(format!("https://localhost:{}", gateway.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let channel = endpoint
        .connect()
        .await
        .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
    let mut client = ExecutionStatusServiceClient::new(channel);
    let request = with_key(GetExecutionStatusRequest {
        execution_id: id.to_owned(),
    });
    client.get_execution_status(request).await.map(|_| ())
}

#[tokio::test]
async fn tls_and_mutual_tls() {
    let pki = pki();
    let simulator = simulator().await;
    let id = slow_execution(&simulator);
    let trust = || ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca));

    let tls = start(
        &simulator,
        GatewaySettings {
            tls: Some(ServerTls {
                certificate_chain: pki.server.0.clone().into_bytes(),
                private_key: pki.server.1.clone().into_bytes(),
                client_ca: None,
            }),
            ..GatewaySettings::default()
        },
    )
    .await;
    tls_get(&tls, trust(), &id).await.unwrap();
    let plaintext = ExecutionStatusServiceClient::new(channel(&tls).await)
        .get_execution_status(with_key(GetExecutionStatusRequest {
            execution_id: id.clone(),
        }))
        .await;
    assert!(plaintext.is_err(), "plaintext is refused on a TLS port");

    let mutual = start(
        &simulator,
        GatewaySettings {
            tls: Some(ServerTls {
                certificate_chain: pki.server.0.clone().into_bytes(),
                private_key: pki.server.1.clone().into_bytes(),
                client_ca: Some(pki.ca.clone().into_bytes()),
            }),
            ..GatewaySettings::default()
        },
    )
    .await;
    assert!(
        tls_get(&mutual, trust(), &id).await.is_err(),
        "no client certificate"
    );
    let identity = Identity::from_pem(&pki.client.0, &pki.client.1);
    tls_get(&mutual, trust().identity(identity), &id)
        .await
        .unwrap();
}

#[tokio::test]
async fn watches_beyond_the_limit_get_resource_exhausted_until_one_ends() {
    let simulator = simulator().await;
    let settings = GatewaySettings {
        limits: Limits {
            max_watch_streams: 2,
            ..Limits::default()
        },
        ..GatewaySettings::default()
    };
    let gateway = start(&simulator, settings).await;
    let id = slow_execution(&simulator);
    let mut client = ExecutionStatusServiceClient::new(channel(&gateway).await);

    let first = client.watch_execution(watch_request(&id)).await.unwrap();
    let _second = client.watch_execution(watch_request(&id)).await.unwrap();
    let refused = client
        .watch_execution(watch_request(&id))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);

    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.watch_execution(watch_request(&id)).await {
            Ok(_third) => break,
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted),
        }
        assert!(
            Instant::now() < deadline,
            "the ended watch's place was never given back"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn unary_calls_are_bounded_by_the_request_timeout_and_message_size() {
    let simulator = simulator().await;
    simulator.simulator.set_faults(Faults {
        latency_ms: 5_000,
        ..Faults::default()
    });
    let settings = GatewaySettings {
        limits: Limits {
            unary_timeout: Duration::from_millis(200),
            ..Limits::default()
        },
        ..GatewaySettings::default()
    };
    let gateway = start(&simulator, settings).await;
    let mut client = ExecutionStatusServiceClient::new(channel(&gateway).await);

    let slow = client
        .get_execution_status(with_key(GetExecutionStatusRequest {
            execution_id: "exec_abc123".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(slow.code(), Code::DeadlineExceeded);

    let huge = client
        .get_execution_status(with_key(GetExecutionStatusRequest {
            execution_id: "a".repeat(100_000),
        }))
        .await
        .unwrap_err();
    assert_eq!(huge.code(), Code::OutOfRange, "{huge:?}");
}

#[tokio::test]
async fn drain_ends_watches_turns_not_serving_and_stops_despite_a_stuck_client() {
    let simulator = simulator().await;
    let settings = GatewaySettings {
        shutdown_grace: Duration::from_millis(500),
        ..GatewaySettings::default()
    };
    let gateway = start(&simulator, settings).await;
    let id = slow_execution(&simulator);

    // A stuck client grants no flow-control window: nothing can be sent to it, not even
    // the status that ends its stream, so only the grace can end the drain.
    let _stuck = stuck_watch(&gateway, &id).await;

    let mut client = ExecutionStatusServiceClient::new(channel(&gateway).await);
    let mut streams = open_watches(&mut client, &id, 100).await;
    let health = gateway.health.clone();
    let readyz = format!("http://{}/readyz", serve_operations(&gateway, None).await);
    assert_eq!(reqwest::get(&readyz).await.unwrap().status(), 200);

    let shutdown = tokio::spawn(gateway.shutdown());
    for stream in &mut streams {
        let end = end_of(stream)
            .await
            .expect("a drained watch must not end OK");
        assert_eq!(end.code(), Code::Unavailable);
    }
    assert!(!health.is_serving());
    assert_eq!(reqwest::get(&readyz).await.unwrap().status(), 503);
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("the grace bounds the drain")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn watches_end_cleanly_when_their_connection_ages_and_the_client_reconnects() {
    let simulator = simulator().await;
    let gateway = start(&simulator, aging_connections(Duration::from_secs(5))).await;
    let id = slow_execution(&simulator);
    let mut client = ExecutionStatusServiceClient::new(channel(&gateway).await);

    // The watch ends when its connection is asked to go away, with a status that says to
    // reconnect, long before the grace would cut it.
    let mut stream = client
        .watch_execution(watch_request(&id))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let end = tokio::time::timeout(Duration::from_secs(4), end_of(&mut stream))
        .await
        .expect("the stream ends at the connection's age, not at the end of its grace")
        .expect("an aged watch does not end OK");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert_eq!(
        end.get_details_error_info().unwrap().reason,
        "CONNECTION_MAX_AGE"
    );
    assert_eq!(
        end.get_details_retry_info().unwrap().retry_delay,
        Some(Duration::ZERO)
    );

    // The same channel connects again, and the watch resumes from its revision.
    let revision = first.execution.unwrap().revision;
    let mut resumed = with_key(WatchExecutionRequest {
        execution_id: id.clone(),
        last_revision: revision,
    });
    resumed.set_timeout(Duration::from_millis(200));
    let mut stream = client.watch_execution(resumed).await.unwrap().into_inner();
    let status = stream.message().await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::DeadlineExceeded,
        "nothing changed, so nothing was repeated before the deadline: {status:?}"
    );
}

#[tokio::test]
async fn a_connection_is_closed_at_its_age_and_grace_even_with_a_stuck_stream() {
    let simulator = simulator().await;
    let gateway = start(&simulator, aging_connections(Duration::from_millis(300))).await;
    let id = slow_execution(&simulator);

    // A client that grants no flow-control window can be sent neither the first message
    // nor the status that would end its stream: only closing the connection ends it.
    let mut stuck = stuck_watch(&gateway, &id).await;
    let end = tokio::time::timeout(Duration::from_secs(10), stuck.message())
        .await
        .expect("the connection is closed once its age and grace have passed");
    assert!(end.is_err(), "{end:?}");
}

#[tokio::test]
async fn watches_over_tls_end_when_their_connection_ages() {
    let pki = pki();
    let simulator = simulator().await;
    let settings = GatewaySettings {
        tls: Some(ServerTls {
            certificate_chain: pki.server.0.clone().into_bytes(),
            private_key: pki.server.1.clone().into_bytes(),
            client_ca: None,
        }),
        limits: Limits {
            max_connection_age: Some(Duration::from_millis(300)),
            max_connection_age_grace: Some(Duration::from_secs(30)),
            ..Limits::default()
        },
        ..GatewaySettings::default()
    };
    let gateway = start(&simulator, settings).await;
    let id = slow_execution(&simulator);
    let channel = Endpoint::from_shared(format!("https://localhost:{}", gateway.addr.port()))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut stream = ExecutionStatusServiceClient::new(channel)
        .watch_execution(watch_request(&id))
        .await
        .unwrap()
        .into_inner();
    let end = tokio::time::timeout(Duration::from_secs(20), end_of(&mut stream))
        .await
        .expect("the watch ends at its connection's age, long before the grace")
        .expect("an aged watch does not end OK");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert_eq!(
        end.get_details_error_info().unwrap().reason,
        "CONNECTION_MAX_AGE"
    );
}

#[tokio::test]
async fn a_unary_call_in_flight_finishes_during_the_drain() {
    let simulator = simulator().await;
    let id = slow_execution(&simulator);
    let gateway = start(&simulator, GatewaySettings::default()).await;
    let mut client = ExecutionStatusServiceClient::new(channel(&gateway).await);
    simulator.simulator.set_faults(Faults {
        latency_ms: 300,
        ..Faults::default()
    });
    let call = tokio::spawn(async move {
        client
            .get_execution_status(with_key(GetExecutionStatusRequest { execution_id: id }))
            .await
    });
    // The call is in flight once the simulator has been asked.
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateway.registry.active_pollers() == 0 {
        assert!(
            Instant::now() < deadline,
            "the call never reached the upstream"
        );
        tokio::task::yield_now().await;
    }
    gateway.shutdown().await.unwrap();
    let answer = call.await.unwrap();
    assert!(answer.is_ok(), "{answer:?}");
}

#[tokio::test]
async fn concurrency_per_connection_counts_a_watch_only_until_its_stream_opens() {
    let simulator = simulator().await;
    let settings = GatewaySettings {
        limits: Limits {
            concurrency_per_connection: Some(1),
            ..Limits::default()
        },
        ..GatewaySettings::default()
    };
    let gateway = start(&simulator, settings).await;
    let id = slow_execution(&simulator);
    let mut client = ExecutionStatusServiceClient::new(channel(&gateway).await);
    let _streams = open_watches(&mut client, &id, 2).await;
    // As documented: open watches hold no slot, so a read on the same connection is
    // answered (were they counted, it would wait for one to end and miss its deadline).
    let mut read = with_key(GetExecutionStatusRequest {
        execution_id: id.clone(),
    });
    read.set_timeout(Duration::from_secs(10));
    client.get_execution_status(read).await.unwrap();
}
