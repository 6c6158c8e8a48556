//! The accept loops and each connection's life, so that a shutdown loses
//! no request a client has sent.
//!
//! `axum::serve` and tonic's `TcpIncoming`, on shutdown, close the listener
//! (resetting connections the kernel had accepted but the server had not)
//! and close idle HTTP/1.1 connections at once (a request the client had
//! just sent on one is lost: "connection closed before message
//! completed"). Here shutdown goes:
//!
//! 1. the accept loop stops, takes every connection still in the kernel's
//!    accept queue, and only then closes the listener: later clients are
//!    refused, which tells them nothing was processed;
//! 2. every response now carries `Connection: close` (HTTP/1.1), so a
//!    kept-alive client that sends another request is answered and then
//!    told to reconnect elsewhere;
//! 3. after [`IDLE_GRACE`], in which a request already on the wire
//!    arrives and is answered, each connection shuts down gracefully: an
//!    idle HTTP/1.1 connection is closed, one with a request in flight
//!    closes after its response, and HTTP/2 connections get GOAWAY with
//!    the last stream id, so clients know which requests were not
//!    processed;
//! 4. the server returns once every connection has closed.
//!
//! gRPC connections are accepted by the same kind of loop and handed to
//! tonic as a stream; when the stream ends tonic sends GOAWAY to every
//! connection and waits for them.
//!
//! Both loops enforce the connection limits ([`crate::Limits`]): a cap on
//! open connections per address (past it an HTTP client gets one 503
//! answer and the connection closes, a gRPC client gets UNAVAILABLE on
//! its calls and GOAWAY; both are logged and counted in
//! `tickserve_connections_refused_total`), the TLS handshake and request
//! headers within the header read timeout, and, on HTTP, each piece of a
//! request body within the body read timeout (408 otherwise, in
//! crate::http). Handshakes run in each connection's task, never in the
//! accept loop.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, Request, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tickserve_telemetry as telemetry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::Limits;
use crate::decode_pool::ConnectionHistory;
use crate::error::ServeError;
use crate::tls::Conn;

/// How long a connection stays open after the drain begins, so that a
/// request a client sent just before is read and answered, not reset.
pub(crate) const IDLE_GRACE: Duration = Duration::from_millis(250);

/// Over-cap connections answered "too many connections" at once (HTTP
/// 503, gRPC UNAVAILABLE); past this many refusals in progress, further
/// ones are closed without an answer.
const REFUSALS_IN_PROGRESS: usize = 64;

/// How one address takes connections: TLS or not, and its limits.
#[derive(Clone)]
pub(crate) struct Accept {
    /// `"http"` or `"grpc"`: the metric label and log field.
    pub(crate) listener: &'static str,
    pub(crate) tls: Option<TlsAcceptor>,
    pub(crate) limits: Limits,
    slots: Arc<Semaphore>,
    /// Over-cap connections being answered "too many connections".
    refusals: Arc<Semaphore>,
}

impl Accept {
    pub(crate) fn new(listener: &'static str, tls: Option<TlsAcceptor>, limits: Limits) -> Self {
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        Accept {
            listener,
            tls,
            limits,
            slots,
            refusals: Arc::new(Semaphore::new(REFUSALS_IN_PROGRESS)),
        }
    }

    /// A place under the connection cap, or `None` when it is reached
    /// (logged and counted).
    fn slot(&self) -> Option<OwnedSemaphorePermit> {
        let permit = Arc::clone(&self.slots).try_acquire_owned().ok();
        if permit.is_none() {
            metrics::counter!(telemetry::CONNECTIONS_REFUSED_TOTAL, "listener" => self.listener)
                .increment(1);
            tracing::warn!(
                listener = self.listener,
                max_connections = self.limits.max_connections,
                "connection refused: the connection cap (--max-connections) is reached"
            );
        }
        permit
    }

    /// The TLS handshake (if any), within the header read timeout; `None`
    /// when it fails or takes too long (logged at debug: scanners and
    /// health probes of load balancers do this all day).
    async fn handshake(
        &self,
        stream: TcpStream,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Option<Conn> {
        let Some(tls) = &self.tls else {
            return Some(Conn::plain(stream, permit));
        };
        match tokio::time::timeout(self.limits.header_read_timeout, tls.accept(stream)).await {
            Ok(Ok(stream)) => Some(Conn::tls(stream, permit)),
            Ok(Err(error)) => {
                tracing::debug!(listener = self.listener, %error, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(
                    listener = self.listener,
                    "TLS handshake not finished within the header read timeout"
                );
                None
            }
        }
    }
}

impl std::fmt::Debug for Accept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accept")
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Resolves once `stop` is set.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|&stop| stop).await;
}

/// The connections the kernel has accepted but the server has not taken
/// yet. Closing the listener without taking them would reset them.
fn take_queued(listener: &TcpListener) -> Vec<TcpStream> {
    let mut context = Context::from_waker(Waker::noop());
    let mut queued = Vec::new();
    while let Poll::Ready(Ok((stream, _))) = listener.poll_accept(&mut context) {
        let _ = stream.set_nodelay(true);
        queued.push(stream);
    }
    queued
}

/// One accepted connection, or the end of accepting.
enum Accepted {
    Connection(TcpStream),
    Stopped,
}

async fn next_connection(listener: &TcpListener, stop: &mut watch::Receiver<bool>) -> Accepted {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Small answers must not wait for Nagle's algorithm.
                    let _ = stream.set_nodelay(true);
                    return Accepted::Connection(stream);
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off
                    // instead of spinning.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            () = stopped(stop) => return Accepted::Stopped,
        }
    }
}

/// Serves `app` over HTTP/1.1 and HTTP/2 on `listener` until `stop`, then
/// drains (module doc) and returns once every connection is closed.
pub(crate) async fn serve_http(
    listener: TcpListener,
    app: Router,
    accept: Accept,
    stop: watch::Receiver<bool>,
) {
    let closing = Arc::new(AtomicBool::new(false));
    let app = app.layer(axum::middleware::map_response({
        let closing = Arc::clone(&closing);
        move |mut response: axum::response::Response| {
            let closing = closing.load(Ordering::Acquire);
            async move {
                if closing {
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                response
            }
        }
    }));
    // A stalled body fails its read (crate::http answers 408).
    let app = app.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
        accept.limits.body_read_timeout,
    ));
    let refusal = refusal_app(accept.limits.max_connections);
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut stop = stop;
    let take = |stream: TcpStream, connections: &mut JoinSet<()>| match accept.slot() {
        Some(permit) => {
            connections.spawn(connection(
                stream,
                Some(permit),
                app.clone(),
                accept.clone(),
                drain_rx.clone(),
            ));
        }
        None => {
            if let Ok(permit) = Arc::clone(&accept.refusals).try_acquire_owned() {
                connections.spawn(connection(
                    stream,
                    Some(permit),
                    refusal.clone(),
                    accept.clone(),
                    drain_rx.clone(),
                ));
            }
        }
    };
    loop {
        tokio::select! {
            accepted = next_connection(&listener, &mut stop) => match accepted {
                Accepted::Connection(stream) => take(stream, &mut connections),
                Accepted::Stopped => break,
            },
            // Reap finished connections as they go.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    closing.store(true, Ordering::Release);
    let queued = take_queued(&listener);
    tracing::debug!(
        queued = queued.len(),
        "HTTP listener closing after its queued connections"
    );
    for stream in queued {
        take(stream, &mut connections);
    }
    drop(listener);
    let _ = drain_tx.send(true);
    while connections.join_next().await.is_some() {}
}

fn too_many_connections(max_connections: usize) -> ServeError {
    ServeError::Overloaded(format!(
        "too many connections: this address serves at most {max_connections} at once (--max-connections)"
    ))
}

/// What over-cap HTTP connections get: 503 and `Connection: close`.
fn refusal_app(max_connections: usize) -> Router {
    Router::new().fallback(move || async move {
        let mut response =
            axum::response::IntoResponse::into_response(too_many_connections(max_connections));
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    })
}

async fn connection(
    stream: TcpStream,
    permit: Option<OwnedSemaphorePermit>,
    app: Router,
    accept: Accept,
    mut drain: watch::Receiver<bool>,
) {
    let Some(stream) = accept.handshake(stream, permit).await else {
        return;
    };
    // The connection's requests share what its last one was (background or
    // not), which decides where the next body is decoded.
    let history = ConnectionHistory::default();
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(history.clone());
        app.clone().oneshot(request)
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(accept.limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(accept.limits.max_concurrent_streams);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = stopped(&mut drain) => {}
    }
    tokio::select! {
        _ = conn.as_mut() => return,
        () = tokio::time::sleep(IDLE_GRACE) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// Accepted gRPC connections, for tonic's `serve_with_incoming_shutdown`:
/// the stream ends once `stop` is set and the queued connections are
/// taken; tonic then sends GOAWAY to every connection and waits for them.
///
/// Each connection's TLS handshake runs in a task of its own that holds a
/// sender, so the stream ends only after the handshakes under way have
/// finished or timed out.
pub(crate) fn grpc_incoming(
    listener: TcpListener,
    accept: Accept,
    stop: watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    // Bounded: past it the accept loop waits for tonic, as the kernel's
    // queue would.
    let (sender, receiver) = mpsc::channel(64);
    let mut stop = stop;
    tokio::spawn(async move {
        while let Accepted::Connection(stream) = next_connection(&listener, &mut stop).await {
            if !grpc_take(stream, &accept, &sender).await {
                return;
            }
        }
        let queued = take_queued(&listener);
        tracing::debug!(
            queued = queued.len(),
            "gRPC listener closing after its queued connections"
        );
        drop(listener);
        for stream in queued {
            if !grpc_take(stream, &accept, &sender).await {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

/// Hands one accepted gRPC connection to tonic: plain ones at once, TLS
/// ones from a task of their own after the handshake. Over the cap it is
/// closed (counted and logged). `false` once tonic has gone.
async fn grpc_take(
    stream: TcpStream,
    accept: &Accept,
    sender: &mpsc::Sender<io::Result<Conn>>,
) -> bool {
    let Some(permit) = accept.slot() else {
        if let Ok(refusal) = Arc::clone(&accept.refusals).try_acquire_owned() {
            tokio::spawn(refuse_grpc(stream, refusal, accept.clone()));
        }
        return !sender.is_closed();
    };
    if accept.tls.is_none() {
        return sender
            .send(Ok(Conn::plain(stream, Some(permit))))
            .await
            .is_ok();
    }
    let (accept, sender) = (accept.clone(), sender.clone());
    tokio::spawn(async move {
        if let Some(conn) = accept.handshake(stream, Some(permit)).await {
            let _ = sender.send(Ok(conn)).await;
        }
    });
    true
}

/// Answers every call of an over-cap gRPC connection UNAVAILABLE ("too
/// many connections"), outside tonic, then closes it.
async fn refuse_grpc(stream: TcpStream, refusal: OwnedSemaphorePermit, accept: Accept) {
    let Some(stream) = accept.handshake(stream, Some(refusal)).await else {
        return;
    };
    let max_connections = accept.limits.max_connections;
    let service = hyper::service::service_fn(move |_: Request<Incoming>| async move {
        let status = tonic::Status::from(too_many_connections(max_connections));
        Ok::<_, std::convert::Infallible>(status.into_http::<axum::body::Body>())
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    // Long enough for the client's first calls, then GOAWAY.
    if tokio::time::timeout(accept.limits.header_read_timeout, connection.as_mut())
        .await
        .is_err()
    {
        connection.as_mut().graceful_shutdown();
        let _ = connection.await;
    }
}
