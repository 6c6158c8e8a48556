//! Real-time isolation end to end with the real engine: a background batch
//! runs in chunks, a real-time request that arrives meanwhile is answered
//! before the batch ends, and chunked answers are the same bits as one
//! engine call gives. Order and completion are asserted, never wall-clock
//! thresholds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

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
