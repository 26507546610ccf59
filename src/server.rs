//! Builds the gRPC server and runs it until shutdown.
//!
//! HTTP/2 settings: watchers open many long-lived streams on few connections. hyper's
//! default of 200 concurrent streams per connection and the 64 KiB connection window are
//! both far too small for that (with the default window, a client opening thousands of
//! streams on one connection is sent GOAWAY), so both are raised.
//!
//! Shutdown: graceful shutdown in hyper waits for every open stream, and a watch stream
//! only ends when its execution does. So when the shutdown signal comes, open watches are
//! told to end first (with UNAVAILABLE, so clients reconnect elsewhere), then the server
//! stops.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tracing::info;

use crate::{
    credential::Credential,
    proto::execution_status_service_server::ExecutionStatusServiceServer,
    registry::{PollSettings, Registry},
    service::ExecutionStatusApi,
    upstream::StatusSource,
};

/// Connection-level HTTP/2 receive window.
const CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;

/// What the gateway needs besides its upstream.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// Used for calls that bring no `authorization` metadata of their own.
    pub fallback_credential: Option<Credential>,
    pub poll: PollSettings,
    /// Quiet time after which a watch stream repeats its snapshot as a heartbeat.
    pub heartbeat_interval: Duration,
    /// HTTP/2 streams one client connection may have open at once.
    pub max_concurrent_streams_per_connection: u32,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            fallback_credential: None,
            poll: PollSettings::default(),
            heartbeat_interval: Duration::from_secs(15),
            max_concurrent_streams_per_connection: 20_000,
        }
    }
}

/// The gateway's gRPC services, ready to serve.
#[derive(Debug)]
pub struct Gateway {
    api: ExecutionStatusApi,
    registry: Registry,
    draining: watch::Sender<bool>,
    max_concurrent_streams: u32,
}

impl Gateway {
    pub fn new(source: Arc<dyn StatusSource>, settings: GatewaySettings) -> Self {
        let registry = Registry::new(source, settings.poll);
        let (draining, draining_receiver) = watch::channel(false);
        let api = ExecutionStatusApi::new(
            registry.clone(),
            settings.fallback_credential,
            settings.heartbeat_interval,
            draining_receiver,
        );
        Self {
            api,
            registry,
            draining,
            max_concurrent_streams: settings.max_concurrent_streams_per_connection,
        }
    }

    /// The registry of pollers, for the webhook listener and for statistics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Serves on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "gRPC listening");
        }
        let draining = self.draining;
        let drain_then_stop = async move {
            shutdown.await;
            info!("draining: ending open watch streams");
            draining.send_replace(true);
        };
        Server::builder()
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_concurrent_streams(self.max_concurrent_streams)
            .add_service(ExecutionStatusServiceServer::new(self.api))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), drain_then_stop)
            .await
    }

    /// Binds 127.0.0.1 on a free port and serves in the background until the returned
    /// handle is dropped. For tests and the demo.
    pub async fn spawn(self) -> io::Result<RunningGateway> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let registry = self.registry.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(self.serve(listener, async {
            let _ = stopped.await;
        }));
        Ok(RunningGateway {
            addr,
            registry,
            stop: Some(stop),
            task,
        })
    }
}

/// A gateway serving in the background; dropping it shuts the server down.
#[derive(Debug)]
pub struct RunningGateway {
    pub addr: SocketAddr,
    pub registry: Registry,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningGateway {
    /// The URI clients connect to, such as `http://127.0.0.1:50051`.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drains, stops accepting calls, and waits for the server to finish.
    pub async fn shutdown(mut self) -> Result<(), tonic::transport::Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap_or(Ok(()))
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
