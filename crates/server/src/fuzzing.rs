//! One entry point per fuzz target (fuzz/fuzz_targets/): each takes the
//! fuzzer's bytes, hands them to a decoder of outside input exactly as the
//! server does, and ignores the result: a target fails only by panicking,
//! overflowing the stack or running out of memory. The same functions
//! replay the corpus and the crash files as ordinary tests
//! (tests/fuzz_corpus.rs), so a crash once found stays fixed.
//!
//! `infer_json` also fails when the fast reader of JSON tensor data
//! disagrees with serde alone.
//!
//! Where a decoder also reads headers, the first bytes choose them, so the
//! fuzzer explores them too.

use axum::http::{HeaderMap, HeaderValue, header};

use crate::codec::{self, INFERENCE_HEADER_CONTENT_LENGTH};

/// A target's entry point.
pub type Target = fn(&[u8]);

/// Every target: its name (the folder under fuzz/corpus/) and entry point.
pub const TARGETS: [(&str, Target); 7] = [
    ("infer_json", infer_json),
    ("infer_binary", infer_binary),
    ("infer_msgpack", infer_msgpack),
    ("grpc_infer", grpc_infer),
    ("compressed_body", compressed_body),
    ("onnx_model", onnx_model),
    ("model_config", model_config),
];

/// Largest decompressed body the compressed-body target reads (the server
/// uses `--max-body-bytes`, 16 MiB by default).
const DECOMPRESSED_LIMIT: usize = 1 << 20;

fn headers(content_type: &'static str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers
}

/// The JSON inference body, also checked against serde alone: the fast
/// reader of tensor data must give the same request, bit for bit, or the
/// same error.
pub fn infer_json(data: &[u8]) {
    let fast = codec::decode_http_body(&headers("application/json"), data);
    let reference = codec::decode_json_with_serde_only(data);
    // Debug text tells -0.0 from 0.0, which `==` does not.
    let text = |r: &Result<_, crate::error::ServeError>| match r {
        Ok(request) => format!("{request:?}"),
        Err(e) => e.to_string(),
    };
    assert_eq!(
        text(&fast),
        text(&reference),
        "the fast JSON reader disagrees with serde"
    );
}

/// Triton's binary-tensor body: the first two bytes (little-endian) give
/// `Inference-Header-Content-Length`, the rest is the body.
pub fn infer_binary(data: &[u8]) {
    let Some((length, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let mut headers = headers("application/octet-stream");
    headers.insert(
        INFERENCE_HEADER_CONTENT_LENGTH,
        HeaderValue::from(u16::from_le_bytes(*length)),
    );
    let _ = codec::decode_http_body(&headers, body);
}

/// The MessagePack inference body.
pub fn infer_msgpack(data: &[u8]) {
    let _ = codec::decode_http_body(&headers("application/msgpack"), data);
}

/// A gRPC `ModelInferRequest` message and its conversion.
pub fn grpc_infer(data: &[u8]) {
    let _ = crate::grpc::decode_infer_message(data);
}

/// A gzip (first byte even) or deflate (odd) body through the server's own
/// decompression layer, then the JSON decoder.
pub fn compressed_body(data: &[u8]) {
    use tower::{Layer, ServiceExt};
    let Some((&choice, body)) = data.split_first() else {
        return;
    };
    let encoding = if choice % 2 == 0 { "gzip" } else { "deflate" };
    let request = axum::http::Request::builder()
        .method("POST")
        .uri("/")
        .header(header::CONTENT_ENCODING, encoding)
        .header(header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::from(body.to_vec()));
    let Ok(request) = request else {
        return;
    };
    let service = codec::decompression_layer().layer(tower::service_fn(
        |request: axum::http::Request<_>| async move {
            let (parts, body) = request.into_parts();
            let bytes = axum::body::to_bytes(axum::body::Body::new(body), DECOMPRESSED_LIMIT).await;
            if let Ok(bytes) = bytes {
                let _ = codec::decode_http_body(&parts.headers, &bytes);
            }
            Ok::<_, std::convert::Infallible>(axum::http::Response::new(axum::body::Body::empty()))
        },
    ));
    let runtime = tokio::runtime::Builder::new_current_thread().build();
    if let Ok(runtime) = runtime {
        let _ = runtime.block_on(service.oneshot(request));
    }
}

/// An ONNX file: the protobuf loader and the recogniser of the native
/// engine (what `model.onnx` in a repository goes through).
pub fn onnx_model(data: &[u8]) {
    let _ = tickserve_engine_native::NativeEngine::from_bytes(data);
}

/// A model's config.toml, and a version's version.toml.
pub fn model_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("config.toml");
    let _ = tickserve_repository::parse_config(path, text);
    let _ = tickserve_repository::parse_version_config(path, text);
}
