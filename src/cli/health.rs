//! `synthome-gateway health`: a probe for container HEALTHCHECKs and exec probes. It asks
//! `grpc.health.v1.Health/Check` and exits 0 only when the answer is SERVING.

use std::{error::Error, process::ExitCode, time::Duration};

use clap::Args;
use tonic::{Code, Request};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::{client::GatewayArgs, parse_duration, status::describe_error};

/// Exit codes, as `--help` shows them.
pub(super) const EXIT_CODES_HELP: &str = "Exit codes: 0 SERVING; 1 any other answer \
(NOT_SERVING, UNKNOWN, or the service is not known); 2 the gateway could not be asked.";

#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub gateway: GatewayArgs,

    /// The service to ask about; empty for the whole server.
    #[arg(long, default_value = "")]
    pub service: String,

    /// Deadline for the check.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

pub(super) async fn run(args: HealthArgs) -> Result<ExitCode, Box<dyn Error>> {
    let channel = match args.gateway.channel().await {
        Ok(channel) => channel,
        Err(err) => {
            eprintln!("error: {err}");
            return Ok(ExitCode::from(2));
        }
    };
    let mut request = Request::new(HealthCheckRequest {
        service: args.service.clone(),
    });
    request.set_timeout(args.timeout);

    match HealthClient::new(channel).check(request).await {
        Ok(response) => {
            let status = response.into_inner().status();
            println!("{}", status.as_str_name());
            Ok(if status == ServingStatus::Serving {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        // The health service answers NOT_FOUND for a service it does not know: an answer,
        // just not SERVING.
        Err(status) if status.code() == Code::NotFound => {
            eprintln!("{}", describe_error(&status));
            Ok(ExitCode::FAILURE)
        }
        Err(status) => {
            eprintln!("{}", describe_error(&status));
            Ok(ExitCode::from(2))
        }
    }
}
