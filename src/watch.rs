//! One `WatchExecution` stream: a task that forwards an execution's poller state to one
//! client.
//!
//! The task sits between the poller's `watch` channel and a two-slot `mpsc` channel that
//! tonic drains into the HTTP/2 stream. The task queues a snapshot only when both slots are
//! free, so at most one snapshot waits and the other slot stays free for the status that
//! ends the stream. When the client reads slowly, the task waits for the queue to empty
//! while the poller keeps publishing; then it sends whatever is newest. Intermediate
//! revisions are skipped this way, never the final one, because the final state is the last
//! value the poller publishes. The deadline and a drain end the stream even while the task
//! waits: the status goes into the free slot, so ending never waits on a client that does
//! not read.
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

/// The capacity of the response channel: one snapshot waiting for the client, and room for
/// the status that ends the stream.
pub const RESPONSE_SLOTS: usize = 2;

/// One watch stream, before it runs.
#[derive(Debug)]
pub struct WatchStream {
    pub execution_id: ExecutionId,
    pub watcher: Watcher,
    /// Needs room for two items ([`RESPONSE_SLOTS`]): a snapshot and the final status.
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
            let (state, sent) = match self.publish().await {
                Some(published) => published,
                None => return,
            };
            if sent {
                quiet_until = Instant::now() + self.heartbeat_interval;
            }
            if let Step::Done = self.finish_if_ended(&state) {
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
                Wake::Draining => return self.fail(CallError::ShuttingDown),
                Wake::DeadlinePassed => return self.fail(CallError::DeadlineExceeded),
                Wake::ConnectionAged => return self.fail(CallError::ConnectionAged),
                // The poller is gone without publishing an end: it failed.
                Wake::PollerGone => return self.fail(CallError::Interrupted),
                Wake::Quiet => {
                    if let Some(snapshot) = &state.snapshot {
                        let ends = self.ends();
                        let room = room(&self.responses, &mut self.draining, ends);
                        let slot = match room.await {
                            Ok(Some(slot)) => slot,
                            Ok(None) => return,
                            Err(err) => return self.fail(err),
                        };
                        slot.send(message(snapshot, true));
                    }
                    quiet_until = Instant::now() + self.heartbeat_interval;
                }
            }
        }
    }

    /// Sends the newest snapshot if the client has not seen it, and returns the state acted
    /// on and whether it was sent; `None` when the stream is over.
    async fn publish(&mut self) -> Option<(PollState, bool)> {
        let state = self.watcher.updates.borrow_and_update().clone();
        let unseen = state
            .snapshot
            .as_ref()
            .is_some_and(|snapshot| snapshot.revision != self.last_sent);
        if !unseen {
            return Some((state, false));
        }
        let ends = self.ends();
        let room = room(&self.responses, &mut self.draining, ends);
        let slot = match room.await {
            Ok(Some(slot)) => slot,
            Ok(None) => return None,
            Err(err) => {
                self.fail(err);
                return None;
            }
        };
        // Room comes when the client has read what was sent before, which can take long:
        // what is newest now goes out, not what was newest when the wait began.
        let state = self.watcher.updates.borrow_and_update().clone();
        let snapshot = state
            .snapshot
            .as_ref()
            .expect("a snapshot, once there, stays");
        slot.send(message(snapshot, false));
        self.last_sent = snapshot.revision;
        Some((state, true))
    }

    /// Ends the stream when the poller has ended: OK for an ended execution, the mapped
    /// status otherwise.
    fn finish_if_ended(&self, state: &PollState) -> Step {
        let Some(end) = &state.end else {
            return Step::Continue;
        };
        match end {
            PollEnd::Ended => debug!("execution ended; closing the stream"),
            PollEnd::Refused(err) => self.fail(CallError::Upstream(err.clone())),
            PollEnd::Outage { lasted, last } => self.fail(CallError::UpstreamOutage {
                lasted: *lasted,
                last: last.clone(),
            }),
        }
        Step::Done
    }

    /// The times at which the stream ends whatever the client does.
    fn ends(&self) -> Ends {
        Ends {
            deadline: self.deadline,
            connection_ages: self.connection_ages,
        }
    }

    /// Ends the stream with the status of `err`, logged once here. It never waits: `send`
    /// leaves a slot free for it.
    fn fail(&self, err: CallError) {
        let status = err.report(Some(&self.execution_id));
        let _ = self.responses.try_send(Err(status));
    }
}

/// When a stream ends whatever its client does.
#[derive(Debug, Clone, Copy)]
struct Ends {
    deadline: Option<Instant>,
    connection_ages: Option<Instant>,
}

/// Waits until the client has taken what was sent before, and returns a slot for the next
/// message; the other slot stays free for the status that ends the stream. `Ok(None)` when
/// the client left, `Err` when the deadline, the connection's age or a drain came first.
async fn room<'a>(
    responses: &'a mpsc::Sender<StreamItem>,
    draining: &mut watch::Receiver<bool>,
    ends: Ends,
) -> Result<Option<mpsc::Permit<'a, StreamItem>>, CallError> {
    tokio::select! {
        // A client that reads gets its snapshot even when the deadline is also due.
        biased;
        room = responses.reserve_many(RESPONSE_SLOTS) => {
            Ok(room.ok().and_then(|mut room| room.next()))
        }
        // An error means the gateway itself is gone: treat it as a drain.
        _ = draining.wait_for(|draining| *draining) => Err(CallError::ShuttingDown),
        () = sleep_until_option(ends.deadline) => Err(CallError::DeadlineExceeded),
        () = sleep_until_option(ends.connection_ages) => Err(CallError::ConnectionAged),
    }
}

fn message(snapshot: &Execution, heartbeat: bool) -> StreamItem {
    Ok(WatchExecutionResponse {
        execution: Some(snapshot.clone()),
        heartbeat,
    })
}

async fn sleep_until_option(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
