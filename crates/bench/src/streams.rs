//! `tickserve bench streams`: many instruments, one tick each per request,
//! sent two ways in one run: the whole window every time (the client
//! keeps the windows), then only the new rows on a stream the server
//! keeps (`sequence_id`; docs/streams.md). Reports bytes per request,
//! requests/s and latency of both side by side, and checks the ratios
//! against goals.
//!
//! ```text
//!  instruments 0..N, each a rolling window of T rows (rendered once as
//!  JSON text per row, so a whole-window body is a concatenation)
//!  phase "full":    C clients, client c ticks instruments c, c+C, …
//!                   in turn and sends the whole window
//!  start streams:   every instrument's window once with
//!                   sequence_start=true (not measured)
//!  phase "streams": the same clients and instruments, each request one
//!                   new row with sequence_id (and the x-sequence-id
//!                   header, for a load balancer routing by it)
//! ```
//!
//! A client owns its instruments, so one stream's ticks are sent one at a
//! time and in order, as a feed handler would. HTTP JSON only: the goal is
//! about the JSON a client sends.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::BenchError;
use crate::run::{closed_loop_sample, record, take};
use crate::sla::{Check, Compliance};
use crate::stats::{ClassStats, DEFAULT_CLASS, GoodputLimits, Outcome, Recorder, RunStats};

/// The header that carries the stream's id for load balancers (nginx
/// `hash $http_x_sequence_id`; deploy/local).
pub const SEQUENCE_HEADER: &str = "x-sequence-id";

/// Options of `bench streams`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct StreamsArgs {
    /// Instruments (streams).
    #[arg(long, default_value_t = 1000)]
    pub instruments: usize,
    /// Concurrent clients; each owns every C-th instrument.
    #[arg(long, short = 'c', default_value_t = 32)]
    pub concurrency: usize,
    /// Run time of each of the two workloads.
    #[arg(long, short = 'd', default_value = "10s", value_parser = humantime_serde::re::humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Goal: whole-window request bytes ÷ stream request bytes at least
    /// this.
    #[arg(long, default_value_t = 40.0)]
    pub goal_bytes_ratio: f64,
    /// Goal: stream requests/s ÷ whole-window requests/s at least this.
    #[arg(long, default_value_t = 1.3)]
    pub goal_rps_ratio: f64,
    /// Send stream requests without the x-sequence-id header, as a client
    /// that does not know about it would: behind a load balancer that
    /// routes on the header, ticks then reach replicas that do not hold
    /// their stream (deploy/local's routing check uses it as its control).
    #[arg(long)]
    pub no_routing_header: bool,
}

/// One workload's result.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamsWorkload {
    /// Mean request body bytes (JSON; headers not counted).
    pub bytes_per_request: f64,
    pub stats: ClassStats,
}

/// The `streams` section of the report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamsReport {
    pub instruments: usize,
    pub window_rows: usize,
    pub features: usize,
    pub concurrency: usize,
    pub full: StreamsWorkload,
    pub streams: StreamsWorkload,
    /// Requests that started the streams (not measured) and their errors.
    pub starts: u64,
    pub start_errors: u64,
    /// full bytes ÷ stream bytes.
    pub bytes_ratio: f64,
    /// stream requests/s ÷ full requests/s.
    pub rps_ratio: f64,
}

/// What `bench streams` hands back to the CLI.
#[derive(Debug)]
pub struct StreamsOutcome {
    pub report: StreamsReport,
    /// The streams workload, as the report's main result.
    pub result: RunStats,
    pub compliance: Compliance,
}

/// Where and what to send.
#[derive(Debug, Clone)]
pub struct StreamsTarget {
    pub infer_url: String,
    pub input_name: String,
    /// The model's window: T rows of F values.
    pub rows: usize,
    pub features: usize,
    /// Extra request parameters, as JSON text without braces ("" when
    /// none).
    pub parameters: String,
    pub seed: u64,
    pub timeout: Duration,
}

/// One instrument: its window as JSON-rendered rows, oldest first.
#[derive(Debug)]
struct Instrument {
    id: u64,
    rows: std::collections::VecDeque<String>,
    rng: StdRng,
}

impl Instrument {
    fn new(id: u64, rows: usize, features: usize, seed: u64) -> Self {
        let mut instrument = Instrument {
            id,
            rows: std::collections::VecDeque::with_capacity(rows + 1),
            rng: StdRng::seed_from_u64(seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        };
        for _ in 0..rows {
            let row = instrument.next_row(features);
            instrument.rows.push_back(row);
        }
        instrument
    }

    /// A new tick, rendered as a JSON array.
    fn next_row(&mut self, features: usize) -> String {
        let mut text = String::with_capacity(features * 11 + 2);
        text.push('[');
        for f in 0..features {
            if f > 0 {
                text.push(',');
            }
            let v: f32 = self.rng.random_range(-1.0..1.0);
            text.push_str(&v.to_string());
        }
        text.push(']');
        text
    }

    /// Appends a tick to the window (dropping the oldest row) and returns
    /// it.
    fn tick(&mut self, features: usize) -> String {
        let row = self.next_row(features);
        self.rows.pop_front();
        self.rows.push_back(row.clone());
        row
    }
}

/// What one request sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Send {
    Full,
    Start,
    Tick,
}

fn body(target: &StreamsTarget, instrument: &Instrument, send: Send, tick: &str) -> String {
    let (rows, data, sequence) = match send {
        Send::Full => (target.rows, join_rows(instrument), String::new()),
        Send::Start => (
            target.rows,
            join_rows(instrument),
            format!("\"sequence_id\":{},\"sequence_start\":true", instrument.id),
        ),
        Send::Tick => (
            1,
            tick.to_owned(),
            format!("\"sequence_id\":{}", instrument.id),
        ),
    };
    let separator = if sequence.is_empty() || target.parameters.is_empty() {
        ""
    } else {
        ","
    };
    format!(
        "{{\"parameters\":{{{sequence}{separator}{}}},\"inputs\":[{{\"name\":{},\"shape\":[1,{rows},{}],\"datatype\":\"FP32\",\"data\":[{data}]}}]}}",
        target.parameters,
        serde_json::Value::from(target.input_name.as_str()),
        target.features,
    )
}

fn join_rows(instrument: &Instrument) -> String {
    let mut data = String::with_capacity(
        instrument.rows.iter().map(String::len).sum::<usize>() + instrument.rows.len(),
    );
    for (i, row) in instrument.rows.iter().enumerate() {
        if i > 0 {
            data.push(',');
        }
        data.push_str(row);
    }
    data
}

/// Runs both workloads.
pub async fn run_streams(
    target: &StreamsTarget,
    args: &StreamsArgs,
) -> Result<StreamsOutcome, BenchError> {
    if args.instruments == 0 || args.concurrency == 0 {
        return Err(BenchError::Config(
            "--instruments and --concurrency must be at least 1".into(),
        ));
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .tcp_nodelay(true)
        .timeout(target.timeout)
        .build()
        .map_err(|e| BenchError::Config(format!("cannot build the HTTP client: {e}")))?;
    let clients = args.concurrency.min(args.instruments);
    // Client c owns instruments c, c + C, …
    let owned: Vec<Arc<Mutex<Vec<Instrument>>>> = (0..clients)
        .map(|c| {
            let mine = (c..args.instruments)
                .step_by(clients)
                .map(|i| Instrument::new(i as u64 + 1, target.rows, target.features, target.seed))
                .collect();
            Arc::new(Mutex::new(mine))
        })
        .collect();
    let header = !args.no_routing_header;
    let full = phase(
        &http,
        target,
        &owned,
        Send::Full,
        Some(args.duration),
        header,
    )
    .await;
    let starts = phase(&http, target, &owned, Send::Start, None, header).await;
    let streams = phase(
        &http,
        target,
        &owned,
        Send::Tick,
        Some(args.duration),
        header,
    )
    .await;

    let limits = GoodputLimits::default();
    let full_stats = full.recorder.summarise(full.elapsed, &limits);
    let stream_stats = streams.recorder.summarise(streams.elapsed, &limits);
    let start_stats = starts.recorder.summarise(starts.elapsed, &limits);
    let workload = |m: &PhaseResult, stats: &RunStats| StreamsWorkload {
        bytes_per_request: m.bytes as f64 / (stats.overall.requests.max(1)) as f64,
        stats: stats.overall.clone(),
    };
    let full_w = workload(&full, &full_stats);
    let stream_w = workload(&streams, &stream_stats);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let report = StreamsReport {
        instruments: args.instruments,
        window_rows: target.rows,
        features: target.features,
        concurrency: clients,
        bytes_ratio: ratio(full_w.bytes_per_request, stream_w.bytes_per_request),
        rps_ratio: ratio(stream_w.stats.throughput_rps, full_w.stats.throughput_rps),
        full: full_w,
        streams: stream_w,
        starts: start_stats.overall.requests,
        start_errors: start_stats.overall.errors,
    };
    let check = |metric: &str, measured: f64, threshold: f64| Check {
        scope: "streams".into(),
        metric: metric.into(),
        measured,
        threshold,
        op: ">=".into(),
        passed: measured >= threshold,
        recommendation: None,
    };
    let error_free = |metric: &str, errors: u64| Check {
        scope: "streams".into(),
        metric: metric.into(),
        measured: errors as f64,
        threshold: 0.0,
        op: "<=".into(),
        passed: errors == 0,
        recommendation: None,
    };
    let compliance = Compliance::from_checks(vec![
        check("bytes_ratio", report.bytes_ratio, args.goal_bytes_ratio),
        check("throughput_ratio", report.rps_ratio, args.goal_rps_ratio),
        error_free("full_errors", report.full.stats.errors),
        error_free("start_errors", report.start_errors),
        error_free("stream_errors", report.streams.stats.errors),
    ]);
    Ok(StreamsOutcome {
        report,
        result: stream_stats,
        compliance,
    })
}

struct PhaseResult {
    recorder: Recorder,
    elapsed: Duration,
    bytes: u64,
}

/// Every client sends `send` requests for its instruments in turn until
/// `duration` passes, or (no duration) once per instrument; stream requests
/// carry the x-sequence-id header when `routing_header`.
async fn phase(
    http: &reqwest::Client,
    target: &StreamsTarget,
    owned: &[Arc<Mutex<Vec<Instrument>>>],
    send: Send,
    duration: Option<Duration>,
    routing_header: bool,
) -> PhaseResult {
    let recorder = Arc::new(Mutex::new(Recorder::new(false)));
    let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let deadline = duration.map(|d| started + d);
    let mut tasks = JoinSet::new();
    for instruments in owned {
        let (http, target, instruments, recorder, bytes) = (
            http.clone(),
            target.clone(),
            Arc::clone(instruments),
            Arc::clone(&recorder),
            Arc::clone(&bytes),
        );
        tasks.spawn(async move {
            let count = instruments
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len();
            for n in 0usize.. {
                if deadline.map_or(n >= count, |d| Instant::now() >= d) {
                    break;
                }
                let (text, id) = {
                    let mut guard = instruments.lock().unwrap_or_else(PoisonError::into_inner);
                    let instrument = &mut guard[n % count];
                    let tick = match send {
                        Send::Start => String::new(),
                        Send::Full | Send::Tick => instrument.tick(target.features),
                    };
                    (body(&target, instrument, send, &tick), instrument.id)
                };
                bytes.fetch_add(text.len() as u64, std::sync::atomic::Ordering::Relaxed);
                let mut post = http
                    .post(&target.infer_url)
                    .header("content-type", "application/json");
                if send != Send::Full && routing_header {
                    post = post.header(SEQUENCE_HEADER, id);
                }
                let sent = Instant::now();
                let outcome = match post.body(text).send().await {
                    Ok(response) => {
                        let status = response.status();
                        match response.bytes().await {
                            Ok(_) if status.is_success() => Outcome::Ok,
                            Ok(_) => Outcome::Status(status.as_u16()),
                            Err(e) => Outcome::Transport(e.to_string()),
                        }
                    }
                    Err(e) if e.is_timeout() => Outcome::Timeout,
                    Err(e) => Outcome::Transport(e.to_string()),
                };
                let sample = closed_loop_sample(DEFAULT_CLASS.to_owned(), outcome, started, sent);
                record(&recorder, &sample);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    PhaseResult {
        recorder: take(recorder, false),
        elapsed,
        bytes: bytes.load(std::sync::atomic::Ordering::Relaxed),
    }
}

/// The text report's table.
pub fn text(o: &mut String, r: &StreamsReport) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "streams: {} instruments, window {} x {}, {} clients, HTTP JSON, one tick per request",
        r.instruments, r.window_rows, r.features, r.concurrency
    );
    let _ = writeln!(
        o,
        "  {:<14} {:>12} {:>12} {:>9} {:>9} {:>8}",
        "workload", "bytes/req", "requests/s", "p50 ms", "p99 ms", "errors"
    );
    for (name, w) in [("whole window", &r.full), ("stream tick", &r.streams)] {
        let _ = writeln!(
            o,
            "  {:<14} {:>12.0} {:>12.1} {:>9.2} {:>9.2} {:>8}",
            name,
            w.bytes_per_request,
            w.stats.throughput_rps,
            w.stats.latency_ms.median,
            w.stats.latency_ms.p99,
            w.stats.errors
        );
    }
    let _ = writeln!(
        o,
        "  bytes {:.1}x smaller, requests/s {:.2}x; {} streams started ({} errors)",
        r.bytes_ratio, r.rps_ratio, r.starts, r.start_errors
    );
    for (name, w) in [("whole window", &r.full), ("stream tick", &r.streams)] {
        if !w.stats.errors_by_reason.is_empty() {
            let _ = writeln!(o, "  {name} errors: {:?}", w.stats.errors_by_reason);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn target() -> StreamsTarget {
        StreamsTarget {
            infer_url: String::new(),
            input_name: "input".into(),
            rows: 4,
            features: 3,
            parameters: "\"cache\":false".into(),
            seed: 1,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn bodies_carry_the_window_or_the_tick_with_the_sequence_parameters() {
        let t = target();
        let mut instrument = Instrument::new(7, t.rows, t.features, t.seed);
        let tick = instrument.tick(t.features);
        let full: serde_json::Value =
            serde_json::from_str(&body(&t, &instrument, Send::Full, &tick)).unwrap();
        assert_eq!(full["inputs"][0]["shape"], serde_json::json!([1, 4, 3]));
        assert_eq!(full["inputs"][0]["data"].as_array().unwrap().len(), 4);
        assert_eq!(full["parameters"], serde_json::json!({"cache": false}));
        let start: serde_json::Value =
            serde_json::from_str(&body(&t, &instrument, Send::Start, "")).unwrap();
        assert_eq!(start["inputs"][0]["data"], full["inputs"][0]["data"]);
        assert_eq!(start["parameters"]["sequence_start"], true);
        assert_eq!(start["parameters"]["sequence_id"], 7);
        let next = instrument.tick(t.features);
        let one: serde_json::Value =
            serde_json::from_str(&body(&t, &instrument, Send::Tick, &next)).unwrap();
        assert_eq!(one["inputs"][0]["shape"], serde_json::json!([1, 1, 3]));
        // The tick is the window's newest row.
        assert_eq!(
            one["inputs"][0]["data"][0],
            serde_json::from_str::<serde_json::Value>(instrument.rows.back().unwrap()).unwrap()
        );
        assert_eq!(
            one["parameters"],
            serde_json::json!({"sequence_id": 7, "cache": false})
        );
    }
}
