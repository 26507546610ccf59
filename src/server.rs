//! Builds the gRPC server and runs it until shutdown.
//!
//! HTTP/2 settings: watchers open many long-lived streams on few connections, so the
//! connection-level flow-control window is raised well above the 64 KiB default (with the
//! default, a client opening thousands of streams on one connection is sent GOAWAY).

use std::{future::Future, io, net::SocketAddr, num::NonZeroUsize, sync::Arc};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tracing::info;

use crate::{
    credential::Credential, proto::execution_status_service_server::ExecutionStatusServiceServer,
    service::ExecutionStatusApi, snapshots::Snapshots, upstream::StatusSource,
};

/// Connection-level HTTP/2 receive window.
const CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;

/// What the gateway needs besides its upstream.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// Used for calls that bring no `authorization` metadata of their own.
    pub fallback_credential: Option<Credential>,
    /// How many ended executions are remembered.
    pub ended_cache_size: NonZeroUsize,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            fallback_credential: None,
            ended_cache_size: NonZeroUsize::new(10_000).expect("non-zero"),
        }
    }
}

/// The gateway's gRPC services, ready to serve.
#[derive(Debug, Clone)]
pub struct Gateway {
    api: ExecutionStatusApi,
}

impl Gateway {
    pub fn new(source: Arc<dyn StatusSource>, settings: GatewaySettings) -> Self {
        let snapshots = Arc::new(Snapshots::new(source, settings.ended_cache_size));
        Self {
            api: ExecutionStatusApi::new(snapshots, settings.fallback_credential),
        }
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
        Server::builder()
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .add_service(ExecutionStatusServiceServer::new(self.api))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await
    }

    /// Binds 127.0.0.1 on a free port and serves in the background until the returned
    /// handle is dropped. For tests and the demo.
    pub async fn spawn(self) -> io::Result<RunningGateway> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(self.serve(listener, async {
            let _ = stopped.await;
        }));
        Ok(RunningGateway {
            addr,
            stop: Some(stop),
            task,
        })
    }
}

/// A gateway serving in the background; dropping it shuts the server down.
#[derive(Debug)]
pub struct RunningGateway {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningGateway {
    /// The URI clients connect to, such as `http://127.0.0.1:50051`.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting calls and waits for the server to finish.
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
