//! The registry of pollers: one upstream poller per (credential, execution id), shared by
//! every caller that reads or watches that execution.
//!
//! Design:
//! - The first caller for a key starts a poller task that publishes [`PollState`] into a
//!   `tokio::sync::watch` channel. Watchers hold receivers; a watch channel keeps only the
//!   latest value, so a slow watcher never slows the poller or anyone else, and simply sees
//!   the newest snapshot when it reads (revisions show what it skipped).
//! - The poller stops once its last receiver has been gone for `linger`, and at once when
//!   the execution ends (its final snapshot then moves to a bounded LRU cache of ended
//!   executions, since it never changes again) or when the upstream gives an answer that
//!   polling cannot fix (not found, bad key, no permission), or after `outage_timeout` of
//!   continuous transient failures.
//! - Entries are keyed by the credential's fingerprint as well as the id: Synthome does not
//!   check that an execution belongs to the key's organisation, so two keys never share a
//!   poller, a snapshot or a cache slot.
//! - Unary reads go through the same pollers: a snapshot younger than the poll interval is
//!   reused; otherwise the caller asks the poller to fetch now and waits for that fetch, so
//!   concurrent reads of one key share one upstream request.
//! - Cadence: every `interval` while the execution changes; while nothing changes the
//!   delay grows up to `max_interval`; each delay is jittered so pollers started together
//!   drift apart. Transient failures back off the same way, and a 429 waits at least its
//!   `Retry-After`. Refreshes asked for by webhooks or unary reads are rate limited to one
//!   per `min_refresh_gap` per poller. A global semaphore caps upstream requests in flight.
//! - Revisions come from one registry-wide counter seeded with the start time in
//!   microseconds: they strictly increase for every key, even across poller restarts and
//!   gateway restarts, and equal revisions mean the same snapshot.
//!
//! Limit: a poller polls with the key of the caller that started it; callers with the same
//! key fingerprint share it, which is the point. Revisions from different gateway replicas
//! are not comparable.

use std::{
    collections::HashMap,
    num::NonZeroUsize,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use lru::LruCache;
use tokio::{
    sync::{Notify, Semaphore, watch},
    time::{Instant, sleep_until},
};
use tracing::{Instrument, debug, debug_span, info_span, warn};

use crate::{
    credential::{Credential, Fingerprint},
    execution::{self, is_final},
    execution_id::ExecutionId,
    metrics::{CacheHit, GaugeGuard, Metrics},
    proto::Execution,
    trace_context::{self, TraceContext},
    upstream::{MAX_RETRY_AFTER, StatusSource, UpstreamError},
};

/// How the pollers pace themselves.
#[derive(Debug, Clone)]
pub struct PollSettings {
    /// Delay between polls while an execution is changing.
    pub interval: Duration,
    /// The longest delay between polls, reached while nothing changes or upstream fails.
    pub max_interval: Duration,
    /// How long a poller keeps going after its last watcher left.
    pub linger: Duration,
    /// How long transient upstream failures may last before watchers are told UNAVAILABLE.
    pub outage_timeout: Duration,
    /// The shortest gap between two fetches of one poller when a refresh is asked for.
    pub min_refresh_gap: Duration,
    /// Upstream requests in flight at once, across all pollers.
    pub max_in_flight: usize,
    /// How many ended executions are remembered.
    pub ended_cache_size: NonZeroUsize,
}

impl Default for PollSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(10),
            linger: Duration::from_secs(2),
            outage_timeout: Duration::from_secs(60),
            min_refresh_gap: Duration::from_millis(250),
            max_in_flight: 64,
            ended_cache_size: NonZeroUsize::new(10_000).expect("non-zero"),
        }
    }
}

/// The identity of a poller: who asks, and for what.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PollerKey {
    pub fingerprint: Fingerprint,
    pub execution_id: ExecutionId,
}

/// What a poller last learned. Published after every fetch.
#[derive(Debug, Clone, Default)]
pub struct PollState {
    /// The latest snapshot, with its revision; `None` until the first successful fetch.
    pub snapshot: Option<Arc<Execution>>,
    /// When `snapshot` was last confirmed by the upstream.
    pub confirmed_at: Option<Instant>,
    /// Fetches finished so far, successful or not.
    pub attempts: u64,
    /// Whether a fetch is in flight now. Set without waking anyone (watchers have nothing
    /// new to see), so that a unary read can wait for that fetch instead of asking for
    /// another one.
    pub fetching: bool,
    /// The error of the latest fetch, when it failed.
    pub last_error: Option<UpstreamError>,
    /// No fetch happens before this instant: the upstream's `Retry-After` is running.
    pub retry_not_before: Option<Instant>,
    /// Set when the poller has stopped for good; nothing is published after it.
    pub end: Option<PollEnd>,
}

/// Why a poller stopped for good.
#[derive(Debug, Clone, PartialEq)]
pub enum PollEnd {
    /// The execution completed or failed; `PollState::snapshot` is final.
    Ended,
    /// The upstream gave an answer that polling again cannot change.
    Refused(UpstreamError),
    /// Transient failures lasted longer than the outage timeout.
    Outage {
        lasted: Duration,
        last: UpstreamError,
    },
}

/// The pollers, the cache of ended executions, and the shared limits.
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    source: Arc<dyn StatusSource>,
    settings: PollSettings,
    /// Lock order: `pollers` before `ended`. Neither is held across an await.
    pollers: Mutex<HashMap<PollerKey, Arc<PollerHandle>>>,
    ended: Mutex<LruCache<PollerKey, Arc<Execution>>>,
    in_flight: Semaphore,
    next_revision: AtomicU64,
    metrics: Metrics,
    /// Since when upstream requests have failed without an HTTP answer or with a 5xx;
    /// `None` while Synthome answers. Read by the health checks.
    upstream_failing_since: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The registry's side of one poller. Only the registry map and the poller task hold it,
/// so the channel closes when the task ends, even by a panic: watchers then see
/// `changed()` fail instead of waiting forever.
#[derive(Debug)]
struct PollerHandle {
    updates: watch::Sender<PollState>,
    refresh: Refresh,
}

/// Asks a poller to fetch now (subject to `min_refresh_gap` and `Retry-After`). Watchers
/// hold this, never the [`PollerHandle`], so the poller's channel closes with its task.
#[derive(Debug, Clone, Default)]
struct Refresh {
    notify: Arc<Notify>,
    /// The trace context of the unary read that asked for the next fetch, if it had one.
    trace: Arc<Mutex<Option<TraceContext>>>,
}

impl Refresh {
    fn ask(&self, trace: Option<&TraceContext>) {
        if let Some(trace) = trace {
            *self.trace.lock().unwrap_or_else(PoisonError::into_inner) = Some(trace.clone());
        }
        self.notify.notify_one();
    }

    /// The trace context of whoever asked for this fetch, taken so it is sent once.
    fn take_trace(&self) -> Option<TraceContext> {
        self.trace
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// A caller's view of one execution: the latest [`PollState`] and every later one.
#[derive(Debug)]
pub struct Watcher {
    pub updates: watch::Receiver<PollState>,
    /// `None` for an execution that has ended: there is nothing to fetch.
    refresh: Option<Refresh>,
}

impl Watcher {
    /// Asks the poller to fetch now; a watcher of an ended execution has nothing to ask.
    pub fn refresh(&self) {
        self.refresh_traced(None);
    }

    /// Asks the poller to fetch now, passing `trace` on with that request.
    fn refresh_traced(&self, trace: Option<&TraceContext>) {
        if let Some(refresh) = &self.refresh {
            refresh.ask(trace);
        }
    }
}

impl Registry {
    pub fn new(source: Arc<dyn StatusSource>, settings: PollSettings) -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_micros() as u64);
        Self {
            inner: Arc::new(Inner {
                source,
                in_flight: Semaphore::new(settings.max_in_flight.max(1)),
                ended: Mutex::new(LruCache::new(settings.ended_cache_size)),
                settings,
                pollers: Mutex::new(HashMap::new()),
                next_revision: AtomicU64::new(seed),
                metrics: Metrics::new(),
                upstream_failing_since: Mutex::new(None),
            }),
        }
    }

    pub fn settings(&self) -> &PollSettings {
        &self.inner.settings
    }

    /// The gateway's metrics, which the registry's pollers feed.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Watches one execution, starting its poller if nobody watches it yet.
    pub fn watch(&self, credential: &Credential, execution_id: &ExecutionId) -> Watcher {
        self.watch_traced(credential, execution_id, None)
    }

    /// [`Registry::watch`] for a call with a trace context: a poller it starts passes the
    /// context on with its scheduled requests.
    pub fn watch_traced(
        &self,
        credential: &Credential,
        execution_id: &ExecutionId,
        trace: Option<&TraceContext>,
    ) -> Watcher {
        let key = PollerKey {
            fingerprint: credential.fingerprint(),
            execution_id: execution_id.clone(),
        };
        let mut pollers = self.inner.lock_pollers();
        if let Some(poller) = pollers.get(&key) {
            return Watcher {
                updates: poller.updates.subscribe(),
                refresh: Some(poller.refresh.clone()),
            };
        }
        if let Some(snapshot) = self.inner.lock_ended().get(&key) {
            self.inner.metrics.cache_hit(CacheHit::Ended);
            return ended_watcher(Arc::clone(snapshot));
        }

        let (updates, receiver) = watch::channel(PollState::default());
        let poller = Arc::new(PollerHandle {
            updates,
            refresh: Refresh::default(),
        });
        pollers.insert(key.clone(), Arc::clone(&poller));
        drop(pollers);

        let refresh = poller.refresh.clone();
        let span = debug_span!("poller", execution_id = %key.execution_id);
        let task = Poller::new(
            Arc::clone(&self.inner),
            key,
            Arc::clone(&poller),
            credential.clone(),
            trace.cloned(),
        );
        tokio::spawn(task.run().instrument(span));
        Watcher {
            updates: receiver,
            refresh: Some(refresh),
        }
    }

    /// The execution as it is now: a snapshot younger than the poll interval, else the
    /// result of a fetch that finishes after this call began.
    pub async fn get(
        &self,
        credential: &Credential,
        execution_id: &ExecutionId,
    ) -> Result<Arc<Execution>, ReadError> {
        self.get_traced(credential, execution_id, None).await
    }

    /// [`Registry::get`] for a call with a trace context, passed on with the fetch it asks
    /// for.
    pub async fn get_traced(
        &self,
        credential: &Credential,
        execution_id: &ExecutionId,
        trace: Option<&TraceContext>,
    ) -> Result<Arc<Execution>, ReadError> {
        let mut watcher = self.watch_traced(credential, execution_id, trace);
        let (attempts_before, fetching) = {
            let state = watcher.updates.borrow_and_update();
            if let Some(answer) = self.answer_now(&state) {
                return answer;
            }
            (state.attempts, state.fetching)
        };
        // A fetch in flight finishes after this call began, which is all a read needs.
        if !fetching {
            watcher.refresh_traced(trace);
        }

        loop {
            let closed = watcher.updates.changed().await.is_err();
            let state = watcher.updates.borrow_and_update();
            if let Some(answer) = end_answer(&state) {
                return answer;
            }
            if state.attempts > attempts_before {
                return match (&state.last_error, &state.snapshot) {
                    (Some(err), _) => Err(ReadError::Upstream(err.clone())),
                    (None, Some(snapshot)) => Ok(Arc::clone(snapshot)),
                    (None, None) => Err(ReadError::Stopped),
                };
            }
            if closed {
                return Err(ReadError::Stopped);
            }
        }
    }

    /// An answer from the current state alone: a final one, a fresh snapshot, or the
    /// rate limit that forbids asking the upstream now.
    fn answer_now(&self, state: &PollState) -> Option<Result<Arc<Execution>, ReadError>> {
        if let Some(answer) = end_answer(state) {
            return Some(answer);
        }
        if let (Some(not_before), Some(UpstreamError::RateLimited { message, .. })) =
            (state.retry_not_before, &state.last_error)
        {
            let now = Instant::now();
            if not_before > now {
                return Some(Err(ReadError::Upstream(UpstreamError::RateLimited {
                    message: message.clone(),
                    retry_after: Some(not_before - now),
                })));
            }
        }
        let fresh = state
            .confirmed_at
            .is_some_and(|at| at.elapsed() < self.inner.settings.interval);
        match (&state.snapshot, fresh && state.last_error.is_none()) {
            (Some(snapshot), true) => {
                self.inner.metrics.cache_hit(CacheHit::Fresh);
                Some(Ok(Arc::clone(snapshot)))
            }
            _ => None,
        }
    }

    /// Asks every poller of this execution, whatever its key, to fetch now. Returns how
    /// many were asked. For webhooks: they say something happened, not what.
    pub fn refresh_execution(&self, execution_id: &ExecutionId) -> usize {
        let pollers = self.inner.lock_pollers();
        let mut asked = 0;
        for (key, poller) in pollers.iter() {
            if &key.execution_id == execution_id {
                poller.refresh.ask(None);
                asked += 1;
            }
        }
        asked
    }

    /// Number of pollers running now.
    pub fn active_pollers(&self) -> usize {
        self.inner.lock_pollers().len()
    }

    /// How long Synthome has been unreachable (no answer, or only 5xx and unreadable
    /// bodies), judged from the latest requests; `None` while it answers or when nothing
    /// has been asked yet.
    pub fn upstream_failing_for(&self) -> Option<Duration> {
        let since = *self
            .inner
            .upstream_failing_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        since.map(|since| since.elapsed())
    }
}

/// Why a unary read got no snapshot.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Upstream(UpstreamError),
    #[error("Synthome has been failing for {lasted:?}; last error: {last}")]
    Outage {
        lasted: Duration,
        last: UpstreamError,
    },
    #[error("the gateway stopped watching this execution")]
    Stopped,
}

/// The answer a final state gives, if the state is final.
fn end_answer(state: &PollState) -> Option<Result<Arc<Execution>, ReadError>> {
    Some(match state.end.as_ref()? {
        PollEnd::Ended => state.snapshot.clone().ok_or(ReadError::Stopped),
        PollEnd::Refused(err) => Err(ReadError::Upstream(err.clone())),
        PollEnd::Outage { lasted, last } => Err(ReadError::Outage {
            lasted: *lasted,
            last: last.clone(),
        }),
    })
}

/// A watcher of an execution that ended before it was asked about.
fn ended_watcher(snapshot: Arc<Execution>) -> Watcher {
    let (_, updates) = watch::channel(PollState {
        snapshot: Some(snapshot),
        confirmed_at: Some(Instant::now()),
        attempts: 0,
        fetching: false,
        last_error: None,
        retry_not_before: None,
        end: Some(PollEnd::Ended),
    });
    Watcher {
        updates,
        refresh: None,
    }
}

impl Inner {
    fn lock_pollers(&self) -> MutexGuard<'_, HashMap<PollerKey, Arc<PollerHandle>>> {
        self.pollers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A poisoned lock only means a thread panicked mid-update of a map of whole entries.
    fn lock_ended(&self) -> MutexGuard<'_, LruCache<PollerKey, Arc<Execution>>> {
        self.ended.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Any HTTP answer but a 5xx shows that Synthome is up, whatever it says.
    fn note_upstream_health<T>(&self, outcome: &Result<T, UpstreamError>, now: Instant) {
        let down = matches!(
            outcome,
            Err(UpstreamError::Unreachable(_)
                | UpstreamError::TimedOut(_)
                | UpstreamError::ServerError { .. }
                | UpstreamError::Malformed(_))
        );
        let mut since = self
            .upstream_failing_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *since = if down {
            Some(since.unwrap_or(now))
        } else {
            None
        };
    }

    fn next_revision(&self) -> u64 {
        self.next_revision.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// One poller task's state.
struct Poller {
    inner: Arc<Inner>,
    key: PollerKey,
    handle: Arc<PollerHandle>,
    credential: Credential,
    /// The trace context of the call that started the poller, for scheduled requests.
    trace: Option<TraceContext>,
    /// The last snapshot's content, revision cleared, to tell changes from repeats.
    last_content: Option<Execution>,
    /// The delay before the next scheduled poll.
    delay: Duration,
    last_fetch: Option<Instant>,
    /// No fetch before this instant (set by a 429's `Retry-After`).
    not_before: Option<Instant>,
    failing_since: Option<Instant>,
    /// Counts this poller in the `active_pollers` gauge while it lives.
    _running: GaugeGuard,
}

/// What the poller does after a fetch.
enum Next {
    Continue,
    Stop(PollEnd),
}

impl Poller {
    fn new(
        inner: Arc<Inner>,
        key: PollerKey,
        handle: Arc<PollerHandle>,
        credential: Credential,
        trace: Option<TraceContext>,
    ) -> Self {
        let delay = inner.settings.interval;
        let running = inner.metrics.poller_running();
        Self {
            _running: running,
            inner,
            key,
            handle,
            credential,
            trace,
            last_content: None,
            delay,
            last_fetch: None,
            not_before: None,
            failing_since: None,
        }
    }

    async fn run(mut self) {
        debug!("poller started");
        loop {
            if let Next::Stop(end) = self.poll_once().await {
                self.finish(end);
                return;
            }
            if !self.wait_for_next_poll().await {
                debug!("poller stopped: no watchers left");
                return;
            }
        }
    }

    /// Fetches once and publishes what was learned.
    async fn poll_once(&mut self) -> Next {
        let (outcome, took) = {
            let _permit = self.inner.in_flight.acquire().await;
            self.handle.updates.send_if_modified(|state| {
                state.fetching = true;
                false
            });
            let asked_by = self.handle.refresh.take_trace();
            let span = info_span!("upstream_request", execution_id = %self.key.execution_id, otel.kind = "client");
            let trace =
                trace_context::continue_in(&span, asked_by.as_ref().or(self.trace.as_ref()));
            let started = Instant::now();
            let outcome = self
                .inner
                .source
                .fetch_status(&self.credential, &self.key.execution_id, trace.as_ref())
                .instrument(span)
                .await;
            (outcome, started.elapsed())
        };
        let now = Instant::now();
        self.last_fetch = Some(now);
        self.inner.note_upstream_health(&outcome, now);
        let kind = outcome.as_ref().map_or_else(UpstreamError::kind, |_| "ok");
        let audience = self.handle.updates.receiver_count();
        self.inner
            .metrics
            .upstream_request(kind, took.as_secs_f64(), audience);

        match outcome {
            Ok(body) => self.on_snapshot(execution::from_upstream(body), now),
            Err(err) if is_refusal(&err) => Next::Stop(PollEnd::Refused(err)),
            Err(err) => self.on_transient_failure(err, now),
        }
    }

    fn on_snapshot(&mut self, content: Execution, now: Instant) -> Next {
        self.failing_since = None;
        self.not_before = None;
        let changed = self.last_content.as_ref() != Some(&content);
        let ended = is_final(content.state());

        let settings = &self.inner.settings;
        self.delay = if changed {
            settings.interval
        } else {
            (self.delay * 2).min(settings.max_interval)
        };

        let snapshot = changed.then(|| {
            let mut snapshot = content.clone();
            snapshot.revision = self.inner.next_revision();
            Arc::new(snapshot)
        });
        if changed {
            self.last_content = Some(content);
        }
        self.handle.updates.send_modify(|state| {
            if let Some(snapshot) = snapshot {
                state.snapshot = Some(snapshot);
            }
            state.confirmed_at = Some(now);
            state.attempts += 1;
            state.fetching = false;
            state.last_error = None;
            state.retry_not_before = None;
        });
        if ended {
            Next::Stop(PollEnd::Ended)
        } else {
            Next::Continue
        }
    }

    fn on_transient_failure(&mut self, err: UpstreamError, now: Instant) -> Next {
        let first_failure = self.failing_since.is_none();
        let since = *self.failing_since.get_or_insert(now);
        let lasted = now.duration_since(since);
        if lasted >= self.inner.settings.outage_timeout {
            return Next::Stop(PollEnd::Outage { lasted, last: err });
        }
        // One warning per streak of failures; the retries of the streak go to debug.
        if first_failure {
            warn!(execution_id = %self.key.execution_id, error = %err, "upstream poll failed; retrying with backoff");
        } else {
            debug!(error = %err, failing_for = ?lasted, "upstream poll failed again");
        }

        self.delay = (self.delay * 2).min(self.inner.settings.max_interval);
        if let UpstreamError::RateLimited {
            retry_after: Some(wait),
            ..
        } = &err
        {
            // The HTTP client caps it already; other sources are held to the same limit.
            let wait = (*wait).min(MAX_RETRY_AFTER);
            self.delay = self.delay.max(wait);
            self.not_before = Some(now + wait);
        }
        let not_before = self.not_before;
        self.handle.updates.send_modify(|state| {
            state.attempts += 1;
            state.fetching = false;
            state.last_error = Some(err);
            state.retry_not_before = not_before;
        });
        Next::Continue
    }

    /// Waits until the next poll is due, or a refresh is asked for. Returns false when the
    /// poller should stop because nobody has watched it for `linger`.
    async fn wait_for_next_poll(&mut self) -> bool {
        let settings = &self.inner.settings;
        let scheduled = Instant::now() + jitter(self.delay);
        let mut due = self
            .not_before
            .map_or(scheduled, |not_before| scheduled.max(not_before));
        loop {
            if self.handle.updates.receiver_count() == 0 && !self.linger().await {
                return false;
            }
            tokio::select! {
                () = sleep_until(due) => return true,
                () = self.handle.refresh.notify.notified() => {
                    let gap_end = self.last_fetch.map(|at| at + settings.min_refresh_gap);
                    let earliest = gap_end.max(self.not_before).unwrap_or_else(Instant::now);
                    due = due.min(earliest);
                }
                () = self.handle.updates.closed() => {}
            }
        }
    }

    /// Waits up to `linger` with no watchers. Returns false, having left the registry, when
    /// still nobody watches; true when someone came back.
    async fn linger(&self) -> bool {
        let until = Instant::now() + self.inner.settings.linger;
        // A refresh asked for while nobody watches (a webhook) does not end the linger; it is
        // kept for a watcher that comes back.
        let mut asked = false;
        loop {
            tokio::select! {
                () = sleep_until(until) => break,
                () = self.handle.refresh.notify.notified() => {
                    asked = true;
                    if self.handle.updates.receiver_count() > 0 {
                        break;
                    }
                }
            }
        }
        let mut pollers = self.inner.lock_pollers();
        if self.handle.updates.receiver_count() > 0 {
            if asked {
                // Keep the request for the poll loop.
                self.handle.refresh.notify.notify_one();
            }
            return true;
        }
        self.leave(&mut pollers);
        false
    }

    /// Publishes the end and moves a final snapshot to the ended cache. Both happen while
    /// the poller is still registered, so a new watcher finds one or the other.
    fn finish(&self, end: PollEnd) {
        let _pollers = self.inner.lock_pollers();
        if end == PollEnd::Ended
            && let Some(snapshot) = self.handle.updates.borrow().snapshot.clone()
        {
            self.inner.lock_ended().put(self.key.clone(), snapshot);
        }
        match &end {
            PollEnd::Ended => debug!("poller stopped: execution ended"),
            PollEnd::Refused(err) => debug!(error = %err, "poller stopped: upstream refused"),
            PollEnd::Outage { lasted, last } => {
                warn!(execution_id = %self.key.execution_id, ?lasted, error = %last, "poller gave up: upstream outage")
            }
        }
        self.handle.updates.send_modify(|state| {
            state.fetching = false;
            state.end = Some(end);
        });
    }

    fn leave(&self, pollers: &mut HashMap<PollerKey, Arc<PollerHandle>>) {
        if pollers
            .get(&self.key)
            .is_some_and(|current| Arc::ptr_eq(current, &self.handle))
        {
            pollers.remove(&self.key);
        }
    }
}

/// However the task ends (stopped, ended, or unwinding from a panic), the poller leaves the
/// registry, which drops the last sender and so wakes its watchers.
impl Drop for Poller {
    fn drop(&mut self) {
        let mut pollers = self.inner.lock_pollers();
        self.leave(&mut pollers);
    }
}

/// Answers that polling again will not change.
fn is_refusal(err: &UpstreamError) -> bool {
    matches!(
        err,
        UpstreamError::NotFound
            | UpstreamError::Unauthenticated { .. }
            | UpstreamError::PermissionDenied { .. }
            | UpstreamError::Rejected { .. }
    )
}

/// A delay spread by ±10%, so that pollers started together do not poll in lock step.
fn jitter(delay: Duration) -> Duration {
    delay.mul_f64(0.9 + fastrand::f64() * 0.2)
}

#[cfg(test)]
mod tests {
    //! The registry against a scripted source, with tokio's clock paused: every sleep below
    //! advances virtual time at once, and pollers run in between.

    use std::{collections::VecDeque, future::Future, pin::Pin};

    use serde_json::json;
    use tokio::time::sleep;

    use super::*;
    use crate::upstream::StatusBody;

    /// Answers with scripted results, repeating the last one, and counts fetches.
    #[derive(Default)]
    struct ScriptedSource {
        script: Mutex<VecDeque<Result<StatusBody, UpstreamError>>>,
        fetches: AtomicU64,
    }

    impl ScriptedSource {
        fn new(script: Vec<Result<StatusBody, UpstreamError>>) -> Arc<Self> {
            Arc::new(Self {
                script: Mutex::new(script.into()),
                fetches: AtomicU64::new(0),
            })
        }

        fn fetches(&self) -> u64 {
            self.fetches.load(Ordering::SeqCst)
        }

        fn push(&self, next: Result<StatusBody, UpstreamError>) {
            self.script.lock().unwrap().push_back(next);
        }
    }

    impl StatusSource for ScriptedSource {
        fn fetch_status<'a>(
            &'a self,
            _credential: &'a Credential,
            execution_id: &'a ExecutionId,
            _trace: Option<&'a TraceContext>,
        ) -> Pin<Box<dyn Future<Output = Result<StatusBody, UpstreamError>> + Send + 'a>> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let mut script = self.script.lock().unwrap();
            let next = if script.len() > 1 {
                script.pop_front().unwrap()
            } else {
                script.front().cloned().unwrap()
            };
            let next = next.map(|mut body| {
                body.id = execution_id.to_string();
                body
            });
            Box::pin(async move {
                // An upstream round trip takes a little time.
                sleep(Duration::from_millis(10)).await;
                next
            })
        }
    }

    fn body(status: &str, completed_jobs: usize) -> Result<StatusBody, UpstreamError> {
        let jobs: Vec<_> = (0..3)
            .map(|i| {
                let job_status = if i < completed_jobs {
                    "completed"
                } else {
                    "pending"
                };
                json!({"id": format!("job{i}"), "operation": "generate", "status": job_status})
            })
            .collect();
        Ok(serde_json::from_value(json!({"id": "x", "status": status, "jobs": jobs})).unwrap())
    }

    fn settings() -> PollSettings {
        PollSettings {
            interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(8),
            linger: Duration::from_secs(2),
            outage_timeout: Duration::from_secs(30),
            min_refresh_gap: Duration::from_millis(200),
            ..PollSettings::default()
        }
    }

    fn alice() -> Credential {
        Credential::new("sy_test_alice").unwrap()
    }

    fn id(raw: &str) -> ExecutionId {
        ExecutionId::parse(raw).unwrap()
    }

    /// Waits for the next published state whose snapshot revision differs from `seen`.
    async fn next_revision(watcher: &mut Watcher, seen: u64) -> Arc<Execution> {
        loop {
            if let Some(snapshot) = &watcher.updates.borrow_and_update().snapshot
                && snapshot.revision != seen
            {
                return Arc::clone(snapshot);
            }
            watcher.updates.changed().await.expect("poller alive");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn many_watchers_share_one_poller_and_one_request_per_interval() {
        let source = ScriptedSource::new(vec![body("processing", 1)]);
        let registry = Registry::new(source.clone(), settings());
        let watchers: Vec<_> = (0..500)
            .map(|_| registry.watch(&alice(), &id("e1")))
            .collect();
        assert_eq!(registry.active_pollers(), 1);

        // Unchanged snapshots back the poller off: 1 s, 2 s, 4 s, 8 s, 8 s ... (±10%).
        sleep(Duration::from_secs(60)).await;
        let fetches = source.fetches();
        assert!((8..=13).contains(&fetches), "{fetches} fetches in 60 s");
        drop(watchers);
    }

    #[tokio::test(start_paused = true)]
    async fn a_changing_execution_is_polled_every_interval() {
        let script = (0..30).map(|n| body("processing", n % 3)).collect();
        let source = ScriptedSource::new(script);
        let registry = Registry::new(source.clone(), settings());
        let _watcher = registry.watch(&alice(), &id("e1"));

        sleep(Duration::from_secs(10)).await;
        let fetches = source.fetches();
        assert!((10..=12).contains(&fetches), "{fetches} fetches in 10 s");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_snapshot_comes_without_waiting_for_an_interval() {
        let source = ScriptedSource::new(vec![body("processing", 0)]);
        let registry = Registry::new(source, settings());
        let mut watcher = registry.watch(&alice(), &id("e1"));

        let started = Instant::now();
        let first = next_revision(&mut watcher, 0).await;
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(first.revision > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn revisions_grow_only_when_something_changes() {
        let source = ScriptedSource::new(vec![
            body("processing", 0),
            body("processing", 0),
            body("processing", 1),
            body("completed", 3),
        ]);
        let registry = Registry::new(source.clone(), settings());
        let mut watcher = registry.watch(&alice(), &id("e1"));

        let first = next_revision(&mut watcher, 0).await;
        let second = next_revision(&mut watcher, first.revision).await;
        let third = next_revision(&mut watcher, second.revision).await;
        assert!(first.revision < second.revision && second.revision < third.revision);
        assert_eq!(second.progress.as_ref().unwrap().completed_jobs, 1);
        assert!(is_final(third.state()));
        assert_eq!(
            source.fetches(),
            4,
            "the repeat was fetched but not published"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_ended_execution_stops_its_poller_and_is_served_from_the_cache() {
        let source = ScriptedSource::new(vec![body("completed", 3)]);
        let registry = Registry::new(source.clone(), settings());
        let mut watcher = registry.watch(&alice(), &id("e1"));
        next_revision(&mut watcher, 0).await;
        watcher
            .updates
            .changed()
            .await
            .expect_err("the poller is gone");
        assert_eq!(watcher.updates.borrow().end, Some(PollEnd::Ended));
        assert_eq!(registry.active_pollers(), 0);

        let again = registry.get(&alice(), &id("e1")).await.unwrap();
        assert!(is_final(again.state()));
        assert_eq!(source.fetches(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_poller_stops_after_its_last_watcher_lingered_away() {
        let source = ScriptedSource::new(vec![body("processing", 0)]);
        let registry = Registry::new(source.clone(), settings());
        let mut watcher = registry.watch(&alice(), &id("e1"));
        next_revision(&mut watcher, 0).await;
        drop(watcher);

        sleep(Duration::from_millis(1500)).await;
        assert_eq!(registry.active_pollers(), 1, "still lingering");
        sleep(Duration::from_secs(1)).await;
        assert_eq!(registry.active_pollers(), 0);
        let fetches = source.fetches();
        sleep(Duration::from_secs(30)).await;
        assert_eq!(source.fetches(), fetches, "no polls after stopping");
    }

    #[tokio::test(start_paused = true)]
    async fn a_watcher_returning_within_the_linger_keeps_the_poller() {
        let source = ScriptedSource::new(vec![body("processing", 0)]);
        let registry = Registry::new(source, settings());
        drop(registry.watch(&alice(), &id("e1")));
        sleep(Duration::from_secs(1)).await;
        let _back = registry.watch(&alice(), &id("e1"));
        sleep(Duration::from_secs(10)).await;
        assert_eq!(registry.active_pollers(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_webhook_during_the_linger_does_not_cut_it_short() {
        let source = ScriptedSource::new(vec![body("processing", 0)]);
        let registry = Registry::new(source.clone(), settings());
        let mut watcher = registry.watch(&alice(), &id("e1"));
        next_revision(&mut watcher, 0).await;
        drop(watcher);

        sleep(Duration::from_millis(500)).await;
        assert_eq!(registry.refresh_execution(&id("e1")), 1);
        sleep(Duration::from_millis(500)).await;
        assert_eq!(registry.active_pollers(), 1, "still lingering");

        // A reader back within the linger finds the poller, and its snapshot.
        let fetches = source.fetches();
        let mut back = registry.watch(&alice(), &id("e1"));
        assert!(back.updates.borrow_and_update().snapshot.is_some());
        sleep(Duration::from_secs(3)).await;
        assert_eq!(registry.active_pollers(), 1);
        assert!(source.fetches() > fetches, "polling resumed");
    }

    #[tokio::test(start_paused = true)]
    async fn two_credentials_never_share_a_poller() {
        let source = ScriptedSource::new(vec![body("processing", 0)]);
        let registry = Registry::new(source, settings());
        let bob = Credential::new("sy_test_bob").unwrap();
        let _a = registry.watch(&alice(), &id("e1"));
        let _b = registry.watch(&bob, &id("e1"));
        assert_eq!(registry.active_pollers(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_end_the_poller_with_the_error() {
        let source = ScriptedSource::new(vec![Err(UpstreamError::NotFound)]);
        let registry = Registry::new(source.clone(), settings());
        let error = registry.get(&alice(), &id("e1")).await.unwrap_err();
        assert_eq!(error, ReadError::Upstream(UpstreamError::NotFound));
        sleep(Duration::from_secs(10)).await;
        assert_eq!(source.fetches(), 1);
        assert_eq!(registry.active_pollers(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_outage_is_ridden_out_and_a_long_one_ends_the_watch() {
        let outage = || {
            Err(UpstreamError::ServerError {
                status: 503,
                message: "down".into(),
            })
        };
        let source = ScriptedSource::new(vec![body("processing", 0), outage(), outage()]);
        source.push(body("processing", 1));
        let registry = Registry::new(source.clone(), settings());
        let mut watcher = registry.watch(&alice(), &id("e1"));
        let first = next_revision(&mut watcher, 0).await;
        let recovered = next_revision(&mut watcher, first.revision).await;
        assert_eq!(recovered.progress.as_ref().unwrap().completed_jobs, 1);
        assert!(watcher.updates.borrow().end.is_none());

        let source = ScriptedSource::new(vec![body("processing", 0), outage()]);
        let registry = Registry::new(source, settings());
        let mut watcher = registry.watch(&alice(), &id("e2"));
        let started = Instant::now();
        while watcher.updates.changed().await.is_ok() {}
        let end = watcher.updates.borrow().end.clone();
        assert!(matches!(end, Some(PollEnd::Outage { .. })), "{end:?}");
        assert!(started.elapsed() >= Duration::from_secs(30));
        assert!(started.elapsed() < Duration::from_secs(45));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_is_waited_out_even_when_refreshes_are_asked_for() {
        let limited = Err(UpstreamError::RateLimited {
            message: "slow down".into(),
            retry_after: Some(Duration::from_secs(20)),
        });
        let source = ScriptedSource::new(vec![body("processing", 0), limited]);
        source.push(body("processing", 2));
        let registry = Registry::new(source.clone(), settings());
        let mut watcher = registry.watch(&alice(), &id("e1"));
        next_revision(&mut watcher, 0).await;
        sleep(Duration::from_millis(1200)).await;
        assert_eq!(source.fetches(), 2, "the second fetch was rate limited");

        for _ in 0..10 {
            registry.refresh_execution(&id("e1"));
            sleep(Duration::from_secs(1)).await;
        }
        sleep(Duration::from_secs(9)).await;
        assert_eq!(
            source.fetches(),
            2,
            "Retry-After (20 s from about 1 s) holds"
        );
        sleep(Duration::from_secs(3)).await;
        assert!(
            source.fetches() >= 3,
            "polling resumes within the jittered back-off"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_during_a_rate_limit_is_told_at_once_without_a_request() {
        let limited = Err(UpstreamError::RateLimited {
            message: "slow down".into(),
            retry_after: Some(Duration::from_secs(20)),
        });
        let source = ScriptedSource::new(vec![limited]);
        let registry = Registry::new(source.clone(), settings());
        let _watcher = registry.watch(&alice(), &id("e1"));
        sleep(Duration::from_secs(5)).await;

        let started = Instant::now();
        let error = registry.get(&alice(), &id("e1")).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::ZERO);
        let ReadError::Upstream(UpstreamError::RateLimited { retry_after, .. }) = error else {
            panic!("{error:?}");
        };
        let left = retry_after.unwrap();
        assert!(
            left > Duration::from_secs(14) && left < Duration::from_secs(16),
            "{left:?}"
        );
        assert_eq!(source.fetches(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurd_retry_after_is_a_rate_limit_not_a_crash() {
        let limited = Err(UpstreamError::RateLimited {
            message: "slow down".into(),
            retry_after: Some(Duration::from_secs(u64::MAX)),
        });
        let source = ScriptedSource::new(vec![limited]);
        let registry = Registry::new(source.clone(), settings());
        let error = registry.get(&alice(), &id("e1")).await.unwrap_err();
        assert!(
            matches!(
                error,
                ReadError::Upstream(UpstreamError::RateLimited { .. })
            ),
            "{error:?}"
        );
        let again = registry.get(&alice(), &id("e1")).await.unwrap_err();
        assert!(
            matches!(
                again,
                ReadError::Upstream(UpstreamError::RateLimited { .. })
            ),
            "{again:?}"
        );
        assert_eq!(source.fetches(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_reads_share_one_fetch_and_fresh_snapshots_are_reused() {
        let source = ScriptedSource::new(vec![body("processing", 0)]);
        let registry = Registry::new(source.clone(), settings());
        let reads = (0..50).map(|_| {
            let registry = registry.clone();
            tokio::spawn(async move { registry.get(&alice(), &id("e1")).await })
        });
        for read in reads {
            read.await.unwrap().unwrap();
        }
        assert_eq!(source.fetches(), 1);

        registry.get(&alice(), &id("e1")).await.unwrap();
        assert_eq!(
            source.fetches(),
            1,
            "a snapshot younger than the interval is reused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_during_a_fetch_is_answered_by_it_and_asks_for_no_other() {
        let source = ScriptedSource::new(vec![body("processing", 0)]);
        let registry = Registry::new(source.clone(), settings());
        let _watcher = registry.watch(&alice(), &id("e1"));
        // Unchanged polls back off to the 8 s ceiling; wait for a scheduled fetch to begin.
        sleep(Duration::from_secs(20)).await;
        let before = source.fetches();
        while source.fetches() == before {
            sleep(Duration::from_millis(1)).await;
        }

        registry.get(&alice(), &id("e1")).await.unwrap();
        assert_eq!(
            source.fetches(),
            before + 1,
            "answered by the fetch in flight"
        );
        sleep(Duration::from_secs(2)).await;
        assert_eq!(
            source.fetches(),
            before + 1,
            "no second fetch for a read that the first one answered"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_snapshot_is_refreshed_for_a_read() {
        let source = ScriptedSource::new(vec![body("processing", 0)]);
        let registry = Registry::new(source.clone(), settings());
        let _watcher = registry.watch(&alice(), &id("e1"));
        // Unchanged polls back off to the 8 s ceiling.
        sleep(Duration::from_secs(20)).await;
        let fetches = source.fetches();
        sleep(Duration::from_millis(1500)).await;

        let started = Instant::now();
        registry.get(&alice(), &id("e1")).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(100));
        assert_eq!(source.fetches(), fetches + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_webhook_refresh_fetches_at_once_for_every_key_but_rate_limited() {
        let source = ScriptedSource::new(vec![body("processing", 0)]);
        let registry = Registry::new(source.clone(), settings());
        let bob = Credential::new("sy_test_bob").unwrap();
        let _a = registry.watch(&alice(), &id("e1"));
        let _b = registry.watch(&bob, &id("e1"));
        let _other = registry.watch(&alice(), &id("e2"));
        sleep(Duration::from_millis(500)).await;
        assert_eq!(source.fetches(), 3);

        assert_eq!(registry.refresh_execution(&id("e1")), 2);
        sleep(Duration::from_millis(50)).await;
        assert_eq!(source.fetches(), 5);

        // A burst of duplicates costs at most one fetch per gap.
        for _ in 0..20 {
            registry.refresh_execution(&id("e1"));
        }
        sleep(Duration::from_millis(250)).await;
        assert_eq!(source.fetches(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_watcher_hears_when_its_poller_dies() {
        struct Panicking;
        impl StatusSource for Panicking {
            fn fetch_status<'a>(
                &'a self,
                _: &'a Credential,
                _: &'a ExecutionId,
                _: Option<&'a TraceContext>,
            ) -> Pin<Box<dyn Future<Output = Result<StatusBody, UpstreamError>> + Send + 'a>>
            {
                Box::pin(async { panic!("a bug in a source") })
            }
        }
        let registry = Registry::new(Arc::new(Panicking), settings());
        let mut watcher = registry.watch(&alice(), &id("e1"));
        assert!(watcher.updates.changed().await.is_err());
        assert_eq!(registry.active_pollers(), 0);
        assert_eq!(
            registry.get(&alice(), &id("e1")).await,
            Err(ReadError::Stopped)
        );
    }
}
