//! Every Open Inference Protocol endpoint and every error class, against a
//! real server on port 0 with the real engine and bundled model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;
use tickserve_test_support::RequestExt;

use common::*;
use serde_json::{Value, json};

async fn get(server: &TestServer, path: &str) -> (u16, Value) {
    let r = server.client.get(server.url(path)).sent().await;
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn post(server: &TestServer, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let r = server
        .client
        .post(server.url(path))
        .header("content-type", "application/json")
        .body(body)
        .sent()
        .await;
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn post_json(server: &TestServer, path: &str, body: &Value) -> (u16, Value) {
    post(server, path, serde_json::to_vec(body).unwrap()).await
}

#[tokio::test]
async fn server_metadata_and_health() {
    let server = start_default().await;
    let (status, body) = get(&server, "/v2").await;
    assert_eq!(status, 200);
    assert_eq!(body["name"], "tickserve");
    assert!(body["version"].is_string());
    assert!(body["extensions"].is_array());
    assert_eq!(
        get(&server, "/v2/health/live").await,
        (200, json!({"live": true}))
    );
    assert_eq!(
        get(&server, "/v2/health/ready").await,
        (200, json!({"ready": true}))
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn model_metadata_and_readiness_with_and_without_version() {
    let server = start_default().await;
    for path in ["/v2/models/cnn_lstm", "/v2/models/cnn_lstm/versions/1"] {
        let (status, body) = get(&server, path).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body["name"], "cnn_lstm");
        assert_eq!(body["versions"], json!(["1"]));
        assert_eq!(body["platform"], "onnx");
        assert_eq!(body["engine"], "native");
        assert_eq!(body["variant"], "native/fp32");
        assert_eq!(
            body["inputs"],
            json!([{"name": "input", "datatype": "FP32", "shape": [-1, 50, 60]}])
        );
        assert_eq!(
            body["outputs"],
            json!([{"name": "output", "datatype": "FP32", "shape": [-1, 3]}])
        );
    }
    for path in [
        "/v2/models/cnn_lstm/ready",
        "/v2/models/cnn_lstm/versions/1/ready",
    ] {
        assert_eq!(
            get(&server, path).await,
            (200, json!({"name": "cnn_lstm", "ready": true}))
        );
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_models_versions_and_routes_are_404_with_a_message() {
    let server = start_default().await;
    let (status, body) = get(&server, "/v2/models/nope").await;
    assert_eq!(status, 404);
    assert!(error_of(&body).contains("unknown model 'nope'"), "{body}");
    let (status, body) = get(&server, "/v2/models/cnn_lstm/versions/7").await;
    assert_eq!(status, 404);
    assert!(error_of(&body).contains("no version 7"), "{body}");
    assert!(error_of(&body).contains("available: 1"), "{body}");
    let (status, _) = get(&server, "/v2/models/cnn_lstm/versions/x/ready").await;
    assert_eq!(status, 404);
    let (status, body) = post_json(&server, "/v2/models/nope/infer", &json!({"inputs": []})).await;
    assert_eq!(status, 404);
    assert!(error_of(&body).contains("nope"));
    let (status, body) = post_json(
        &server,
        "/v2/models/cnn_lstm/versions/2/infer",
        &json!({"inputs": []}),
    )
    .await;
    assert_eq!(status, 404);
    assert!(error_of(&body).contains("no version 2"));
    let (status, body) = get(&server, "/v3/whatever").await;
    assert_eq!(status, 404);
    assert!(error_of(&body).contains("/v3/whatever"));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_readme_request_returns_the_golden_output() {
    let server = start_default().await;
    let body = std::fs::read(root().join("fixtures/golden/cnn_lstm/request.json")).unwrap();
    let expected: Value = serde_json::from_slice(
        &std::fs::read(root().join("fixtures/golden/cnn_lstm/expected_output.json")).unwrap(),
    )
    .unwrap();
    for path in [
        "/v2/models/cnn_lstm/infer",
        "/v2/models/cnn_lstm/versions/1/infer",
    ] {
        let (status, response) = post(&server, path, body.clone()).await;
        assert_eq!(status, 200, "{response}");
        assert_eq!(response["model_name"], "cnn_lstm");
        assert_eq!(response["model_version"], "1");
        assert_eq!(response["id"], "golden-0");
        let got = response["outputs"][0]["data"].as_array().unwrap();
        let want = expected["output"].as_array().unwrap();
        assert_eq!(got.len(), 3);
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g.as_f64().unwrap() - w.as_f64().unwrap()).abs() <= 1e-5,
                "{g} vs {w}"
            );
        }
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn multi_row_and_nested_requests_get_their_own_rows() {
    let server = start_default().await;
    let golden = golden();
    let rows = [3, 17, 0, 42, 63];
    let (status, response) = post_json(
        &server,
        "/v2/models/cnn_lstm/infer",
        &request_for(&golden, &rows, "five"),
    )
    .await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["id"], "five");
    assert_golden_rows(&golden, &response, &rows);

    // The same two rows as nested arrays [2][50][60], no id, named output.
    let nested: Vec<Vec<Vec<f32>>> = [5usize, 6]
        .iter()
        .map(|&r| {
            (0..50)
                .map(|t| golden.input[r * ROW + t * 60..r * ROW + (t + 1) * 60].to_vec())
                .collect()
        })
        .collect();
    let request = json!({
        "inputs": [{"name": "input", "shape": [2, 50, 60], "datatype": "FP32", "data": nested}],
        "outputs": [{"name": "output"}]
    });
    let (status, response) = post_json(&server, "/v2/models/cnn_lstm/infer", &request).await;
    assert_eq!(status, 200, "{response}");
    assert!(
        response.get("id").is_none(),
        "no id was sent, none is echoed: {response}"
    );
    assert_golden_rows(&golden, &response, &[5, 6]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_engine_on_two_threads_answers_as_the_golden_fixture() {
    // `threads = 2`: one-row requests run as the native engine's two-stage
    // pipeline, larger batches split their rows; the batcher may also merge
    // the concurrent one-row requests into split batches.
    let repo = repository_with(
        "cnn_lstm",
        &cnn_lstm_config("").replace("max_batch_size = 32", "max_batch_size = 32\nthreads = 2"),
    );
    let server = start(config(repo)).await;
    let golden = golden();
    // Four clients at once, each sending its share of the 64 rows one by one.
    let client = |first: usize| {
        let (server, golden) = (&server, &golden);
        async move {
            for row in (first..64).step_by(4) {
                let response: Value = server
                    .infer(&request_for(golden, &[row], "one"))
                    .await
                    .json()
                    .await
                    .unwrap();
                assert_golden_rows(golden, &response, &[row]);
            }
        }
    };
    tokio::join!(client(0), client(1), client(2), client(3));
    let rows = [9, 8, 7, 6, 5, 4, 3, 2, 1];
    let (status, response) = post_json(
        &server,
        "/v2/models/cnn_lstm/infer",
        &request_for(&golden, &rows, "nine"),
    )
    .await;
    assert_eq!(status, 200, "{response}");
    assert_golden_rows(&golden, &response, &rows);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn invalid_requests_are_400_naming_the_problem() {
    let server = start_default().await;
    let golden = golden();
    let valid = request_for(&golden, &[0], "x");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut r = valid.clone();
        f(&mut r);
        r
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "unknown input",
            with(&|r| r["inputs"][0]["name"] = json!("prices")),
            "unknown input 'prices'",
        ),
        (
            "wrong shape",
            with(&|r| r["inputs"][0]["shape"] = json!([1, 60, 50])),
            "the model takes [n, 50, 60]",
        ),
        (
            "wrong rank",
            with(&|r| r["inputs"][0]["shape"] = json!([3000])),
            "has shape [3000]",
        ),
        (
            "wrong datatype",
            with(&|r| r["inputs"][0]["datatype"] = json!("FP64")),
            "datatype FP64",
        ),
        (
            "element count",
            with(&|r| r["inputs"][0]["shape"] = json!([2, 50, 60])),
            "has 3000 values",
        ),
        (
            "zero batch",
            with(&|r| r["inputs"][0]["shape"] = json!([0, 50, 60])),
            "batch size 0",
        ),
        (
            "batch over max",
            with(&|r| r["inputs"][0]["shape"] = json!([33, 50, 60])),
            "max_batch_size 32",
        ),
        (
            "out of fp32 range",
            with(&|r| r["inputs"][0]["data"][7] = json!(1e39)),
            "non-finite value at position 7",
        ),
        (
            "missing input",
            with(&|r| r["inputs"] = json!([])),
            "no inputs",
        ),
        (
            "duplicate input",
            with(&|r| {
                let first = r["inputs"][0].clone();
                r["inputs"].as_array_mut().unwrap().push(first);
            }),
            "given twice",
        ),
        (
            "unknown output",
            with(&|r| r["outputs"] = json!([{"name": "signal"}])),
            "unknown output 'signal'",
        ),
        (
            "string data",
            with(&|r| r["inputs"][0]["data"] = json!(["a"])),
            "array of numbers",
        ),
        (
            "missing shape",
            with(&|r| {
                r["inputs"][0].as_object_mut().unwrap().remove("shape");
            }),
            "missing field `shape`",
        ),
    ];
    for (what, body, needle) in cases {
        let (status, response) = post_json(&server, "/v2/models/cnn_lstm/infer", &body).await;
        assert_eq!(status, 400, "{what}: {response}");
        assert!(
            error_of(&response).contains(needle),
            "{what}: '{}' lacks '{needle}'",
            error_of(&response)
        );
    }
    let (status, response) = post(&server, "/v2/models/cnn_lstm/infer", "{\"inputs\": [").await;
    assert_eq!(status, 400);
    assert!(error_of(&response).contains("malformed"), "{response}");
    let (status, response) = post(
        &server,
        "/v2/models/cnn_lstm/infer",
        "{\"inputs\":[{\"name\":\"input\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[NaN]}]}",
    )
    .await;
    assert_eq!(status, 400, "NaN is not JSON: {response}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let mut config = config(root().join("models"));
    config.max_body_bytes = 1000;
    let server = start(config).await;
    let request = request_for(&golden(), &[0], "big");
    let (status, response) = post_json(&server, "/v2/models/cnn_lstm/infer", &request).await;
    assert_eq!(status, 413, "{response}");
    assert!(
        error_of(&response).contains("limit of 1000 bytes"),
        "{response}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after_and_says_so() {
    // Waiting mode, a long delay and a queue of two: the first two
    // requests wait in the queue (the batch is not full), the third finds
    // it full.
    let server = start_model("cnn_lstm", &waiting_batches("max_queue_size = 2\n")).await;
    let golden = golden();
    let send = |i: usize| {
        let client = server.client.clone();
        let url = server.url("/v2/models/cnn_lstm/infer");
        let body = serde_json::to_vec(&request_for(&golden, &[i], "q")).unwrap();
        async move {
            let r = client.post(url).body(body).sent().await;
            let status = r.status().as_u16();
            let retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            (status, r.json::<Value>().await.unwrap(), retry_after)
        }
    };
    let first = tokio::spawn(send(0));
    let second = tokio::spawn(send(1));
    // Give the two time to be queued, then overflow.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body, retry_after) = send(2).await;
    assert_eq!(status, 429, "{body}");
    let retry_after: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!(retry_after >= 1, "{retry_after}");
    assert!(
        error_of(&body).contains("queue of model 'cnn_lstm' is full"),
        "{body}"
    );
    assert_eq!(first.await.unwrap().0, 200);
    assert_eq!(second.await.unwrap().0, 200);
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains(
            "batch_processing_errors_total{model=\"cnn_lstm\",version=\"1\",error_type=\"queue_full\",priority=\"3\"} 1"
        ),
        "{metrics}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_drains_queued_requests_then_returns() {
    let mut server = start_model(
        "cnn_lstm",
        "[dynamic_batching]\nmax_queue_delay = \"400ms\"\nwork_conserving = false\n",
    )
    .await;
    let golden = golden();
    let client = server.client.clone();
    let url = server.url("/v2/models/cnn_lstm/infer");
    let body = serde_json::to_vec(&request_for(&golden, &[9], "drain")).unwrap();
    let in_flight = tokio::spawn(async move {
        let r = client.post(url).body(body).sent().await;
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The request sits in the queue for another ~300 ms; shutting down now
    // must still answer it.
    server.trigger_shutdown();
    let (status, response) = in_flight.await.unwrap();
    assert_eq!(status, 200, "{response}");
    assert_golden_rows(&golden, &response, &[9]);
    server.task.take().unwrap().await.unwrap().unwrap();
}

#[tokio::test]
async fn a_repository_that_cannot_load_fails_start_up_with_the_reason() {
    let repo = repository_with(
        "cnn_lstm",
        &cnn_lstm_config("").replace("dims = [3]", "dims = [4]"),
    );
    let server = tickserve_server::BoundServer::bind(config(repo))
        .await
        .unwrap();
    let err = server.serve(std::future::pending()).await.unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("output 'output' has dims [4] in config.toml but [3] in the model"),
        "{message}"
    );
}

#[tokio::test]
async fn requests_and_batches_are_counted_in_prometheus_format() {
    let server = start_default().await;
    let golden = golden();
    let (status, _) = post_json(
        &server,
        "/v2/models/cnn_lstm/infer",
        &request_for(&golden, &[1, 2], "m"),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = post_json(
        &server,
        "/v2/models/cnn_lstm/infer",
        &json!({"inputs": "bad"}),
    )
    .await;
    assert_eq!(status, 400);
    let text = server.metrics_text().await;
    for needle in [
        "# TYPE batch_processing_requests_total counter",
        "batch_processing_requests_total{model=\"cnn_lstm\",version=\"1\",outcome=\"success\",batch_type=\"multi\",source=\"http\",priority=\"3\"}",
        "batch_processing_requests_total{model=\"cnn_lstm\",version=\"1\",outcome=\"invalid_request\"",
        "batch_processing_latency_seconds_bucket{model=\"cnn_lstm\",version=\"1\",batch_size_range=\"small\",priority=\"3\",le=\"0.001\"}",
        "batch_processing_batch_size_bucket{model=\"cnn_lstm\",version=\"1\",le=\"32\"}",
        "batch_processing_wait_time_seconds_bucket{model=\"cnn_lstm\",version=\"1\",priority=\"3\",le=\"0.005\"}",
        "batch_processing_queue_length{model=\"cnn_lstm\",version=\"1\",priority=\"1\"}",
        "batch_processing_adaptive_batch_size{model=\"cnn_lstm\",version=\"1\"}",
        "tickserve_engine_execution_seconds_count{model=\"cnn_lstm\",version=\"1\"}",
        "batch_processing_errors_total{model=\"cnn_lstm\",version=\"1\",error_type=\"invalid_request\",priority=\"none\"}",
        "tickserve_ready 1",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
    server.shutdown().await.unwrap();
}
