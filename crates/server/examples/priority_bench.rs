//! Priority scheduling under overload, measured: starts tickserve in this
//! process on a loopback port with the bundled model, measures a lone
//! sequential client's latency, then the capacity with a closed loop, then offers twice that as an open loop
//! (10 % priority 1, 60 % priority 3, 30 % priority 5, one row each) and
//! reports per-class p50/p99 latency, refusals by reason and the process
//! RSS over the run. Latency counts from each request's *intended* send
//! time, so a stalled client does not hide queueing (coordinated
//! omission). Bounded in time and in requests in flight.
//!
//! ```text
//! cargo run --release -p tickserve-server --example priority_bench -- [seconds] [capacity-seconds] [repository]
//! ```
//!
//! `repository` defaults to the bundled `models/` (its cnn_lstm model is
//! the one exercised).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tickserve_test_support::RequestExt;

use serde_json::{Value, json};
use tickserve_server::{BoundServer, CacheConfig, ServerConfig};

/// Most requests in flight at once; past it a send is counted as skipped.
const MAX_IN_FLIGHT: usize = 4096;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn body(priority: u8) -> Vec<u8> {
    // A deterministic window; the values do not matter for timing.
    let data: Vec<f32> = (0..50 * 60).map(|i| ((i % 97) as f32) / 97.0).collect();
    serde_json::to_vec(&json!({
        "parameters": { "priority": priority },
        "inputs": [{ "name": "input", "shape": [1, 50, 60], "datatype": "FP32", "data": data }],
    }))
    .unwrap()
}

fn pct(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

#[derive(Default, Debug)]
struct Outcomes {
    ok: Vec<Duration>,
    /// status or reason → count
    refused: BTreeMap<String, u64>,
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(10)
        .min(120);
    let capacity_seconds: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(3)
        .min(30);
    let root = args.next().map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"),
        std::path::PathBuf::from,
    );
    // The result cache is off: the workload repeats its rows, and this
    // bench measures the scheduler, not cache hits.
    let server = BoundServer::bind(ServerConfig {
        drain_timeout: Duration::from_secs(5),
        shutdown_delay: Duration::ZERO,
        cache: CacheConfig {
            enabled: false,
            ..CacheConfig::default()
        },
        ..ServerConfig::loopback(root)
    })
    .await
    .unwrap();
    let http = server.http_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async move {
        let _ = stop_rx.await;
    }));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .build()
        .unwrap();
    let url = format!("http://{http}/v2/models/cnn_lstm/infer");
    for _ in 0..600 {
        if let Ok(r) = client
            .get(format!("http://{http}/v2/health/ready"))
            .send()
            .await
            && r.status() == 200
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let bodies: Arc<[Vec<u8>; 5]> = Arc::new([body(1), body(2), body(3), body(4), body(5)]);

    // 0. A lone sequential client (work-conserving dispatch: no batch wait).
    let mut sequential = Vec::with_capacity(500);
    for _ in 0..500 {
        let sent = Instant::now();
        let r = client
            .post(&url)
            .header("content-type", "application/json")
            .body(bodies[2].clone())
            .sent()
            .await;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
        sequential.push(sent.elapsed());
    }
    sequential.sort();
    println!(
        "sequential client, 500 requests of priority 3: p50 {:.2} ms, p99 {:.2} ms",
        pct(&sequential, 0.5),
        pct(&sequential, 0.99)
    );

    // 1. Capacity: 64 closed-loop clients of priority 3.
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let loops: Vec<_> = (0..64)
        .map(|_| {
            let (client, url, bodies, done, stop) = (
                client.clone(),
                url.clone(),
                bodies.clone(),
                done.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(bodies[2].clone())
                        .send()
                        .await;
                    if let Ok(r) = r
                        && r.status() == 200
                        && r.bytes().await.is_ok()
                    {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(capacity_seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        let _ = l.await;
    }
    let capacity = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    let offered = 2.0 * capacity;
    println!(
        "capacity (64 closed-loop clients, priority 3): {capacity:.0} req/s; offering {offered:.0} req/s for {seconds} s"
    );

    // 2. Open loop at twice the capacity.
    let outcomes: Arc<std::sync::Mutex<[Outcomes; 5]>> = Arc::default();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut skipped = 0u64;
    let mut rss_max = rss_kib();
    let rss_start = rss_max;
    let interval = Duration::from_secs_f64(1.0 / offered);
    let t0 = Instant::now();
    let mut next = t0;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut last_rss = t0;
    let mut sent = 0u64;
    while next < t0 + Duration::from_secs(seconds) {
        let now = Instant::now();
        if next > now {
            tokio::time::sleep(next - now).await;
        }
        if last_rss.elapsed() > Duration::from_millis(100) {
            rss_max = rss_max.max(rss_kib());
            last_rss = Instant::now();
        }
        // xorshift: 10 % priority 1, 60 % priority 3, 30 % priority 5.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let class = match rng % 10 {
            0 => 1usize,
            1..=6 => 3,
            _ => 5,
        };
        let intended = next;
        next += interval;
        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            skipped += 1;
            continue;
        }
        sent += 1;
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (client, url, bodies, outcomes, in_flight) = (
            client.clone(),
            url.clone(),
            bodies.clone(),
            outcomes.clone(),
            in_flight.clone(),
        );
        tokio::spawn(async move {
            let r = client
                .post(&url)
                .header("content-type", "application/json")
                .body(bodies[class - 1].clone())
                .send()
                .await;
            let outcome = match r {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    match status {
                        200 => Ok(intended.elapsed()),
                        429 if text.contains("admission refused") => Err("429 deadline".to_owned()),
                        429 => Err("429 queue_full".to_owned()),
                        503 if text.contains("request timeout expired") => {
                            Err("503 timeout".to_owned())
                        }
                        other => Err(format!("{other}")),
                    }
                }
                Err(e) => Err(format!("client error: {e}")),
            };
            let mut all = outcomes.lock().unwrap();
            match outcome {
                Ok(latency) => all[class - 1].ok.push(latency),
                Err(reason) => *all[class - 1].refused.entry(reason).or_default() += 1,
            }
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
    // Let the last requests finish (bounded).
    let drain_until = Instant::now() + Duration::from_secs(15);
    while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        rss_max = rss_max.max(rss_kib());
    }
    let elapsed = t0.elapsed().as_secs_f64();
    println!(
        "sent {sent} requests in {elapsed:.1} s ({:.0} req/s), {skipped} skipped (over {MAX_IN_FLIGHT} in flight)",
        sent as f64 / elapsed
    );
    println!("class  sent   ok     p50 ms   p99 ms   refused");
    let mut all = std::mem::take(&mut *outcomes.lock().unwrap());
    for (i, o) in all.iter_mut().enumerate() {
        let refused: u64 = o.refused.values().sum();
        let total = o.ok.len() as u64 + refused;
        if total == 0 {
            continue;
        }
        o.ok.sort();
        println!(
            "p{}    {:6} {:6} {:8.2} {:8.2}   {:?} ({:.1} % refused)",
            i + 1,
            total,
            o.ok.len(),
            pct(&o.ok, 0.5),
            pct(&o.ok, 0.99),
            o.refused,
            100.0 * refused as f64 / total as f64
        );
    }
    println!(
        "RSS (server and client in one process): start {:.1} MiB, max {:.1} MiB, end {:.1} MiB",
        rss_start as f64 / 1024.0,
        rss_max as f64 / 1024.0,
        rss_kib() as f64 / 1024.0
    );
    let stats: Value = client
        .get(format!("http://{http}/v2/models/cnn_lstm/stats"))
        .json_value()
        .await;
    let model = &stats["model_stats"][0];
    let batches = model["execution_count"].as_f64().unwrap_or(0.0);
    let rows = model["inference_count"].as_f64().unwrap_or(0.0);
    println!(
        "engine: {batches} batches, mean batch size {:.1}, adaptive batch size now {}",
        rows / batches.max(1.0),
        model["adaptive_batch_size"]
    );
    let _ = stop_tx.send(());
    let _ = serving.await;
}
