//! Writes the seed corpus of the fuzz targets (fuzz/corpus/<target>/)
//! from the project's own encoders and fixtures:
//! `cargo run -p tickserve-server --example fuzz_seeds -- fuzz/corpus`.
//! Small tensors on purpose: the decoders do not know the model, and the
//! fuzzer mutates short inputs faster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};

use tickserve_server::grpc::pb;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn requests() -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    vec![
        (
            "fp32",
            json!({"id": "a", "inputs": [{"name": "input", "shape": [1, 2, 3], "datatype": "FP32", "data": [0.5, -1.0, 2.0, 3.5, 1e-3, 7.0]}]}),
        ),
        (
            "nested",
            json!({"inputs": [{"name": "input", "shape": [2, 2], "datatype": "FP32", "data": [[1.0, 2.0], [3.0, 4.0]]}], "outputs": [{"name": "output", "parameters": {"binary_data": true}}]}),
        ),
        (
            "options",
            json!({"id": "o", "parameters": {"priority": 1, "timeout": 5000, "cache": false, "binary_data_output": true}, "inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}),
        ),
        (
            // Every text form the fast JSON number reader handles or hands
            // back to serde: exponents, -0, long mantissas, big integers.
            "numbers",
            json!({"inputs": [{"name": "input", "shape": [10], "datatype": "FP32", "data": [0.1, -0.0, 1e22, 1e-23, 1.2345678901234567e17, 9007199254740993u64, -42, 3.4028235e38, 0.10000000149011612, 18446744073709551615u64]}]}),
        ),
        (
            "int64",
            json!({"inputs": [{"name": "x", "shape": [3], "datatype": "INT64", "data": [1, 2, 3]}, {"name": "s", "shape": [1], "datatype": "BYTES", "data": ["abc"]}]}),
        ),
    ]
}

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for (name, request) in requests() {
        let json = serde_json::to_vec(&request).unwrap();
        write(&dir, "infer_json", name, &json);
        write(
            &dir,
            "infer_msgpack",
            name,
            &rmp_serde::to_vec_named(&request).unwrap(),
        );
        // compressed_body reads its first byte as the encoding: even gzip,
        // odd deflate.
        let mut gzip = flate2::write::GzEncoder::new(vec![0u8], flate2::Compression::default());
        gzip.write_all(&json).unwrap();
        let mut zlib = flate2::write::ZlibEncoder::new(vec![1u8], flate2::Compression::default());
        zlib.write_all(&json).unwrap();
        for (suffix, body) in [("gz", gzip.finish()), ("deflate", zlib.finish())] {
            write(
                &dir,
                "compressed_body",
                &format!("{name}.{suffix}"),
                &body.unwrap(),
            );
        }
    }
    // Binary tensors: a JSON header whose input names its byte size, then
    // the little-endian values.
    let values: Vec<u8> = [0.5f32, -1.0, 2.0, 3.5, 1e-3, 7.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let header = serde_json::to_vec(&serde_json::json!({
        "inputs": [{"name": "input", "shape": [1, 2, 3], "datatype": "FP32", "parameters": {"binary_data_size": values.len()}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": true}}]
    }))
    .unwrap();
    let mut binary = (header.len() as u16).to_le_bytes().to_vec();
    binary.extend_from_slice(&header);
    binary.extend_from_slice(&values);
    write(&dir, "infer_binary", "fp32", &binary);

    let tensor =
        |contents: Option<pb::InferTensorContents>| pb::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 2, 3],
            contents,
            ..Default::default()
        };
    let typed = pb::ModelInferRequest {
        model_name: "cnn_lstm".into(),
        id: "g".into(),
        inputs: vec![tensor(Some(pb::InferTensorContents {
            fp32_contents: vec![0.5, -1.0, 2.0, 3.5, 1e-3, 7.0],
            ..Default::default()
        }))],
        ..Default::default()
    };
    let raw = pb::ModelInferRequest {
        model_name: "cnn_lstm".into(),
        inputs: vec![tensor(None)],
        raw_input_contents: vec![values.clone()],
        ..Default::default()
    };
    write(
        &dir,
        "grpc_infer",
        "typed",
        &prost::Message::encode_to_vec(&typed),
    );
    write(
        &dir,
        "grpc_infer",
        "raw",
        &prost::Message::encode_to_vec(&raw),
    );

    for model in ["variant_a", "variant_a_qdq", "variant_b", "unsupported"] {
        let bytes =
            std::fs::read(root.join("fixtures/models").join(model).join("model.onnx")).unwrap();
        write(&dir, "onnx_model", model, &bytes);
    }
    let config = std::fs::read(root.join("models/cnn_lstm/config.toml")).unwrap();
    write(&dir, "model_config", "cnn_lstm", &config);
    write(
        &dir,
        "model_config",
        "version",
        b"precision = \"int8\"\n[quantization]\nactivations = \"static\"\ncalibration = \"calibration.npy\"\n",
    );
}
