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

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, Request, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tower::ServiceExt;

/// How long a connection stays open after the drain begins, so that a
/// request a client sent just before is read and answered, not reset.
pub(crate) const IDLE_GRACE: Duration = Duration::from_millis(250);

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
pub(crate) async fn serve_http(listener: TcpListener, app: Router, stop: watch::Receiver<bool>) {
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
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut stop = stop;
    loop {
        tokio::select! {
            accepted = next_connection(&listener, &mut stop) => match accepted {
                Accepted::Connection(stream) => {
                    connections.spawn(connection(stream, app.clone(), drain_rx.clone()));
                }
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
        connections.spawn(connection(stream, app.clone(), drain_rx.clone()));
    }
    drop(listener);
    let _ = drain_tx.send(true);
    while connections.join_next().await.is_some() {}
}

async fn connection(stream: TcpStream, app: Router, mut drain: watch::Receiver<bool>) {
    let service =
        hyper::service::service_fn(move |request: Request<Incoming>| app.clone().oneshot(request));
    let builder = auto::Builder::new(TokioExecutor::new());
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
pub(crate) fn grpc_incoming(
    listener: TcpListener,
    stop: watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TcpStream>> {
    // Bounded: past it the accept loop waits for tonic, as the kernel's
    // queue would.
    let (sender, receiver) = mpsc::channel(64);
    let mut stop = stop;
    tokio::spawn(async move {
        while let Accepted::Connection(stream) = next_connection(&listener, &mut stop).await {
            if sender.send(Ok(stream)).await.is_err() {
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
            if sender.send(Ok(stream)).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}
