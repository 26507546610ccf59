//! GetExecutionStatus end to end: a client, the gateway and the simulator (or a scripted
//! upstream), each on its own socket on 127.0.0.1.

mod common;

use std::time::Duration;

use common::{ALICE, BOB, Harness, ScriptedUpstream, gateway, get, job, upstream_config};
use serde_json::json;
use synthome_gateway::{
    json::from_struct,
    proto::{ExecutionState, GetExecutionStatusRequest},
    simulator::{Faults, SimulatorConfig},
    upstream::MAX_RETRY_AFTER,
};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"))
}

#[tokio::test]
async fn a_new_execution_is_pending() {
    // A large time scale stretches the simulator's pending phase to minutes.
    let harness = Harness::start(1000.0).await;
    let id = harness.create(ALICE, json!([job("job1", "generate", json!({}), &[])]));

    let execution = harness.get(Some(ALICE), &id).await.unwrap();
    assert_eq!(execution.id, id);
    assert_eq!(execution.state(), ExecutionState::Pending);
    assert_eq!(execution.upstream_status, "pending");
    assert!(execution.create_time.is_some() && execution.complete_time.is_none());
    let progress = execution.progress.unwrap();
    assert_eq!((progress.total_jobs, progress.completed_jobs), (1, 0));
    assert_eq!(
        (progress.progress, progress.current_job.as_str()),
        (0.0, "job1")
    );
}

#[tokio::test]
async fn progress_is_derived_from_the_jobs_while_processing() {
    let harness = Harness::start(0.0).await;
    let id = harness.create(
        ALICE,
        json!([
            job("job1", "generate", json!({"durationMs": 1}), &[]),
            job(
                "job2",
                "generateAudio",
                json!({"durationMs": 600_000}),
                &["job1"]
            ),
            job("job3", "merge", json!({"durationMs": 1}), &["job2"]),
        ]),
    );

    let execution = harness
        .wait_until(ALICE, &id, |e| {
            e.progress.as_ref().unwrap().completed_jobs == 1
        })
        .await;
    assert_eq!(execution.state(), ExecutionState::Processing);
    let progress = execution.progress.unwrap();
    assert_eq!(progress.total_jobs, 3);
    assert_eq!(progress.current_job, "job2");
    assert!(
        (progress.progress - 100.0 / 3.0).abs() < 1e-9,
        "{progress:?}"
    );
    let statuses: Vec<_> = execution.jobs.iter().map(|j| j.status.as_str()).collect();
    assert_eq!(statuses, ["completed", "processing", "pending"]);
    assert!(execution.jobs[0].result.is_some());
}

#[tokio::test]
async fn a_completed_execution_carries_its_result_with_every_extra_key() {
    let harness = Harness::start(0.0).await;
    let result = json!({
        "url": "https://cdn.example/final.mp4", "type": "video", "duration": 12.5,
        "format": "mp4", "size": 2_000_000, "width": 1920, "codec": {"video": "h264"}
    });
    let id = harness.create(
        ALICE,
        json!([
            job("job1", "generate", json!({"durationMs": 1}), &[]),
            job(
                "job2",
                "merge",
                json!({"durationMs": 1, "result": result}),
                &["job1"]
            ),
        ]),
    );

    let execution = harness
        .wait_for_state(ALICE, &id, ExecutionState::Completed)
        .await;
    let media = execution
        .result
        .clone()
        .expect("a completed execution has a result");
    assert_eq!(media.url, "https://cdn.example/final.mp4");
    assert_eq!(
        (media.r#type.as_str(), media.format.as_str()),
        ("video", "mp4")
    );
    assert_eq!((media.duration, media.size), (Some(12.5), Some(2_000_000)));
    assert_eq!(
        from_struct(media.metadata.as_ref().unwrap()),
        json!({"width": 1920, "codec": {"video": "h264"}})
    );
    assert!(execution.complete_time.is_some());
    let progress = execution.progress.unwrap();
    assert_eq!((progress.progress, progress.completed_jobs), (100.0, 2));
    assert_eq!(progress.current_job, "");
}

#[tokio::test]
async fn a_failed_execution_carries_the_joined_job_errors() {
    let harness = Harness::start(0.0).await;
    let id = harness.create(
        ALICE,
        json!([
            job("job1", "generate", json!({"durationMs": 1}), &[]),
            job(
                "job2",
                "lipSync",
                json!({"durationMs": 1, "fail": "face not found"}),
                &["job1"]
            ),
            job("job3", "merge", json!({"durationMs": 1}), &["job2"]),
        ]),
    );

    let execution = harness
        .wait_for_state(ALICE, &id, ExecutionState::Failed)
        .await;
    assert_eq!(execution.error, "lipSync: face not found");
    assert!(execution.result.is_none());
    let progress = execution.progress.unwrap();
    assert_eq!((progress.completed_jobs, progress.total_jobs), (1, 3));
    assert!(progress.progress < 100.0);
    assert_eq!(execution.jobs[1].error, "face not found");
}

#[tokio::test]
async fn ended_executions_are_answered_without_asking_upstream_again() {
    let harness = Harness::start(0.0).await;
    let id = harness.create(
        ALICE,
        json!([job("job1", "generateImage", json!({"durationMs": 1}), &[])]),
    );
    harness
        .wait_for_state(ALICE, &id, ExecutionState::Completed)
        .await;
    let reads = harness.simulator.simulator.status_requests_for(&id);

    for _ in 0..3 {
        let again = harness.get(Some(ALICE), &id).await.unwrap();
        assert_eq!(again.state(), ExecutionState::Completed);
    }
    assert_eq!(harness.simulator.simulator.status_requests_for(&id), reads);

    // Another key gets its own answer from upstream: here, that the execution is not theirs.
    let status = harness.get(Some(BOB), &id).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        harness.simulator.simulator.status_requests_for(&id),
        reads + 1
    );
}

#[tokio::test]
async fn the_callers_key_is_forwarded_and_the_gateway_key_is_the_fallback() {
    let config = SimulatorConfig {
        api_keys: vec![ALICE.into(), BOB.into(), "sy_test_gateway".into()],
        time_scale: 1000.0,
        ..SimulatorConfig::default()
    };
    let harness = Harness::start_with(config, Some("sy_test_gateway")).await;
    let alices = harness.create(ALICE, json!([job("job1", "generate", json!({}), &[])]));
    let gateways = harness.create(
        "sy_test_gateway",
        json!([job("job1", "generate", json!({}), &[])]),
    );

    assert!(harness.get(Some(ALICE), &alices).await.is_ok());
    assert_eq!(
        harness.get(Some(BOB), &alices).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        harness.get(None, &alices).await.unwrap_err().code(),
        Code::NotFound
    );
    assert!(harness.get(None, &gateways).await.is_ok());

    let rejected = harness
        .get(Some("sy_test_revoked"), &alices)
        .await
        .unwrap_err();
    assert_eq!(rejected.code(), Code::Unauthenticated);
    assert_eq!(reason(&rejected), "UPSTREAM_UNAUTHENTICATED");
    assert!(
        !rejected.message().contains("sy_test_revoked"),
        "{rejected:?}"
    );
}

#[tokio::test]
async fn without_any_key_the_call_is_refused_before_reaching_upstream() {
    let harness = Harness::start(0.0).await;
    let id = harness.create(ALICE, json!([job("job1", "generate", json!({}), &[])]));

    let status = harness.get(None, &id).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "CREDENTIALS_MISSING");

    let mut request = Request::new(synthome_gateway::proto::GetExecutionStatusRequest {
        execution_id: id.clone(),
    });
    request
        .metadata_mut()
        .insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
    let status = harness
        .client
        .clone()
        .get_execution_status(request)
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "CREDENTIALS_MALFORMED");
    assert!(!status.message().contains("dXNlcjpwYXNz"));

    assert_eq!(harness.simulator.simulator.status_requests(), 0);
}

#[tokio::test]
async fn malformed_ids_are_refused_before_reaching_upstream() {
    let harness = Harness::start(0.0).await;
    let too_long = "a".repeat(129);
    for id in [
        "",
        "../etc/passwd",
        "a/b",
        "abc?x=1",
        "%2e%2e",
        "a b",
        "exec#1",
        &too_long,
    ] {
        let status = harness.get(Some(ALICE), id).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{id:?}");
        assert_eq!(reason(&status), "INVALID_EXECUTION_ID");
        let violations = status.get_details_bad_request().unwrap().field_violations;
        assert_eq!(violations[0].field, "execution_id");
    }
    assert_eq!(harness.simulator.simulator.status_requests(), 0);
}

#[tokio::test]
async fn unknown_executions_are_not_found() {
    let harness = Harness::start(0.0).await;
    let status = harness
        .get(Some(ALICE), "V1StGXR8Z5jdHi6BmyT12")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(reason(&status), "EXECUTION_NOT_FOUND");
    let info = status.get_details_error_info().unwrap();
    assert_eq!(info.metadata["execution_id"], "V1StGXR8Z5jdHi6BmyT12");
}

#[tokio::test]
async fn upstream_faults_map_to_retryable_codes() {
    // Each case reads its own execution, so each meets a poller of its own.
    let harness = Harness::start(1000.0).await;
    let cases = [
        (
            Faults {
                rate_limit_rate: 1.0,
                retry_after_secs: 7,
                ..Faults::default()
            },
            Code::ResourceExhausted,
            "UPSTREAM_RATE_LIMITED",
            Duration::from_secs(7),
        ),
        (
            Faults {
                error_rate: 1.0,
                ..Faults::default()
            },
            Code::Unavailable,
            "UPSTREAM_SERVER_ERROR",
            Duration::from_secs(1),
        ),
        (
            Faults {
                malformed_rate: 1.0,
                ..Faults::default()
            },
            Code::Unavailable,
            "UPSTREAM_MALFORMED_RESPONSE",
            Duration::from_secs(1),
        ),
    ];
    for (faults, code, expected_reason, retry_delay) in cases {
        let id = harness.create(ALICE, json!([job("job1", "generate", json!({}), &[])]));
        harness.simulator.simulator.set_faults(faults);
        let status = harness.get(Some(ALICE), &id).await.unwrap_err();
        assert_eq!(status.code(), code, "{expected_reason}");
        assert_eq!(reason(&status), expected_reason);
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(retry_delay));
    }

    harness.simulator.simulator.set_faults(Faults::default());
    let id = harness.create(ALICE, json!([job("job1", "generate", json!({}), &[])]));
    assert!(
        harness.get(Some(ALICE), &id).await.is_ok(),
        "recovers once faults stop"
    );
}

#[tokio::test]
async fn a_slow_upstream_times_out_as_unavailable() {
    let simulator = synthome_gateway::simulator::Simulator::spawn(SimulatorConfig::default())
        .await
        .unwrap();
    simulator.simulator.set_faults(Faults {
        latency_ms: 5_000,
        ..Faults::default()
    });
    let mut config = upstream_config(&simulator.base_url());
    config.request_timeout = Duration::from_millis(200);
    let gateway = gateway(config, None).await;
    let client = common::client(&gateway).await;

    let status = get(&client, Some(ALICE), "exec_abc123").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason(&status), "UPSTREAM_TIMEOUT");
}

#[tokio::test]
async fn the_callers_deadline_gives_deadline_exceeded() {
    let harness = Harness::start(0.0).await;
    harness.simulator.simulator.set_faults(Faults {
        latency_ms: 5_000,
        ..Faults::default()
    });

    let mut request = Request::new(synthome_gateway::proto::GetExecutionStatusRequest {
        execution_id: "exec_abc123".into(),
    });
    request.set_timeout(Duration::from_millis(300));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {ALICE}").parse().unwrap());
    let status = harness
        .client
        .clone()
        .get_execution_status(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(reason(&status), "DEADLINE_EXCEEDED");
}

#[tokio::test]
async fn an_unreachable_upstream_is_unavailable() {
    // Bind and release a port so that nothing listens on it.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let gateway = gateway(upstream_config(&format!("http://{addr}/api/execute")), None).await;
    let client = common::client(&gateway).await;

    let status = get(&client, Some(ALICE), "exec_abc123").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason(&status), "UPSTREAM_UNREACHABLE");
    assert!(status.get_details_retry_info().is_some());
}

#[tokio::test]
async fn answers_the_simulator_never_gives_are_mapped_too() {
    let forbidden = r#"{"error":"Forbidden","message":"Organisation suspended"}"#;
    let about_another = r#"{"id":"exec_other","status":"completed","jobs":[]}"#;
    let oversized = format!(
        r#"{{"id":"exec_abc123","status":"pending","pad":"{}"}}"#,
        "x".repeat(100_000)
    );
    type Case<'a> = (
        u16,
        Vec<(&'static str, &'static str)>,
        &'a str,
        Code,
        &'static str,
    );
    let cases: [Case; 4] = [
        (
            403,
            vec![],
            forbidden,
            Code::PermissionDenied,
            "UPSTREAM_PERMISSION_DENIED",
        ),
        (
            302,
            vec![("location", "http://127.0.0.1:9/steal")],
            "",
            Code::Unavailable,
            "UPSTREAM_REDIRECTED",
        ),
        (
            200,
            vec![],
            about_another,
            Code::Unavailable,
            "UPSTREAM_MALFORMED_RESPONSE",
        ),
        (
            200,
            vec![],
            &oversized,
            Code::Unavailable,
            "UPSTREAM_MALFORMED_RESPONSE",
        ),
    ];

    for (http_status, headers, body, code, expected_reason) in cases {
        let upstream = ScriptedUpstream::start(http_status, &headers, body).await;
        let gateway = gateway(upstream_config(&upstream.base_url()), None).await;
        let client = common::client(&gateway).await;

        let status = get(&client, Some(ALICE), "exec_abc123").await.unwrap_err();
        assert_eq!(status.code(), code, "{expected_reason}: {status:?}");
        assert_eq!(reason(&status), expected_reason);
        let seen = upstream.seen();
        assert_eq!(
            seen.len(),
            1,
            "exactly one request, and no redirect followed"
        );
        assert_eq!(seen[0].path, "/api/execute/exec_abc123/status");
        assert_eq!(
            seen[0].authorization.as_deref(),
            Some("Bearer sy_test_alice")
        );
    }
}

#[tokio::test]
async fn the_callers_trace_context_reaches_the_upstream_and_junk_does_not() {
    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = r#"{"id":"exec_abc123","status":"processing","jobs":[]}"#;
    let upstream = ScriptedUpstream::start(200, &[], body).await;
    let gateway = gateway(upstream_config(&upstream.base_url()), None).await;
    let client = common::client(&gateway).await;
    let call = |traceparent: &str, tracestate: &str| {
        let mut request = Request::new(GetExecutionStatusRequest {
            execution_id: "exec_abc123".into(),
        });
        let metadata = request.metadata_mut();
        metadata.insert("authorization", format!("Bearer {ALICE}").parse().unwrap());
        metadata.insert("traceparent", traceparent.parse().unwrap());
        metadata.insert("tracestate", tracestate.parse().unwrap());
        let mut client = client.clone();
        async move { client.get_execution_status(request).await }
    };

    call(TRACEPARENT, "vendor=opaque").await.unwrap();
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].traceparent.as_deref(), Some(TRACEPARENT));
    assert_eq!(seen[0].tracestate.as_deref(), Some("vendor=opaque"));

    // A snapshot younger than the poll interval is reused, so wait for the next poll to
    // ask again: the poller's scheduled requests carry the context of its first caller.
    let all_zero_trace = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while upstream.seen().len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no second request");
        call(all_zero_trace, "other=state").await.unwrap();
    }
    assert!(
        upstream
            .seen()
            .iter()
            .all(|seen| seen.traceparent.as_deref() == Some(TRACEPARENT)),
        "an invalid context is dropped, never forwarded: {:?}",
        upstream.seen()
    );
}

#[tokio::test]
async fn an_unreadable_body_that_echoes_a_long_string_still_gives_a_short_unavailable() {
    // serde_json quotes a string of the wrong type whole in its error text; a body within
    // the size cap must not turn into a status message of tens of kilobytes.
    let body = format!(
        r#"{{"id":"exec_abc123","status":"pending","jobs":"{}"}}"#,
        "x".repeat(60_000)
    );
    let upstream = ScriptedUpstream::start(200, &[], &body).await;
    let gateway = gateway(upstream_config(&upstream.base_url()), None).await;
    let client = common::client(&gateway).await;

    let status = get(&client, Some(ALICE), "exec_abc123").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:.300?}");
    assert_eq!(reason(&status), "UPSTREAM_MALFORMED_RESPONSE");
    assert!(
        status.message().len() < 1_000,
        "message of {} bytes",
        status.message().len()
    );
}

#[tokio::test]
async fn a_huge_retry_after_is_passed_on_capped_to_a_day_not_crashing_the_poller() {
    let limited =
        r#"{"error":"Rate Limit Exceeded","message":"Usage limit","code":"RATE_LIMIT_EXCEEDED"}"#;
    for retry_after in ["18446744073709551615", "99999999999999999999999"] {
        let upstream = ScriptedUpstream::start(429, &[("retry-after", retry_after)], limited).await;
        let gateway = gateway(upstream_config(&upstream.base_url()), None).await;
        let client = common::client(&gateway).await;

        for _ in 0..2 {
            let status = get(&client, Some(ALICE), "exec_abc123").await.unwrap_err();
            assert_eq!(
                status.code(),
                Code::ResourceExhausted,
                "{retry_after}: {status:?}"
            );
            assert_eq!(reason(&status), "UPSTREAM_RATE_LIMITED");
            let delay = status
                .get_details_retry_info()
                .unwrap()
                .retry_delay
                .unwrap();
            assert!(
                delay > Duration::from_secs(23 * 3600) && delay <= MAX_RETRY_AFTER,
                "{retry_after}: {delay:?}"
            );
        }
        assert_eq!(
            upstream.seen().len(),
            1,
            "the second call waits out the limit"
        );
    }
}
