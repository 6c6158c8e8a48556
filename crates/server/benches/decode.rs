//! CPU time to decode one inference request in each wire form, from the
//! bytes on the wire to the protocol-neutral `InferRequest` (what the server
//! does before validation): HTTP JSON (values widened to f64 as Python
//! prints them, and printed as the shortest f32 text), HTTP binary tensors, HTTP
//! MessagePack and gRPC (typed contents and raw bytes). One golden row
//! (50×60 FP32) and a max batch of 32 rows.
//!
//!   cargo bench -p tickserve-server --bench decode

use std::hint::black_box;

use axum::http::{HeaderMap, HeaderValue};
use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message;
use tickserve_server::bench::{decode_http_body, decode_infer_message};

const ROW: usize = 50 * 60;

fn data(rows: usize) -> Vec<f32> {
    // Values like the golden fixture's: normalised features with full
    // f32 mantissas, so JSON text has realistic length.
    (0..rows * ROW)
        .map(|i| ((i as f32) * 0.618_034).sin() * 1.7)
        .collect()
}

/// The values as Python's `json` writes a float32 array after `tolist()`:
/// widened to f64, up to 17 digits each.
fn json_body(rows: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "inputs": [{"name": "input", "shape": [rows, 50, 60], "datatype": "FP32", "data": data(rows)}]
    }))
    .unwrap_or_default()
}

/// The values printed as the shortest text that reads back as the same
/// f32 (as `tickserve bench` and most non-Python clients send them).
fn json_f32_text_body(rows: usize) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Input {
        name: &'static str,
        shape: [usize; 3],
        datatype: &'static str,
        data: Vec<f32>,
    }
    #[derive(serde::Serialize)]
    struct Request {
        inputs: [Input; 1],
    }
    serde_json::to_vec(&Request {
        inputs: [Input {
            name: "input",
            shape: [rows, 50, 60],
            datatype: "FP32",
            data: data(rows),
        }],
    })
    .unwrap_or_default()
}

/// The request as a MessagePack client builds it (FP32 values as float32).
fn msgpack_body(rows: usize) -> Vec<u8> {
    tickserve_test_support::msgpack_request(rows, &data(rows))
}

fn binary_body(rows: usize) -> (HeaderMap, Vec<u8>) {
    let bytes: Vec<u8> = data(rows).iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut body = serde_json::to_vec(&serde_json::json!({
        "inputs": [{"name": "input", "shape": [rows, 50, 60], "datatype": "FP32",
                    "parameters": {"binary_data_size": bytes.len()}}]
    }))
    .unwrap_or_default();
    let mut headers = HeaderMap::new();
    headers.insert(
        "inference-header-content-length",
        HeaderValue::from(body.len()),
    );
    body.extend_from_slice(&bytes);
    (headers, body)
}

fn grpc_body(rows: usize, raw: bool) -> Vec<u8> {
    tickserve_test_support::grpc_request("", rows, data(rows), raw).encode_to_vec()
}

fn decode(c: &mut Criterion) {
    for rows in [1usize, 32] {
        let mut group = c.benchmark_group(format!("decode/{rows}rows"));
        let json = json_body(rows);
        let plain = HeaderMap::new();
        group.bench_function("http_json", |b| {
            b.iter(|| decode_http_body(&plain, black_box(&json)))
        });
        let json_f32_text = json_f32_text_body(rows);
        group.bench_function("http_json_f32_text", |b| {
            b.iter(|| decode_http_body(&plain, black_box(&json_f32_text)))
        });
        let (headers, binary) = binary_body(rows);
        group.bench_function("http_binary", |b| {
            b.iter(|| decode_http_body(&headers, black_box(&binary)))
        });
        let msgpack = msgpack_body(rows);
        let mut mp_headers = HeaderMap::new();
        mp_headers.insert(
            "content-type",
            HeaderValue::from_static("application/msgpack"),
        );
        group.bench_function("http_msgpack", |b| {
            b.iter(|| decode_http_body(&mp_headers, black_box(&msgpack)))
        });
        let typed = grpc_body(rows, false);
        group.bench_function("grpc_contents", |b| {
            b.iter(|| decode_infer_message(black_box(&typed)))
        });
        let raw = grpc_body(rows, true);
        group.bench_function("grpc_raw", |b| {
            b.iter(|| decode_infer_message(black_box(&raw)))
        });
        println!(
            "bytes/{rows}rows: json {} json_f32_text {} binary {} msgpack {} grpc_contents {} grpc_raw {}",
            json.len(),
            json_f32_text.len(),
            binary.len(),
            msgpack.len(),
            typed.len(),
            raw.len()
        );
        group.finish();
    }
}

criterion_group!(benches, decode);
criterion_main!(benches);
