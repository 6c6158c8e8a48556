//! The options of `tickserve bench` and each mode (clap derive; also
//! recorded in the report's settings through serde). `cli` re-exports them.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

use crate::run::Arrival;
use crate::workload::{PriorityMix, Protocol};

/// The input shape when neither `--shape` nor the model's metadata gives
/// one: the bundled model's window of 50 steps × 60 features.
pub const DEFAULT_SHAPE: [usize; 3] = [1, 50, 60];

/// `tickserve bench`: measure an Open Inference Protocol server (tickserve,
/// Triton, KServe) and judge it against an SLA.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub mode: Mode,
}

#[derive(Debug, Subcommand, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// N sequential requests from one client.
    Latency {
        #[command(flatten)]
        common: Common,
        /// Number of requests.
        #[arg(long, short = 'n', default_value_t = 1000)]
        requests: u64,
    },
    /// C concurrent clients in closed loop for D seconds.
    Load {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Open loop at R requests/s; latency from the intended send time
    /// (coordinated-omission corrected) and from the actual send time.
    Rate {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        rate: RateArgs,
    },
    /// Step the concurrency (or the rate) until the error rate or p99 passes
    /// its limit; report the last step within SLA.
    Stress {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        stress: StressArgs,
    },
    /// The same workload against a baseline and a candidate, repeated;
    /// the improvement in throughput and latency with a 95 % CI.
    Compare {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        compare: CompareArgs,
    },
    /// A foreground class at a fixed rate (open loop) and a background
    /// flood (closed loop), alone and together: the foreground's latency
    /// under the flood and the background's throughput beside the
    /// foreground.
    Mixed {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        mixed: MixedArgs,
    },
    /// Many instruments, one tick each per request: the whole window every
    /// time, then only the new row on a stream the server keeps
    /// (`sequence_id`); bytes per request, requests/s and latency of both
    /// (HTTP JSON).
    Streams {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        streams: crate::streams::StreamsArgs,
    },
}

/// Options every mode takes.
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct Common {
    /// Base URL of the server's HTTP endpoint.
    #[arg(
        long,
        env = "TICKSERVE_BENCH_URL",
        default_value = "http://127.0.0.1:8000"
    )]
    pub url: String,
    /// Model name.
    #[arg(long, short = 'm', default_value = "cnn_lstm")]
    pub model: String,
    /// Model version (the server's default when not given).
    #[arg(long)]
    pub model_version: Option<String>,
    /// Input tensor name.
    #[arg(long, default_value = "input")]
    pub input_name: String,
    /// Wire format: JSON over HTTP, Triton's binary tensors over HTTP, or
    /// gRPC (at `--grpc-url`).
    #[arg(long, value_enum, default_value_t = Protocol::HttpJson)]
    pub protocol: Protocol,
    /// The server's gRPC endpoint, for `--protocol grpc`.
    #[arg(
        long,
        env = "TICKSERVE_BENCH_GRPC_URL",
        default_value = "http://127.0.0.1:8001"
    )]
    pub grpc_url: String,
    /// Input shape including the batch dimension, comma separated
    /// (default: from the model's metadata at `--url`, with a batch of 1;
    /// `1,50,60` when the metadata cannot be read).
    #[arg(long, value_delimiter = ',')]
    pub shape: Option<Vec<usize>>,
    /// Input datatype.
    #[arg(long, default_value = "FP32")]
    pub datatype: String,
    /// Read input rows from a .npy (float32/float64) or JSON file
    /// (nested or flat arrays) instead of random data.
    #[arg(long, value_name = "FILE")]
    pub input_file: Option<PathBuf>,
    /// Seed of the random inputs, priority draws and Poisson arrivals.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Share (0..1) of requests that repeat one of a few hot inputs (the
    /// cache workload); the rest are all distinct.
    #[arg(long, default_value_t = 0.0)]
    pub repeat_fraction: f64,
    /// Number of distinct hot inputs the repeated requests use.
    #[arg(long, default_value_t = 16)]
    pub hot_set: usize,
    /// Priority mix PRIORITY:WEIGHT,…, e.g. `1:10,3:60,5:30`; sent as
    /// the request parameter `priority`; statistics per class.
    #[arg(long, value_name = "MIX")]
    pub priorities: Option<PriorityMix>,
    /// Extra request parameter KEY=JSON (repeatable), e.g.
    /// `--param cache=false`.
    #[arg(long = "param", value_name = "KEY=JSON")]
    pub params: Vec<String>,
    /// Requests sent (and not measured) before the run.
    #[arg(long, default_value_t = 10)]
    pub warmup: u64,
    /// Per-request timeout (counted as an error "timeout").
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// SLA file (TOML); the seed's defaults when not given.
    #[arg(long, value_name = "FILE")]
    pub sla: Option<PathBuf>,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the HTML report here.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Format of the report printed on stdout.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Text,
    Json,
    None,
}

/// Closed-loop load options.
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct LoadArgs {
    /// Concurrent clients.
    #[arg(long, short = 'c', default_value_t = 100)]
    pub concurrency: usize,
    /// Run time.
    #[arg(long, short = 'd', default_value = "60s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Stop after this many requests even before the duration.
    #[arg(long, default_value_t = 10_000_000)]
    pub max_requests: u64,
}

/// Open-loop options.
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct RateArgs {
    /// Requests per second.
    #[arg(long, short = 'r', default_value_t = 100.0)]
    pub rate: f64,
    /// Arrival process.
    #[arg(long, value_enum, default_value_t = Arrival::Constant)]
    pub arrival: Arrival,
    /// Run time.
    #[arg(long, short = 'd', default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Stop after this many requests even before the duration.
    #[arg(long, default_value_t = 10_000_000)]
    pub max_requests: u64,
    /// Most requests in flight; a send beyond it is not made and counts as
    /// an error.
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
    /// A send later than its schedule by more than this counts as late
    /// (a parked client thread takes up to a few hundred microseconds to
    /// wake, so keep this above 1 ms).
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub late_threshold: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StressBy {
    Concurrency,
    Rate,
}

/// Stress options.
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct StressArgs {
    /// Step the client concurrency (closed loop) or the rate (open loop).
    #[arg(long, value_enum, default_value_t = StressBy::Concurrency)]
    pub by: StressBy,
    /// First level (clients or requests/s).
    #[arg(long, default_value_t = 50.0)]
    pub start: f64,
    /// Increase per step.
    #[arg(long, default_value_t = 50.0)]
    pub step: f64,
    /// Last level.
    #[arg(long, default_value_t = 500.0)]
    pub max: f64,
    /// Time per step.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub step_duration: Duration,
    /// Stop when a step's error rate passes this fraction.
    #[arg(long, default_value_t = 0.10)]
    pub stop_error_rate: f64,
    /// Stop when a step's p99 passes this.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub stop_p99: Duration,
    /// Arrival process when stepping the rate.
    #[arg(long, value_enum, default_value_t = Arrival::Constant)]
    pub arrival: Arrival,
    /// Most requests in flight when stepping the rate.
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompareWorkload {
    Latency,
    Load,
    Rate,
}

/// Compare options. The baseline is `--url` with `--param`s; the
/// candidate is `--candidate-url` (default: the same URL) with
/// `--candidate-param`s.
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct CompareArgs {
    /// Candidate server's base URL (default: `--url`).
    #[arg(long)]
    pub candidate_url: Option<String>,
    /// Candidate's request parameter KEY=JSON (repeatable), replacing
    /// the baseline's `--param`s.
    #[arg(long = "candidate-param", value_name = "KEY=JSON")]
    pub candidate_params: Vec<String>,
    /// Workload run on both.
    #[arg(long, value_enum, default_value_t = CompareWorkload::Load)]
    pub workload: CompareWorkload,
    /// Repeats (each runs baseline and candidate, order alternating).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Clients for the load workload; requests for latency.
    #[arg(long, short = 'c', default_value_t = 32)]
    pub concurrency: usize,
    /// Rate of the rate workload.
    #[arg(long, short = 'r', default_value_t = 100.0)]
    pub rate: f64,
    /// Time per run.
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Requests per run of the latency workload.
    #[arg(long, short = 'n', default_value_t = 200)]
    pub requests: u64,
}

/// `bench mixed` options.
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct MixedArgs {
    /// Foreground priority (1-5).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub fg_priority: u8,
    /// Where the foreground is sent over HTTP (default: `--url`): e.g. the
    /// server's real-time listener (`tickserve serve --realtime-http-addr`).
    #[arg(long, value_name = "URL")]
    pub fg_url: Option<String>,
    /// Where the foreground is sent with `--protocol grpc` (default:
    /// `--grpc-url`).
    #[arg(long, value_name = "URL")]
    pub fg_grpc_url: Option<String>,
    /// Foreground requests per second (open loop).
    #[arg(long, short = 'r', default_value_t = 100.0)]
    pub fg_rate: f64,
    /// Foreground arrival process.
    #[arg(long, value_enum, default_value_t = Arrival::Constant)]
    pub fg_arrival: Arrival,
    /// Background priority (1-5), not the foreground's.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub bg_priority: u8,
    /// Background clients (closed loop).
    #[arg(long, short = 'c', visible_alias = "bg-clients", default_value_t = 256)]
    pub bg_concurrency: usize,
    /// Rows per background request (default: the first dimension of
    /// `--shape`).
    #[arg(long)]
    pub bg_rows: Option<usize>,
    /// Duration of every phase (replaces the three below).
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub phase: Option<Duration>,
    /// Duration of phase 1, the foreground alone.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub fg_duration: Duration,
    /// Duration of phase 2, the background alone.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub bg_duration: Duration,
    /// Duration of phase 3, both together.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub both_duration: Duration,
    /// Latency target of a class, PRIORITY=DURATION (repeatable; `none`
    /// for no target): goodput counts the successes within it. Giving
    /// any replaces the defaults.
    #[arg(long = "target-latency", value_name = "PRIORITY=DURATION", default_values = ["1=2ms", "2=5ms"])]
    pub target_latency: Vec<String>,
    /// Goal: foreground p99 under the flood at most this.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub goal_fg_p99: Duration,
    /// Goal: foreground p99 under the flood at most this multiple of its
    /// p99 alone.
    #[arg(long, visible_alias = "max-p99-ratio", default_value_t = 3.0)]
    pub goal_fg_p99_ratio: f64,
    /// Goal: background throughput with the foreground at least this share
    /// of its throughput alone.
    #[arg(long, visible_alias = "min-bg-share", default_value_t = 0.9)]
    pub goal_bg_throughput_ratio: f64,
    /// Most foreground requests in flight; a send beyond it is not made
    /// and counts as an error.
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
    /// A foreground send later than its schedule by more than this counts
    /// as late.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    #[serde(with = "humantime_serde")]
    pub late_threshold: Duration,
}

pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(text).map_err(|e| e.to_string())
}
