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

#[tokio::test]
async fn json_logs_are_one_object_per_line_and_never_hold_a_key() {
    use std::process::Stdio;
    use tokio::io::{AsyncBufReadExt, BufReader};

    const KEY: &str = "sy_test_never_logged_0123456789";
    let mut process = tokio::process::Command::new(common::binary::BINARY)
        .args(["--log-format", "json", "serve", "--simulate"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--api-key", KEY])
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(process.stderr.take().unwrap()).lines();
    let mut logged = Vec::new();
    let addr = loop {
        let line = lines.next_line().await.unwrap().expect("still running");
        let record: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|err| panic!("not a JSON line ({err}): {line}"));
        logged.push(line);
        if record["fields"]["message"] == "gRPC listening" {
            break format!("http://{}", record["fields"]["addr"].as_str().unwrap());
        }
    };

    // Calls with the key, one of them refused: both are logged at debug or above.
    let unknown = client("status", &addr, &["exec_unknown", "--api-key", KEY]).await;
    assert!(!unknown.status.success());
    process.start_kill().unwrap();
    while let Ok(Some(line)) = lines.next_line().await {
        serde_json::from_str::<serde_json::Value>(&line)
            .unwrap_or_else(|err| panic!("not a JSON line ({err}): {line}"));
        logged.push(line);
    }
    let all = logged.join("\n");
    assert!(all.contains("exec_unknown"), "the call was logged:\n{all}");
    assert!(!all.contains(KEY), "a key reached the log:\n{all}");
}

#[tokio::test]
async fn sigterm_drains_open_watches_and_exits_zero() {
    use synthome_gateway::proto::{
        WatchExecutionRequest, execution_status_service_client::ExecutionStatusServiceClient,
    };
    use tonic_types::StatusExt;

    let mut gateway = serve_simulated(&["--shutdown-grace", "5s"]).await;
    let mut client = ExecutionStatusServiceClient::connect(gateway.addr.clone())
        .await
        .unwrap();
    let mut streams = Vec::new();
    for sample in gateway.samples.iter().cycle().take(40) {
        let request = WatchExecutionRequest {
            execution_id: sample.clone(),
            last_revision: 0,
        };
        let mut stream = client.watch_execution(request).await.unwrap().into_inner();
        stream.message().await.unwrap().expect("first message");
        streams.push(stream);
    }

    let pid = gateway.process.id().expect("running").to_string();
    let kill = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(kill.success());

    let mut drained = 0;
    for mut stream in streams {
        let end = loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => break None,
                Err(status) => break Some(status),
            }
        };
        // A sample that ended just before the signal closes with OK; the others drain.
        if let Some(status) = end {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            let reason = status.get_details_error_info().unwrap().reason;
            assert_eq!(reason, "GATEWAY_SHUTTING_DOWN");
            drained += 1;
        }
    }
    assert!(
        drained > 0,
        "the samples run for seconds: most watches were open"
    );
    let exit = tokio::time::timeout(std::time::Duration::from_secs(15), gateway.process.wait())
        .await
        .expect("the drain is bounded by --shutdown-grace")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn health_exits_1_for_an_unknown_service_and_2_when_it_cannot_ask() {
    let gateway = serve_simulated(&[]).await;

    let serving = client("health", &gateway.addr, &[]).await;
    assert_eq!(serving.status.code(), Some(0), "{serving:?}");
    let unknown = client("health", &gateway.addr, &["--service", "no.such.Service"]).await;
    assert_eq!(
        unknown.status.code(),
        Some(1),
        "an answer that is not SERVING: {unknown:?}"
    );

    // Nothing listens on the port of a listener that was just closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let unreachable = client("health", &addr, &[]).await;
    assert_eq!(unreachable.status.code(), Some(2), "{unreachable:?}");
}

#[tokio::test]
async fn sigterm_exits_within_the_grace_despite_a_stuck_operations_request() {
    use tokio::io::AsyncWriteExt;

    let mut gateway = serve_simulated(&["--shutdown-grace", "200ms"]).await;
    // A webhook whose body never comes: its handler waits for it as long as the
    // connection stays open.
    let mut stuck = tokio::net::TcpStream::connect(&gateway.admin_addr)
        .await
        .unwrap();
    stuck
        .write_all(
            b"POST /webhooks/synthome HTTP/1.1\r\nhost: gateway\r\n\
              content-type: application/json\r\ncontent-length: 100\r\n\r\n{",
        )
        .await
        .unwrap();
    // The stuck connection has been accepted once a later one is answered: the listener
    // accepts in order.
    let metrics = reqwest::get(format!("http://{}/metrics", gateway.admin_addr))
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);

    let pid = gateway.process.id().expect("running").to_string();
    let kill = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(kill.success());
    let exit = tokio::time::timeout(std::time::Duration::from_secs(15), gateway.process.wait())
        .await
        .expect("the drain is bounded by --shutdown-grace")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    drop(stuck);
}

#[tokio::test]
async fn clients_use_tls_when_given_tls_flags_whatever_the_address_scheme() {
    let pki = common::pki();
    let dir = std::env::temp_dir().join(format!(
        "synthome-gateway-cli-tls-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (ca, cert, key) = (
        write("ca.pem", &pki.ca),
        write("server.pem", &pki.server.0),
        write("server.key", &pki.server.1),
    );
    let gateway = serve_simulated(&["--tls-cert", &cert, "--tls-key", &key]).await;
    let port = gateway.addr.rsplit(':').next().unwrap();

    let https = format!("https://localhost:{port}");
    let sample = &gateway.samples[0];
    let status_https = client("status", &https, &[sample, "--tls-ca", &ca]).await;
    assert!(status_https.status.success(), "{status_https:?}");

    // The flag asks for TLS; an http:// address must not quietly send the call (and its
    // key) in plaintext.
    let http = format!("http://localhost:{port}");
    let status_http = client("status", &http, &[sample, "--tls-ca", &ca]).await;
    assert!(status_http.status.success(), "{status_http:?}");
    let health = client("health", &http, &["--tls-ca", &ca]).await;
    assert_eq!(health.status.code(), Some(0), "{health:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn health_gives_up_at_its_timeout_on_a_gateway_that_never_answers() {
    // Accepts connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });

    let probe = client("health", &addr, &["--timeout", "300ms"]);
    let output = tokio::time::timeout(std::time::Duration::from_secs(20), probe)
        .await
        .expect("the probe gives up by itself");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
}
