//! `watch` and `demo` as a user runs them: the real binary, against `serve --simulate` or
//! on its own.

mod common;

use std::process::Output;

use common::binary::{BINARY, client, serve_simulated};
use serde_json::Value;
use tokio::process::Command;

/// Quick polls and a short back-off, so that the samples (realistic durations of several
/// seconds, no webhooks) end within a few seconds of their last change.
const FAST_POLLING: &[&str] = &["--poll-interval", "100ms", "--poll-max-interval", "500ms"];

/// The JSON lines of a `watch --json` run.
fn json_lines(output: &Output) -> Vec<Value> {
    String::from_utf8(output.stdout.clone())
        .expect("UTF-8 output")
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}")))
        .collect()
}

/// Checks the stream's shape: revisions grow on every change, and the last line is final.
fn assert_well_formed(lines: &[Value], final_state: &str) {
    assert!(!lines.is_empty(), "no message");
    let mut last_revision = 0;
    for line in lines {
        let heartbeat = line["heartbeat"].as_bool().expect("heartbeat is a bool");
        let revision: u64 = line["execution"]["revision"]
            .as_str()
            .and_then(|text| text.parse().ok())
            .expect("revision as a decimal string");
        if heartbeat {
            assert_eq!(revision, last_revision, "a heartbeat repeats: {line}");
        } else {
            assert!(revision > last_revision, "revisions grow: {line}");
            last_revision = revision;
        }
    }
    let last = lines.last().expect("not empty");
    assert_eq!(last["execution"]["state"], final_state, "{last}");
}

#[tokio::test]
async fn watch_json_follows_samples_to_their_end_and_exits_by_outcome() {
    let gateway = serve_simulated(FAST_POLLING).await;
    let (addr, samples) = (&gateway.addr, &gateway.samples);
    assert_eq!(samples.len(), 4, "{samples:?}");

    // The first sample completes and the fourth fails; both are watched at once.
    let completing = [samples[0].as_str(), "--json"];
    let failing = [samples[3].as_str(), "--json"];
    let (completed, failed) = tokio::join!(
        client("watch", addr, &completing),
        client("watch", addr, &failing),
    );

    assert_eq!(completed.status.code(), Some(0), "{completed:?}");
    let lines = json_lines(&completed);
    assert_well_formed(&lines, "EXECUTION_STATE_COMPLETED");
    let last = &lines[lines.len() - 1]["execution"];
    assert!(last["result"]["url"].as_str().is_some(), "{last}");

    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    let lines = json_lines(&failed);
    assert_well_formed(&lines, "EXECUTION_STATE_FAILED");
    let error = lines[lines.len() - 1]["execution"]["error"].to_string();
    assert!(error.contains("face not detected"), "{error}");
    let stderr = String::from_utf8(failed.stderr).expect("UTF-8");
    assert!(stderr.contains("face not detected"), "{stderr}");
}

#[tokio::test]
async fn watch_prints_one_plain_line_per_change_without_a_terminal() {
    let gateway = serve_simulated(FAST_POLLING).await;
    let image = &gateway.samples[1];

    let output = client("watch", &gateway.addr, &[image]).await;

    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let text = String::from_utf8(output.stdout).expect("UTF-8");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 2, "{text}");
    assert!(
        lines.iter().all(|line| !line.contains('\u{1b}')),
        "no escape codes: {text}"
    );
    assert!(lines[lines.len() - 2].contains("completed  100%"), "{text}");
    assert!(
        lines[lines.len() - 1].starts_with("completed: https://"),
        "{text}"
    );
}

#[tokio::test]
async fn watch_of_an_unknown_execution_fails_with_not_found() {
    let gateway = serve_simulated(&[]).await;

    let output = client("watch", &gateway.addr, &["exec_unknown", "--json"]).await;

    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(output.stdout.is_empty(), "{output:?}");
    let stderr = String::from_utf8(output.stderr).expect("UTF-8");
    assert!(
        stderr.contains("NotFound (EXECUTION_NOT_FOUND)"),
        "{stderr}"
    );
}

/// The number at the start of the summary line that begins with `label`.
fn summary_figure(summary: &str, label: &str) -> u64 {
    let line = summary
        .lines()
        .find_map(|line| line.trim_start().strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} line in {summary}"));
    let figure = line.split_whitespace().next().expect("a figure");
    figure
        .parse()
        .unwrap_or_else(|_| panic!("{figure:?} is no count"))
}

#[tokio::test]
async fn demo_runs_to_an_expected_end_and_reports_the_saving() {
    let output = Command::new(BINARY)
        .args([
            "demo",
            "--time-scale",
            "0.05",
            "--watchers-per-execution",
            "5",
        ])
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("the demo runs");

    let summary = String::from_utf8(output.stdout.clone()).expect("UTF-8");
    assert_eq!(output.status.code(), Some(0), "{summary}\n{output:?}");
    assert_eq!(summary_figure(&summary, "watch streams"), 20, "{summary}");
    let upstream = summary_figure(&summary, "upstream status requests");
    let solo = summary_figure(&summary, "per-watcher polling at 1 s");
    assert!(upstream > 0, "{summary}");
    assert!(
        solo >= 20,
        "each watcher costs one request at least: {summary}"
    );
    assert!(summary.contains("face not detected"), "{summary}");
    assert!(summary.contains("ratio"), "{summary}");
}

#[tokio::test]
async fn watch_with_a_key_that_cannot_be_sent_exits_2_not_as_a_failed_execution() {
    let gateway = serve_simulated(&[]).await;

    let output = client(
        "watch",
        &gateway.addr,
        &[&gateway.samples[0], "--api-key", "sy_test_\u{7f}key"],
    )
    .await;

    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8(output.stderr).expect("UTF-8");
    assert!(
        !stderr.contains("sy_test_"),
        "the key is not echoed: {stderr}"
    );
}
