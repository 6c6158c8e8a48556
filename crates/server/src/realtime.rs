//! The real-time listeners: an HTTP and a gRPC address that serve the same
//! API as the main ones, on a runtime thread of their own.
//!
//! Why: tokio has no task priorities. Under a background flood the main
//! runtime's threads have hundreds of connection tasks to poll (reading
//! bodies, handing them to the decode pool, writing answers), and a
//! real-time request's connection waits its turn behind them, however
//! early the scheduler then runs its batch. Connections accepted here are
//! polled by one current-thread runtime that serves nothing else, on an OS
//! thread on the request path (`tickserve_scheduler::os_thread`: the
//! short time slice, or SCHED_FIFO when configured), so a request sent here
//! is read as soon as it arrives. A trading platform points its real-time
//! client at these addresses and everything else at the main ones.
//!
//! Everything past the socket is shared: the same router and gRPC
//! services over the same state (models, schedulers, cache, streams), the
//! same authentication, TLS and limits, and the same shutdown: the stop
//! signal drains these listeners as it drains the main ones
//! (crate::serve), and `serve` returns only when both have drained.

use std::future::Future;
use std::pin::Pin;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::StartError;

/// What serves one listener until the stop signal, then drains it: called
/// on the real-time thread's runtime.
pub(crate) type Serve =
    Box<dyn FnOnce(TcpListener) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// The running real-time thread, if any.
pub(crate) struct Running {
    /// Resolves (or is dropped) when the thread's listeners have drained.
    done: Option<oneshot::Receiver<()>>,
}

impl Running {
    /// Waits until every real-time connection has closed after the stop
    /// signal.
    pub(crate) async fn drained(self) {
        if let Some(done) = self.done {
            let _ = done.await;
        }
    }
}

/// Moves the real-time listeners to a new runtime on a thread of their own
/// and serves each there with what serves it. Nothing to serve: no thread.
pub(crate) fn start(served: Vec<(TcpListener, Serve)>) -> Result<Running, StartError> {
    if served.is_empty() {
        return Ok(Running { done: None });
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::RealtimeThread)?;
    // A listener's readiness is reported by the reactor it is registered
    // with: register each with the new runtime's.
    let mut moved = Vec::with_capacity(served.len());
    {
        let _entered = runtime.enter();
        for (listener, serve) in served {
            let listener = listener
                .into_std()
                .and_then(TcpListener::from_std)
                .map_err(StartError::RealtimeThread)?;
            moved.push((listener, serve));
        }
    }
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("realtime-listen".into())
        .spawn(move || {
            tickserve_scheduler::os_thread::enter_request_path("real-time listeners");
            runtime.block_on(async move {
                let serving: Vec<_> = moved
                    .into_iter()
                    .map(|(listener, serve)| tokio::spawn(serve(listener)))
                    .collect();
                for listener in serving {
                    let _ = listener.await;
                }
            });
            let _ = done_tx.send(());
        })
        .map_err(StartError::RealtimeThread)?;
    Ok(Running {
        done: Some(done_rx),
    })
}
