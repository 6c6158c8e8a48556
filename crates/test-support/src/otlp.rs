//! An OTLP trace receiver on 127.0.0.1:0, for the tests of the trace
//! export: every export request it gets is handed to the test through a
//! channel.

use std::net::SocketAddr;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

struct Receiver {
    exports: mpsc::Sender<ExportTraceServiceRequest>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.exports
            .send(request.into_inner())
            .await
            .map_err(|_| tonic::Status::unavailable("the test has finished"))?;
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running receiver: its address, the exports it got, and its task.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    pub exports: mpsc::Receiver<ExportTraceServiceRequest>,
    pub task: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Starts a receiver on the current tokio runtime; `capacity` exports wait
/// in the channel before the receiver stops answering.
pub async fn otlp_receiver(capacity: usize) -> OtlpReceiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (exports_tx, exports) = mpsc::channel(capacity);
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver {
                exports: exports_tx,
            }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    OtlpReceiver {
        addr,
        exports,
        task,
    }
}
