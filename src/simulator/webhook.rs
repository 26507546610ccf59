//! Webhook delivery: one task per execution that asked for a webhook.
//!
//! The task sleeps until the execution's end instant (known at creation, see
//! `engine`), POSTs the end-of-execution body and, with a `webhookSecret`, signs it
//! as `X-Webhook-Signature: sha256=<hex HMAC-SHA256 of the raw body>`, the form the
//! real service sends. A failed delivery (transport error or non-2xx answer) is
//! retried up to five times, `RETRY_DELAY` apart scaled by `time_scale`, echoing the
//! real service's 30-second retry worker. Tasks end when the simulator is dropped.
//!
//! Limits: deliveries are never duplicated on purpose, and per-job webhooks are not
//! sent. Logs name the execution and the receiving host, never the full URL (it
//! may carry credentials) nor the secret.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::watch;
use tracing::{Instrument, debug, info_span, warn};

use super::engine::Execution;
use super::model::WebhookTarget;

/// One first attempt plus five retries.
const MAX_ATTEMPTS: u32 = 6;

/// Delay between attempts before `time_scale`, as the real retry worker's period.
const RETRY_DELAY: Duration = Duration::from_secs(30);

/// Floor of the scaled retry delay, so a tiny `time_scale` cannot hammer a receiver.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(50);

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Header carrying the signature, as the service's code names it.
pub(crate) const SIGNATURE_HEADER: &str = "X-Webhook-Signature";

/// Schedules deliveries; shared by every execution of one simulator.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    /// `None` when the HTTP client could not be built; webhooks are then skipped.
    client: Option<reqwest::Client>,
    retry_delay: Duration,
    /// Never sent on; dropping it with the simulator tells every task to stop.
    alive: watch::Sender<()>,
}

impl Dispatcher {
    pub(crate) fn new(time_scale: f64) -> Self {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REQUEST_TIMEOUT)
            .build()
            .inspect_err(|err| {
                tracing::error!(error = %err, "cannot build webhook client; webhooks disabled");
            })
            .ok();
        let retry_delay = Duration::try_from_secs_f64(RETRY_DELAY.as_secs_f64() * time_scale)
            .unwrap_or(RETRY_DELAY)
            .max(MIN_RETRY_DELAY);

        Self {
            client,
            retry_delay,
            alive: watch::Sender::new(()),
        }
    }

    /// Starts the delivery task of `execution`. Outside a Tokio runtime there is
    /// nowhere to run it, so the webhook is skipped with a warning.
    pub(crate) fn schedule(&self, execution: Arc<Execution>, target: WebhookTarget) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!(execution_id = %execution.id, "no Tokio runtime; webhook skipped");
            return;
        };

        let span = info_span!(
            "webhook",
            execution_id = %execution.id,
            host = target.url.host_str().unwrap_or_default(),
        );
        let delivery = Delivery {
            client,
            execution,
            target,
            retry_delay: self.retry_delay,
            alive: self.alive.subscribe(),
        };
        runtime.spawn(delivery.run().instrument(span));
    }
}

struct Delivery {
    client: reqwest::Client,
    execution: Arc<Execution>,
    target: WebhookTarget,
    retry_delay: Duration,
    alive: watch::Receiver<()>,
}

impl Delivery {
    async fn run(mut self) {
        let end = self.execution.finishes_at();
        if !self.wait(tokio::time::sleep_until(end)).await {
            return;
        }

        let body = serde_json::to_vec(&self.execution.webhook_body())
            .expect("a body of strings and JSON values always serializes");
        let signature = self
            .target
            .secret
            .as_deref()
            .map(|secret| sign(secret, &body));

        for attempt in 1..=MAX_ATTEMPTS {
            match self.post(&body, signature.as_deref()).await {
                Ok(()) => {
                    debug!(attempt, "webhook delivered");
                    return;
                }
                Err(error) => warn!(attempt, %error, "webhook delivery failed"),
            }
            if attempt < MAX_ATTEMPTS && !self.wait(tokio::time::sleep(self.retry_delay)).await {
                return;
            }
        }
        warn!(attempts = MAX_ATTEMPTS, "webhook abandoned");
    }

    /// Waits for `timer`; false when the simulator went away first.
    async fn wait(&mut self, timer: tokio::time::Sleep) -> bool {
        tokio::select! {
            () = timer => true,
            _ = self.alive.changed() => false,
        }
    }

    async fn post(&self, body: &[u8], signature: Option<&str>) -> Result<(), DeliveryError> {
        let mut request = self
            .client
            .post(self.target.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(signature) = signature {
            request = request.header(SIGNATURE_HEADER, signature);
        }

        let response = request
            .send()
            .await
            .map_err(|err| DeliveryError::Transport(err.without_url()))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(DeliveryError::Rejected(response.status()))
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error("transport: {0}")]
    Transport(reqwest::Error),
    #[error("receiver answered {0}")]
    Rejected(reqwest::StatusCode),
}

/// `sha256=<lowercase hex HMAC-SHA256 of body under secret>`.
pub(crate) fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_rfc_4231_case_2() {
        let signature = sign("Jefe", b"what do ya want for nothing?");
        assert_eq!(
            signature,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
