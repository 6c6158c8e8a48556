//! Request tracing end to end: the real server exports its spans over
//! OTLP/gRPC to a trace receiver this test runs (opentelemetry-proto's
//! TraceService on tonic, 127.0.0.1:0). An HTTP request carries a known
//! `traceparent`, a gRPC request none; the answers must carry the trace id
//! and an `x-request-id`, and the receiver must get the documented spans
//! with the documented parentage (docs/operations.md, "Tracing").
//!
//! One test in this file: the `tracing` subscriber is global to the
//! process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tickserve_server::grpc::pb;
use tickserve_server::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use tickserve_telemetry::LogFormat;
use tickserve_telemetry::traces::{OtlpConfig, init_logging_and_traces};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
/// The spans under a request's `infer` span when its rows miss the cache.
const CHILDREN: [&str; 5] = ["decode", "cache", "queue", "engine", "encode"];

/// The spans of trace `trace_id`: its `infer` span and its children by
/// name. Panics unless each named child is there exactly once, as a child
/// of the `infer` span.
fn check_trace(spans: &[Received], trace_id: &str, protocol: &str) -> Received {
    let trace: Vec<&Received> = spans
        .iter()
        .filter(|s| hex(&s.span.trace_id) == trace_id)
        .collect();
    let infer: Vec<&&Received> = trace.iter().filter(|s| s.span.name == "infer").collect();
    assert_eq!(
        infer.len(),
        1,
        "one infer span in trace {trace_id}: {trace:#?}"
    );
    let infer = (*infer[0]).clone();
    assert_eq!(infer.service, "tickserve");
    assert_eq!(infer.span.kind, SpanKind::Server as i32);
    assert_eq!(infer.attribute("protocol").as_deref(), Some(protocol));
    assert_eq!(infer.attribute("model").as_deref(), Some("cnn_lstm"));
    assert_eq!(infer.attribute("outcome").as_deref(), Some("success"));
    assert_eq!(infer.attribute("rows").as_deref(), Some("2"));
    for name in CHILDREN {
        let named: Vec<&&Received> = trace.iter().filter(|s| s.span.name == name).collect();
        assert_eq!(
            named.len(),
            1,
            "one {name} span in trace {trace_id}: {trace:#?}"
        );
        assert_eq!(
            hex(&named[0].span.parent_span_id),
            hex(&infer.span.span_id),
            "{name} is a child of infer"
        );
        assert!(named[0].span.end_time_unix_nano >= named[0].span.start_time_unix_nano);
    }
    let engine = trace.iter().find(|s| s.span.name == "engine").unwrap();
    assert_eq!(engine.attribute("rows").as_deref(), Some("2"));
    assert_eq!(
        trace.len(),
        1 + CHILDREN.len(),
        "no other spans: {trace:#?}"
    );
    infer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn traceparent_is_propagated_and_spans_reach_the_otlp_receiver() {
    // The receiver.
    let OtlpReceiver {
        addr: collector,
        exports: mut exports_rx,
        task: receiver,
    } = otlp_receiver(256).await;

    // The export, as `--otlp-endpoint` sets it up.
    let export = init_logging_and_traces(
        LogFormat::Text,
        "warn",
        Some(&OtlpConfig::new(format!("http://{collector}"))),
    )
    .unwrap()
    .expect("an export");
    let export = Arc::new(export);

    let server = start_default().await;
    let golden = golden();

    // HTTP, with the caller's trace context and request id.
    let response = server
        .client
        .post(server.url("/v2/models/cnn_lstm/infer"))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .header("x-request-id", "order-7")
        .json(&request_for(&golden, &[0, 1], "http"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let http_traceparent = response.headers()["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(response.headers()["x-request-id"], "order-7");
    let fields: Vec<&str> = http_traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "{http_traceparent}");
    assert_eq!((fields[0], fields[1], fields[3]), ("00", TRACE_ID, "01"));
    let http_span_id = fields[2].to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_golden_rows(&golden, &body, &[0, 1]);

    // gRPC, with neither: a new trace, a new request id.
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let data: Vec<f32> = golden.input[2 * ROW..4 * ROW].to_vec();
    let answer = client
        .model_infer(pb::ModelInferRequest {
            model_name: "cnn_lstm".into(),
            id: "grpc".into(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![2, 50, 60],
                contents: Some(pb::InferTensorContents {
                    fp32_contents: data,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let metadata = answer.metadata();
    let grpc_traceparent = metadata
        .get("traceparent")
        .expect("traceparent metadata")
        .to_str()
        .unwrap()
        .to_owned();
    let request_id = metadata
        .get("x-request-id")
        .expect("x-request-id metadata")
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(request_id.len(), 32, "{request_id}");
    let fields: Vec<&str> = grpc_traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "{grpc_traceparent}");
    let grpc_trace_id = fields[1].to_owned();
    let grpc_span_id = fields[2].to_owned();
    assert_ne!(grpc_trace_id, TRACE_ID);
    assert_eq!(fields[3], "01", "a new trace is sampled at ratio 1");
    assert_eq!(answer.into_inner().outputs[0].shape, vec![2, 3]);

    // Every span of both requests has ended before its answer was sent;
    // the flush sends them now.
    let flushing = Arc::clone(&export);
    tokio::task::spawn_blocking(move || flushing.flush())
        .await
        .unwrap()
        .unwrap();
    let mut spans = Vec::new();
    let wanted = 2 * (1 + CHILDREN.len());
    while spans.len() < wanted {
        // A guard against a hang, not a measurement.
        let export = tokio::time::timeout(Duration::from_secs(60), exports_rx.recv())
            .await
            .expect("the receiver got every span")
            .unwrap();
        spans.extend(spans_of(export));
    }
    let by_trace = spans.iter().fold(HashMap::new(), |mut m, s| {
        *m.entry(hex(&s.span.trace_id)).or_insert(0) += 1;
        m
    });
    assert_eq!(by_trace.len(), 2, "two traces: {by_trace:?}");

    let http = check_trace(&spans, TRACE_ID, "http");
    assert_eq!(
        hex(&http.span.parent_span_id),
        PARENT_ID,
        "a child of the caller's span"
    );
    assert_eq!(
        hex(&http.span.span_id),
        http_span_id,
        "the answer names the infer span"
    );
    assert_eq!(http.attribute("request_id").as_deref(), Some("order-7"));

    let grpc = check_trace(&spans, &grpc_trace_id, "grpc");
    assert!(
        grpc.span.parent_span_id.is_empty(),
        "the root of a new trace"
    );
    assert_eq!(hex(&grpc.span.span_id), grpc_span_id);
    assert_eq!(grpc.attribute("request_id").as_deref(), Some(&*request_id));

    server.shutdown().await.unwrap();
    Arc::try_unwrap(export)
        .map(|export| tokio::task::spawn_blocking(move || export.shutdown()))
        .expect("the only handle")
        .await
        .unwrap()
        .unwrap();
    receiver.abort();
}
