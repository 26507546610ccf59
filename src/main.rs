use std::process::ExitCode;

use clap::Parser;
use synthome_gateway::{
    cli::{self, Cli},
    telemetry::Telemetry,
};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = match Telemetry::install(
        cli.log_format,
        cli.command.default_log_level(),
        &cli.traces(),
    ) {
        Ok(telemetry) => telemetry,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };

    let code = match cli::run(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}
