//! Real-time isolation end to end with the real engine: a background batch
//! runs in chunks, a real-time request that arrives meanwhile is answered
//! before the batch ends, chunked answers are the same bits as one engine
//! call gives, and the real-time listeners answer while the main runtime
//! cannot run at all. Order and completion are asserted, never wall-clock
//! thresholds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};
use tickserve_test_support::RequestExt;

use common::*;
use serde_json::{Value, json};

/// A background request of `rows` golden rows (cycled), and the rows used.
fn background(golden: &Golden, rows: usize) -> (Value, Vec<usize>) {
    let available = golden.input.len() / ROW;
    let picked: Vec<usize> = (0..available).cycle().take(rows).collect();
    let mut body = request_for(golden, &picked, "bg");
    body["parameters"] = json!({ "priority": 5 });
    (body, picked)
}

fn outputs(response: &Value) -> Vec<f64> {
    response["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

const BATCH: usize = 64;

fn config_toml(batching: &str) -> String {
    cnn_lstm_config(&format!(
        "[dynamic_batching]\n{batching}\n[dynamic_batching.priority.5]\ndefault_timeout = \"60s\"\n[dynamic_batching.priority.1]\ndefault_timeout = \"60s\"\n[adaptive_batching]\nenabled = false\n[cache]\nenabled = false\n"
    ))
    .replace("max_batch_size = 32", &format!("max_batch_size = {BATCH}"))
}

async fn execution_count(server: &TestServer, model: &str) -> u64 {
    let stats = server.get_json(&format!("/v2/models/{model}/stats")).await;
    stats["model_stats"][0]["execution_count"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_time_request_completes_while_a_background_batch_runs() {
    // Its own model name: the other test's chunk gauge shares this
    // process's metrics.
    let repo = repository_with("chunked", &config_toml("chunk_rows = 2"));
    let server = start(config(repo)).await;
    let golden = golden();
    let (body, rows) = background(&golden, BATCH);
    let url = server.url("/v2/models/chunked/infer");
    let mut realtime = request_for(&golden, &[1], "rt");
    realtime["parameters"] = json!({ "priority": 1 });
    // Real-time traffic seen: background batches now run in chunks.
    let warm = server.client.post(&url).json(&realtime).sent().await;
    assert_eq!(warm.status(), 200);
    let bg = tokio::spawn({
        let (client, url) = (server.client.clone(), url.clone());
        async move {
            let response: Value = client.post(&url).json(&body).json_value().await;
            (response, Instant::now())
        }
    });
    // The background batch has started once its first chunk is counted
    // (after the warm-up call); 31 chunks of 2 rows remain.
    for _ in 0..3000 {
        if execution_count(&server, "chunked").await >= 2 {
            break;
        }
        assert!(
            !bg.is_finished(),
            "background request ended before it was seen running"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        execution_count(&server, "chunked").await >= 2,
        "background batch never started"
    );
    let response = server.client.post(&url).json(&realtime).sent().await;
    assert_eq!(response.status(), 200);
    let response: Value = response.json().await.unwrap();
    let realtime_done = Instant::now();
    assert_golden_rows(&golden, &response, &[1]);
    let (background, background_done) = bg.await.unwrap();
    assert!(
        realtime_done < background_done,
        "the real-time request waited for the whole background batch"
    );
    assert_golden_rows(&golden, &background, &rows);
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("tickserve_chunk_rows{model=\"chunked\",version=\"1\"} 2"),
        "chunk gauge missing: {metrics}"
    );
    server.shutdown().await.unwrap();
}

/// Chunking hands every row to the engine exactly once and returns its
/// answer untouched: a 64-row batch run in chunks of 7 gives, bit for bit,
/// what the same rows give as one unchunked 64-row call and as separate
/// calls of the chunk sizes (the native engine's answer for a row does not
/// depend on the batch it runs in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_answers_are_the_same_bits_as_the_whole_batch() {
    let golden = golden();
    let (body, rows) = background(&golden, BATCH);
    let mut realtime = request_for(&golden, &[0], "rt");
    realtime["parameters"] = json!({ "priority": 1 });

    let server = start(config(repository_with(
        "cnn_lstm",
        &config_toml("chunk_rows = 7"),
    )))
    .await;
    // A priority with a target first: batches of lower priorities chunk.
    assert_eq!(server.infer(&realtime).await.status(), 200);
    let response = server.infer(&body).await;
    assert_eq!(response.status(), 200);
    let chunked = outputs(&response.json().await.unwrap());
    // 1 real-time call, then ⌈64 / 7⌉ = 10 chunks (a chunk is counted
    // just after its requests are answered).
    let mut calls = 0;
    for _ in 0..500 {
        calls = execution_count(&server, "cnn_lstm").await;
        if calls >= 11 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(calls, 11);
    server.shutdown().await.unwrap();

    let server = start(config(repository_with(
        "cnn_lstm",
        &config_toml("chunking = false"),
    )))
    .await;
    let mut separate = Vec::new();
    for part in rows.chunks(7) {
        let mut request = request_for(&golden, part, "part");
        request["parameters"] = json!({ "priority": 5 });
        let response = server.infer(&request).await;
        assert_eq!(response.status(), 200);
        separate.extend(outputs(&response.json().await.unwrap()));
    }
    let response = server.infer(&body).await;
    let whole: Value = response.json().await.unwrap();
    server.shutdown().await.unwrap();

    assert_eq!(chunked.len(), BATCH * 3);
    assert_eq!(
        chunked, separate,
        "chunked outputs differ from calls of the chunk sizes"
    );
    assert_eq!(
        chunked,
        outputs(&whole),
        "chunked outputs differ from the whole batch"
    );
    assert_golden_rows(&golden, &whole, &rows);
}

/// Runs `calls` on a runtime of its own in a new thread (so that it needs
/// nothing of the test's runtime) and sends its result.
fn on_own_thread<T: Send + 'static, F: Future<Output = T> + 'static>(
    calls: impl FnOnce() -> F + Send + 'static,
) -> std_mpsc::Receiver<T> {
    let (tx, rx) = std_mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _ = tx.send(runtime.block_on(calls()));
    });
    rx
}

/// POSTs `body` to the bundled model at `addr`: status and JSON answer.
async fn post_infer(addr: SocketAddr, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/v2/models/cnn_lstm/infer"))
        .json(&body)
        .sent()
        .await;
    (response.status().as_u16(), response.json().await.unwrap())
}

/// The gRPC answer of the bundled model at `addr` for golden `row`.
async fn grpc_infer(addr: SocketAddr, golden: &Golden, row: usize) -> Vec<f32> {
    use tickserve_server::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let data = golden.input[row * ROW..(row + 1) * ROW].to_vec();
    let response = client
        .model_infer(grpc_request("rt", 1, data, false))
        .await
        .unwrap()
        .into_inner();
    response.outputs[0]
        .contents
        .as_ref()
        .unwrap()
        .fp32_contents
        .clone()
}

/// The real-time listeners serve the same API on a thread of their own: with
/// the main runtime's only worker held, a request on the main address waits,
/// and requests on the real-time addresses (HTTP and gRPC) are answered,
/// with the same bits as the main addresses give.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn the_real_time_listeners_answer_while_the_main_runtime_is_held() {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config = config(repository_with("cnn_lstm", &cnn_lstm_config("")));
    config.realtime_http_addr = Some(any);
    config.realtime_grpc_addr = Some(any);
    let server = start(config).await;
    let (rt_http, rt_grpc) = (server.realtime_http.unwrap(), server.realtime_grpc.unwrap());
    assert_ne!(rt_http, server.http);
    let golden = golden();
    let (status, answer) = post_infer(rt_http, request_for(&golden, &[2], "rt")).await;
    assert_eq!(status, 200, "{answer}");
    assert_golden_rows(&golden, &answer, &[2]);
    assert_eq!(
        grpc_infer(rt_grpc, &golden, 3).await,
        grpc_infer(server.grpc, &golden, 3).await
    );

    // Hold the main runtime's only worker: nothing spawned on it runs.
    let (held_tx, held_rx) = std_mpsc::channel();
    let (release_tx, release_rx) = std_mpsc::channel::<()>();
    let holder = tokio::spawn(async move {
        held_tx.send(()).unwrap();
        // Bounded: a failing test below still ends.
        let _ = release_rx.recv_timeout(Duration::from_secs(120));
    });
    held_rx.recv_timeout(Duration::from_secs(60)).unwrap();

    let main = server.http;
    let main_request = request_for(&golden, &[4], "main");
    let main_done = on_own_thread(move || post_infer(main, main_request));
    let realtime_request = request_for(&golden, &[5], "rt");
    let realtime_done = on_own_thread(move || async move {
        let http = post_infer(rt_http, realtime_request).await;
        let grpc = grpc_infer(rt_grpc, &tickserve_test_support::golden(), 5).await;
        (http, grpc)
    });
    let ((status, answer), grpc) = realtime_done
        .recv_timeout(Duration::from_secs(60))
        .expect("the real-time listeners depend on the main runtime");
    assert_eq!(status, 200, "{answer}");
    assert_golden_rows(&golden, &answer, &[5]);
    assert_eq!(grpc.len(), 3);
    assert!(
        matches!(main_done.try_recv(), Err(std_mpsc::TryRecvError::Empty)),
        "the main address answered while its runtime was held"
    );

    release_tx.send(()).unwrap();
    holder.await.unwrap();
    let (status, answer) = main_done.recv_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_golden_rows(&golden, &answer, &[4]);
    assert_eq!(grpc, grpc_infer(server.grpc, &golden, 5).await);
    server.shutdown().await.unwrap();
}

/// Shutdown drains the real-time listeners with the main ones: a request
/// queued on the real-time address when the shutdown starts is answered
/// before `serve` returns, and the listener is closed by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_answers_a_request_queued_on_the_real_time_listener() {
    use std::io::Read;
    let mut config = config(repository_with(
        "slow",
        &cnn_lstm_config(&waiting_batches("")),
    ));
    config.realtime_http_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let mut server = start(config).await;
    let rt = server.realtime_http.unwrap();
    let golden = golden();
    let body = serde_json::to_vec(&request_for(&golden, &[6], "queued")).unwrap();
    let mut socket = std::net::TcpStream::connect(rt).unwrap();
    write_json_post(&mut socket, "/v2/models/slow/infer", &body);
    // Waiting mode holds a lone request for its 1 s queue delay.
    let series = "batch_processing_queue_length{model=\"slow\",version=\"1\",priority=\"3\"} 1";
    for _ in 0..2000 {
        if server.metrics_text().await.contains(series) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        server.metrics_text().await.contains(series),
        "the request was never queued"
    );
    server.trigger_shutdown();
    let served = server.task.take().unwrap().await.unwrap();
    assert!(served.is_ok(), "{served:?}");
    assert!(
        std::net::TcpStream::connect(rt).is_err(),
        "the real-time listener still accepts after serve returned"
    );
    // The answer was written before `serve` returned, so it is already in
    // this socket's receive buffer (a few reads allow for loopback
    // delivery; without the drain it would come with the batch, ~1 s on).
    socket.set_nonblocking(true).unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    for _ in 0..10 {
        match socket.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !answer.is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("reading the answer: {e}"),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "not answered before serve returned: {text:?}"
    );
    let json = &text[text.find("\r\n\r\n").unwrap() + 4..];
    assert_golden_rows(&golden, &serde_json::from_str(json).unwrap(), &[6]);
}
