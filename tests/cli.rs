//! The `synthome-gateway` binary as a user runs it: `serve --simulate`, then `status`.

mod common;

use common::binary::{client, serve_simulated};

async fn status(addr: &str, args: &[&str]) -> std::process::Output {
    client("status", addr, args).await
}

#[tokio::test]
async fn serve_simulate_then_status_works_without_an_account() {
    let gateway = serve_simulated(&[]).await;
    let (addr, samples) = (&gateway.addr, &gateway.samples);
    assert_eq!(
        samples.len(),
        4,
        "sample executions are logged: {samples:?}"
    );

    let summary = status(addr, &[&samples[0]]).await;
    assert!(summary.status.success(), "{summary:?}");
    let text = String::from_utf8(summary.stdout).unwrap();
    assert!(
        text.starts_with(&format!("execution {}", samples[0])),
        "{text}"
    );
    assert!(text.contains("progress"), "{text}");

    let json = status(addr, &[&samples[1], "--json"]).await;
    assert!(json.status.success(), "{json:?}");
    let execution: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(execution["id"], samples[1].as_str());
    assert!(
        execution["state"]
            .as_str()
            .unwrap()
            .starts_with("EXECUTION_STATE_")
    );
    assert!(execution["progress"]["totalJobs"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn status_reports_errors_with_code_and_reason_and_fails() {
    let gateway = serve_simulated(&[]).await;
    let addr = &gateway.addr;

    let missing = status(addr, &["exec_unknown"]).await;
    assert!(!missing.status.success());
    let text = String::from_utf8(missing.stderr).unwrap();
    assert!(text.contains("NotFound (EXECUTION_NOT_FOUND)"), "{text}");

    let invalid = status(addr, &["../etc"]).await;
    assert!(!invalid.status.success());
    let text = String::from_utf8(invalid.stderr).unwrap();
    assert!(
        text.contains("InvalidArgument (INVALID_EXECUTION_ID)"),
        "{text}"
    );
}
