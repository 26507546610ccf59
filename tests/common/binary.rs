//! The `synthome-gateway` binary as a user runs it: `serve --simulate` on free ports, and
//! the client subcommands against it.

use std::{process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

pub const BINARY: &str = env!("CARGO_BIN_EXE_synthome-gateway");

/// A `serve --simulate` process, killed when dropped.
pub struct SimulatedGateway {
    pub process: Child,
    /// The gRPC address, such as `http://127.0.0.1:40123`.
    pub addr: String,
    /// The operations listener's address, such as `127.0.0.1:40124`.
    pub admin_addr: String,
    /// The sample executions it started, in the simulator's order: the 4th fails.
    pub samples: Vec<String>,
}

/// Starts `serve --simulate` on free ports with `extra_args`, and reads both listeners'
/// addresses and the sample execution ids from its log.
pub async fn serve_simulated(extra_args: &[&str]) -> SimulatedGateway {
    let mut process = Command::new(BINARY)
        .args(["serve", "--simulate", "--listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(extra_args)
        .env("RUST_LOG", "info")
        .env_remove("SYNTHOME_API_KEY")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let mut lines = BufReader::new(process.stderr.take().expect("piped")).lines();

    let mut samples = Vec::new();
    let read_until_listening = async {
        let (mut grpc, mut admin) = (None, None);
        while let Some(line) = lines.next_line().await.expect("stderr readable") {
            if let Some(id) = field(&line, "execution_id=") {
                samples.push(id);
            }
            if line.contains("gRPC listening") {
                grpc = Some(field(&line, "addr=").expect("address logged"));
            }
            if line.contains("operations HTTP listening") {
                admin = Some(field(&line, "addr=").expect("address logged"));
            }
            if let (Some(grpc), Some(admin)) = (&grpc, &admin) {
                return (grpc.clone(), admin.clone());
            }
        }
        panic!("the gateway exited before listening");
    };
    let (addr, admin_addr) = tokio::time::timeout(Duration::from_secs(30), read_until_listening)
        .await
        .expect("the gateway listens within 30 s");
    // Keep draining stderr so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    SimulatedGateway {
        process,
        addr: format!("http://{addr}"),
        admin_addr,
        samples,
    }
}

/// The value after `name` in a log line, up to the next space.
pub fn field(line: &str, name: &str) -> Option<String> {
    let start = line.find(name)? + name.len();
    let value: String = line[start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    Some(value)
}

/// Runs a client subcommand (`status`, `watch`) against `addr` to its end.
pub async fn client(subcommand: &str, addr: &str, args: &[&str]) -> std::process::Output {
    Command::new(BINARY)
        .arg(subcommand)
        .args(args)
        .args(["--addr", addr])
        .env_remove("SYNTHOME_API_KEY")
        .output()
        .await
        .expect("the client runs")
}
