use std::process::ExitCode;

use clap::Parser;
use synthome_gateway::{
    cli::{self, Cli},
    telemetry,
};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format, cli.command.default_log_level());

    match cli::run(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
