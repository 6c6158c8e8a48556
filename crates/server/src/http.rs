//! The Open Inference Protocol (KServe v2) over HTTP/JSON, per
//! serving-systems.md §6.
//!
//! Handlers decode the wire format into the protocol-neutral
//! [`InferRequest`], call [`ModelVersion::infer`](crate::models::ModelVersion::infer)
//! and encode the [`InferResponse`]. Nothing here knows about batching.

use std::fmt;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics::{counter, histogram};
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use tickserve_telemetry as telemetry;

use crate::AppState;
use crate::error::ServeError;
use crate::models::{InferRequest, InferResponse, InputTensor};

pub(crate) fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// `{model}` and the optional `{version}` of a model route.
#[derive(Debug, Deserialize)]
struct ModelPath {
    model: String,
    version: Option<String>,
}

async fn server_metadata() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "name": "tickserve",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
    }))
}

async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "live": true }))
}

async fn ready(State(state): State<AppState>) -> Response {
    let ready = state.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(serde_json::json!({ "ready": ready }))).into_response()
}

async fn model_metadata(State(state): State<AppState>, Path(path): Path<ModelPath>) -> Response {
    let result = (|| {
        let registry = state.registry()?;
        let model = registry.get(&path.model)?;
        let version = model.version(path.version.as_deref())?;
        let tensor = |spec: &tickserve_engine::TensorSpec| {
            let mut shape = vec![-1i64];
            shape.extend(spec.dims.iter().map(|&d| d as i64));
            serde_json::json!({ "name": spec.name, "datatype": spec.datatype.as_str(), "shape": shape })
        };
        Ok::<_, ServeError>(serde_json::json!({
            "name": model.name,
            "versions": model.version_names(),
            "platform": "onnx",
            "engine": version.engine_kind,
            "variant": version.engine_variant,
            "max_batch_size": version.max_batch_size,
            "inputs": version.signature.inputs.iter().map(tensor).collect::<Vec<_>>(),
            "outputs": version.signature.outputs.iter().map(tensor).collect::<Vec<_>>(),
        }))
    })();
    match result {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn model_ready(State(state): State<AppState>, Path(path): Path<ModelPath>) -> Response {
    let result = state.registry().and_then(|registry| {
        let model = registry.get(&path.model)?;
        model.version(path.version.as_deref())?;
        Ok(model.name.clone())
    });
    match result {
        Ok(name) if !state.is_draining() => {
            Json(serde_json::json!({ "name": name, "ready": true })).into_response()
        }
        Ok(name) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "name": name, "ready": false })),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn no_route(uri: Uri) -> ServeError {
    ServeError::NoRoute(uri.path().to_owned())
}

async fn infer(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let mut rows = 0usize;
    let mut known_model = false;
    let result = async {
        let registry = state.registry()?;
        let version = registry
            .get(&path.model)?
            .version(path.version.as_deref())?;
        known_model = true;
        let body = body.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ServeError::PayloadTooLarge(format!(
                    "request body is larger than the limit of {} bytes (--max-body-bytes)",
                    state.max_body_bytes
                ))
            } else {
                ServeError::Invalid(format!(
                    "cannot read the request body: {}",
                    rejection.body_text()
                ))
            }
        })?;
        let request = decode_request(&body)?;
        rows = request
            .inputs
            .first()
            .and_then(|i| i.shape.first())
            .map_or(0, |&n| n.max(0) as usize);
        version.infer(request).await
    }
    .await;

    let model = if known_model {
        path.model.as_str()
    } else {
        "unknown"
    };
    let outcome = match &result {
        Ok(_) => "success",
        Err(e) => {
            counter!(telemetry::ERRORS_TOTAL, "model" => model.to_owned(), "error_type" => e.kind()).increment(1);
            e.kind()
        }
    };
    if known_model {
        let batch_type = if rows <= 1 { "single" } else { "multi" };
        counter!(telemetry::REQUESTS_TOTAL, "model" => model.to_owned(), "outcome" => outcome, "batch_type" => batch_type, "source" => "http")
            .increment(1);
        histogram!(telemetry::REQUEST_LATENCY, "model" => model.to_owned(), "batch_size_range" => telemetry::batch_size_range(rows))
            .record(started.elapsed().as_secs_f64());
    }
    match result {
        Ok(response) => encode_response(&response),
        Err(error) => {
            if error.status().is_server_error() {
                tracing::warn!(model = %path.model, %error, "inference request failed");
            }
            error.into_response()
        }
    }
}

// === JSON wire format ===

#[derive(Debug, Deserialize)]
struct RequestJson {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    parameters: Option<serde_json::Map<String, serde_json::Value>>,
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutputJson>>,
}

#[derive(Debug, Deserialize)]
struct InputJson {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    #[allow(dead_code)]
    parameters: Option<serde_json::Map<String, serde_json::Value>>,
    data: FlatData,
}

#[derive(Debug, Deserialize)]
struct RequestedOutputJson {
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

fn decode_request(body: &[u8]) -> Result<InferRequest, ServeError> {
    let request: RequestJson = serde_json::from_slice(body)
        .map_err(|e| ServeError::Invalid(format!("malformed inference request JSON: {e}")))?;
    Ok(InferRequest {
        id: request.id,
        inputs: request
            .inputs
            .into_iter()
            .map(|i| InputTensor {
                name: i.name,
                datatype: i.datatype,
                shape: i.shape,
                data: i.data.0,
            })
            .collect(),
        outputs: request
            .outputs
            .map(|outputs| outputs.into_iter().map(|o| o.name).collect()),
    })
}

#[derive(Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<OutputJson<'a>>,
}

#[derive(Serialize)]
struct OutputJson<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    data: &'a [f32],
}

fn encode_response(response: &InferResponse) -> Response {
    let body = ResponseJson {
        model_name: &response.model_name,
        model_version: &response.model_version,
        id: response.id.as_deref(),
        outputs: response
            .outputs
            .iter()
            .map(|o| OutputJson {
                name: &o.name,
                datatype: o.datatype.as_str(),
                shape: &o.shape,
                data: &o.data,
            })
            .collect(),
    };
    match serde_json::to_vec(&body) {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => ServeError::Internal(format!("cannot encode the response: {e}")).into_response(),
    }
}

/// Tensor `data`, flat or nested to any depth, flattened in row-major
/// order while parsing (no intermediate `serde_json::Value` tree).
#[derive(Debug, Default)]
struct FlatData(Vec<f32>);

impl<'de> Deserialize<'de> for FlatData {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut values = Vec::new();
        deserializer.deserialize_any(Flatten(&mut values))?;
        Ok(FlatData(values))
    }
}

struct Flatten<'a>(&'a mut Vec<f32>);

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of numbers, flat or nested")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if let Some(hint) = seq.size_hint() {
            self.0.reserve(hint);
        }
        while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.0.push(v as f32);
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.0.push(v as f32);
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.0.push(v as f32);
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_flat_data_decode_to_the_same_values() {
        let flat = decode_request(
            br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2.5,-3,4e0]}]}"#,
        )
        .unwrap();
        let nested = decode_request(br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5],[-3,4e0]]}]}"#).unwrap();
        assert_eq!(flat.inputs[0].data, vec![1.0, 2.5, -3.0, 4.0]);
        assert_eq!(flat, nested);
        assert_eq!(flat.id, None);
        assert_eq!(flat.outputs, None);
    }

    #[test]
    fn strings_in_data_are_refused_with_a_reason() {
        let err = decode_request(
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":["a"]}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("array of numbers"), "{err}");
    }

    #[test]
    fn json_floats_round_trip_to_the_same_f32_bits() {
        let value = 0.1f32;
        let text = format!(
            r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"FP32","data":[{}]}}]}}"#,
            value as f64
        );
        let decoded = decode_request(text.as_bytes()).unwrap();
        assert_eq!(decoded.inputs[0].data[0].to_bits(), value.to_bits());
    }
}
