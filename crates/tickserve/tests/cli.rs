//! The `tickserve` binary as an operator runs it: start on the bundled
//! repository, answer, stop on SIGTERM with exit status 0; refuse a bad
//! repository with a non-zero status and a reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

mod common;

use common::root;

#[test]
fn serve_answers_and_exits_zero_on_sigterm() {
    let common::Served {
        child,
        http,
        log: lines,
        ..
    } = common::spawn_serve(&[]);
    let client = reqwest::blocking::Client::new();
    common::wait_ready(&client, &http, Duration::from_secs(30));
    let body = std::fs::read(root().join("fixtures/golden/cnn_lstm/request.json")).unwrap();
    let response = client
        .post(format!("http://{http}/v2/models/cnn_lstm/infer"))
        .body(body)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);

    let log = common::terminate(child, lines);
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("drained"), "{log}");
}

#[test]
fn a_missing_repository_exits_non_zero_with_the_reason() {
    let output = Command::new(env!("CARGO_BIN_EXE_tickserve"))
        .args(["serve", "--model-repository", "/nonexistent/repo"])
        .args(common::FREE_PORTS)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot read model repository /nonexistent/repo"),
        "{stderr}"
    );
}
