//! The operations HTTP listener (`--admin-listen`): Synthome's webhooks and plain HTTP
//! probes and metrics. `GET /metrics` serves Prometheus text (see `crate::metrics`); `/healthz` answers 200 while the process runs (liveness); `/readyz` answers 200
//! while the gateway should get traffic and 503 while it should not (Synthome unreachable
//! past the threshold, or draining), the same state gRPC health reports.
//!
//! It is a separate listener from gRPC so that it can be bound to an internal address and
//! kept out of the client-facing load balancer.

use std::future::Future;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;
use tracing::info;

use crate::{
    health::Health,
    metrics::{self, Metrics},
    registry::Registry,
    webhook::{self, WebhookSecret},
};

/// Every route of the operations listener.
pub fn router(registry: Registry, health: Health, webhook_secret: Option<WebhookSecret>) -> Router {
    let probes = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(health);
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .with_state(registry.metrics().clone());
    webhook::router(registry, webhook_secret)
        .merge(probes)
        .merge(metrics)
}

async fn metrics(State(metrics): State<Metrics>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics.encode(),
    )
}

async fn ready(State(health): State<Health>) -> (StatusCode, &'static str) {
    if health.is_serving() {
        (StatusCode::OK, "serving\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not serving\n")
    }
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "operations HTTP listening");
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
