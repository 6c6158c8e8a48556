//! Handler tests through the router with no socket
//! (`tower::ServiceExt::oneshot`): one request in, one response out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

use crate::registry::{ModelControl, ModelRegistry};
use crate::{AppState, ServerConfig, router};

use tickserve_test_support::root;

/// State with no models loaded yet, and no cache.
fn starting() -> AppState {
    let config = ServerConfig::loopback(root().join("models"));
    tickserve_telemetry::install_recorder().unwrap();
    AppState::new(&config, None)
}

/// State with the bundled repository loaded.
async fn loaded() -> AppState {
    let state = starting();
    let runtime = tokio::runtime::Handle::current();
    let registry = tokio::task::spawn_blocking(move || {
        ModelRegistry::start(&root().join("models"), &runtime, &ModelControl::default())
    })
    .await
    .unwrap()
    .unwrap();
    state.set_registry(registry);
    state
}

async fn call(state: &AppState, request: Request<Body>) -> (StatusCode, Value) {
    let response = router(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

#[tokio::test]
async fn readiness_follows_loading_and_draining() {
    let state = starting();
    assert_eq!(
        call(&state, get("/v2/health/live")).await,
        (StatusCode::OK, serde_json::json!({"live": true}))
    );
    let (status, body) = call(&state, get("/v2/health/ready")).await;
    assert_eq!(
        (status, &body["ready"]),
        (StatusCode::SERVICE_UNAVAILABLE, &Value::Bool(false))
    );
    let (status, body) = call(&state, get("/v2/models/cnn_lstm")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    let state = loaded().await;
    assert_eq!(
        call(&state, get("/v2/health/ready")).await.0,
        StatusCode::OK
    );
    state.start_draining();
    assert_eq!(
        call(&state, get("/v2/health/ready")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn the_golden_request_is_answered_and_sampled_for_the_sla_view() {
    let state = loaded().await;
    let body = std::fs::read(root().join("fixtures/golden/cnn_lstm/request.json")).unwrap();
    let request = Request::post("/v2/models/cnn_lstm/infer")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let (status, answer) = call(&state, request).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["model_name"], "cnn_lstm");
    assert_eq!(answer["outputs"][0]["shape"], serde_json::json!([1, 3]));

    let (status, view) = call(&state, get("/v2/sla")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["overall"]["requests"], 1, "{view:#}");
    assert_eq!(view["classes"][0]["class"], "priority 3");
}

#[tokio::test]
async fn unknown_routes_and_models_are_404_with_a_reason() {
    let state = loaded().await;
    let (status, body) = call(&state, get("/v2/nowhere")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body["error"].as_str().unwrap().contains("/v2/nowhere"),
        "{body}"
    );
    let (status, body) = call(&state, get("/v2/models/nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].as_str().unwrap().contains("nope"), "{body}");
    let (status, body) = call(&state, get("/v2/models/cnn_lstm/versions/9")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].as_str().unwrap().contains('9'), "{body}");
}

#[tokio::test]
async fn an_error_answer_carries_the_trace_id_and_the_request_id() {
    let state = starting();
    let request = Request::post("/v2/models/cnn_lstm/infer")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("x-request-id", "order-9")
        .body(Body::from("{}"))
        .unwrap();
    let response = router(state).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let traceparent = response.headers()["traceparent"].to_str().unwrap();
    assert!(
        traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{traceparent}"
    );
    assert_eq!(response.headers()["x-request-id"], "order-9");
}
