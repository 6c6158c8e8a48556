//! Starting the real `tickserve` binary for the tests in this folder.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

pub use tickserve_test_support::root;

/// A running `tickserve serve`: the child, its HTTP and gRPC addresses, and the log
/// lines after its "listening" line (keep reading them, or the server
/// blocks on a full pipe).
pub struct Served {
    pub child: Child,
    pub http: String,
    pub grpc: String,
    pub log: Lines<BufReader<ChildStderr>>,
}

/// `serve` arguments that put every listener on a free loopback port.
pub const FREE_PORTS: [&str; 6] = [
    "--http-addr",
    "127.0.0.1:0",
    "--metrics-addr",
    "127.0.0.1:0",
    "--grpc-addr",
    "127.0.0.1:0",
];

/// Starts `tickserve serve` from the repository root with every listener
/// on port 0, JSON logs and `extra` arguments, and returns once the log
/// names the bound HTTP address.
pub fn spawn_serve(extra: &[&str]) -> Served {
    spawn_serve_with_env(extra, &[])
}

/// [`spawn_serve`] with these environment variables set as well.
pub fn spawn_serve_with_env(extra: &[&str], env: &[(&str, &str)]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tickserve"))
        .envs(env.iter().copied())
        .current_dir(root())
        .arg("serve")
        .args(FREE_PORTS)
        .args(["--log-format", "json"])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The JSON log's "listening" line names the bound port.
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    let (http, grpc) = loop {
        let line = log.next().expect("server exited before listening").unwrap();
        let line: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if line["message"] == "listening" {
            let addr = |key: &str| line[key].as_str().unwrap().to_owned();
            break (addr("http"), addr("grpc"));
        }
    };
    Served {
        child,
        http,
        grpc,
        log,
    }
}

/// Polls `/v2/health/ready` on `http` until it answers 200.
pub fn wait_ready(client: &reqwest::blocking::Client, http: &str, within: Duration) {
    let ready = format!("http://{http}/v2/health/ready");
    let started = Instant::now();
    while client
        .get(&ready)
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
        != 200
    {
        assert!(started.elapsed() < within, "not ready in {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM, keeps reading the log so the server never blocks on a
/// full pipe, checks that it exits with status 0, and returns the log.
pub fn terminate(mut child: Child, log: Lines<BufReader<ChildStderr>>) -> String {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let drained = std::thread::spawn(move || log.map_while(Result::ok).collect::<Vec<_>>());
    let exit = child.wait().unwrap();
    let log = drained.join().unwrap().join("\n");
    assert!(exit.success(), "exit status {exit:?}\n{log}");
    log
}
