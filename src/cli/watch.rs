//! `synthome-gateway watch <execution-id>`: follows one execution through `WatchExecution`
//! until it ends, and exits with a code that says how it ended.
//!
//! Three ways to show the stream:
//! - on a terminal, live `indicatif` bars on stderr: the whole execution (percent, state,
//!   jobs done, current job) and one line per job, redrawn on every message;
//! - when stderr is not a terminal (indicatif then hides its bars), one plain line on
//!   stdout per message that changed something, so CI logs stay readable;
//! - with `--json`, one compact JSON line on stdout per message, heartbeats included.
//!
//! Heartbeats change nothing visible: they repeat the last snapshot.
//!
//! Limits: the command does not reconnect. When the stream ends with an error (a gateway
//! restart ends it with UNAVAILABLE), it exits 2 and prints the last revision it saw, so a
//! script can run it again with `--last-revision`.

use std::{error::Error, process::ExitCode, time::Duration};

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;
use tonic::{Code, Status, Streaming, transport::Channel};

use super::{client::GatewayArgs, output, status::describe_error};
use crate::{
    execution::is_final,
    proto::{
        Execution, ExecutionState, WatchExecutionRequest, WatchExecutionResponse,
        execution_status_service_client::ExecutionStatusServiceClient,
    },
};

/// The exit codes, as `--help` lists them.
pub(super) const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  the execution completed; its result URL is printed
  1  the execution failed; its error is printed
  2  no final state was seen: the gateway could not be reached, refused the call, ended
     the stream with an error, or ended it before the execution completed or failed";

const EXIT_FAILED: u8 = 1;
const EXIT_NO_FINAL_STATE: u8 = 2;

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// The execution to follow.
    pub execution_id: String,

    #[command(flatten)]
    pub gateway: GatewayArgs,

    /// Print each message of the stream as one JSON line
    /// (`{"heartbeat": bool, "execution": {...}}`) instead of progress bars.
    #[arg(long)]
    pub json: bool,

    /// The last revision already seen, when resuming a watch: the gateway then holds its
    /// first message back until the execution changes past it.
    #[arg(long, default_value_t = 0)]
    pub last_revision: u64,
}

/// How a watch stream ended.
#[derive(Debug)]
pub(super) enum Ending {
    /// The stream delivered a completed or failed execution.
    Final(Execution),
    /// The gateway refused the call or ended the stream with an error.
    Refused {
        status: Status,
        last: Option<Execution>,
    },
    /// The stream ended without error before a final state, which the contract rules out.
    Unfinished(Option<Execution>),
}

pub(super) async fn run(args: WatchArgs) -> Result<ExitCode, Box<dyn Error>> {
    let mut client = match args.gateway.connect().await {
        Ok(client) => client,
        Err(err) => {
            eprintln!("error: {err}");
            return Ok(ExitCode::from(EXIT_NO_FINAL_STATE));
        }
    };
    // Exit 1 means the execution failed: a call that cannot be made is a 2.
    let request = match args.gateway.request(WatchExecutionRequest {
        execution_id: args.execution_id.clone(),
        last_revision: args.last_revision,
    }) {
        Ok(request) => request,
        Err(err) => {
            eprintln!("error: {err}");
            return Ok(ExitCode::from(EXIT_NO_FINAL_STATE));
        }
    };

    let mut display = Display::new(args.json);
    let ending = follow(&mut client, request, |execution, heartbeat| {
        display.show(execution, heartbeat);
    })
    .await;
    display.finish();

    Ok(report(&ending, args.json))
}

/// Reads the stream to its end, handing every execution it carries (and whether the
/// message was a heartbeat) to `on_message`.
pub(super) async fn follow(
    client: &mut ExecutionStatusServiceClient<Channel>,
    request: tonic::Request<WatchExecutionRequest>,
    on_message: impl FnMut(&Execution, bool),
) -> Ending {
    let stream = match client.watch_execution(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Ending::Refused { status, last: None },
    };
    let last = match read_all(stream, on_message).await {
        Ok(last) => last,
        Err((status, last)) => return Ending::Refused { status, last },
    };
    match last {
        Some(execution) if is_final(execution.state()) => Ending::Final(execution),
        last => Ending::Unfinished(last),
    }
}

/// The last execution the stream carried, or the status it ended with and that execution.
async fn read_all(
    mut stream: Streaming<WatchExecutionResponse>,
    mut on_message: impl FnMut(&Execution, bool),
) -> Result<Option<Execution>, (Status, Option<Execution>)> {
    let mut last = None;
    loop {
        match stream.message().await {
            Ok(Some(response)) => {
                // A message without an execution has nothing to show; the contract always
                // sets it.
                if let Some(execution) = response.execution {
                    on_message(&execution, response.heartbeat);
                    last = Some(execution);
                }
            }
            Ok(None) => return Ok(last),
            Err(status) => return Err((status, last)),
        }
    }
}

/// Prints how the watch ended and picks the exit code.
fn report(ending: &Ending, json: bool) -> ExitCode {
    match ending {
        Ending::Final(execution) if execution.state() == ExecutionState::Completed => {
            if !json {
                match &execution.result {
                    Some(result) => println!("completed: {}", result.url),
                    None => println!("completed (the execution reported no result URL)"),
                }
            }
            ExitCode::SUCCESS
        }
        Ending::Final(execution) => {
            eprintln!("execution failed: {}", execution.error);
            ExitCode::from(EXIT_FAILED)
        }
        Ending::Refused { status, last } => {
            eprintln!("{}", describe_error(status));
            if let (Code::Unavailable, Some(last)) = (status.code(), last) {
                eprintln!(
                    "the stream may be resumed with --last-revision {}",
                    last.revision
                );
            }
            ExitCode::from(EXIT_NO_FINAL_STATE)
        }
        Ending::Unfinished(last) => {
            let seen = last
                .as_ref()
                .map_or("no execution".to_owned(), |execution| {
                    format!(
                        "{} at revision {}",
                        execution.upstream_status, execution.revision
                    )
                });
            eprintln!(
                "error: the gateway ended the stream before the execution completed or \
                 failed (last seen: {seen})"
            );
            ExitCode::from(EXIT_NO_FINAL_STATE)
        }
    }
}

/// Where the messages of the stream go.
#[derive(Debug)]
enum Display {
    Json,
    Lines,
    Bars(ExecutionBars),
}

impl Display {
    /// JSON when asked for, else bars, else plain lines when stderr is no terminal.
    fn new(json: bool) -> Self {
        if json {
            return Self::Json;
        }
        let bars = ExecutionBars::new();
        if bars.is_hidden() {
            Self::Lines
        } else {
            Self::Bars(bars)
        }
    }

    fn show(&mut self, execution: &Execution, heartbeat: bool) {
        match self {
            Self::Json => {
                let line = json!({
                    "heartbeat": heartbeat,
                    "execution": output::execution_json(execution),
                });
                println!("{line}");
            }
            Self::Lines if heartbeat => {}
            Self::Lines => println!("{}", plain_line(execution)),
            Self::Bars(bars) if heartbeat => bars.overall.tick(),
            Self::Bars(bars) => bars.show(execution),
        }
    }

    fn finish(&self) {
        if let Self::Bars(bars) = self {
            bars.finish();
        }
    }
}

/// `revision 3  processing  50%  (1/2 jobs done), current job outro  [intro completed, …]`
fn plain_line(execution: &Execution) -> String {
    let jobs: Vec<String> = execution
        .jobs
        .iter()
        .map(|job| format!("{} {}", job.id, job.status))
        .collect();
    format!(
        "revision {}  {}  {}  [{}]",
        execution.revision,
        output::state_text(execution),
        output::progress_text(execution),
        jobs.join(", ")
    )
}

/// `processing  1/2 jobs done, current job outro`: the overall bar's message.
pub(super) fn headline(execution: &Execution) -> String {
    let mut text = output::state_text(execution);
    if let Some(progress) = &execution.progress {
        text.push_str(&format!(
            "  {}/{} jobs done",
            progress.completed_jobs, progress.total_jobs
        ));
        if !progress.current_job.is_empty() {
            text.push_str(&format!(", current job {}", progress.current_job));
        }
    }
    text
}

/// The style of a bar showing an execution's percent, with `{msg}` after it.
pub(super) fn execution_bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner:.green} [{bar:32.cyan/blue}] {pos:>3}%  {msg}")
        .expect("the template is valid")
        .progress_chars("=> ")
}

/// The overall bar and one line per job, on stderr.
#[derive(Debug)]
struct ExecutionBars {
    lines: MultiProgress,
    overall: ProgressBar,
    jobs: Vec<ProgressBar>,
}

impl ExecutionBars {
    fn new() -> Self {
        let lines = MultiProgress::new();
        let overall = lines.add(ProgressBar::new(100).with_style(execution_bar_style()));
        overall.enable_steady_tick(Duration::from_millis(120));
        Self {
            lines,
            overall,
            jobs: Vec::new(),
        }
    }

    fn is_hidden(&self) -> bool {
        self.lines.is_hidden()
    }

    fn show(&mut self, execution: &Execution) {
        self.overall.set_position(output::percent(execution));
        self.overall.set_message(headline(execution));

        // Jobs keep their order; a line is added for each job not seen before.
        let job_style = ProgressStyle::with_template("    {msg}").expect("the template is valid");
        while self.jobs.len() < execution.jobs.len() {
            let line = self
                .lines
                .add(ProgressBar::new(1).with_style(job_style.clone()));
            self.jobs.push(line);
        }
        for (line, job) in self.jobs.iter().zip(&execution.jobs) {
            line.set_message(output::job_line(job));
        }
    }

    /// Leaves the bars on screen as they are: `abandon`, because `finish` would also fill
    /// the bar to 100% for a failed execution.
    fn finish(&self) {
        self.overall.abandon();
        for line in &self.jobs {
            line.abandon();
        }
        // indicatif leaves the cursor at the end of its last line.
        eprintln!();
    }
}
