//! Result-cache benchmark on loopback: latency of a miss, an L1 hit and an
//! L2 hit, and requests/s at 64 clients for 0 %, 50 % and 90 % repeated
//! inputs, against a baseline with the cache turned off per request
//! (`"cache": false`) measured in the same run.
//!
//! ```text
//! redis-server --port 6390 --save '' --appendonly no &
//! REDIS_URL=redis://127.0.0.1:6390 cargo run --release -p tickserve-server --example cache_bench
//! ```
//!
//! Runs the server in this process (the bundled model) with a bounded
//! load: `BENCH_REQUESTS` sequential requests per latency phase (default
//! 200) and `BENCH_SECONDS` per throughput run (default 5).
//! `BENCH_REDIS_TIMEOUT_MS` sets `--redis-timeout` (default 5). For a
//! `rediss://` URL, `REDIS_CA_CERT` names the PEM file of a private CA.
//!
//! Server-side latency per phase comes from the server's SLA view
//! (`/v2/sla`, exact quantiles of the HTTP handler's time: decoding, cache,
//! engine; not the response encoding): each latency phase sends its
//! requests under its own priority class, which is not part of the cache
//! key, and hits never reach the scheduler where classes differ. The miss
//! phase uses the model's default class (3). The lookup itself is the
//! `tickserve_cache_lookup_seconds` histogram (bucket bounds, so "≤").
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tickserve_test_support::RequestExt;

use tickserve_server::{AdminToken, BoundServer, CacheConfig, RedisConfig, RedisTls, ServerConfig};

const ROW: usize = 50 * 60;
const TOKEN: &str = "bench";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A deterministic row: seed `i` gives the same values every time.
fn row(i: u64) -> Vec<f32> {
    let mut state = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..ROW)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn body(i: u64, cache: bool) -> Vec<u8> {
    body_with(i, cache, None)
}

fn body_with(i: u64, cache: bool, priority: Option<u8>) -> Vec<u8> {
    let mut json = serde_json::json!({
        "inputs": [{"name": "input", "shape": [1, 50, 60], "datatype": "FP32", "data": row(i)}],
        "parameters": {}
    });
    if !cache {
        json["parameters"]["cache"] = false.into();
    }
    if let Some(priority) = priority {
        json["parameters"]["priority"] = priority.into();
    }
    serde_json::to_vec(&json).unwrap()
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct Bench {
    client: reqwest::Client,
    base: String,
    metrics: String,
}

impl Bench {
    async fn infer(&self, body: Vec<u8>) -> Duration {
        let started = Instant::now();
        let response = self
            .client
            .post(format!("{}/v2/models/cnn_lstm/infer", self.base))
            .header("content-type", "application/json")
            .body(body)
            .sent()
            .await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        started.elapsed()
    }

    async fn clear(&self, tier: &str) {
        let r = self
            .client
            .delete(format!(
                "{}/v2/cache/models/cnn_lstm?tier={tier}",
                self.base
            ))
            .bearer_auth(TOKEN)
            .sent()
            .await;
        if r.status() != 200 {
            eprintln!("warning: clearing tier {tier} answered {}", r.status());
        }
    }

    async fn stats(&self) -> serde_json::Value {
        self.client
            .get(format!("{}/v2/cache/stats", self.base))
            .bearer_auth(TOKEN)
            .json_value()
            .await
    }

    /// Quantile upper bounds of the lookup histogram of `tier`.
    async fn server_lookup(&self, tier: &str) -> String {
        let text = self.client.get(&self.metrics).text_body().await;
        let prefix = format!("tickserve_cache_lookup_seconds_bucket{{tier=\"{tier}\",le=\"");
        let buckets: Vec<(String, f64)> = text
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|l| {
                let (le, count) = l.split_once("\"} ")?;
                Some((le.to_owned(), count.trim().parse().ok()?))
            })
            .collect();
        let Some(total) = buckets.last().map(|b| b.1) else {
            return "n/a".into();
        };
        let bound = |q: f64| {
            buckets
                .iter()
                .find(|(_, c)| *c >= q * total)
                .map_or("?".into(), |(le, _)| {
                    le.parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite())
                        .map_or("> 10000 µs".into(), |s| format!("≤{:.0} µs", s * 1e6))
                })
        };
        format!("p50 {}, p99 {} (n={total})", bound(0.5), bound(0.99))
    }

    /// Server-side p50/p99 of one priority class in the SLA window.
    async fn server_side(&self, priority: u8) -> String {
        let view: serde_json::Value = self
            .client
            .get(format!("{}/v2/sla", self.base))
            .json_value()
            .await;
        let class = format!("priority {priority}");
        view["classes"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["class"] == class.as_str()))
            .map_or("n/a".into(), |c| {
                format!(
                    "p50 {:.0} µs, p99 {:.0} µs (n={})",
                    c["p50_ms"].as_f64().unwrap_or(f64::NAN) * 1e3,
                    c["p99_ms"].as_f64().unwrap_or(f64::NAN) * 1e3,
                    c["requests"]
                )
            })
    }

    async fn sequential(
        &self,
        label: &str,
        seeds: &[u64],
        before_each: Option<&str>,
        priority: u8,
    ) {
        let mut times = Vec::with_capacity(seeds.len());
        for &seed in seeds {
            if let Some(tier) = before_each {
                self.clear(tier).await;
            }
            times.push(self.infer(body_with(seed, true, Some(priority))).await);
        }
        times.sort();
        let s = self.stats().await;
        println!(
            "{label:<28} client p50 {:>8.0} µs  p99 {:>8.0} µs  (n={}; totals so far: L1 hits {}, L2 hits {}, L2 errors {})",
            micros(quantile(&times, 0.5)),
            micros(quantile(&times, 0.99)),
            times.len(),
            s["l1"]["hits"],
            s["l2"]["hits"],
            s["l2"]["errors"],
        );
    }

    /// 64 clients for `seconds`; each request repeats one of 64 hot rows
    /// with probability `repeat`, else sends a row never seen before.
    async fn throughput(self: &Arc<Self>, label: &str, repeat: f64, cache: bool, seconds: u64) {
        self.clear("all").await;
        let before = self.stats().await;
        let fresh = Arc::new(AtomicU64::new(1_000_000 + (repeat * 1e6) as u64 * 10));
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let started = Instant::now();
        let clients: Vec<_> = (0..64u64)
            .map(|c| {
                let bench = Arc::clone(self);
                let fresh = Arc::clone(&fresh);
                tokio::spawn(async move {
                    let mut state = c * 7919 + 1;
                    let mut times = Vec::new();
                    // Bounded by time and by count.
                    while Instant::now() < deadline && times.len() < 100_000 {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let draw = (state >> 33) as f64 / (1u64 << 31) as f64;
                        let seed = if draw < repeat {
                            (state >> 20) % 64
                        } else {
                            fresh.fetch_add(1, Ordering::Relaxed)
                        };
                        times.push(bench.infer(body(seed, cache)).await);
                    }
                    times
                })
            })
            .collect();
        let mut times = Vec::new();
        for c in clients {
            times.extend(c.await.unwrap());
        }
        let elapsed = started.elapsed().as_secs_f64();
        times.sort();
        let after = self.stats().await;
        let delta = |a: &str, b: &str| {
            after[a][b].as_u64().unwrap_or(0) - before[a][b].as_u64().unwrap_or(0)
        };
        let looked_up = delta("l1", "hits") + delta("l1", "misses");
        let hits = delta("l1", "hits") + delta("l2", "hits");
        let coalesced =
            after["coalesced"].as_u64().unwrap_or(0) - before["coalesced"].as_u64().unwrap_or(0);
        println!(
            "{label:<28} {:>8.0} req/s  client p50 {:>7.0} µs  p99 {:>7.0} µs  rows {looked_up} hits {hits} coalesced {coalesced}",
            times.len() as f64 / elapsed,
            micros(quantile(&times, 0.5)),
            micros(quantile(&times, 0.99)),
        );
    }
}

#[tokio::main]
async fn main() {
    let requests: u64 = env_or("BENCH_REQUESTS", 200);
    let seconds: u64 = env_or("BENCH_SECONDS", 5);
    let redis_timeout = Duration::from_millis(env_or("BENCH_REDIS_TIMEOUT_MS", 5));
    let redis_url = std::env::var("REDIS_URL").ok();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let config = ServerConfig {
        cache: CacheConfig {
            capacity: Some(100_000),
            redis: redis_url.clone().map(|url| RedisConfig {
                url,
                tls: RedisTls {
                    ca_pem: std::env::var("REDIS_CA_CERT")
                        .ok()
                        .map(|path| std::fs::read(path).unwrap()),
                    client: None,
                },
                timeout: redis_timeout,
                ..RedisConfig::default()
            }),
            ..CacheConfig::default()
        },
        admin_token: Some(AdminToken::new(TOKEN)),
        model_control: tickserve_server::ModelControl::default(),
        drain_timeout: Duration::from_secs(5),
        shutdown_delay: Duration::ZERO,
        ..ServerConfig::loopback(root)
    };
    let server = BoundServer::bind(config).await.unwrap();
    let base = format!("http://{}", server.http_addr());
    let metrics = format!("http://{}/metrics", server.metrics_addr());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async move {
        let _ = stop_rx.await;
    }));
    let bench = Arc::new(Bench {
        client: reqwest::Client::new(),
        base,
        metrics,
    });
    for _ in 0..600 {
        let ready = bench
            .client
            .get(format!("{}/v2/health/ready", bench.base))
            .send()
            .await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "tickserve cache bench: model cnn_lstm, Redis {} (timeout {redis_timeout:?}), {requests} sequential requests per latency phase, {seconds} s per throughput run",
        redis_url.as_deref().unwrap_or("off")
    );
    let seeds: Vec<u64> = (0..requests).collect();
    bench.clear("all").await;
    bench.sequential("miss (engine)", &seeds, None, 3).await;
    // Let the write-behind queue reach Redis.
    tokio::time::sleep(Duration::from_millis(500)).await;
    bench.sequential("L1 hit", &seeds, None, 4).await;
    if redis_url.is_some() {
        bench
            .sequential("L2 hit (after L1 clear)", &seeds, Some("l1"), 5)
            .await;
    }
    println!("server-side (HTTP handler, SLA view):");
    println!("  miss   {}", bench.server_side(3).await);
    println!("  L1 hit {}", bench.server_side(4).await);
    if redis_url.is_some() {
        println!("  L2 hit {}", bench.server_side(5).await);
    }
    println!(
        "server-side lookup: L1 {}; L2 {}",
        bench.server_lookup("l1").await,
        bench.server_lookup("l2").await
    );
    bench
        .throughput("0% repeats, cache off", 0.0, false, seconds)
        .await;
    for repeat in [0.0, 0.5, 0.9] {
        let label = format!("{:.0}% repeats, cache on", repeat * 100.0);
        bench.throughput(&label, repeat, true, seconds).await;
    }
    let _ = stop_tx.send(());
    let _ = task.await;
}
