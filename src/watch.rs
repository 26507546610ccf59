//! One `WatchExecution` stream: a task that forwards an execution's poller state to one
//! client.
//!
//! The task sits between the poller's `watch` channel and a one-slot `mpsc` channel that
//! tonic drains into the HTTP/2 stream. When the client reads slowly, the task waits on the
//! slot while the poller keeps publishing; once the slot frees, the task sends whatever is
//! newest. Intermediate revisions are skipped this way, never the final one, because the
//! final state is the last value the poller publishes.
//!
//! The task ends, and with it the stream, when the execution ends (OK), when the poller
//! stops for a reason that maps to a status, when the client goes away (the task notices
//! at once through `closed()`), when the call's deadline passes, when the client's
//! connection reaches the maximum connection age (UNAVAILABLE, so the client reconnects,
//! to any replica, with its revision), or when the gateway drains.

use std::time::Duration;

use tokio::{
    sync::{OwnedSemaphorePermit, mpsc, watch},
    time::{Instant, sleep_until},
};
use tonic::Status;
use tracing::debug;

use crate::{
    execution_id::ExecutionId,
    grpc_error::CallError,
    metrics::GaugeGuard,
    proto::{Execution, WatchExecutionResponse},
    registry::{PollEnd, PollState, Watcher},
};

/// What the task sends into the response stream.
pub type StreamItem = Result<WatchExecutionResponse, Status>;

/// One watch stream, before it runs.
#[derive(Debug)]
pub struct WatchStream {
    pub execution_id: ExecutionId,
    pub watcher: Watcher,
    pub responses: mpsc::Sender<StreamItem>,
    /// The revision the client saw last; nothing equal to it is sent.
    pub last_sent: u64,
    pub heartbeat_interval: Duration,
    /// When the call's own deadline passes.
    pub deadline: Option<Instant>,
    /// When the client's connection reaches the maximum connection age and is asked to go
    /// away: the stream ends then, cleanly, instead of being cut with the connection.
    pub connection_ages: Option<Instant>,
    /// Turns true when the gateway drains.
    pub draining: watch::Receiver<bool>,
    /// This stream's place under the limit of open watches, given back when it ends.
    pub _permit: OwnedSemaphorePermit,
    /// Counts this stream in the `open_watch_streams` gauge while it lives.
    pub _open: GaugeGuard,
}

/// What woke the stream task up.
enum Wake {
    Changed,
    ClientGone,
    Draining,
    DeadlinePassed,
    ConnectionAged,
    PollerGone,
    Quiet,
}

/// Whether the stream goes on after a step.
enum Step {
    Continue,
    Done,
}

impl WatchStream {
    pub async fn run(mut self) {
        let mut quiet_until = Instant::now() + self.heartbeat_interval;
        loop {
            let state = self.watcher.updates.borrow_and_update().clone();
            match self.publish(&state).await {
                Some(true) => quiet_until = Instant::now() + self.heartbeat_interval,
                Some(false) => {}
                None => return,
            }
            if let Step::Done = self.finish_if_ended(&state).await {
                return;
            }

            let wake = tokio::select! {
                () = self.responses.closed() => Wake::ClientGone,
                // An error means the gateway itself is gone: treat it as a drain.
                _ = self.draining.wait_for(|draining| *draining) => Wake::Draining,
                () = sleep_until_option(self.deadline) => Wake::DeadlinePassed,
                () = sleep_until_option(self.connection_ages) => Wake::ConnectionAged,
                changed = self.watcher.updates.changed() => match changed {
                    Ok(()) => Wake::Changed,
                    Err(_) => Wake::PollerGone,
                },
                () = sleep_until(quiet_until) => Wake::Quiet,
            };
            match wake {
                Wake::Changed => {}
                Wake::ClientGone => {
                    debug!("watcher left");
                    return;
                }
                Wake::Draining => return self.fail(CallError::ShuttingDown).await,
                Wake::DeadlinePassed => return self.fail(CallError::DeadlineExceeded).await,
                Wake::ConnectionAged => return self.fail(CallError::ConnectionAged).await,
                // The poller is gone without publishing an end: it failed.
                Wake::PollerGone => return self.fail(CallError::Interrupted).await,
                Wake::Quiet => {
                    if let Some(snapshot) = &state.snapshot
                        && !self.send(snapshot, true).await
                    {
                        return;
                    }
                    quiet_until = Instant::now() + self.heartbeat_interval;
                }
            }
        }
    }

    /// Sends the state's snapshot if the client has not seen it. `Some(sent)`, or `None`
    /// when the client is gone.
    async fn publish(&mut self, state: &PollState) -> Option<bool> {
        let Some(snapshot) = &state.snapshot else {
            return Some(false);
        };
        if snapshot.revision == self.last_sent {
            return Some(false);
        }
        if !self.send(snapshot, false).await {
            return None;
        }
        self.last_sent = snapshot.revision;
        Some(true)
    }

    /// Ends the stream when the poller has ended: OK for an ended execution, the mapped
    /// status otherwise.
    async fn finish_if_ended(&self, state: &PollState) -> Step {
        let Some(end) = &state.end else {
            return Step::Continue;
        };
        match end {
            PollEnd::Ended => debug!("execution ended; closing the stream"),
            PollEnd::Refused(err) => self.fail(CallError::Upstream(err.clone())).await,
            PollEnd::Outage { lasted, last } => {
                self.fail(CallError::UpstreamOutage {
                    lasted: *lasted,
                    last: last.clone(),
                })
                .await
            }
        }
        Step::Done
    }

    async fn send(&self, snapshot: &Execution, heartbeat: bool) -> bool {
        let response = WatchExecutionResponse {
            execution: Some(snapshot.clone()),
            heartbeat,
        };
        self.responses.send(Ok(response)).await.is_ok()
    }

    /// Ends the stream with the status of `err`, logged once here.
    async fn fail(&self, err: CallError) {
        let status = err.report(Some(&self.execution_id));
        let _ = self.responses.send(Err(status)).await;
    }
}

async fn sleep_until_option(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
