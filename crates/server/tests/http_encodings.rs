//! The HTTP forms beyond plain JSON against the real server: Triton's
//! binary-tensor extension (and its raw single-input form), MessagePack,
//! gzip/deflate both ways, the model-configuration and statistics
//! extensions, and datatype validation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use tickserve_test_support::RequestExt;

use common::*;
use serde_json::{Value, json};

const HEADER_LEN: &str = "inference-header-content-length";

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn input_rows(golden: &Golden, rows: &[usize]) -> Vec<f32> {
    rows.iter()
        .flat_map(|&r| golden.input[r * ROW..(r + 1) * ROW].iter().copied())
        .collect()
}

fn assert_close(golden: &Golden, got: &[f32], rows: &[usize]) {
    assert_eq!(got.len(), rows.len() * 3);
    for (i, &r) in rows.iter().enumerate() {
        for j in 0..3 {
            let want = golden.output[r * 3 + j];
            assert!((got[i * 3 + j] - want).abs() <= 1e-5, "row {i} output {j}");
        }
    }
}

/// Splits a binary-tensor answer into its JSON header and raw tail.
async fn split_binary(response: reqwest::Response) -> (Value, Vec<u8>) {
    let header_len: usize = response
        .headers()
        .get(HEADER_LEN)
        .expect("no Inference-Header-Content-Length")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = response.bytes().await.unwrap();
    let header = serde_json::from_slice(&body[..header_len]).unwrap();
    (header, body[header_len..].to_vec())
}

#[tokio::test]
async fn binary_inputs_and_outputs_round_trip() {
    let server = start_default().await;
    let golden = golden();
    let rows = [0, 1];
    let data = le_bytes(&input_rows(&golden, &rows));
    let header = serde_json::to_vec(&json!({
        "id": "bin",
        "inputs": [{"name": "input", "shape": [2, 50, 60], "datatype": "FP32",
                    "parameters": {"binary_data_size": data.len()}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": true}}]
    }))
    .unwrap();
    let mut body = header.clone();
    body.extend_from_slice(&data);
    let header_len = header.len().to_string();
    let response = post_bytes(
        &server,
        &[
            (HEADER_LEN, &header_len),
            ("content-type", "application/octet-stream"),
        ],
        body,
    )
    .await;
    assert_eq!(response.status(), 200);
    let (json, tail) = split_binary(response).await;
    assert_eq!(json["id"], "bin");
    let output = &json["outputs"][0];
    assert_eq!(output["shape"], json!([2, 3]));
    assert_eq!(output["parameters"]["binary_data_size"], 24);
    assert!(output.get("data").is_none());
    assert_close(&golden, &floats(&tail), &rows);

    // JSON inputs with the request-wide binary_data_output flag.
    let mut request = request_for(&golden, &[2], "flag");
    request["parameters"] = json!({"binary_data_output": true});
    let response = server.infer(&request).await;
    let (_, tail) = split_binary(response).await;
    assert_close(&golden, &floats(&tail), &[2]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_raw_single_input_form_answers_binary() {
    let server = start_default().await;
    let golden = golden();
    let response = post_bytes(
        &server,
        &[(HEADER_LEN, "0")],
        le_bytes(&input_rows(&golden, &[3])),
    )
    .await;
    assert_eq!(response.status(), 200);
    let (json, tail) = split_binary(response).await;
    assert_eq!(json["outputs"][0]["shape"], json!([1, 3]));
    assert_close(&golden, &floats(&tail), &[3]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_binary_bodies_are_400_with_the_reason() {
    let server = start_default().await;
    let send = |header_len: &'static str, body: Vec<u8>| {
        server
            .client
            .post(server.url("/v2/models/cnn_lstm/infer"))
            .header(HEADER_LEN, header_len)
            .body(body)
            .send()
    };
    let short = send("500", b"{}".to_vec()).await.unwrap();
    assert_eq!(short.status(), 400);
    let text = short.text().await.unwrap();
    assert!(text.contains("only 2 bytes"), "{text}");

    let header = br#"{"inputs":[{"name":"input","shape":[1,50,60],"datatype":"FP32","parameters":{"binary_data_size":12000}}]}"#;
    let mut body = header.to_vec();
    body.extend_from_slice(&[0; 100]);
    let len: &'static str = Box::leak(header.len().to_string().into_boxed_str());
    let missing = send(len, body).await.unwrap();
    assert_eq!(missing.status(), 400);
    let text = missing.text().await.unwrap();
    assert!(text.contains("binary_data_size 12000"), "{text}");

    let raw_odd = send("0", vec![0; 7]).await.unwrap();
    assert_eq!(raw_odd.status(), 400);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn msgpack_requests_and_answers_have_the_json_structure() {
    let server = start_default().await;
    let golden = golden();
    let request = request_for(&golden, &[0, 4], "mp");
    let body = rmp_serde::to_vec_named(&request).unwrap();
    let response = post_bytes(
        &server,
        &[
            ("content-type", "application/msgpack"),
            ("accept", "application/msgpack"),
        ],
        body,
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/msgpack"
    );
    let answer: Value = rmp_serde::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(answer["id"], "mp");
    assert_golden_rows(&golden, &answer, &[0, 4]);

    // Without Accept: msgpack in, JSON out.
    let body = rmp_serde::to_vec_named(&request).unwrap();
    let response = post_bytes(&server, &[("content-type", "application/msgpack")], body).await;
    let answer: Value = response.json().await.unwrap();
    assert_golden_rows(&golden, &answer, &[0, 4]);

    let garbage = post_bytes(
        &server,
        &[("content-type", "application/msgpack")],
        vec![0xc1, 0x00],
    )
    .await;
    assert_eq!(garbage.status(), 400);
    assert!(garbage.text().await.unwrap().contains("MessagePack"));
    server.shutdown().await.unwrap();
}

/// POSTs `body` to the bundled model's infer endpoint with `headers`.
async fn post_bytes(
    server: &TestServer,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> reqwest::Response {
    let mut request = server.client.post(server.url("/v2/models/cnn_lstm/infer"));
    for &(name, value) in headers {
        request = request.header(name, value);
    }
    request.body(body).sent().await
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn a_max_batch_request_round_trips_gzip_and_is_smaller_on_the_wire() {
    let server = start_default().await;
    let golden = golden();
    let available = golden.input.len() / ROW;
    let rows: Vec<usize> = (0..32).map(|i| i % available).collect();
    let plain = serde_json::to_vec(&request_for(&golden, &rows, "gz")).unwrap();
    let compressed = gzip(&plain);
    assert!(
        compressed.len() * 2 < plain.len(),
        "gzip {} vs plain {} bytes",
        compressed.len(),
        plain.len()
    );
    let response = post_bytes(
        &server,
        &[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
            ("accept-encoding", "gzip"),
        ],
        compressed,
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let wire = response.bytes().await.unwrap();
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(&wire[..])
        .read_to_end(&mut text)
        .unwrap();
    assert!(wire.len() < text.len(), "{} vs {}", wire.len(), text.len());
    let answer: Value = serde_json::from_slice(&text).unwrap();
    assert_golden_rows(&golden, &answer, &rows);

    // deflate (zlib) request body, plain answer.
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&plain).unwrap();
    let response = post_bytes(
        &server,
        &[("content-encoding", "deflate")],
        encoder.finish().unwrap(),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("content-encoding").is_none());
    assert_golden_rows(&golden, &response.json().await.unwrap(), &rows);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn model_configuration_and_statistics_extensions() {
    let server = start_default().await;
    let v2: Value = server.get_json("/v2").await;
    let extensions = v2["extensions"].as_array().unwrap();
    for name in ["model_configuration", "binary_tensor_data", "statistics"] {
        assert!(extensions.contains(&json!(name)), "{v2}");
    }
    for path in [
        "/v2/models/cnn_lstm/config",
        "/v2/models/cnn_lstm/versions/1/config",
    ] {
        let config: Value = server.get_json(path).await;
        assert_eq!(config["name"], "cnn_lstm");
        assert_eq!(config["max_batch_size"], 32);
        assert_eq!(config["backend"], "native");
        assert_eq!(config["input"][0]["name"], "input");
        assert_eq!(config["input"][0]["data_type"], "TYPE_FP32");
        assert_eq!(config["input"][0]["dims"], json!([50, 60]));
        assert_eq!(config["output"][0]["dims"], json!([3]));
        assert_eq!(
            config["dynamic_batching"]["max_queue_delay_microseconds"],
            5000
        );
    }
    let missing = server
        .client
        .get(server.url("/v2/models/cnn_lstm/versions/9/config"))
        .sent()
        .await;
    assert_eq!(missing.status(), 404);

    let golden = golden();
    let ok = server.infer(&request_for(&golden, &[0, 1, 2], "s")).await;
    assert_eq!(ok.status(), 200);
    for path in [
        "/v2/models/stats",
        "/v2/models/cnn_lstm/stats",
        "/v2/models/cnn_lstm/versions/1/stats",
    ] {
        // The engine thread counts a batch, and the batcher the request's
        // success, just after answering it: give the counters a moment to
        // catch up with the answer.
        let mut stats = Value::Null;
        for _ in 0..100 {
            stats = server.get_json(path).await;
            let model = &stats["model_stats"][0];
            if model["inference_count"] == 3 && model["inference_stats"]["success"]["count"] == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let model = &stats["model_stats"][0];
        assert_eq!(model["name"], "cnn_lstm", "{path}");
        assert_eq!(model["inference_count"], 3, "{path}");
        assert_eq!(model["inference_stats"]["success"]["count"], 1, "{path}");
    }
    let index: Value = server
        .client
        .post(server.url("/v2/repository/index"))
        .json_value()
        .await;
    assert_eq!(
        index,
        json!([{"name": "cnn_lstm", "version": "1", "state": "READY", "reason": ""}])
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_datatype_the_model_does_not_take_is_400_with_the_reason() {
    let server = start_default().await;
    for (datatype, binary) in [("FP64", false), ("INT32", false), ("FP16", true)] {
        let response = if binary {
            let header =
                serde_json::to_vec(&json!({"inputs": [{"name": "input", "shape": [1, 50, 60],
                "datatype": datatype, "parameters": {"binary_data_size": 6000}}]}))
                .unwrap();
            let mut body = header.clone();
            body.extend_from_slice(&[0; 6000]);
            server
                .client
                .post(server.url("/v2/models/cnn_lstm/infer"))
                .header(HEADER_LEN, header.len())
                .body(body)
                .sent()
                .await
        } else {
            server
                .client
                .post(server.url("/v2/models/cnn_lstm/infer"))
                .json(&json!({"inputs": [{"name": "input", "shape": [1, 50, 60],
                    "datatype": datatype, "data": vec![0; ROW]}]}))
                .sent()
                .await
        };
        assert_eq!(response.status(), 400, "{datatype}");
        let body: Value = response.json().await.unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains(&format!("datatype {datatype}; the model takes FP32")),
            "{error}"
        );
    }
    server.shutdown().await.unwrap();
}
