//! The `synthome-gateway` binary as a user runs it: `serve --simulate`, then `status`.

use std::{process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

const BINARY: &str = env!("CARGO_BIN_EXE_synthome-gateway");

/// Starts `serve --simulate` on a free port; returns the process, the gRPC address and the
/// sample execution ids it logged.
async fn serve_simulated() -> (Child, String, Vec<String>) {
    let mut child = Command::new(BINARY)
        .args(["serve", "--simulate", "--listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .env_remove("SYNTHOME_API_KEY")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();

    let mut samples = Vec::new();
    let read_until_listening = async {
        while let Some(line) = lines.next_line().await.expect("stderr readable") {
            if let Some(id) = field(&line, "execution_id=") {
                samples.push(id);
            }
            if line.contains("gRPC listening") {
                return field(&line, "addr=").expect("address logged");
            }
        }
        panic!("the gateway exited before listening");
    };
    let addr = tokio::time::timeout(Duration::from_secs(30), read_until_listening)
        .await
        .expect("the gateway listens within 30 s");
    // Keep draining stderr so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, format!("http://{addr}"), samples)
}

fn field(line: &str, name: &str) -> Option<String> {
    let start = line.find(name)? + name.len();
    let value: String = line[start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    Some(value)
}

async fn status(addr: &str, args: &[&str]) -> std::process::Output {
    Command::new(BINARY)
        .arg("status")
        .args(args)
        .args(["--addr", addr])
        .env_remove("SYNTHOME_API_KEY")
        .output()
        .await
        .expect("the status client runs")
}

#[tokio::test]
async fn serve_simulate_then_status_works_without_an_account() {
    let (_gateway, addr, samples) = serve_simulated().await;
    assert_eq!(
        samples.len(),
        4,
        "sample executions are logged: {samples:?}"
    );

    let summary = status(&addr, &[&samples[0]]).await;
    assert!(summary.status.success(), "{summary:?}");
    let text = String::from_utf8(summary.stdout).unwrap();
    assert!(
        text.starts_with(&format!("execution {}", samples[0])),
        "{text}"
    );
    assert!(text.contains("progress"), "{text}");

    let json = status(&addr, &[&samples[1], "--json"]).await;
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
    let (_gateway, addr, _) = serve_simulated().await;

    let missing = status(&addr, &["exec_unknown"]).await;
    assert!(!missing.status.success());
    let text = String::from_utf8(missing.stderr).unwrap();
    assert!(text.contains("NotFound (EXECUTION_NOT_FOUND)"), "{text}");

    let invalid = status(&addr, &["../etc"]).await;
    assert!(!invalid.status.success());
    let text = String::from_utf8(invalid.stderr).unwrap();
    assert!(
        text.contains("InvalidArgument (INVALID_EXECUTION_ID)"),
        "{text}"
    );
}
