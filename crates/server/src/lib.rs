//! tickserve's server: loads the model repository, starts a scheduler per
//! model version and answers the Open Inference Protocol over HTTP and
//! gRPC, with Prometheus metrics on an address of their own.
//!
//! Start-up binds both listeners first, so liveness answers at once and
//! readiness answers 503 until every model is loaded and warmed up
//! ([`registry::ModelRegistry::start`]); models are then loaded, swapped and
//! unloaded while serving as the model control mode allows ([`registry`]). Shutdown flips readiness to 503 at
//! once, keeps serving for the shutdown delay (so load balancers stop
//! routing), then drains without losing a request a client sent
//! ([`serve`]): queued connections are taken before the listeners close,
//! HTTP/1.1 answers carry `Connection: close`, HTTP/2 and gRPC connections
//! get GOAWAY; queued and running requests finish within the drain
//! timeout.
//!
//! Both inference addresses can require a bearer token ([`auth`]) and
//! speak TLS, optionally mutual ([`tls`]); the connection limits
//! ([`Limits`]) hold on both (docs/security.md). The metrics address stays
//! plain and open: put it on a private interface.
//!
//! The HTTP handlers ([`http`]) and the gRPC service ([`grpc`]) share one
//! [`AppState`]: the same registry, schedulers and error mapping. The gRPC
//! listener also serves grpc.health.v1 for Kubernetes probes, SERVING once
//! the models are ready and NOT_SERVING while draining.

pub mod auth;
mod cache_admin;
mod cached;
mod codec;
mod decode_pool;
pub mod error;
pub mod grpc;
mod http;
mod infer;
mod json_numbers;
pub mod models;
mod realtime;
pub mod registry;
mod repository_api;
#[cfg(test)]
mod router_tests;
pub mod scheduling;
mod serve;
pub mod sla;
mod state;
mod stream_store;
pub mod streams;
pub mod tls;
mod trace;
pub mod triton;
mod version_stats;

/// Entry points of the fuzz targets (fuzz/) and their corpus replay.
#[doc(hidden)]
pub mod fuzzing;

/// Entry points for the decoding benchmark (benches/decode.rs).
#[doc(hidden)]
pub mod bench {
    pub use crate::codec::decode_http_body;
    pub use crate::grpc::decode_infer_message;
}

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tickserve_cache::{L2Error, ResultCache};
use tickserve_repository::RepositoryError;
use tickserve_telemetry as telemetry;
use tokio::net::TcpListener;

use crate::registry::ModelRegistry;
pub use crate::registry::{ControlMode, ModelControl};
pub(crate) use crate::state::AppState;

pub use crate::auth::{AuthConfig, AuthError, AuthHandle};
pub use crate::decode_pool::DecodeConfig;
pub use crate::tls::{TlsConfig, TlsError};
pub use tickserve_cache::{CacheConfig, ClientIdentity, RedisConfig, RedisTls};

/// Everything `serve` needs, as plain data (the CLI fills it from flags,
/// environment and the TOML file).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub model_repository: PathBuf,
    pub http_addr: SocketAddr,
    /// Address of the gRPC service (and gRPC health checking).
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// Addresses of the real-time listeners: the same HTTP API and gRPC
    /// service, served by a runtime thread of their own (docs/scheduling.md);
    /// `None`: not served.
    pub realtime_http_addr: Option<SocketAddr>,
    pub realtime_grpc_addr: Option<SocketAddr>,
    /// How long shutdown waits for queued and running requests.
    pub drain_timeout: Duration,
    /// How long shutdown keeps serving normally after readiness turns
    /// NOT_SERVING, before the drain begins.
    pub shutdown_delay: Duration,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// The result cache (docs/cache.md).
    pub cache: CacheConfig,
    /// Bearer token of the admin endpoints; `None` turns them off (unless
    /// `auth` is set: then they take the inference tokens).
    pub admin_token: Option<AdminToken>,
    /// Which models are loaded and how that changes (docs/models.md).
    pub model_control: ModelControl,
    /// Bearer tokens required on the inference address (HTTP and gRPC);
    /// `None`: open.
    pub auth: Option<AuthConfig>,
    /// TLS on the HTTP and gRPC addresses; `None`: plain text.
    pub tls: Option<TlsConfig>,
    /// Limits against slow or abusive clients.
    pub limits: Limits,
    /// Threads that decode background requests' bodies off the async
    /// runtime (docs/scheduling.md).
    pub decode: DecodeConfig,
}

/// Limits against slow or abusive clients, per address (HTTP and gRPC
/// each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest time for the TLS handshake and for a request's headers
    /// (HTTP/1.1); past it the connection closes. hyper starts the clock
    /// when it waits for a request, so a kept-alive HTTP/1.1 connection
    /// idle this long is closed too.
    pub header_read_timeout: Duration,
    /// Longest wait for the next piece of an HTTP request body; past it
    /// the request gets 408.
    pub body_read_timeout: Duration,
    /// Most open connections per address; past it HTTP clients get 503
    /// and gRPC clients UNAVAILABLE.
    pub max_connections: usize,
    /// Largest gRPC request message; larger ones get OUT_OF_RANGE.
    pub grpc_max_message_bytes: usize,
    /// Most concurrent HTTP/2 streams (gRPC calls) per connection.
    pub max_concurrent_streams: u32,
    /// Connections the kernel queues per listener before the server
    /// accepts them (`listen(2)`'s backlog, capped by the kernel at
    /// `net.core.somaxconn`). Past it the kernel drops new connections'
    /// handshakes, and a client that already sent its request sees the
    /// connection reset: a burst of new connections under overload (the
    /// accept loop runs on the same busy cores) must fit here.
    pub listen_backlog: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(120),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            grpc_max_message_bytes: 16 * 1024 * 1024,
            max_concurrent_streams: 1024,
            listen_backlog: 4096,
        }
    }
}

impl ServerConfig {
    /// Every listener on a free loopback port, the in-process cache on its
    /// defaults, no Redis, no admin token: for tests, benches and examples.
    pub fn loopback(model_repository: PathBuf) -> Self {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        ServerConfig {
            model_repository,
            http_addr: any_port,
            grpc_addr: any_port,
            metrics_addr: any_port,
            realtime_http_addr: None,
            realtime_grpc_addr: None,
            drain_timeout: Duration::from_secs(10),
            shutdown_delay: Duration::ZERO,
            max_body_bytes: 16 * 1024 * 1024,
            cache: CacheConfig::default(),
            admin_token: None,
            model_control: ModelControl::default(),
            auth: None,
            tls: None,
            limits: Limits::default(),
            decode: DecodeConfig::default(),
        }
    }
}

/// A secret that never shows in `Debug` output (settings are logged at
/// start-up).
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    pub fn new(token: impl Into<String>) -> Self {
        AdminToken(token.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error("cannot set up the result cache: {0}")]
    Cache(#[from] L2Error),
    #[error("server task failed: {0}")]
    Task(String),
    #[error("cannot set up authentication: {0}")]
    Auth(#[from] AuthError),
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot start the real-time listeners' thread: {0}")]
    RealtimeThread(#[source] std::io::Error),
}

/// A server whose listeners are bound; [`BoundServer::serve`] runs it.
pub struct BoundServer {
    config: ServerConfig,
    http_listener: TcpListener,
    grpc_listener: TcpListener,
    metrics_listener: TcpListener,
    realtime_http_listener: Option<TcpListener>,
    realtime_grpc_listener: Option<TcpListener>,
    metrics: PrometheusHandle,
    auth: AuthHandle,
    http_tls: Option<tokio_rustls::TlsAcceptor>,
    grpc_tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for BoundServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundServer")
            .field("config", &self.config)
            .field("tls", &self.http_tls.is_some())
            .finish_non_exhaustive()
    }
}

/// The address `listener` is bound to (the port chosen for port 0), or the
/// `configured` one if the OS cannot say.
fn bound_addr(listener: &TcpListener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}

/// A listener on `addr` with room for `backlog` connections not yet
/// accepted (tokio's `TcpListener::bind` asks for 1024).
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind`: a restarted server can bind at once although
    // the previous one's connections are in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

impl BoundServer {
    /// Binds the HTTP, gRPC and metrics listeners (port 0 picks a free port).
    pub async fn bind(config: ServerConfig) -> Result<Self, StartError> {
        let metrics = telemetry::install_recorder()?;
        // Bad token files and certificates stop the start, before binding.
        let auth = AuthHandle::new(config.auth.clone())?;
        let (http_tls, grpc_tls) = match &config.tls {
            Some(tls) => (
                Some(tls::acceptor(tls, &[b"h2", b"http/1.1"])?),
                Some(tls::acceptor(tls, &[b"h2"])?),
            ),
            None => (None, None),
        };
        let backlog = config.limits.listen_backlog;
        let bind = |addr: SocketAddr| {
            listen(addr, backlog).map_err(|source| StartError::Bind { addr, source })
        };
        let http_listener = bind(config.http_addr)?;
        let grpc_listener = bind(config.grpc_addr)?;
        let metrics_listener = bind(config.metrics_addr)?;
        let realtime_http_listener = config.realtime_http_addr.map(bind).transpose()?;
        let realtime_grpc_listener = config.realtime_grpc_addr.map(bind).transpose()?;
        Ok(BoundServer {
            config,
            http_listener,
            grpc_listener,
            metrics_listener,
            realtime_http_listener,
            realtime_grpc_listener,
            metrics,
            auth,
            http_tls,
            grpc_tls,
        })
    }

    /// The tokens this server checks; [`AuthHandle::reload`] rereads the
    /// token file (the binary calls it on SIGHUP).
    pub fn auth_handle(&self) -> AuthHandle {
        self.auth.clone()
    }

    pub fn http_addr(&self) -> SocketAddr {
        bound_addr(&self.http_listener, self.config.http_addr)
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        bound_addr(&self.grpc_listener, self.config.grpc_addr)
    }

    /// The real-time HTTP listener's address, when it is served.
    pub fn realtime_http_addr(&self) -> Option<SocketAddr> {
        let listener = self.realtime_http_listener.as_ref()?;
        Some(bound_addr(listener, self.config.realtime_http_addr?))
    }

    /// The real-time gRPC listener's address, when it is served.
    pub fn realtime_grpc_addr(&self) -> Option<SocketAddr> {
        let listener = self.realtime_grpc_listener.as_ref()?;
        Some(bound_addr(listener, self.config.realtime_grpc_addr?))
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        bound_addr(&self.metrics_listener, self.config.metrics_addr)
    }

    /// Serves until `shutdown` resolves, then drains. Returns an error if
    /// the model repository cannot be loaded.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let BoundServer {
            config,
            http_listener,
            grpc_listener,
            metrics_listener,
            realtime_http_listener,
            realtime_grpc_listener,
            metrics,
            auth,
            http_tls,
            grpc_tls,
        } = self;
        let cache = match config.cache.enabled {
            true => Some(Arc::new(cached::CacheLayer::new(ResultCache::new(
                config.cache.clone(),
            )?))),
            false => None,
        };
        let state = AppState::new(&config, cache).with_auth(auth.clone());
        metrics::gauge!(telemetry::READY).set(0.0);

        // Shutdown fans out to both servers and to the loader.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|&stop| stop).await;
        };

        let http_app = router(state.clone());
        let http_accept = serve::Accept::new("http", http_tls.clone(), config.limits);
        let grpc_accept = serve::Accept::new("grpc", grpc_tls.clone(), config.limits);
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, tonic_health::ServingStatus::NotServing).await;
        let inference =
            grpc::GrpcInferenceServiceServer::new(grpc::InferenceService::new(state.clone()))
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                .send_compressed(tonic::codec::CompressionEncoding::Gzip)
                .max_decoding_message_size(config.limits.grpc_max_message_bytes)
                .max_encoding_message_size(usize::MAX);
        let grpc_routes = || {
            tonic::transport::Server::builder()
                .max_concurrent_streams(config.limits.max_concurrent_streams)
                .layer(auth::GrpcAuthLayer { auth: auth.clone() })
                .add_service(health_service.clone())
                .add_service(inference.clone())
        };
        // Started before the main listeners, so that a failure to start
        // its thread stops the start with nothing yet served.
        let mut realtime = Vec::new();
        if let Some(listener) = realtime_http_listener {
            let (app, stop) = (http_app.clone(), stop_rx.clone());
            let accept = serve::Accept::new("realtime_http", http_tls.clone(), config.limits);
            let serve: realtime::Serve =
                Box::new(move |listener| Box::pin(serve::serve_http(listener, app, accept, stop)));
            realtime.push((listener, serve));
        }
        if let Some(listener) = realtime_grpc_listener {
            let (routes, stop) = (grpc_routes(), stop_rx.clone());
            let accept = serve::Accept::new("realtime_grpc", grpc_tls.clone(), config.limits);
            let serve: realtime::Serve = Box::new(move |listener| {
                Box::pin(async move {
                    let incoming = serve::grpc_incoming(listener, accept, stop);
                    let served = routes
                        .serve_with_incoming_shutdown(incoming, std::future::pending::<()>())
                        .await;
                    if let Err(error) = served {
                        tracing::error!(%error, "real-time gRPC listener failed");
                    }
                })
            });
            realtime.push((listener, serve));
        }
        let realtime = realtime::start(realtime)?;
        let http_server = tokio::spawn(serve::serve_http(
            http_listener,
            http_app,
            http_accept,
            stop_rx.clone(),
        ));
        // The drain starts when the incoming stream ends (after the queued
        // connections are taken), not on a signal: tonic would drop
        // connections it has not yet served.
        let grpc_server = tokio::spawn(grpc_routes().serve_with_incoming_shutdown(
            serve::grpc_incoming(grpc_listener, grpc_accept, stop_rx.clone()),
            std::future::pending::<()>(),
        ));
        let metrics_app = metrics_router(metrics.clone());
        let metrics_server = tokio::spawn(
            axum::serve(metrics_listener, metrics_app)
                .with_graceful_shutdown(stopped(stop_rx.clone()))
                .into_future(),
        );
        let throughput = Arc::clone(&state.throughput);
        let upkeep_state = state.clone();
        let upkeep = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            for n in 0u64.. {
                tick.tick().await;
                throughput.publish(std::time::Instant::now());
                if let Ok(registry) = upkeep_state.registry() {
                    registry.sweep_streams();
                }
                if n % 5 == 0 {
                    metrics.run_upkeep();
                }
            }
        });

        let root = config.model_repository.clone();
        let runtime = tokio::runtime::Handle::current();
        let control = config.model_control.clone();
        let loaded =
            tokio::task::spawn_blocking(move || ModelRegistry::start(&root, &runtime, &control))
                .await
                .map_err(|e| StartError::Task(e.to_string()));
        let registry = match loaded {
            Ok(Ok(registry)) => registry,
            Ok(Err(e)) | Err(StartError::Repository(e)) => {
                let _ = stop_tx.send(true);
                upkeep.abort();
                return Err(StartError::Repository(e));
            }
            Err(e) => {
                let _ = stop_tx.send(true);
                upkeep.abort();
                return Err(e);
            }
        };
        state.set_registry(registry);
        let poll = (config.model_control.mode == ControlMode::Poll).then(|| {
            tokio::spawn(poll_repository(
                state.clone(),
                config.model_control.poll_interval,
            ))
        });
        metrics::gauge!(telemetry::READY).set(1.0);
        set_health(&health, tonic_health::ServingStatus::Serving).await;
        tracing::info!(http = %config.http_addr, grpc = %config.grpc_addr, "ready");

        shutdown.await;
        if let Some(poll) = poll {
            poll.abort();
        }
        state.start_draining();
        metrics::gauge!(telemetry::READY).set(0.0);
        set_health(&health, tonic_health::ServingStatus::NotServing).await;
        if !config.shutdown_delay.is_zero() {
            tracing::info!(shutdown_delay = ?config.shutdown_delay, "shutting down: not ready, still serving while load balancers stop routing here");
            tokio::time::sleep(config.shutdown_delay).await;
        }
        tracing::info!(drain_timeout = ?config.drain_timeout, "shutting down: draining requests");
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(config.drain_timeout, async {
            let _ = http_server.await;
            let _ = grpc_server.await;
            let _ = metrics_server.await;
            realtime.drained().await;
        })
        .await;
        upkeep.abort();
        match drained {
            Ok(()) => tracing::info!("drained; bye"),
            Err(_) => tracing::warn!(
                drain_timeout = ?config.drain_timeout,
                "drain timeout passed with requests still running; exiting anyway"
            ),
        }
        Ok(())
    }
}

/// Every HTTP route of the inference address: the protocol, the SLA view
/// and dashboard, and the cache admin endpoints. Needs no socket: tests
/// call it through `tower::ServiceExt::oneshot`.
pub(crate) fn router(state: AppState) -> Router {
    let auth = state.auth.clone();
    http::router(state.clone())
        .merge(sla::router(state.clone()))
        .merge(cache_admin::router(state))
        .layer(axum::middleware::from_fn_with_state(
            auth,
            auth::http_middleware,
        ))
}

/// Sets the gRPC health status of the server ("") and of the inference
/// service together.
async fn set_health(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    health.set_service_status("", status).await;
    health
        .set_service_status(
            <grpc::GrpcInferenceServiceServer<grpc::InferenceService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// Poll mode: re-reads the repository every `interval`, off the async
/// runtime, one pass at a time.
async fn poll_repository(state: AppState, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let polling = state.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            polling
                .registry()
                .map(|registry| registry.poll())
                .unwrap_or_default()
        })
        .await
        .unwrap_or_default();
        for model in loaded {
            repository_api::forget_cached(&state, &model).await;
        }
    }
}

fn metrics_router(handle: PrometheusHandle) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    handle.render(),
                )
                    .into_response()
            }
        }),
    )
}

#[cfg(test)]
mod listen_tests {
    use super::listen;

    #[tokio::test]
    async fn listeners_take_the_configured_backlog_on_both_families() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(addr) = addr.parse() else {
                panic!("bad test address {addr}");
            };
            let listener = match listen(addr, 8) {
                Ok(l) => l,
                // A machine without IPv6 on loopback.
                Err(e) if addr.is_ipv6() => {
                    eprintln!("no IPv6 loopback here: {e}");
                    continue;
                }
                Err(e) => panic!("cannot listen on {addr}: {e}"),
            };
            let bound = listener.local_addr().expect("bound address");
            let client = tokio::net::TcpStream::connect(bound);
            let (accepted, connected) = tokio::join!(listener.accept(), client);
            assert!(accepted.is_ok() && connected.is_ok(), "{addr}");
        }
        // Zero is refused by the configuration; the socket layer takes any
        // positive size and the kernel caps it at somaxconn.
        assert!(listen("127.0.0.1:0".parse().expect("address"), u32::MAX >> 1).is_ok());
    }
}
