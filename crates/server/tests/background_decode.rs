//! Background decoding end to end, with the real engine: after a background
//! request, the next body on the same connection is decoded on the
//! background decode threads (counted in
//! `tickserve_background_decodes_total`) and answered exactly as the
//! runtime's decoding answers it, errors included; after a real-time
//! request the connection's bodies are decoded on the runtime again.
//! Its own test binary: the counter has no labels, and other tests' traffic
//! in the same process would move it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{Value, json};
use tickserve_test_support::RequestExt;

fn background_decodes(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("tickserve_background_decodes_total "))
        .map_or(0, |count| count.trim().parse().unwrap())
}

fn with_priority(mut body: Value, priority: u8) -> Value {
    body["parameters"] = json!({ "priority": priority });
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_after_a_background_request_are_decoded_off_the_runtime() {
    let repo = repository_with("cnn_lstm", &cnn_lstm_config("[cache]\nenabled = false\n"));
    let server = start(config(repo)).await;
    // One connection: requests in sequence, at most one idle connection.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let url = server.url("/v2/models/cnn_lstm/infer");
    let golden = golden();
    let background = with_priority(request_for(&golden, &[0, 1], "bg"), 5);
    let realtime = with_priority(request_for(&golden, &[2], "rt"), 1);
    let post = |body: &Value| client.post(&url).json(body).json_value();
    let decodes = || async { background_decodes(&server.metrics_text().await) };

    // The first request of a connection: decoded on the runtime.
    let on_runtime = post(&background).await;
    assert_golden_rows(&golden, &on_runtime, &[0, 1]);
    assert_eq!(decodes().await, 0);
    // After a background request: off the runtime, the same answer bits.
    let off_runtime = post(&background).await;
    assert_eq!(decodes().await, 1);
    assert_eq!(off_runtime["outputs"], on_runtime["outputs"]);
    let on_runtime_answer = on_runtime["outputs"].clone();
    // The first real-time request after background work is decoded there
    // too; the next ones on the runtime.
    assert_golden_rows(&golden, &post(&realtime).await, &[2]);
    assert_eq!(decodes().await, 2);
    assert_golden_rows(&golden, &post(&realtime).await, &[2]);
    assert_eq!(decodes().await, 2);

    // A malformed body gets the same 400 wherever it is decoded (large
    // enough to be decoded off the runtime: small bodies never are).
    let malformed = format!("{{\"inputs\": [{}", " ".repeat(20_000));
    let send_malformed = |client: &reqwest::Client| {
        client
            .post(&url)
            .header("content-type", "application/json")
            .body(malformed.clone())
            .sent()
    };
    let on_runtime = send_malformed(&client).await;
    assert_eq!(on_runtime.status(), 400);
    let on_runtime: Value = on_runtime.json().await.unwrap();
    // A fresh connection for the background request and the malformed body
    // after it: a client may replace a connection that answered an error.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let answer: Value = fresh.post(&url).json(&background).json_value().await;
    assert_eq!(answer["outputs"], off_runtime["outputs"]);
    let before = decodes().await;
    let off_runtime = send_malformed(&fresh).await;
    assert_eq!(decodes().await, before + 1);
    assert_eq!(off_runtime.status(), 400);
    let off_runtime: Value = off_runtime.json().await.unwrap();
    assert_eq!(off_runtime, on_runtime);
    assert!(error_of(&off_runtime).contains("malformed inference request JSON"));
    // Small bodies stay on the runtime after background work too.
    assert_eq!(post(&background).await["outputs"], on_runtime_answer);
    let before = decodes().await;
    let small = client
        .post(&url)
        .header("content-type", "application/json")
        .body("{}");
    assert_eq!(small.sent().await.status(), 400);
    assert_eq!(decodes().await, before);
    server.shutdown().await.unwrap();
}
