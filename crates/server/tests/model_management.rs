//! Model management against a running server: a Triton-style repository
//! (config.pbtxt, an ONNX-only folder, version policy) serving the golden
//! outputs, explicit load/unload with the repository index, bad input that
//! leaves the previous version serving, and swaps under load (explicit
//! and poll) with no failed request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tickserve_test_support::RequestExt;

use common::{TestServer, assert_golden_rows, config, error_of, golden, request_for, root, start};
use serde_json::{Value, json};
use tickserve_server::{ControlMode, ModelControl, ServerConfig};

const TRITON_PBTXT: &str = r#"
name: "triton_cnn"
backend: "onnxruntime"
max_batch_size: 8
version_policy: { latest: { num_versions: 1 } }
input [ { name: "input", data_type: TYPE_FP32, dims: [ 50, 60 ] } ]
output [ { name: "output", data_type: TYPE_FP32, dims: [ 3 ] } ]
dynamic_batching {
  max_queue_delay_microseconds: 200
  priority_levels: 3
  default_priority_level: 2
  default_queue_policy { max_queue_size: 100 }
}
instance_group [ { count: 1, kind: KIND_CPU } ]
optimization { input_pinned_memory { enable: true } }
"#;

fn temp_repo() -> PathBuf {
    tickserve_test_support::fresh_dir("tickserve-mm")
}

/// Copies the bundled model to `repo/name/version/model.onnx` through a
/// temporary folder renamed into place, as a deployment should, so a
/// polling server never sees half a file.
fn add_version(repo: &Path, name: &str, version: u64) {
    let staging = repo.join(format!(".staging-{name}-{version}"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::copy(
        root().join("models/cnn_lstm/1/model.onnx"),
        staging.join("model.onnx"),
    )
    .unwrap();
    std::fs::create_dir_all(repo.join(name)).unwrap();
    std::fs::rename(&staging, repo.join(name).join(version.to_string())).unwrap();
}

fn server_config(repo: PathBuf, control: ModelControl) -> ServerConfig {
    let mut config = config(repo);
    // Every request runs on the engine: the swaps are what is tested.
    config.cache.enabled = false;
    config.model_control = control;
    config
}

fn explicit(models: &[&str]) -> ModelControl {
    ModelControl {
        mode: ControlMode::Explicit,
        load_models: models.iter().map(|m| (*m).to_owned()).collect(),
        ..ModelControl::default()
    }
}

async fn post(server: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let response = server
        .client
        .post(server.url(path))
        .json(&body)
        .sent()
        .await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn index(server: &TestServer) -> Vec<Value> {
    let (status, body) = post(server, "/v2/repository/index", json!({})).await;
    assert_eq!(status, 200);
    body.as_array().unwrap().clone()
}

fn row<'a>(index: &'a [Value], name: &str, version: &str) -> &'a Value {
    index
        .iter()
        .find(|r| r["name"] == name && r["version"] == version)
        .unwrap_or_else(|| panic!("no index row {name} v'{version}' in {index:?}"))
}

async fn infer_golden(server: &TestServer, model: &str) -> (u16, Value) {
    let golden = golden();
    post(
        server,
        &format!("/v2/models/{model}/infer"),
        request_for(&golden, &[0, 1, 2], "g"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triton_repository_and_an_onnx_only_folder_serve_the_golden_outputs() {
    let repo = temp_repo();
    add_version(&repo, "triton_cnn", 1);
    add_version(&repo, "triton_cnn", 2);
    std::fs::write(repo.join("triton_cnn/config.pbtxt"), TRITON_PBTXT).unwrap();
    add_version(&repo, "bare", 1);
    let server = start(server_config(repo, ModelControl::default())).await;
    let golden = golden();
    for model in ["triton_cnn", "bare"] {
        let (status, body) = infer_golden(&server, model).await;
        assert_eq!(status, 200, "{model}: {body}");
        assert_golden_rows(&golden, &body, &[0, 1, 2]);
    }
    // latest: 1 serves version 2 only.
    let (_, body) = infer_golden(&server, "triton_cnn").await;
    assert_eq!(body["model_version"], "2");
    let (status, _) = server
        .client
        .get(server.url("/v2/models/triton_cnn/versions/1"))
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(status, 404);
    // The completed configurations: pbtxt's batch size, the graph's tensors.
    let config = server.get_json("/v2/models/triton_cnn/config").await;
    assert_eq!(config["max_batch_size"], 8);
    let bare = server.get_json("/v2/models/bare/config").await;
    assert_eq!(bare["max_batch_size"], 32);
    assert_eq!(bare["input"][0]["name"], "input");
    assert_eq!(bare["input"][0]["dims"], json!([50, 60]));
    assert_eq!(bare["output"][0]["dims"], json!([3]));
    let meta = server.get_json("/v2/models/bare").await;
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 50, 60]));
    // A priority above priority_levels' classes still maps (3 → class 3).
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_mode_loads_unloads_and_reports_the_index() {
    let repo = temp_repo();
    add_version(&repo, "a", 1);
    add_version(&repo, "b", 1);
    let server = start(server_config(repo, explicit(&["a"]))).await;
    let idx = index(&server).await;
    assert_eq!(row(&idx, "a", "1")["state"], "READY");
    assert_eq!(row(&idx, "b", "")["state"], "UNAVAILABLE");
    assert_eq!(row(&idx, "b", "")["reason"], "not loaded");
    assert_eq!(infer_golden(&server, "b").await.0, 404);

    let (status, body) = post(&server, "/v2/repository/models/b/load", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(infer_golden(&server, "b").await.0, 200);
    assert_eq!(row(&index(&server).await, "b", "1")["state"], "READY");

    let (status, _) = post(&server, "/v2/repository/models/a/unload", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(infer_golden(&server, "a").await.0, 404);
    let idx = index(&server).await;
    assert_eq!(row(&idx, "a", "")["reason"], "unloaded");
    let (status, body) = post(&server, "/v2/repository/index", json!({"ready": true})).await;
    assert_eq!(status, 200);
    assert!(
        body.as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "READY")
    );

    // A load with Triton's JSON config override.
    let override_config = json!({"max_batch_size": 4}).to_string();
    let (status, body) = post(
        &server,
        "/v2/repository/models/a/load",
        json!({"parameters": {"config": override_config}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let config = server.get_json("/v2/models/a/config").await;
    assert_eq!(config["max_batch_size"], 4);
    let (status, body) = post(&server, "/v2/repository/models/nope/load", json!({})).await;
    assert_eq!(status, 400);
    assert!(error_of(&body).contains("no such model folder"), "{body}");
    assert!(!index(&server).await.iter().any(|r| r["name"] == "nope"));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_and_unload_are_refused_outside_explicit_mode() {
    let repo = temp_repo();
    add_version(&repo, "a", 1);
    let server = start(server_config(repo, ModelControl::default())).await;
    let (status, body) = post(&server, "/v2/repository/models/a/unload", json!({})).await;
    assert_eq!(status, 400);
    assert!(
        error_of(&body).contains("--model-control-mode none"),
        "{body}"
    );
    assert_eq!(infer_golden(&server, "a").await.0, 200);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_that_load_with_the_reason_and_the_previous_version_serves() {
    let repo = temp_repo();
    add_version(&repo, "m", 1);
    let server = start(server_config(repo.clone(), explicit(&["m"]))).await;

    // A broken model file as version 2.
    std::fs::create_dir_all(repo.join("m/2")).unwrap();
    std::fs::write(repo.join("m/2/model.onnx"), b"not a model").unwrap();
    let (status, body) = post(&server, "/v2/repository/models/m/load", json!({})).await;
    assert_eq!(status, 400);
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("m/2/model.onnx"), "{error}");
    let idx = index(&server).await;
    assert_eq!(row(&idx, "m", "1")["state"], "READY");
    let failed = row(&idx, "m", "2");
    assert_eq!(failed["state"], "UNAVAILABLE");
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("m/2/model.onnx"),
        "{failed}"
    );
    let (status, answer) = infer_golden(&server, "m").await;
    assert_eq!(status, 200);
    assert_eq!(answer["model_version"], "1");
    std::fs::remove_dir_all(repo.join("m/2")).unwrap();

    // An invalid pbtxt and an unknown datatype: the file and the reason.
    for (pbtxt, reason) in [
        (
            "max_batch_size: 8 input [",
            "not valid protobuf text format",
        ),
        (
            "max_batch_size: 8\ninput [{ name: \"input\" data_type: TYPE_STRING dims: [50, 60] }]",
            "has data_type TYPE_STRING",
        ),
    ] {
        std::fs::write(repo.join("m/config.pbtxt"), pbtxt).unwrap();
        let (status, body) = post(&server, "/v2/repository/models/m/load", json!({})).await;
        assert_eq!(status, 400);
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains("m/config.pbtxt") && error.contains(reason),
            "{error}"
        );
        let idx = index(&server).await;
        let failed = row(&idx, "m", "");
        assert_eq!(failed["state"], "UNAVAILABLE");
        assert!(failed["reason"].as_str().unwrap().contains(reason));
        assert_eq!(infer_golden(&server, "m").await.0, 200);
    }
    server.shutdown().await.unwrap();
}

/// Clients that send golden requests until told to stop (each at most
/// `limit` requests), counting failures and the versions that answered.
struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicUsize>,
    v1: Arc<AtomicUsize>,
    v2: Arc<AtomicUsize>,
    /// Answers from version 1 after the first answer from version 2.
    v1_after_v2: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn start_load(server: &TestServer, clients: usize, limit: usize) -> Load {
    let load = Load {
        stop: Arc::new(AtomicBool::new(false)),
        failed: Arc::new(AtomicUsize::new(0)),
        v1: Arc::new(AtomicUsize::new(0)),
        v2: Arc::new(AtomicUsize::new(0)),
        v1_after_v2: Arc::new(AtomicUsize::new(0)),
        tasks: Vec::new(),
    };
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = server.client.clone();
        let url = server.url("/v2/models/m/infer");
        let (stop, failed, v1, v2, late) = (
            Arc::clone(&load.stop),
            Arc::clone(&load.failed),
            Arc::clone(&load.v1),
            Arc::clone(&load.v2),
            Arc::clone(&load.v1_after_v2),
        );
        tasks.push(tokio::spawn(async move {
            let golden = golden();
            for i in 0..limit {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let row = (c + i) % 8;
                let body = request_for(&golden, &[row], "load");
                let seen_v2 = v2.load(Ordering::SeqCst) > 0;
                let answer = client.post(&url).json(&body).send().await;
                let ok = match answer {
                    Ok(r) if r.status() == 200 => r.json::<Value>().await.ok(),
                    _ => None,
                };
                match ok {
                    Some(answer) => {
                        assert_golden_rows(&golden, &answer, &[row]);
                        if answer["model_version"] == "2" {
                            v2.fetch_add(1, Ordering::SeqCst);
                        } else {
                            v1.fetch_add(1, Ordering::SeqCst);
                            if seen_v2 {
                                late.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                    None => {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    Load { tasks, ..load }
}

impl Load {
    /// Waits (bounded) until `count` reaches `at_least`.
    async fn until(&self, what: &str, count: &AtomicUsize, at_least: usize) {
        for _ in 0..3000 {
            if count.load(Ordering::SeqCst) >= at_least {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what} never reached {at_least}");
    }

    async fn finish(self) -> (usize, usize, usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        (
            self.failed.load(Ordering::SeqCst),
            self.v1.load(Ordering::SeqCst),
            self.v2.load(Ordering::SeqCst),
            self.v1_after_v2.load(Ordering::SeqCst),
        )
    }
}

async fn swap_under_load(control: ModelControl) {
    let repo = temp_repo();
    add_version(&repo, "m", 1);
    // A second model whose traffic must not pause during the swap.
    add_version(&repo, "other", 1);
    let poll = control.mode == ControlMode::Poll;
    let server = start(server_config(repo.clone(), control)).await;
    let load = start_load(&server, 4, 5000);
    load.until("answers from version 1", &load.v1, 20).await;
    add_version(&repo, "m", 2);
    if !poll {
        let (status, body) = post(&server, "/v2/repository/models/m/load", json!({})).await;
        assert_eq!(status, 200, "{body}");
    }
    load.until("answers from version 2", &load.v2, 50).await;
    // The other model answered throughout.
    assert_eq!(infer_golden(&server, "other").await.0, 200);
    let (failed, v1, v2, _) = load.finish().await;
    assert_eq!(failed, 0, "failed requests during the swap");
    assert!(v1 >= 20 && v2 >= 50, "v1 {v1}, v2 {v2}");
    // Version 1 is gone (latest: 1) once it drained.
    let idx = index(&server).await;
    assert_eq!(row(&idx, "m", "2")["state"], "READY");
    assert!(!idx.iter().any(|r| r["name"] == "m" && r["version"] == "1"));
    let (_, answer) = infer_golden(&server, "m").await;
    assert_eq!(answer["model_version"], "2");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_swap_under_load_fails_no_request() {
    swap_under_load(explicit(&["*"])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polled_swap_under_load_fails_no_request() {
    swap_under_load(ModelControl {
        mode: ControlMode::Poll,
        poll_interval: Duration::from_millis(100),
        ..ModelControl::default()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_file_replaced_in_place_is_not_answered_from_the_old_cache() {
    let repo = temp_repo();
    add_version(&repo, "m", 1);
    let mut config = server_config(repo.clone(), explicit(&["m"]));
    config.cache.enabled = true;
    let server = start(config).await;
    let (status, first) = infer_golden(&server, "m").await;
    assert_eq!(status, 200);
    assert_golden_rows(&golden(), &first, &[0, 1, 2]);
    // The same version number and engine variant, other weights ("a
    // retrained model"): 4 KiB at 3/8 of the file set to zero, which lies
    // in the raw data of the largest weight tensor (bytes 25 % to 49.8 %
    // of the bundled model.onnx).
    let path = repo.join("m/1/model.onnx");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() * 3 / 8;
    bytes[at..at + 4096].fill(0);
    std::fs::write(&path, bytes).unwrap();
    let (status, body) = post(&server, "/v2/repository/models/m/load", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (status, second) = infer_golden(&server, "m").await;
    assert_eq!(status, 200);
    assert_ne!(
        first["outputs"][0]["data"], second["outputs"][0]["data"],
        "answered from the cache of the replaced file"
    );
    server.shutdown().await.unwrap();
}
