//! Synthome's webhooks: `POST /webhooks/synthome` on the operations listener.
//!
//! A webhook only says that an execution probably changed; it is a hint to refresh, never
//! the truth. Synthome retries deliveries for minutes, so webhooks arrive late, twice or not
//! at all: the status endpoint stays the source of every snapshot, and a webhook merely makes
//! every poller of that execution id (whatever its key) fetch now. Pollers rate limit these
//! refreshes themselves, so a burst of duplicates costs at most one upstream request per
//! `--min-refresh-interval` per poller.
//!
//! Authentication: with a secret configured, the body must carry an HMAC-SHA256 signature
//! under it, either as Synthome's code sends it (`X-Webhook-Signature: sha256=<hex>`) or as
//! its public guide shows (`x-synthome-signature: <hex>`). The comparison is constant-time
//! (`Mac::verify_slice`). A missing or bad signature gets 401 and changes nothing. Without a
//! secret every webhook is accepted, which is safe only because a webhook can do no more
//! than cause an early poll.

use std::fmt;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;
use tracing::{debug, warn};

use crate::{execution_id::ExecutionId, metrics::WebhookResult, registry::Registry};

/// The largest webhook body accepted. Synthome's bodies are a few hundred bytes plus the
/// execution's result.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// The webhook signing secret. Never printed.
#[derive(Clone)]
pub struct WebhookSecret(Vec<u8>);

impl WebhookSecret {
    /// `None` for an empty secret.
    pub fn new(secret: &str) -> Option<Self> {
        (!secret.is_empty()).then(|| Self(secret.as_bytes().to_vec()))
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }

    /// Whether `signature` (hex, with or without a `sha256=` prefix) signs `body`.
    pub(crate) fn verifies(&self, body: &[u8], signature: &str) -> bool {
        let hex_digest = signature.trim().trim_start_matches("sha256=");
        let Ok(digest) = hex::decode(hex_digest) else {
            return false;
        };
        let mut mac = self.mac();
        mac.update(body);
        mac.verify_slice(&digest).is_ok()
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

#[derive(Debug, Clone)]
struct WebhookState {
    registry: Registry,
    secret: Option<WebhookSecret>,
}

/// The webhook route, to be merged into the operations router.
pub fn router(registry: Registry, secret: Option<WebhookSecret>) -> Router {
    if secret.is_none() {
        warn!("no webhook secret: webhooks are accepted unsigned (they can only trigger polls)");
    }
    Router::new()
        .route("/webhooks/synthome", post(receive))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(WebhookState { registry, secret })
}

/// The part of a webhook body the gateway reads; both the execution and the job webhooks
/// carry `executionId`.
#[derive(Deserialize)]
struct WebhookBody {
    #[serde(rename = "executionId")]
    execution_id: String,
}

async fn receive(
    State(state): State<WebhookState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let metrics = state.registry.metrics();
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let result = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                WebhookResult::TooLarge
            } else {
                WebhookResult::Malformed
            };
            metrics.webhook(result);
            debug!(status = %rejection.status(), "webhook refused: body not read");
            return rejection.into_response();
        }
    };
    if let Some(secret) = &state.secret {
        let signature = headers
            .get("x-webhook-signature")
            .or_else(|| headers.get("x-synthome-signature"))
            .and_then(|value| value.to_str().ok());
        let valid = signature.is_some_and(|signature| secret.verifies(&body, signature));
        if !valid {
            warn!(
                signed = signature.is_some(),
                "webhook refused: bad or missing signature"
            );
            metrics.webhook(WebhookResult::BadSignature);
            return refuse(
                StatusCode::UNAUTHORIZED,
                "missing or invalid webhook signature",
            );
        }
    }

    let Ok(parsed) = serde_json::from_slice::<WebhookBody>(&body) else {
        debug!("webhook refused: body is not a Synthome webhook");
        metrics.webhook(WebhookResult::Malformed);
        return refuse(
            StatusCode::BAD_REQUEST,
            "body must be JSON with an executionId",
        );
    };
    let Ok(execution_id) = ExecutionId::parse(&parsed.execution_id) else {
        debug!("webhook refused: malformed executionId");
        metrics.webhook(WebhookResult::Malformed);
        return refuse(
            StatusCode::BAD_REQUEST,
            "executionId is not a valid execution id",
        );
    };

    let refreshed = state.registry.refresh_execution(&execution_id);
    metrics.webhook(WebhookResult::Accepted);
    debug!(%execution_id, refreshed, "webhook received");
    (StatusCode::OK, Json(json!({"refreshedPollers": refreshed}))).into_response()
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, body: &[u8]) -> String {
        let mut mac = WebhookSecret::new(secret).unwrap().mac();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn accepts_both_signature_forms_and_nothing_else() {
        let secret = WebhookSecret::new("whsec_test").unwrap();
        let body = br#"{"executionId":"exec_1","status":"completed"}"#;
        let digest = sign("whsec_test", body);

        assert!(secret.verifies(body, &format!("sha256={digest}")));
        assert!(secret.verifies(body, &digest));
        assert!(!secret.verifies(b"{}", &digest), "another body");
        assert!(
            !secret.verifies(body, &sign("other", body)),
            "another secret"
        );
        assert!(!secret.verifies(body, "sha256=zz"), "not hex");
        assert!(!secret.verifies(body, &digest[..32]), "truncated");
    }

    #[test]
    fn the_secret_is_never_printed() {
        let secret = WebhookSecret::new("whsec_test").unwrap();
        assert!(!format!("{secret:?}").contains("whsec"));
    }
}
