//! Whether this gateway should get traffic: `grpc.health.v1.Health` for gRPC-aware load
//! balancers and probes, and the same answer for the plain HTTP `/readyz`.
//!
//! Both the whole server (`""`) and `synthome.status.v1.ExecutionStatusService` report
//! NOT_SERVING while Synthome has been unreachable for longer than `unhealthy_after` (no
//! answer, or only 5xx and unreadable bodies, judged from the pollers' own requests), and
//! from the moment the gateway starts draining. An unreachable upstream is a reason to send
//! traffic elsewhere only if other replicas fare better, which is why the threshold exists.
//!
//! Limit: the upstream is judged from real traffic only; a gateway that has had no calls
//! reports SERVING, having nothing against it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tonic_health::{
    ServingStatus,
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};
use tracing::{info, warn};

use crate::registry::Registry;

/// The gRPC service name health is reported for, besides the whole server (`""`).
pub const SERVICE_NAME: &str = "synthome.status.v1.ExecutionStatusService";

/// How often the upstream's state is looked at.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The gateway's serving state, shared by the gRPC health service and `/readyz`.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    serving: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
    /// Serialises changes of the reported status, so that a change decided just before a
    /// drain cannot land after the drain's NOT_SERVING.
    changing: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("serving", &self.is_serving())
            .field("draining", &self.draining.load(Ordering::Relaxed))
            .finish()
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// The serving state. The gRPC services are declared SERVING by [`Health::start`] once
    /// the server runs.
    pub fn new() -> Self {
        Self {
            reporter: HealthReporter::new(),
            serving: Arc::new(AtomicBool::new(true)),
            draining: Arc::new(AtomicBool::new(false)),
            changing: Arc::default(),
        }
    }

    /// The `grpc.health.v1.Health` service answering from this state.
    pub fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
    }

    /// Declares both services SERVING.
    pub async fn start(&self) {
        self.set(true).await;
    }

    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    /// Turns NOT_SERVING for good: the gateway is shutting down.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.set(false).await;
    }

    /// Follows the upstream's state until the gateway drains.
    pub async fn monitor_upstream(self, registry: Registry, unhealthy_after: Duration) {
        let mut ticks = tokio::time::interval(CHECK_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if self.draining.load(Ordering::Relaxed) {
                return;
            }
            let failing_for = registry.upstream_failing_for();
            let healthy = failing_for.is_none_or(|lasted| lasted < unhealthy_after);
            if healthy != self.is_serving() {
                match failing_for {
                    Some(lasted) if !healthy => {
                        warn!(failing_for = ?lasted, "Synthome unreachable: reporting NOT_SERVING")
                    }
                    _ => info!("Synthome reachable again: reporting SERVING"),
                }
                self.set(healthy).await;
            }
        }
    }

    /// Once draining, nothing turns the gateway SERVING again.
    async fn set(&self, serving: bool) {
        let _changing = self.changing.lock().await;
        let serving = serving && !self.draining.load(Ordering::SeqCst);
        self.serving.store(serving, Ordering::Relaxed);
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(SERVICE_NAME, status).await;
    }
}
