//! Builds the gRPC server and runs it until shutdown.
//!
//! On one port: `synthome.status.v1.ExecutionStatusService`, `grpc.health.v1.Health`,
//! server reflection (`grpc.reflection.v1` and, for older tools, `v1alpha`), and gRPC-Web
//! (HTTP/1.1 and HTTP/2) for browser dashboards, with CORS closed unless origins are
//! configured. TLS, and mutual TLS with a client CA, are optional.
//!
//! HTTP/2 settings: watchers open many long-lived streams on few connections, so the
//! concurrent-stream limit per connection and the connection-level flow-control window
//! are raised well above their defaults. Keepalive pings find dead peers behind NATs and
//! load balancers; an optional maximum connection age makes long-lived clients reconnect,
//! and so rebalance across replicas, now and then.
//!
//! Shutdown (drain): when the shutdown signal comes, health turns NOT_SERVING, new
//! watches are refused, open watches end with UNAVAILABLE (clients reconnect elsewhere and
//! resume from their revision), and the server stops accepting connections while unary
//! calls in flight finish. hyper's graceful shutdown would wait forever on a stream that
//! never ends, so the whole drain is bounded by `shutdown_grace`: what is still open then
//! is closed.
//!
//! Accepted connections get `TCP_NODELAY`: a unary answer is written as a few small frames
//! (headers, message, trailers), and with Nagle's algorithm on, the last of them waits for
//! the client's delayed ACK, about 40 ms on Linux, on every call. When accepting fails for
//! lack of resources (no file descriptors left), accepting pauses for a moment instead of
//! spinning on the error; the backlog holds new connections meanwhile.
//!
//! Connection age: at `max_connection_age` a connection gets GOAWAY (tonic), watches on it
//! end a moment later with UNAVAILABLE `CONNECTION_MAX_AGE` (so their clients reconnect on
//! a new connection, to any replica, with their revision), and at age + grace the
//! connection is closed whatever is still open on it (`AcceptedStream`). tonic's own grace
//! is not used: with it, tonic closes the connection at age + grace without a GOAWAY.
//!
//! Limits: `concurrency_per_connection` (tower's concurrency limit, inside tonic) counts a
//! call until its response starts: a unary call until it is answered, a watch only until
//! its stream opens. Open watches are bounded by `max_streams_per_connection` and
//! `max_watch_streams` instead.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tokio_stream::Stream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig, server::Connected};
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::{debug, info, warn};

use crate::{
    credential::Credential,
    health::Health,
    metrics::RpcMetricsLayer,
    proto::{self, execution_status_service_server::ExecutionStatusServiceServer},
    registry::{PollSettings, Registry},
    service::{ExecutionStatusApi, ServiceSettings},
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
    pub limits: Limits,
    pub tls: Option<ServerTls>,
    /// Browser origins allowed to call over gRPC-Web; empty means none (CORS closed).
    pub cors_allowed_origins: Vec<String>,
    /// How long Synthome may be unreachable before health reports NOT_SERVING.
    pub unhealthy_after: Duration,
    /// The longest a drain may take before remaining connections are closed.
    pub shutdown_grace: Duration,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            fallback_credential: None,
            poll: PollSettings::default(),
            heartbeat_interval: Duration::from_secs(15),
            limits: Limits::default(),
            tls: None,
            cors_allowed_origins: Vec::new(),
            unhealthy_after: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Protection of the gateway and its clients from one another.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Watch streams open at once across all clients; more get RESOURCE_EXHAUSTED.
    pub max_watch_streams: usize,
    /// HTTP/2 streams (calls and watches) one connection may have open at once.
    pub max_streams_per_connection: u32,
    /// Calls being answered at once per connection (a watch counts until its stream opens,
    /// not while it is open); `None` for no limit.
    pub concurrency_per_connection: Option<usize>,
    /// The longest a unary call may take, whatever deadline the caller sent.
    pub unary_timeout: Duration,
    /// Largest request message accepted.
    pub max_request_bytes: usize,
    /// Largest response message sent.
    pub max_response_bytes: usize,
    /// Interval of HTTP/2 keepalive pings; `None` to send none.
    pub keepalive_interval: Option<Duration>,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Connections older than this are asked to go away (GOAWAY); `None` for no limit.
    pub max_connection_age: Option<Duration>,
    /// After `max_connection_age`, how long open streams may go on before the connection
    /// is closed.
    pub max_connection_age_grace: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_watch_streams: 100_000,
            max_streams_per_connection: 20_000,
            concurrency_per_connection: None,
            unary_timeout: Duration::from_secs(30),
            max_request_bytes: 64 * 1024,
            max_response_bytes: 16 * 1024 * 1024,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(10),
            max_connection_age: None,
            max_connection_age_grace: None,
        }
    }
}

/// PEM-encoded server certificate chain and key, and the CA that client certificates must
/// chain to for mutual TLS.
#[derive(Clone)]
pub struct ServerTls {
    pub certificate_chain: Vec<u8>,
    pub private_key: Vec<u8>,
    pub client_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    fn config(&self) -> ServerTlsConfig {
        let identity = Identity::from_pem(&self.certificate_chain, &self.private_key);
        let config = ServerTlsConfig::new().identity(identity);
        match &self.client_ca {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }
}

/// Why the server could not be built or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS configuration: {0}")]
    Tls(tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("a CORS origin is not a valid header value: {0:?}")]
    CorsOrigin(String),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// The gateway's gRPC services, ready to serve.
#[derive(Debug)]
pub struct Gateway {
    api: ExecutionStatusApi,
    registry: Registry,
    health: Health,
    draining: watch::Sender<bool>,
    settings: GatewaySettings,
}

impl Gateway {
    pub fn new(source: Arc<dyn StatusSource>, settings: GatewaySettings) -> Self {
        let registry = Registry::new(source, settings.poll.clone());
        let (draining, draining_receiver) = watch::channel(false);
        let service_settings = ServiceSettings {
            fallback_credential: settings.fallback_credential.clone(),
            heartbeat_interval: settings.heartbeat_interval,
            max_watch_streams: settings.limits.max_watch_streams,
            unary_timeout: settings.limits.unary_timeout,
            max_connection_age: settings.limits.max_connection_age,
            max_connection_age_grace: settings.limits.max_connection_age_grace,
        };
        let api = ExecutionStatusApi::new(registry.clone(), service_settings, draining_receiver);
        let health = Health::new();
        Self {
            api,
            registry,
            health,
            draining,
            settings,
        }
    }

    /// The registry of pollers, for the webhook listener and for statistics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The serving state, for `/readyz`.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Serves on `listener` until `shutdown` resolves, then drains within the grace.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let health = self.health.clone();
        let health_service = health.service();
        let builder = self.server_builder()?;
        let limits = &self.settings.limits;
        let services = ExecutionStatusServiceServer::new(self.api)
            .max_decoding_message_size(limits.max_request_bytes)
            .max_encoding_message_size(limits.max_response_bytes);
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        let web = ServiceBuilder::new()
            .option_layer(cors_layer(&self.settings.cors_allowed_origins)?)
            .layer(tonic_web::GrpcWebLayer::new())
            .into_inner();

        let router = builder
            .layer(web)
            .layer(RpcMetricsLayer::new(self.registry.metrics().clone()))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(services);

        health.start().await;
        tokio::spawn(
            health
                .clone()
                .monitor_upstream(self.registry.clone(), self.settings.unhealthy_after),
        );
        if let Ok(addr) = listener.local_addr() {
            let tls = self.settings.tls.is_some();
            info!(%addr, tls, "gRPC listening");
        }

        let (drain_started, drain_began) = oneshot::channel();
        let draining = self.draining;
        let drain = async move {
            shutdown.await;
            info!("draining: NOT_SERVING, ending open watches, finishing unary calls");
            health.drain().await;
            draining.send_replace(true);
            let _ = drain_started.send(());
        };
        let closes_after = limits_close_after(&self.settings.limits);
        let serving =
            router.serve_with_incoming_shutdown(Incoming::new(listener, closes_after), drain);
        tokio::pin!(serving);

        let grace = self.settings.shutdown_grace;
        tokio::select! {
            result = &mut serving => result.map_err(ServeError::from),
            () = async {
                if drain_began.await.is_ok() {
                    tokio::time::sleep(grace).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {
                warn!(?grace, "drain took longer than the grace; closing what is still open");
                Ok(())
            }
        }
    }

    fn server_builder(&self) -> Result<Server, ServeError> {
        let limits = &self.settings.limits;
        let mut builder = Server::builder()
            .accept_http1(true)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_concurrent_streams(limits.max_streams_per_connection)
            .http2_keepalive_interval(limits.keepalive_interval)
            .http2_keepalive_timeout(Some(limits.keepalive_timeout));
        // Only the age goes to tonic, which then sends GOAWAY at that age; given a grace
        // too, it would close the connection at age + grace without any GOAWAY. The grace
        // is enforced by `AcceptedStream` instead, and watches end by themselves.
        if let Some(age) = limits.max_connection_age {
            builder = builder.max_connection_age(age);
        }
        if let Some(limit) = limits.concurrency_per_connection {
            builder = builder.concurrency_limit_per_connection(limit);
        }
        if let Some(tls) = &self.settings.tls {
            builder = builder.tls_config(tls.config()).map_err(ServeError::Tls)?;
        }
        Ok(builder)
    }

    /// Binds 127.0.0.1 on a free port and serves in the background until the returned
    /// handle is dropped. For tests and the demo.
    pub async fn spawn(self) -> io::Result<RunningGateway> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let registry = self.registry.clone();
        let health = self.health.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(self.serve(listener, async {
            let _ = stopped.await;
        }));
        Ok(RunningGateway {
            addr,
            registry,
            health,
            stop: Some(stop),
            task,
        })
    }
}

/// How long accepting pauses after a failure that is not the client's (such as EMFILE).
const ACCEPT_PAUSE: Duration = Duration::from_millis(500);

/// What the gateway knows of a client's connection. Every call on it carries this in its
/// request extensions (see [`ConnectionInfo::of`]).
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// When the gateway began serving the connection: after its TLS handshake, if any, at
    /// the moment tonic starts timing its maximum age.
    pub established_at: std::time::Instant,
    pub remote_addr: Option<SocketAddr>,
}

impl ConnectionInfo {
    /// The connection a call came on, over plain TCP or TLS.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Self> {
        let extensions = request.extensions();
        extensions.get::<Self>().or_else(|| {
            extensions
                .get::<tonic::transport::server::TlsConnectInfo<Self>>()
                .map(|tls| tls.get_ref())
        })
    }
}

/// How long after acceptance a connection is closed, whatever is open on it.
fn limits_close_after(limits: &Limits) -> Option<Duration> {
    Some(limits.max_connection_age? + limits.max_connection_age_grace?)
}

/// An accepted connection, which tells tonic its [`ConnectionInfo`], and which fails its
/// reads and writes once its maximum age and grace have passed, so that hyper closes it.
struct AcceptedStream {
    inner: TcpStream,
    remote_addr: SocketAddr,
    closes: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AcceptedStream {
    /// An error once the connection's time is up; registers for the wake-up until then.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let closes = self.closes.as_mut()?;
        closes.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection outlived its maximum age and grace",
            )
        })
    }
}

impl Connected for AcceptedStream {
    type ConnectInfo = ConnectionInfo;

    /// tonic asks once per connection, when it starts serving it (after the TLS handshake)
    /// and starts its max-age timer.
    fn connect_info(&self) -> ConnectionInfo {
        ConnectionInfo {
            established_at: std::time::Instant::now(),
            remote_addr: Some(self.remote_addr),
        }
    }
}

impl AsyncRead for AcceptedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(expired) = self.poll_expired(cx) {
            return Poll::Ready(Err(expired));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AcceptedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(expired) = self.poll_expired(cx) {
            return Poll::Ready(Err(expired));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(expired) = self.poll_expired(cx) {
            return Poll::Ready(Err(expired));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The listener's connections, with `TCP_NODELAY` set, pausing after resource failures.
struct Incoming {
    listener: TcpListener,
    /// How long after acceptance connections are closed; `None` for never.
    closes_after: Option<Duration>,
    /// Set while accepting pauses after a failure.
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the latest accept failed: one warning per streak of failures.
    failing: bool,
}

impl Incoming {
    fn new(listener: TcpListener, closes_after: Option<Duration>) -> Self {
        Self {
            listener,
            closes_after,
            pause: None,
            failing: false,
        }
    }
}

impl Stream for Incoming {
    type Item = io::Result<AcceptedStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(pause) = &mut self.pause {
            ready!(pause.as_mut().poll(cx));
            self.pause = None;
        }
        match ready!(self.listener.poll_accept(cx)) {
            Ok((stream, remote_addr)) => {
                self.failing = false;
                if let Err(err) = stream.set_nodelay(true) {
                    debug!(error = %err, "could not set TCP_NODELAY on a connection");
                }
                let closes = self
                    .closes_after
                    .map(|after| Box::pin(tokio::time::sleep(after)));
                Poll::Ready(Some(Ok(AcceptedStream {
                    inner: stream,
                    remote_addr,
                    closes,
                })))
            }
            // The peer gave up before the connection was accepted: nothing to wait for.
            Err(err) if is_connection_error(&err) => {
                debug!(error = %err, "a connection failed while being accepted");
                Poll::Ready(Some(Err(err)))
            }
            Err(err) => {
                if !self.failing {
                    warn!(error = %err, pause = ?ACCEPT_PAUSE, "cannot accept connections; pausing");
                }
                self.failing = true;
                self.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_PAUSE)));
                Poll::Ready(Some(Err(err)))
            }
        }
    }
}

fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The reflection service over the contract and the health service.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// CORS for gRPC-Web from the configured origins; `None` (closed) when there are none.
fn cors_layer(origins: &[String]) -> Result<Option<CorsLayer>, ServeError> {
    if origins.is_empty() {
        return Ok(None);
    }
    let origins = origins
        .iter()
        .map(|origin| {
            origin
                .parse()
                .map_err(|_| ServeError::CorsOrigin(origin.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let layer = CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([axum::http::Method::POST, axum::http::Method::OPTIONS])
        .allow_headers(tower_http::cors::Any)
        .expose_headers([
            axum::http::HeaderName::from_static("grpc-status"),
            axum::http::HeaderName::from_static("grpc-message"),
            axum::http::HeaderName::from_static("grpc-status-details-bin"),
        ])
        .max_age(Duration::from_secs(600));
    Ok(Some(layer))
}

/// A gateway serving in the background; dropping it shuts the server down.
#[derive(Debug)]
pub struct RunningGateway {
    pub addr: SocketAddr,
    pub registry: Registry,
    pub health: Health,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl RunningGateway {
    /// The URI clients connect to, such as `http://127.0.0.1:50051`.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drains, stops accepting calls, and waits for the server to finish.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
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

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_do_not_wait_for_delayed_acks() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Incoming::new(listener, None);

        let _client = TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.inner.nodelay().unwrap(), "TCP_NODELAY is set");
    }
}
