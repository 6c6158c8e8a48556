//! The Open Inference Protocol (KServe v2) over HTTP/JSON, per
//! serving-systems.md §6.
//!
//! Handlers decode the wire format into the protocol-neutral
//! [`InferRequest`], call the one inference path (crate::infer) and encode
//! the [`InferResponse`](crate::models::InferResponse). Nothing here knows
//! about batching, caching or metrics.
//! The binary-tensor, MessagePack and raw forms of the same request and
//! answer are chosen by headers in [`crate::codec`]; compression is a tower
//! layer around the router.

use std::fmt;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::AppState;
use crate::codec;
use crate::error::ServeError;
use crate::infer::Protocol;
use crate::models::{InferRequest, InputTensor};
use crate::scheduling::{self, Param};

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
        .route("/v2/models/{model}/stats", get(model_stats))
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(model_stats),
        )
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer))
        .route("/v2/models/{model}/config", get(model_config))
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(model_config),
        )
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/repository/index", post(repository_index))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(limit))
        .layer(codec::decompression_layer())
        .layer(codec::compression_layer())
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
        "extensions": codec::EXTENSIONS,
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

/// Triton's model-configuration extension: the model's configuration in
/// Triton's JSON shape, which perf_analyzer reads before sending anything.
async fn model_config(State(state): State<AppState>, Path(path): Path<ModelPath>) -> Response {
    let result = state.registry().and_then(|registry| {
        let version = registry
            .get(&path.model)?
            .version(path.version.as_deref())?;
        Ok(crate::triton::ModelConfigJson::of(version))
    });
    match result {
        Ok(config) => Json(config).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Triton's statistics extension plus per-priority counts: every model,
/// one model, or one version.
async fn model_stats(State(state): State<AppState>, Path(path): Path<ModelPath>) -> Response {
    stats_response(&state, Some(&path.model), path.version.as_deref())
}

async fn all_stats(State(state): State<AppState>) -> Response {
    stats_response(&state, None, None)
}

fn stats_response(state: &AppState, model: Option<&str>, version: Option<&str>) -> Response {
    let result = state
        .registry()
        .and_then(|registry| crate::triton::versions(registry, model, version));
    match result {
        Ok(versions) => {
            let stats: Vec<_> = versions
                .into_iter()
                .map(|v| scheduling::model_stats(&v.name, v.version, &v.stats()))
                .collect();
            Json(serde_json::json!({ "model_stats": stats })).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Triton's repository index: every loaded version and its state.
async fn repository_index(State(state): State<AppState>) -> Response {
    match state.registry() {
        Ok(registry) => Json(
            crate::triton::repository_index(registry)
                .into_iter()
                .map(|(name, version)| {
                    serde_json::json!({"name": name, "version": version, "state": "READY", "reason": ""})
                })
                .collect::<Vec<_>>(),
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
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut answer = codec::Answer::from_accept(&headers);
    let result = crate::infer::infer(
        &state,
        Protocol::Http,
        &path.model,
        path.version.as_deref(),
        |version| {
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
            codec::decode_request(&headers, &body, Some(version), &mut answer)
        },
    )
    .await;
    match result {
        Ok(response) => answer.encode(&response),
        Err(error) => error.into_response(),
    }
}

// === JSON wire format ===

/// The request body's structure, shared by the JSON, MessagePack and
/// binary-tensor forms (the latter's JSON header omits `data` of inputs
/// that carry `binary_data_size`).
#[derive(Debug, Deserialize)]
pub(crate) struct RequestJson {
    #[serde(default)]
    pub(crate) id: Option<String>,
    #[serde(default)]
    pub(crate) parameters: Option<serde_json::Map<String, serde_json::Value>>,
    pub(crate) inputs: Vec<InputJson>,
    #[serde(default)]
    pub(crate) outputs: Option<Vec<RequestedOutputJson>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct InputJson {
    pub(crate) name: String,
    pub(crate) shape: Vec<i64>,
    pub(crate) datatype: String,
    #[serde(default)]
    pub(crate) parameters: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub(crate) data: Option<FlatData>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RequestedOutputJson {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

#[cfg(test)]
fn decode_request(body: &[u8], priority_header: Option<&str>) -> Result<InferRequest, ServeError> {
    let request: RequestJson = serde_json::from_slice(body)
        .map_err(|e| ServeError::Invalid(format!("malformed inference request JSON: {e}")))?;
    request_from_wire(request, &[], priority_header)
}

/// Converts the decoded body into the protocol-neutral request. `binary`
/// holds the raw tensors that follow a binary-tensor request's JSON header,
/// consumed in input order by inputs with `binary_data_size`;
/// `priority_header` is the `x-priority` header.
pub(crate) fn request_from_wire(
    request: RequestJson,
    binary: &[u8],
    priority_header: Option<&str>,
) -> Result<InferRequest, ServeError> {
    let parameter = |name: &str| {
        request
            .parameters
            .as_ref()
            .and_then(|p| p.get(name))
            .map(Param::from_json)
    };
    let options = scheduling::resolve_options(
        parameter(scheduling::PRIORITY_PARAMETER),
        parameter(scheduling::REQUEST_TYPE_PARAMETER),
        parameter(scheduling::TIMEOUT_PARAMETER),
        priority_header,
    )?;
    let mut rest = binary;
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for i in request.inputs {
        let data = match (
            codec::binary_data_size(i.parameters.as_ref(), &i.name)?,
            i.data,
        ) {
            (Some(size), _) => {
                let Some((bytes, tail)) = rest.split_at_checked(size) else {
                    return Err(ServeError::Invalid(format!(
                        "input '{}' has binary_data_size {size} but only {} bytes of binary data remain",
                        i.name,
                        rest.len()
                    )));
                };
                rest = tail;
                codec::tensor_from_le_bytes(&i.name, &i.datatype, bytes)?
            }
            (None, Some(data)) => data.0,
            (None, None) => {
                return Err(ServeError::Invalid(format!(
                    "input '{}' has neither data nor binary_data_size",
                    i.name
                )));
            }
        };
        inputs.push(InputTensor {
            name: i.name,
            datatype: i.datatype,
            shape: i.shape,
            data,
        });
    }
    if !rest.is_empty() {
        return Err(ServeError::Invalid(format!(
            "{} bytes of binary data follow the inputs' binary_data_size",
            rest.len()
        )));
    }
    Ok(InferRequest {
        options,
        id: request.id,
        inputs,
        outputs: request
            .outputs
            .map(|outputs| outputs.into_iter().map(|o| o.name).collect()),
        parameters: request.parameters.unwrap_or_default(),
    })
}

#[derive(Serialize)]
pub(crate) struct ResponseJson<'a> {
    pub(crate) model_name: &'a str,
    pub(crate) model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) id: Option<&'a str>,
    pub(crate) outputs: Vec<OutputJson<'a>>,
}

#[derive(Serialize)]
pub(crate) struct OutputJson<'a> {
    pub(crate) name: &'a str,
    pub(crate) datatype: &'static str,
    pub(crate) shape: &'a [usize],
    /// `{"binary_data_size": N}` when the data follows the JSON header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) parameters: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) data: Option<&'a [f32]>,
}

/// Tensor `data`, flat or nested to any depth, flattened in row-major
/// order while parsing (no intermediate `serde_json::Value` tree).
#[derive(Debug, Default)]
pub(crate) struct FlatData(pub(crate) Vec<f32>);

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
            None,
        )
        .unwrap();
        let nested = decode_request(br#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5],[-3,4e0]]}]}"#, None).unwrap();
        assert_eq!(flat.inputs[0].data, vec![1.0, 2.5, -3.0, 4.0]);
        assert_eq!(flat, nested);
        assert_eq!(flat.id, None);
        assert_eq!(flat.outputs, None);
    }

    #[test]
    fn strings_in_data_are_refused_with_a_reason() {
        let err = decode_request(
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":["a"]}]}"#,
            None,
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
        let decoded = decode_request(text.as_bytes(), None).unwrap();
        assert_eq!(decoded.inputs[0].data[0].to_bits(), value.to_bits());
    }

    #[test]
    fn scheduling_parameters_and_the_header_become_options() {
        let body = br#"{"parameters":{"request_type":"real_time_trading","timeout":2500},"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}"#;
        let decoded = decode_request(body, Some("5")).unwrap();
        assert_eq!(
            decoded.options.priority,
            tickserve_scheduler::Priority::new(1)
        );
        assert_eq!(
            decoded.options.timeout,
            Some(std::time::Duration::from_micros(2500))
        );
        let plain = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}"#;
        let decoded = decode_request(plain, Some("background")).unwrap();
        assert_eq!(
            decoded.options.priority,
            tickserve_scheduler::Priority::new(5)
        );
        let bad = br#"{"parameters":{"priority":7},"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}"#;
        let err = decode_request(bad, None).unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert!(
            err.to_string().contains("invalid priority parameter 7"),
            "{err}"
        );
    }
}
