//! The operations HTTP listener (`--admin-listen`): Synthome's webhooks today.
//!
//! It is a separate listener from gRPC so that it can be bound to an internal address and
//! kept out of the client-facing load balancer.

use std::future::Future;

use axum::Router;
use tokio::net::TcpListener;
use tracing::info;

use crate::{
    registry::Registry,
    webhook::{self, WebhookSecret},
};

/// Every route of the operations listener.
pub fn router(registry: Registry, webhook_secret: Option<WebhookSecret>) -> Router {
    webhook::router(registry, webhook_secret)
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
