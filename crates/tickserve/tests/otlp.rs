//! The binary's trace export: `tickserve serve --otlp-endpoint` sends the
//! spans of a request to an OTLP receiver this test runs, and sends the
//! last ones on SIGTERM. The batch delay is set to an hour
//! (`OTEL_BSP_SCHEDULE_DELAY`), so the spans can only arrive through the
//! flush at shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tickserve_test_support::{hex, spans_of};

mod common;

use common::root;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[test]
fn spans_are_exported_and_flushed_on_sigterm() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let tickserve_test_support::OtlpReceiver {
        addr: collector,
        exports: mut exports_rx,
        ..
    } = runtime.block_on(tickserve_test_support::otlp_receiver(64));

    let endpoint = format!("http://{collector}");
    let common::Served {
        child,
        http,
        log: lines,
        ..
    } = common::spawn_serve_with_env(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-service-name",
            "pricing-test",
        ],
        &[("OTEL_BSP_SCHEDULE_DELAY", "3600000")],
    );
    let client = reqwest::blocking::Client::new();
    common::wait_ready(&client, &http, Duration::from_secs(30));
    let body = std::fs::read(root().join("fixtures/golden/cnn_lstm/request.json")).unwrap();
    let response = client
        .post(format!("http://{http}/v2/models/cnn_lstm/infer"))
        .header("traceparent", format!("00-{TRACE_ID}-00f067aa0ba902b7-01"))
        .body(body)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["traceparent"]
            .to_str()
            .unwrap()
            .contains(TRACE_ID)
    );
    assert!(
        exports_rx.try_recv().is_err(),
        "nothing is sent before the batch delay or the shutdown"
    );

    let log = common::terminate(child, lines);
    assert!(log.contains("trace export flushed"), "{log}");

    // The process has exited: whatever it sent is here already.
    let mut names = Vec::new();
    while let Ok(export) = exports_rx.try_recv() {
        for received in spans_of(export) {
            assert_eq!(received.service, "pricing-test");
            let span = received.span;
            assert_eq!(hex(&span.trace_id), TRACE_ID, "{}", span.name);
            names.push(span.name);
        }
    }
    names.sort();
    assert_eq!(
        names,
        ["cache", "decode", "encode", "engine", "infer", "queue"],
        "{log}"
    );
}
