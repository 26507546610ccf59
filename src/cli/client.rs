//! What every command-line client of the gateway shares: where the gateway is, which key
//! to send, and how a call carries that key.
//!
//! The key travels as `authorization: Bearer <key>` metadata, the way the contract asks;
//! without one the gateway falls back to its own key. The key never appears in an error
//! message this module builds.
//!
//! TLS: an `https://` address, or any of the `--tls-*` flags, makes the connection use TLS,
//! verified against `--tls-ca` (else the system's roots); `--tls-cert` and `--tls-key`
//! present a client certificate for mutual TLS.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::proto::execution_status_service_client::ExecutionStatusServiceClient;

/// How long the clients try to connect before giving up: a gateway that silently drops
/// connection attempts would otherwise hold them for the system's TCP timeout (minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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

    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// TLS settings of the clients.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientTlsArgs {
    /// PEM CA certificate to verify the gateway's certificate with.
    #[arg(long, env = "SYNTHOME_GATEWAY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate, for a gateway that requires mutual TLS (with --tls-key).
    #[arg(
        long = "tls-cert",
        env = "SYNTHOME_GATEWAY_CLIENT_TLS_CERT",
        requires = "client_tls_key"
    )]
    pub client_tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(
        long = "tls-key",
        env = "SYNTHOME_GATEWAY_CLIENT_TLS_KEY",
        requires = "client_tls_cert"
    )]
    pub client_tls_key: Option<PathBuf>,

    /// Name to verify the gateway's certificate against, when it differs from the address's
    /// host.
    #[arg(long, env = "SYNTHOME_GATEWAY_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
}

impl ClientTlsArgs {
    /// The TLS configuration, or `None` for plaintext.
    fn config(&self, addr: &str) -> Result<Option<ClientTlsConfig>, ClientError> {
        let wanted = addr.starts_with("https://")
            || self.tls_ca.is_some()
            || self.client_tls_cert.is_some()
            || self.tls_domain.is_some();
        if !wanted {
            return Ok(None);
        }
        let mut config = ClientTlsConfig::new();
        match &self.tls_ca {
            Some(path) => config = config.ca_certificate(Certificate::from_pem(read(path)?)),
            None => config = config.with_native_roots(),
        }
        if let (Some(cert), Some(key)) = (&self.client_tls_cert, &self.client_tls_key) {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(domain) = &self.tls_domain {
            config = config.domain_name(domain.clone());
        }
        Ok(Some(config))
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::Read {
        path: path.clone(),
        source,
    })
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
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS settings for {addr}: {source}")]
    Tls {
        addr: String,
        source: tonic::transport::Error,
    },
}

impl GatewayArgs {
    /// A plaintext connection to `addr` with no key of its own, as in-process clients use.
    pub fn plaintext(addr: String) -> Self {
        Self {
            addr,
            api_key: None,
            tls: ClientTlsArgs::default(),
        }
    }

    /// A client on one connection to `--addr`, connected now so an unreachable gateway is
    /// reported before the first call.
    pub async fn connect(&self) -> Result<ExecutionStatusServiceClient<Channel>, ClientError> {
        Ok(ExecutionStatusServiceClient::new(self.channel().await?))
    }

    /// One connection to `--addr`, with TLS when asked for, connected now.
    pub async fn channel(&self) -> Result<Channel, ClientError> {
        let tls = self.tls.config(&self.addr)?;
        // tonic speaks TLS only to an `https://` URI, whatever TLS settings it is given: a
        // `--tls-*` flag with an `http://` address would otherwise send the call, key
        // included, in plaintext.
        let uri = match (&tls, self.addr.strip_prefix("http://")) {
            (Some(_), Some(rest)) => format!("https://{rest}"),
            _ => self.addr.clone(),
        };
        let mut endpoint = Endpoint::from_shared(uri).map_err(|_| ClientError::Address {
            addr: self.addr.clone(),
        })?;
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|source| ClientError::Tls {
                    addr: self.addr.clone(),
                    source,
                })?;
        }
        endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(|source| ClientError::Unreachable {
                addr: self.addr.clone(),
                source,
            })
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
