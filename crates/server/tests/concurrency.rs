//! Many clients at once against the real server: batching merges them, and
//! every client gets exactly its own rows back. A client that disconnects
//! while queued is dropped before the engine.
//!
//! This file runs in its own process, so the Prometheus figures it reads
//! are its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;
use tickserve_test_support::RequestExt;

use common::*;
use serde_json::Value;

/// The value of a sample line `name{labels} value` in Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_clients_each_get_their_golden_rows_in_shared_batches() {
    // The result cache would answer repeated rows without the engine;
    // this test is about batching, so every row must reach it. A long
    // deadline: admission control must not refuse on a loaded machine.
    let server = start(tickserve_server::ServerConfig {
        cache: tickserve_server::CacheConfig {
            enabled: false,
            ..Default::default()
        },
        ..config(repository_with(
            "cnn_lstm",
            &cnn_lstm_config("[dynamic_batching.priority.3]\ndefault_timeout = \"60s\"\n"),
        ))
    })
    .await;
    let golden = std::sync::Arc::new(golden());
    let clients: Vec<_> = (0..64usize)
        .map(|i| {
            let client = reqwest::Client::new();
            let url = server.url("/v2/models/cnn_lstm/infer");
            let golden = golden.clone();
            tokio::spawn(async move {
                // Three requests per client: its own row, two rows, and a
                // row some other client also asks for.
                for rows in [vec![i], vec![i, (i + 1) % 64], vec![(i * 5) % 64]] {
                    let id = format!("client-{i}-{rows:?}");
                    let response = client
                        .post(&url)
                        .json(&request_for(&golden, &rows, &id))
                        .sent()
                        .await;
                    assert_eq!(response.status(), 200);
                    let body: Value = response.json().await.unwrap();
                    assert_eq!(body["id"], id.as_str());
                    assert_golden_rows(&golden, &body, &rows);
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let text = server.metrics_text().await;
    let batches = sample(
        &text,
        "batch_processing_batch_size_count{model=\"cnn_lstm\",version=\"1\"}",
    )
    .unwrap();
    let rows = sample(
        &text,
        "batch_processing_batch_size_sum{model=\"cnn_lstm\",version=\"1\"}",
    )
    .unwrap();
    let single = sample(
        &text,
        "batch_processing_batch_size_bucket{model=\"cnn_lstm\",version=\"1\",le=\"1\"}",
    )
    .unwrap();
    assert_eq!(rows, 64.0 * 4.0, "every requested row ran exactly once");
    assert!(
        single < batches,
        "some batch must hold more than one row:\n{text}"
    );
    assert!(
        batches < 192.0,
        "192 requests must share batches, ran {batches}"
    );
    eprintln!("192 requests, {rows} rows in {batches} batches");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_while_queued_is_dropped_before_the_engine() {
    let server = start_model("slow", &waiting_batches("")).await;
    let golden = golden();

    // A raw connection that sends a full request and hangs up while the
    // request waits for its batch.
    let body = serde_json::to_vec(&request_for(&golden, &[1, 2, 3], "gone")).unwrap();
    let mut socket = std::net::TcpStream::connect(server.http).unwrap();
    write_json_post(&mut socket, "/v2/models/slow/infer", &body);
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(socket);

    // A client that stays: its batch leaves when the first request's second
    // has passed, and must hold only its own row.
    let response = server
        .client
        .post(server.url("/v2/models/slow/infer"))
        .json(&request_for(&golden, &[4], "stays"))
        .sent()
        .await;
    assert_eq!(response.status(), 200);
    assert_golden_rows(&golden, &response.json().await.unwrap(), &[4]);

    let text = server.metrics_text().await;
    assert_eq!(
        sample(
            &text,
            "tickserve_requests_dropped_total{model=\"slow\",version=\"1\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "batch_processing_batch_size_sum{model=\"slow\",version=\"1\"}"
        ),
        Some(1.0),
        "{text}"
    );
    server.shutdown().await.unwrap();
}
