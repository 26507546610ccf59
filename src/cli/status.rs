//! `synthome-gateway status <execution-id>`: one GetExecutionStatus call, printed for a
//! person or, with `--json`, as the full message in protobuf's JSON mapping.

use std::{error::Error, process::ExitCode, time::Duration};

use clap::Args;
use tonic::Status;
use tonic_types::StatusExt;

use super::{client::GatewayArgs, output, parse_duration};
use crate::proto::GetExecutionStatusRequest;

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The execution to look up.
    pub execution_id: String,

    #[command(flatten)]
    pub gateway: GatewayArgs,

    /// Deadline for the call (e.g. 500ms, 10s).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Print the whole Execution message as JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn run(args: StatusArgs) -> Result<ExitCode, Box<dyn Error>> {
    let mut client = args.gateway.connect().await?;
    let mut request = args.gateway.request(GetExecutionStatusRequest {
        execution_id: args.execution_id.clone(),
    })?;
    request.set_timeout(args.timeout);

    match client.get_execution_status(request).await {
        Ok(response) => {
            let execution = response.into_inner().execution.unwrap_or_default();
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&output::execution_json(&execution))?
                );
            } else {
                print!("{}", output::summary(&execution));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(status) => {
            eprintln!("{}", describe_error(&status));
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `NOT_FOUND (EXECUTION_NOT_FOUND): execution x: …`, with the retry hint when there is one.
pub(super) fn describe_error(status: &Status) -> String {
    let mut text = format!("error: {:?}", status.code());
    if let Some(info) = status.get_details_error_info() {
        text.push_str(&format!(" ({})", info.reason));
    }
    text.push_str(&format!(": {}", status.message()));
    if let Some(delay) = status.get_details_retry_info().and_then(|r| r.retry_delay) {
        text.push_str(&format!(" (retry after {delay:?})"));
    }
    text
}
