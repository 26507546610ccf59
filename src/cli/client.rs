//! What every command-line client of the gateway shares: where the gateway is, which key
//! to send, and how a call carries that key.
//!
//! The key travels as `authorization: Bearer <key>` metadata, the way the contract asks;
//! without one the gateway falls back to its own key. The key never appears in an error
//! message this module builds.

use clap::Args;
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};

use crate::proto::execution_status_service_client::ExecutionStatusServiceClient;

/// The `--addr` and `--api-key` flags of the clients.
#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// The gateway to ask.
    #[arg(
        long,
        env = "SYNTHOME_GATEWAY_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub addr: String,

    /// API key to send as `authorization: Bearer` metadata; without it the gateway uses its own.
    #[arg(long, env = "SYNTHOME_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// Why a client could not make its call; the text names the gateway, never the key.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{addr:?} is not a gateway address such as http://127.0.0.1:50051")]
    Address { addr: String },
    #[error("cannot reach the gateway at {addr}: {source}")]
    Unreachable {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("the API key contains characters that cannot be sent as metadata")]
    KeyNotSendable,
}

impl GatewayArgs {
    /// A client on one connection to `--addr`, connected now so an unreachable gateway is
    /// reported before the first call.
    pub async fn connect(&self) -> Result<ExecutionStatusServiceClient<Channel>, ClientError> {
        let endpoint =
            Endpoint::from_shared(self.addr.clone()).map_err(|_| ClientError::Address {
                addr: self.addr.clone(),
            })?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Unreachable {
                addr: self.addr.clone(),
                source,
            })?;
        Ok(ExecutionStatusServiceClient::new(channel))
    }

    /// `message` as a call carrying `--api-key`, when one was given.
    pub fn request<T>(&self, message: T) -> Result<Request<T>, ClientError> {
        let mut request = Request::new(message);
        if let Some(key) = &self.api_key {
            let value = MetadataValue::try_from(format!("Bearer {key}"))
                .map_err(|_| ClientError::KeyNotSendable)?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}
