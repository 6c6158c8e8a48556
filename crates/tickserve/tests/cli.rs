//! The `tickserve` binary as an operator runs it: start on the bundled
//! repository, answer, stop on SIGTERM with exit status 0; refuse a bad
//! repository with a non-zero status and a reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

#[test]
fn serve_answers_and_exits_zero_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tickserve"))
        .current_dir(root())
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The JSON log's "listening" line names the bound port.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = Instant::now();
    let http = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        let log: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if log["message"] == "listening" {
            break log["http"].as_str().unwrap().to_owned();
        }
    };
    let client = reqwest::blocking::Client::new();
    let ready_url = format!("http://{http}/v2/health/ready");
    while client
        .get(&ready_url)
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
        != 200
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not ready in 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let body = std::fs::read(root().join("fixtures/golden/cnn_lstm/request.json")).unwrap();
    let response = client
        .post(format!("http://{http}/v2/models/cnn_lstm/infer"))
        .body(body)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Keep draining stderr so the server never blocks on a full pipe.
    let drained = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let exit = child.wait().unwrap();
    let log = drained.join().unwrap().join("\n");
    assert!(exit.success(), "exit status {exit:?}\n{log}");
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("drained"), "{log}");
}

#[test]
fn a_missing_repository_exits_non_zero_with_the_reason() {
    let output = Command::new(env!("CARGO_BIN_EXE_tickserve"))
        .args([
            "serve",
            "--model-repository",
            "/nonexistent/repo",
            "--http-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot read model repository /nonexistent/repo"),
        "{stderr}"
    );
}
