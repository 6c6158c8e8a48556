//! Starts a real tickserve server on 127.0.0.1:0 with the real engine and
//! the bundled model, and helpers to talk to it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod redis;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tickserve_server::{BoundServer, ServerConfig, StartError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub struct TestServer {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
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
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// POSTs an inference request for the bundled model as JSON.
    pub async fn infer(&self, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.url("/v2/models/cnn_lstm/infer"))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn metrics_text(&self) -> String {
        self.client
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

pub fn config(repository: PathBuf) -> ServerConfig {
    ServerConfig {
        model_repository: repository,
        http_addr: "127.0.0.1:0".parse().unwrap(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        drain_timeout: Duration::from_secs(10),
        shutdown_delay: Duration::ZERO,
        max_body_bytes: 16 * 1024 * 1024,
        cache: tickserve_server::CacheConfig::default(),
        admin_token: None,
        auth: None,
        tls: None,
        limits: tickserve_server::Limits::default(),
    }
}

/// Starts a server and waits until it reports ready.
pub async fn start(config: ServerConfig) -> TestServer {
    let server = BoundServer::bind(config).await.unwrap();
    let (http, grpc, metrics) = (
        server.http_addr(),
        server.grpc_addr(),
        server.metrics_addr(),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let ready = format!("http://{http}/v2/health/ready");
    for _ in 0..600 {
        if let Ok(r) = client.get(&ready).send().await
            && r.status() == 200
        {
            return TestServer {
                http,
                grpc,
                metrics,
                client,
                stop: Some(stop),
                task: Some(task),
            };
        }
        assert!(!task.is_finished(), "server stopped before becoming ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("server not ready after 6 s");
}

/// The bundled repository.
pub async fn start_default() -> TestServer {
    start(config(root().join("models"))).await
}

/// A repository in a fresh temp folder holding the bundled model under
/// `name` with the given config.toml.
pub fn repository_with(name: &str, config_toml: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tickserve-test-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let model_dir = dir.join(name);
    std::fs::create_dir_all(model_dir.join("1")).unwrap();
    std::fs::write(model_dir.join("config.toml"), config_toml).unwrap();
    std::fs::copy(
        root().join("models/cnn_lstm/1/model.onnx"),
        model_dir.join("1/model.onnx"),
    )
    .unwrap();
    dir
}

/// config.toml of the bundled model with the batching section replaced.
pub fn cnn_lstm_config(extra: &str) -> String {
    format!(
        r#"
engine = "native"
max_batch_size = 32
[[input]]
name = "input"
datatype = "FP32"
dims = [50, 60]
[[output]]
name = "output"
datatype = "FP32"
dims = [3]
{extra}
"#
    )
}

pub struct Golden {
    pub input: Vec<f32>,
    pub output: Vec<f32>,
}

pub const ROW: usize = 50 * 60;

pub fn golden() -> Golden {
    let read = |name: &str| {
        let bytes = std::fs::read(root().join("fixtures/golden/cnn_lstm").join(name)).unwrap();
        npyz::NpyFile::new(&bytes[..])
            .unwrap()
            .into_vec::<f32>()
            .unwrap()
    };
    Golden {
        input: read("input.npy"),
        output: read("output.npy"),
    }
}

/// An OIP request body for the golden rows `rows`.
pub fn request_for(golden: &Golden, rows: &[usize], id: &str) -> serde_json::Value {
    let mut data = Vec::with_capacity(rows.len() * ROW);
    for &r in rows {
        data.extend_from_slice(&golden.input[r * ROW..(r + 1) * ROW]);
    }
    serde_json::json!({
        "id": id,
        "inputs": [{"name": "input", "shape": [rows.len(), 50, 60], "datatype": "FP32", "data": data}]
    })
}

/// Asserts that `response` carries exactly the golden outputs of `rows`.
pub fn assert_golden_rows(golden: &Golden, response: &serde_json::Value, rows: &[usize]) {
    let output = &response["outputs"][0];
    assert_eq!(output["name"], "output");
    assert_eq!(output["datatype"], "FP32");
    assert_eq!(output["shape"], serde_json::json!([rows.len(), 3]));
    let data: Vec<f64> = output["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(data.len(), rows.len() * 3);
    for (i, &r) in rows.iter().enumerate() {
        for j in 0..3 {
            let want = golden.output[r * 3 + j] as f64;
            let got = data[i * 3 + j];
            assert!(
                (got - want).abs() <= 1e-5,
                "row {i} (golden {r}) output {j}: {got} vs {want}"
            );
        }
    }
}
