//! The Open Inference Protocol (KServe v2) over HTTP/JSON, per
//! serving-systems.md §6.
//!
//! Handlers decode the wire format into the protocol-neutral
//! [`InferRequest`](crate::models::InferRequest), call the one inference path (crate::infer) and encode
//! the [`InferResponse`](crate::models::InferResponse). Nothing here knows
//! about batching, caching or metrics.
//! The binary-tensor, MessagePack and raw forms of the same request and
//! answer are chosen by headers in [`crate::codec`]; compression is a tower
//! layer around the router.
//! An inference request runs in its trace's `infer` span and its answer
//! carries `traceparent` and `x-request-id` ([`crate::trace`]).
//! After a background request on a connection, the connection's next body
//! is decoded on the background decode threads ([`crate::decode_pool`]),
//! off the runtime that carries real-time requests.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tickserve_telemetry::traces::TRACE_TARGET;
use tracing::Instrument;

use crate::AppState;
use crate::codec;
use crate::decode_pool::{self, ConnectionHistory};
use crate::error::ServeError;
use crate::models::InferRequest;
use crate::trace::{Incoming, Protocol, RequestTrace};

pub(crate) fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    let mut router = Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready));
    // Every model route also stands under one named version; without it
    // the request goes to the version the model's policy serves.
    let model_routes = [
        ("", get(model_metadata)),
        ("/ready", get(model_ready)),
        ("/stats", get(model_stats)),
        ("/infer", post(infer)),
        ("/config", get(model_config)),
    ];
    for (action, handler) in model_routes {
        router = router
            .route(&format!("/v2/models/{{model}}{action}"), handler.clone())
            .route(
                &format!("/v2/models/{{model}}/versions/{{version}}{action}"),
                handler,
            );
    }
    router
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/load", post(load_model))
        .route("/v2/repository/models/{model}/unload", post(unload_model))
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
        Ok(crate::triton::ModelConfigJson::of(&version))
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
                .map(|v| crate::triton::model_stats(&v.name, v.version, &v.stats()))
                .collect();
            Json(serde_json::json!({ "model_stats": stats })).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Triton's repository index: every model folder and served version, with
/// its state and the reason it is not ready. A body `{"ready": true}`
/// keeps the ready rows only.
async fn repository_index(State(state): State<AppState>, body: Bytes) -> Response {
    let ready_only = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|b| b.get("ready").and_then(serde_json::Value::as_bool))
        .unwrap_or(false);
    match state.registry() {
        Ok(registry) => Json(
            registry
                .index()
                .into_iter()
                .filter(|row| !ready_only || row.state == "READY")
                .map(|row| {
                    serde_json::json!({"name": row.name, "version": row.version, "state": row.state, "reason": row.reason})
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Triton's repository load: loads or reloads the model (explicit mode),
/// optionally with `{"parameters": {"config": "<JSON model config>"}}`
/// replacing the folder's configuration. Answers once the model serves.
async fn load_model(
    State(state): State<AppState>,
    Path(model): Path<String>,
    body: Bytes,
) -> Response {
    let config = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(body) => body
                .pointer("/parameters/config")
                .map(|c| c.as_str().map_or_else(|| c.to_string(), str::to_owned)),
            Err(e) => {
                return ServeError::Invalid(format!("the load request body is not JSON: {e}"))
                    .into_response();
            }
        }
    };
    match crate::repository_api::load(&state, model, config).await {
        Ok(()) => Json(serde_json::json!({})).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Triton's repository unload (explicit mode): requests being answered
/// finish first.
async fn unload_model(State(state): State<AppState>, Path(model): Path<String>) -> Response {
    match crate::repository_api::unload(&state, model).await {
        Ok(()) => Json(serde_json::json!({})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn no_route(uri: Uri) -> ServeError {
    ServeError::NoRoute(uri.path().to_owned())
}

/// Whether the body failed because the client stopped sending it (the
/// body read timeout of crate::serve).
/// The error of a body that could not be read.
fn body_error(state: &AppState, rejection: &BytesRejection) -> ServeError {
    if body_timed_out(rejection) {
        ServeError::RequestTimeout(format!(
            "the request body stalled: no data for {:?} (--body-read-timeout)",
            state.limits.body_read_timeout
        ))
    } else if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
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
}

fn body_timed_out(rejection: &BytesRejection) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(error) = source {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// A request body: decoded already on the background decode threads
/// (crate::decode_pool), or still as it came.
enum Body {
    Decoded(Result<InferRequest, ServeError>),
    Wire(HeaderMap, Result<Bytes, ServeError>),
}

/// Decodes a body on the background decode threads; returns it with the
/// answer's form the body asked for.
async fn decode_in_background(
    pool: &decode_pool::DecodePool,
    headers: HeaderMap,
    body: Result<Bytes, ServeError>,
    mut answer: codec::Answer,
) -> (Body, codec::Answer) {
    let fallback = answer.clone();
    let decoded = pool
        .run(move || {
            let decoded =
                body.and_then(|body| codec::decode_request(&headers, &body, None, &mut answer));
            (decoded, answer)
        })
        .instrument(tracing::info_span!(target: TRACE_TARGET, "background_decode"))
        .await;
    match decoded {
        Ok((decoded, answer)) => (Body::Decoded(decoded), answer),
        Err(error) => (Body::Decoded(Err(error)), fallback),
    }
}

async fn infer(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
    history: Option<Extension<ConnectionHistory>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let trace = RequestTrace::start(Protocol::Http, &Incoming::from_http(&headers));
    let answer = codec::Answer::from_accept(&headers);
    let body = body.map_err(|rejection| body_error(&state, &rejection));
    let history = history.map(|Extension(history)| history);
    let result = async {
        // After a background request on this connection, a large body is
        // decoded off the runtime (crate::decode_pool); the raw binary
        // form needs the model's signature and is cheap: never.
        let (body, mut answer) = match &state.decode_pool {
            Some(pool)
                if history.as_ref().is_some_and(|h| h.last_was_background())
                    && body
                        .as_ref()
                        .is_ok_and(|b| b.len() >= decode_pool::MIN_BODY_BYTES)
                    && !codec::is_raw(&headers) =>
            {
                decode_in_background(pool, headers, body, answer).await
            }
            _ => (Body::Wire(headers, body), answer),
        };
        let result = crate::infer::infer(
            &state,
            Protocol::Http,
            &path.model,
            path.version.as_deref(),
            |version| {
                let request = match body {
                    Body::Decoded(decoded) => decoded,
                    Body::Wire(headers, body) => body.and_then(|body| {
                        codec::decode_request(&headers, &body, Some(version), &mut answer)
                    }),
                }?;
                if let Some(history) = &history {
                    let class = request
                        .options
                        .priority
                        .unwrap_or_else(|| version.default_priority());
                    history.record(version.is_background(class));
                }
                Ok(request)
            },
        )
        .await;
        (result, answer)
    }
    .instrument(trace.span().clone())
    .await;
    let (result, answer) = result;
    let mut response = trace.encode(|| match result {
        Ok(response) => answer.encode(&response),
        Err(error) => error.into_response(),
    });
    trace.tag_http(response.headers_mut());
    response
}
