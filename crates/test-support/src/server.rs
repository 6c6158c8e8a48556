//! A real tickserve server on 127.0.0.1:0 (HTTP, gRPC and metrics on free
//! ports) with the real engine, and the client calls tests make to it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tickserve_server::{BoundServer, ServerConfig, StartError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{cnn_lstm_config, repository_with, root};

pub struct TestServer {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    /// The real-time listeners, when the config asks for them.
    pub realtime_http: Option<SocketAddr>,
    pub realtime_grpc: Option<SocketAddr>,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<Result<(), StartError>>>,
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Asks the server to shut down and waits for `serve` to return.
    pub async fn shutdown(mut self) -> Result<(), StartError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// GETs `path` and parses the answer as JSON, whatever its status.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.client.get(self.url(path)).json_value().await
    }

    /// POSTs an inference request for `model` as JSON.
    pub async fn post_infer(&self, model: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/v2/models/{model}/infer")))
            .json(body)
            .sent()
            .await
    }

    /// POSTs an inference request for the bundled model as JSON.
    pub async fn infer(&self, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.url("/v2/models/cnn_lstm/infer"))
            .json(body)
            .sent()
            .await
    }

    pub async fn metrics_text(&self) -> String {
        self.client
            .get(format!("http://{}/metrics", self.metrics))
            .text_body()
            .await
    }
}

pub fn config(repository: PathBuf) -> ServerConfig {
    ServerConfig::loopback(repository)
}

/// Starts a server and waits until it reports ready.
pub async fn start(config: ServerConfig) -> TestServer {
    let server = BoundServer::bind(config).await.unwrap();
    let (http, grpc, metrics) = (
        server.http_addr(),
        server.grpc_addr(),
        server.metrics_addr(),
    );
    let (realtime_http, realtime_grpc) = (server.realtime_http_addr(), server.realtime_grpc_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let ready = format!("http://{http}/v2/health/ready");
    // Warm-up runs every batch size; on a loaded 2-core machine a large
    // `max_batch_size` takes seconds.
    for _ in 0..6000 {
        if let Ok(r) = client.get(&ready).send().await
            && r.status() == 200
        {
            return TestServer {
                http,
                grpc,
                metrics,
                realtime_http,
                realtime_grpc,
                client,
                stop: Some(stop),
                task: Some(task),
            };
        }
        assert!(!task.is_finished(), "server stopped before becoming ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("server not ready after 60 s");
}

/// The bundled repository.
pub async fn start_default() -> TestServer {
    start(config(root().join("models"))).await
}

/// A server for a fresh repository holding the bundled model as `name`
/// (version 1) with [`cnn_lstm_config`]`(extra)`.
pub async fn start_model(name: &str, extra: &str) -> TestServer {
    start(config(repository_with(name, &cnn_lstm_config(extra)))).await
}

/// The awaits and unwraps that end every request a test sends, as one
/// call each.
pub trait RequestExt {
    /// Sends the request; panics when it cannot be sent.
    fn sent(self) -> impl Future<Output = reqwest::Response> + Send;
    /// Sends the request and parses the answer as JSON, whatever its status.
    fn json_value(self) -> impl Future<Output = serde_json::Value> + Send;
    /// Sends the request and reads the answer as text, whatever its status.
    fn text_body(self) -> impl Future<Output = String> + Send;
}

impl RequestExt for reqwest::RequestBuilder {
    async fn sent(self) -> reqwest::Response {
        self.send().await.unwrap()
    }

    async fn json_value(self) -> serde_json::Value {
        self.send().await.unwrap().json().await.unwrap()
    }

    async fn text_body(self) -> String {
        self.send().await.unwrap().text().await.unwrap()
    }
}

/// Writes an HTTP/1.1 POST of the JSON `body` to `path` on a raw
/// `socket`, for tests that control the connection themselves (hang up,
/// read the answer at a chosen moment).
pub fn write_json_post(socket: &mut impl std::io::Write, path: &str, body: &[u8]) {
    write!(
        socket,
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    socket.write_all(body).unwrap();
}

/// An OIP request body of `rows` rows of the bundled model's input (`data`,
/// row-major) as a MessagePack client builds it: FP32 values as MessagePack
/// float32 (5 bytes each), not float64.
pub fn msgpack_request(rows: usize, data: &[f32]) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Request<'a> {
        inputs: [Input<'a>; 1],
    }
    #[derive(serde::Serialize)]
    struct Input<'a> {
        name: &'a str,
        shape: [usize; 3],
        datatype: &'a str,
        data: &'a [f32],
    }
    rmp_serde::to_vec_named(&Request {
        inputs: [Input {
            name: "input",
            shape: [rows, 50, 60],
            datatype: "FP32",
            data,
        }],
    })
    .unwrap()
}

/// A gRPC inference request of `rows` rows of the bundled model's input
/// (`data`, row-major), in `fp32_contents` or, when `raw`, in
/// `raw_input_contents` (little-endian bytes).
pub fn grpc_request(
    id: &str,
    rows: usize,
    data: Vec<f32>,
    raw: bool,
) -> tickserve_server::grpc::pb::ModelInferRequest {
    use tickserve_server::grpc::pb;
    let mut request = pb::ModelInferRequest {
        model_name: "cnn_lstm".into(),
        id: id.into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 50, 60],
            ..Default::default()
        }],
        ..Default::default()
    };
    if raw {
        request.raw_input_contents = vec![data.iter().flat_map(|v| v.to_le_bytes()).collect()];
    } else {
        request.inputs[0].contents = Some(pb::InferTensorContents {
            fp32_contents: data,
            ..Default::default()
        });
    }
    request
}
