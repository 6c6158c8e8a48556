//! Closed-loop load against a running tickserve in each wire form: HTTP
//! JSON, HTTP binary tensors, HTTP MessagePack and gRPC (raw tensors).
//! Each of `--clients` tasks sends one request, waits for the answer and
//! sends the next, for `--seconds` per protocol. Prints requests/s,
//! p50/p99 latency and, with `--server-pid`, the server's CPU time per
//! request (user+system from /proc, so it includes the engine: the
//! difference between rows is the protocol's cost). HTTP clients share a
//! connection pool (one connection per client in practice); gRPC clients
//! share `--grpc-channels` HTTP/2 connections (default 1), round-robin.
//!
//!   cargo run --release -p tickserve-server --example protocol_load -- \
//!       --http 127.0.0.1:8000 --grpc 127.0.0.1:8001 --clients 64 --seconds 10 \
//!       --server-pid "$(pgrep -n tickserve)"
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tickserve_server::grpc::pb::grpc_inference_service_client::GrpcInferenceServiceClient;

const ROW: usize = 50 * 60;

struct Args {
    http: String,
    grpc: String,
    clients: usize,
    seconds: u64,
    rows: usize,
    grpc_channels: usize,
    server_pid: Option<u32>,
}

fn args() -> Args {
    let mut args = Args {
        http: "127.0.0.1:8000".into(),
        grpc: "127.0.0.1:8001".into(),
        clients: 64,
        seconds: 10,
        rows: 1,
        grpc_channels: 1,
        server_pid: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().expect("every flag takes a value");
        match flag.as_str() {
            "--http" => args.http = value,
            "--grpc" => args.grpc = value,
            "--clients" => args.clients = value.parse().unwrap(),
            "--seconds" => args.seconds = value.parse().unwrap(),
            "--rows" => args.rows = value.parse().unwrap(),
            "--grpc-channels" => args.grpc_channels = value.parse().unwrap(),
            "--server-pid" => args.server_pid = Some(value.parse().unwrap()),
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

/// user+system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0 // CLK_TCK is 100 on Linux
}

fn input(rows: usize) -> Vec<f32> {
    let golden = tickserve_test_support::golden().input;
    let available = golden.len() / ROW;
    (0..rows)
        .flat_map(|r| golden[(r % available) * ROW..(r % available + 1) * ROW].to_vec())
        .collect()
}

type Ready = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

/// Success when the status is 2xx and the whole body arrived: a real
/// client pays for reading the answer.
fn read_ok(response: reqwest::Response) -> Ready {
    Box::pin(async move { response.status().is_success() && response.bytes().await.is_ok() })
}

#[derive(Clone, Copy, PartialEq)]
enum Form {
    Json,
    Binary,
    Msgpack,
    Grpc,
}

#[tokio::main]
async fn main() {
    let args = args();
    let data = input(args.rows);
    let json_value = serde_json::json!({
        "inputs": [{"name": "input", "shape": [args.rows, 50, 60], "datatype": "FP32", "data": data}]
    });
    let json = serde_json::to_vec(&json_value).unwrap();
    let msgpack = tickserve_test_support::msgpack_request(args.rows, &data);
    let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let header = serde_json::to_vec(&serde_json::json!({
        "inputs": [{"name": "input", "shape": [args.rows, 50, 60], "datatype": "FP32",
                    "parameters": {"binary_data_size": raw.len()}}],
        "parameters": {"binary_data_output": true}
    }))
    .unwrap();
    let header_len = header.len();
    let mut binary = header;
    binary.extend_from_slice(&raw);
    let mut grpc_request = tickserve_test_support::grpc_request("", args.rows, Vec::new(), true);
    grpc_request.raw_input_contents = vec![raw.clone()];

    println!(
        "{} clients, {} s per form, {} row(s) per request, {} gRPC connection(s)",
        args.clients, args.seconds, args.rows, args.grpc_channels
    );
    println!("| form | requests/s | p50 ms | p99 ms | errors | server CPU ms/request |");
    println!("|---|---|---|---|---|---|");
    for (name, form) in [
        ("HTTP JSON", Form::Json),
        ("HTTP binary", Form::Binary),
        ("HTTP msgpack", Form::Msgpack),
        ("gRPC raw", Form::Grpc),
    ] {
        let http = reqwest::Client::new();
        let url = format!("http://{}/v2/models/cnn_lstm/infer", args.http);
        let mut channels = Vec::new();
        for _ in 0..args.grpc_channels {
            channels.push(
                GrpcInferenceServiceClient::connect(format!("http://{}", args.grpc))
                    .await
                    .unwrap()
                    .max_decoding_message_size(64 << 20),
            );
        }
        let cpu_before = args.server_pid.map(cpu_seconds);
        let started = Instant::now();
        let deadline = started + Duration::from_secs(args.seconds);
        let mut tasks = Vec::new();
        for client in 0..args.clients {
            let mut grpc = channels[client % channels.len()].clone();
            let (http, url) = (http.clone(), url.clone());
            let (json, msgpack, binary, grpc_request) = (
                json.clone(),
                msgpack.clone(),
                binary.clone(),
                grpc_request.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new(3).unwrap();
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let ok = match form {
                        Form::Json => http
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(json.clone())
                            .send()
                            .await
                            .map(read_ok),
                        Form::Msgpack => http
                            .post(&url)
                            .header("content-type", "application/msgpack")
                            .header("accept", "application/msgpack")
                            .body(msgpack.clone())
                            .send()
                            .await
                            .map(read_ok),
                        Form::Binary => http
                            .post(&url)
                            .header("inference-header-content-length", header_len)
                            .body(binary.clone())
                            .send()
                            .await
                            .map(read_ok),
                        Form::Grpc => {
                            let ok = grpc.model_infer(grpc_request.clone()).await.is_ok();
                            Ok(Box::pin(async move { ok }) as Ready)
                        }
                    };
                    let ok = match ok {
                        Ok(ok) => ok.await,
                        Err(_) => false,
                    };
                    if ok {
                        hist.record(t.elapsed().as_micros() as u64).unwrap();
                    } else {
                        errors += 1;
                    }
                }
                (hist, errors)
            }));
        }
        let mut hist = Histogram::<u64>::new(3).unwrap();
        let mut errors = 0;
        for task in tasks {
            let (h, e) = task.await.unwrap();
            hist.add(h).unwrap();
            errors += e;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let count = hist.len();
        let cpu = match (args.server_pid, cpu_before) {
            (Some(pid), Some(before)) => {
                format!(
                    "{:.3}",
                    (cpu_seconds(pid) - before) * 1e3 / count.max(1) as f64
                )
            }
            _ => "-".into(),
        };
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {errors} | {cpu} |",
            count as f64 / elapsed,
            hist.value_at_quantile(0.5) as f64 / 1e3,
            hist.value_at_quantile(0.99) as f64 / 1e3,
        );
    }
}
