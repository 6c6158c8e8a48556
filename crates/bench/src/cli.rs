//! `tickserve bench <mode>`: the command-line options (clap) and the
//! drivers that turn them into runs, a [`Report`] and an exit code.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};

use crate::BenchError;
use crate::mixed::{MixedGoals, MixedPlan};
use crate::report::{CompareReport, Report, SCHEMA, StressReport, StressStep, improvement};
use crate::run::{Arrival, Limits, Measured, OpenLoop, Progress, Target, closed_loop, open_loop};
use crate::sla::{Compliance, Sla, evaluate};
use crate::stats::RunStats;
use crate::workload::{InputSource, PriorityMix, Protocol, Workload, WorkloadSpec};

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

/// The outcome of `tickserve bench`: the report (already written where
/// asked) and the process exit code (0 compliant, 3 not).
#[derive(Debug)]
pub struct Finished {
    pub report: Report,
    pub exit_code: u8,
}

fn parse_params(
    params: &[String],
) -> Result<serde_json::Map<String, serde_json::Value>, BenchError> {
    let mut map = serde_json::Map::new();
    for p in params {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| BenchError::Config(format!("--param `{p}`: expected KEY=JSON")))?;
        // A bare word that is not JSON is taken as a string.
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::from(v));
        map.insert(k.to_owned(), value);
    }
    Ok(map)
}

fn workload(
    c: &Common,
    params: serde_json::Map<String, serde_json::Value>,
) -> Result<Arc<Workload>, BenchError> {
    Ok(Arc::new(Workload::new(WorkloadSpec {
        model: c.model.clone(),
        input_name: c.input_name.clone(),
        shape: c.shape.clone().unwrap_or_else(|| DEFAULT_SHAPE.to_vec()),
        datatype: c.datatype.clone(),
        source: c
            .input_file
            .clone()
            .map_or(InputSource::Random, InputSource::File),
        seed: c.seed,
        repeat_fraction: c.repeat_fraction,
        hot_set: c.hot_set,
        priorities: c.priorities.clone(),
        parameters: params,
        protocol: c.protocol,
    })?))
}

fn target(c: &Common, url: &str, connections: usize) -> Result<Target, BenchError> {
    Target::new(
        url,
        &c.model,
        c.model_version.as_deref(),
        c.timeout,
        connections,
        (c.protocol == Protocol::Grpc).then_some(c.grpc_url.as_str()),
    )
}

/// The first input of the model's metadata (`GET /v2/models/{m}`): name,
/// datatype and shape with a batch of 1 for the variable (`-1`) axes.
async fn input_from_metadata(c: &Common) -> Result<(String, String, Vec<usize>), String> {
    let base = c.url.trim_end_matches('/');
    let url = match &c.model_version {
        Some(v) => format!("{base}/v2/models/{}/versions/{v}", c.model),
        None => format!("{base}/v2/models/{}", c.model),
    };
    let response = reqwest::Client::builder()
        .timeout(c.timeout)
        .build()
        .map_err(|e| e.to_string())?
        .get(&url)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("{url}: http {}", response.status().as_u16()));
    }
    let meta: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
    let inputs = meta["inputs"].as_array().cloned().unwrap_or_default();
    let input = inputs
        .iter()
        .find(|i| i["name"] == c.input_name.as_str())
        .or(inputs.first())
        .ok_or_else(|| format!("{url}: no inputs in the metadata"))?;
    let shape = input["shape"]
        .as_array()
        .ok_or_else(|| format!("{url}: input without a shape"))?
        .iter()
        .map(|d| match d.as_i64() {
            Some(d) if d > 0 => Ok(d as usize),
            Some(_) => Ok(1),
            None => Err(format!("{url}: shape entry {d} is not a number")),
        })
        .collect::<Result<Vec<usize>, String>>()?;
    let name = input["name"].as_str().unwrap_or(&c.input_name).to_owned();
    let datatype = input["datatype"].as_str().unwrap_or(&c.datatype).to_owned();
    Ok((name, datatype, shape))
}

/// Fills in `--shape` (and the input's name and datatype) from the
/// model's metadata when `--shape` was not given.
async fn resolve_input(mut c: Common) -> Common {
    if c.shape.is_some() {
        return c;
    }
    match input_from_metadata(&c).await {
        Ok((name, datatype, shape)) => {
            if !c.quiet {
                eprintln!("input from the model's metadata: {name} {datatype} {shape:?}");
            }
            c.input_name = name;
            c.datatype = datatype;
            c.shape = Some(shape);
        }
        Err(e) => {
            if !c.quiet {
                eprintln!("cannot read the model's metadata ({e}); input shape {DEFAULT_SHAPE:?}");
            }
            c.shape = Some(DEFAULT_SHAPE.to_vec());
        }
    }
    c
}

fn load_sla(c: &Common) -> Result<Sla, BenchError> {
    match &c.sla {
        None => Ok(Sla::default()),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                BenchError::Config(format!("cannot read SLA file {}: {e}", path.display()))
            })?;
            Sla::parse(&text).map_err(|e| {
                BenchError::Config(format!("invalid SLA file {}: {e}", path.display()))
            })
        }
    }
}

fn settings_json(mode: &Mode) -> serde_json::Value {
    serde_json::to_value(mode).unwrap_or(serde_json::Value::Null)
}

/// Runs one bench mode to completion. Must be called inside a tokio
/// runtime.
pub async fn run(args: BenchArgs) -> Result<Finished, BenchError> {
    let settings = settings_json(&args.mode);
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (mode_name, common) = match &args.mode {
        Mode::Latency { common, .. } => ("latency", common),
        Mode::Load { common, .. } => ("load", common),
        Mode::Rate { common, .. } => ("rate", common),
        Mode::Stress { common, .. } => ("stress", common),
        Mode::Compare { common, .. } => ("compare", common),
        Mode::Mixed { common, .. } => ("mixed", common),
        Mode::Streams { common, .. } => ("streams", common),
    };
    let common = resolve_input(common.clone()).await;
    // Record the input as sent, also when it came from the metadata.
    let mut settings = settings;
    if let Some(recorded) = settings
        .get_mut(mode_name)
        .and_then(|m| m.get_mut("common"))
    {
        recorded["shape"] = serde_json::json!(common.shape);
        recorded["input_name"] = serde_json::json!(common.input_name);
        recorded["datatype"] = serde_json::json!(common.datatype);
    }
    let sla = load_sla(&common)?;
    let params = parse_params(&common.params)?;
    let show = !common.quiet;
    let mut stress = None;
    let mut compare = None;
    let mut mixed = None;
    let mut streams = None;
    let (result, compliance): (RunStats, Compliance) = match args.mode {
        Mode::Latency { requests, .. } => {
            let t = target(&common, &common.url, 1)?;
            let w = workload(&common, params)?;
            let limits = Limits {
                duration: None,
                count: Some(requests),
            };
            let progress = Progress::new(show, "latency", limits);
            let m = closed_loop(&t, w, 1, limits, common.warmup, &progress).await;
            progress.finish();
            judge(m, &sla)
        }
        Mode::Load { load, .. } => {
            let t = target(&common, &common.url, load.concurrency)?;
            let w = workload(&common, params)?;
            let m = run_load(
                &t,
                w,
                load.concurrency,
                load.duration,
                load.max_requests,
                &common,
            )
            .await;
            judge(m, &sla)
        }
        Mode::Rate { rate, .. } => {
            let t = target(&common, &common.url, rate.max_in_flight)?;
            let w = workload(&common, params)?;
            let open = OpenLoop {
                rate: rate.rate,
                arrival: rate.arrival,
                max_in_flight: rate.max_in_flight,
                late_threshold: rate.late_threshold,
                seed: common.seed,
            };
            let m = run_rate(&t, w, open, rate.duration, rate.max_requests, &common).await;
            judge(m, &sla)
        }
        Mode::Stress { stress: s, .. } => {
            let report = run_stress(&common, &s, params, &sla).await?;
            let pick = report
                .steps
                .iter()
                .rev()
                .find(|st| Some(st.level) == report.last_compliant_level)
                .or(report.steps.first())
                .map(|st| (st.stats.clone(), st.compliance.clone()));
            let (stats, compliance) = pick.ok_or_else(|| {
                BenchError::Config("the stress run had no steps (check --start/--max)".into())
            })?;
            // Compliant when at least one step met the SLA.
            let compliance = Compliance {
                compliant: report.last_compliant_level.is_some(),
                ..compliance
            };
            stress = Some(report);
            (stats, compliance)
        }
        Mode::Compare { compare: c, .. } => {
            let report = run_compare(&common, &c, params).await?;
            let last = report.candidate_runs.last().cloned().unwrap_or_default();
            let compliance = evaluate(&last, &sla);
            compare = Some(report);
            (last, compliance)
        }
        Mode::Mixed { mixed: m, .. } => {
            let outcome = run_mixed(&common, &m, params).await?;
            // The SLA file's checks join the goals only when one is given.
            let sla_checks = common.sla.is_some().then(|| evaluate(&outcome.both, &sla));
            let compliance = crate::mixed::compliance(outcome.checks, sla_checks);
            mixed = Some(outcome.report);
            (outcome.both, compliance)
        }
        Mode::Streams { streams: s, .. } => {
            let outcome = run_streams(&common, &s, &params).await?;
            streams = Some(outcome.report);
            (outcome.result, outcome.compliance)
        }
    };
    let report = Report {
        schema: SCHEMA.to_owned(),
        tool: format!("tickserve {}", env!("CARGO_PKG_VERSION")),
        mode: mode_name.to_owned(),
        started_unix_s,
        target: common.url.clone(),
        settings,
        result,
        sla,
        compliance,
        stress,
        compare,
        mixed,
        streams,
    };
    write_outputs(&common, &report)?;
    let exit_code = report.compliance.exit_code();
    Ok(Finished { report, exit_code })
}

fn write_outputs(c: &Common, report: &Report) -> Result<(), BenchError> {
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text)
            .map_err(|e| BenchError::Config(format!("cannot write {}: {e}", path.display())))
    };
    if let Some(p) = &c.json {
        write(p, report.to_json())?;
    }
    if let Some(p) = &c.html {
        write(p, report.to_html())?;
    }
    match c.format {
        Format::Text => println!("{}", report.to_text()),
        Format::Json => println!("{}", report.to_json()),
        Format::None => {}
    }
    Ok(())
}

fn judge(m: Measured, sla: &Sla) -> (RunStats, Compliance) {
    let stats = m.recorder.summarise(m.elapsed, &sla.goodput_limits());
    let compliance = evaluate(&stats, sla);
    (stats, compliance)
}

async fn run_load(
    t: &Target,
    w: Arc<Workload>,
    concurrency: usize,
    duration: Duration,
    max_requests: u64,
    c: &Common,
) -> Measured {
    let limits = Limits {
        duration: Some(duration),
        count: Some(max_requests),
    };
    let progress = Progress::new(!c.quiet, &format!("load c={concurrency}"), limits);
    let m = closed_loop(t, w, concurrency, limits, c.warmup, &progress).await;
    progress.finish();
    m
}

async fn run_rate(
    t: &Target,
    w: Arc<Workload>,
    open: OpenLoop,
    duration: Duration,
    max_requests: u64,
    c: &Common,
) -> Measured {
    let limits = Limits {
        duration: Some(duration),
        count: Some(max_requests),
    };
    let progress = Progress::new(!c.quiet, &format!("rate {}/s", open.rate), limits);
    let m = open_loop(t, w, open, limits, c.warmup, &progress).await;
    progress.finish();
    m
}

async fn run_stress(
    c: &Common,
    s: &StressArgs,
    params: serde_json::Map<String, serde_json::Value>,
    sla: &Sla,
) -> Result<StressReport, BenchError> {
    if s.step <= 0.0 || s.start <= 0.0 {
        return Err(BenchError::Config(
            "--start and --step must be positive".into(),
        ));
    }
    let w = workload(c, params)?;
    let by = match s.by {
        StressBy::Concurrency => "concurrency",
        StressBy::Rate => "rate",
    };
    let connections = match s.by {
        StressBy::Concurrency => s.max as usize,
        StressBy::Rate => s.max_in_flight,
    };
    let t = target(c, &c.url, connections)?;
    let mut steps = Vec::new();
    let mut stopped_because = format!("reached --max {}", s.max);
    let mut level = s.start;
    let mut first = true;
    while level <= s.max + 1e-9 {
        // Warm up only before the first step; later steps follow a loaded
        // server anyway.
        let mut step_common = c.clone();
        if !first {
            step_common.warmup = 0;
        }
        first = false;
        let m = match s.by {
            StressBy::Concurrency => {
                run_load(
                    &t,
                    w.clone(),
                    level as usize,
                    s.step_duration,
                    u64::MAX,
                    &step_common,
                )
                .await
            }
            StressBy::Rate => {
                let open = OpenLoop {
                    rate: level,
                    arrival: s.arrival,
                    max_in_flight: s.max_in_flight,
                    late_threshold: Duration::from_millis(5),
                    seed: c.seed,
                };
                run_rate(&t, w.clone(), open, s.step_duration, u64::MAX, &step_common).await
            }
        };
        let (stats, compliance) = judge(m, sla);
        let err = stats.overall.error_rate;
        let p99 = stats.overall.latency_ms.p99;
        let stop_p99 = s.stop_p99.as_secs_f64() * 1000.0;
        if !c.quiet {
            eprintln!(
                "step {by} {level}: {:.1} req/s, p99 {p99:.1} ms, errors {:.2}%, SLA {}",
                stats.overall.throughput_rps,
                err * 100.0,
                if compliance.compliant {
                    "met"
                } else {
                    "missed"
                }
            );
        }
        steps.push(StressStep {
            level,
            stats,
            compliance,
        });
        if err > s.stop_error_rate {
            stopped_because = format!(
                "error rate {:.2}% passed {:.2}% at {by} {level}",
                err * 100.0,
                s.stop_error_rate * 100.0
            );
            break;
        }
        if p99 > stop_p99 {
            stopped_because = format!("p99 {p99:.1} ms passed {stop_p99} ms at {by} {level}");
            break;
        }
        level += s.step;
    }
    let last_compliant_level = steps
        .iter()
        .rev()
        .find(|st| st.compliance.compliant)
        .map(|st| st.level);
    Ok(StressReport {
        by: by.to_owned(),
        steps,
        stopped_because,
        last_compliant_level,
    })
}

async fn run_compare(
    c: &Common,
    a: &CompareArgs,
    baseline_params: serde_json::Map<String, serde_json::Value>,
) -> Result<CompareReport, BenchError> {
    let candidate_url = a.candidate_url.clone().unwrap_or_else(|| c.url.clone());
    let candidate_params = parse_params(&a.candidate_params)?;
    let describe = |url: &str, p: &serde_json::Map<String, serde_json::Value>| {
        if p.is_empty() {
            url.to_owned()
        } else {
            format!(
                "{url} with parameters {}",
                serde_json::Value::Object(p.clone())
            )
        }
    };
    let sides = [
        (
            describe(&c.url, &baseline_params),
            target(c, &c.url, a.concurrency)?,
            workload(c, baseline_params)?,
        ),
        (
            describe(&candidate_url, &candidate_params),
            target(c, &candidate_url, a.concurrency)?,
            workload(c, candidate_params)?,
        ),
    ];
    let limits = Sla::default().goodput_limits();
    let mut runs: [Vec<RunStats>; 2] = [Vec::new(), Vec::new()];
    for r in 0..a.repeats.max(1) {
        // Alternate the order so drift in the machine's load does not
        // favour one side.
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let (_, t, w) = &sides[side];
            let m = match a.workload {
                CompareWorkload::Latency => {
                    let limits = Limits {
                        duration: None,
                        count: Some(a.requests),
                    };
                    let p = Progress::new(!c.quiet, "compare", limits);
                    let m = closed_loop(t, w.clone(), 1, limits, c.warmup, &p).await;
                    p.finish();
                    m
                }
                CompareWorkload::Load => {
                    run_load(t, w.clone(), a.concurrency, a.duration, u64::MAX, c).await
                }
                CompareWorkload::Rate => {
                    let open = OpenLoop {
                        rate: a.rate,
                        arrival: Arrival::Constant,
                        max_in_flight: 1024,
                        late_threshold: Duration::from_millis(5),
                        seed: c.seed,
                    };
                    run_rate(t, w.clone(), open, a.duration, u64::MAX, c).await
                }
            };
            runs[side].push(m.recorder.summarise(m.elapsed, &limits));
        }
    }
    let [baseline_runs, candidate_runs] = runs;
    let pick = |runs: &[RunStats], f: fn(&RunStats) -> f64| runs.iter().map(f).collect::<Vec<_>>();
    let improvements = vec![
        improvement(
            "throughput rps",
            pick(&baseline_runs, |r| r.overall.throughput_rps),
            pick(&candidate_runs, |r| r.overall.throughput_rps),
            true,
        ),
        improvement(
            "mean ms",
            pick(&baseline_runs, |r| r.overall.latency_ms.mean),
            pick(&candidate_runs, |r| r.overall.latency_ms.mean),
            false,
        ),
        improvement(
            "p50 ms",
            pick(&baseline_runs, |r| r.overall.latency_ms.median),
            pick(&candidate_runs, |r| r.overall.latency_ms.median),
            false,
        ),
        improvement(
            "p99 ms",
            pick(&baseline_runs, |r| r.overall.latency_ms.p99),
            pick(&candidate_runs, |r| r.overall.latency_ms.p99),
            false,
        ),
    ];
    let [(baseline, _, _), (candidate, _, _)] = sides;
    Ok(CompareReport {
        baseline,
        candidate,
        repeats: a.repeats.max(1),
        workload: format!("{:?}", a.workload).to_lowercase(),
        improvements,
        baseline_runs,
        candidate_runs,
    })
}

async fn run_mixed(
    c: &Common,
    m: &MixedArgs,
    params: serde_json::Map<String, serde_json::Value>,
) -> Result<crate::mixed::MixedOutcome, BenchError> {
    if c.priorities.is_some() {
        return Err(BenchError::Config(
            "bench mixed sets each class's priority: use --fg-priority and --bg-priority, not --priorities".into(),
        ));
    }
    if m.fg_priority == m.bg_priority {
        return Err(BenchError::Config(format!(
            "--fg-priority and --bg-priority are both {}: the classes must differ",
            m.fg_priority
        )));
    }
    if m.fg_rate.is_nan() || m.fg_rate <= 0.0 {
        return Err(BenchError::Config("--fg-rate must be positive".into()));
    }
    let plan = MixedPlan {
        fg_priority: m.fg_priority,
        fg_rate: m.fg_rate,
        fg_arrival: m.fg_arrival,
        fg_max_in_flight: m.max_in_flight,
        late_threshold: m.late_threshold,
        bg_priority: m.bg_priority,
        bg_concurrency: m.bg_concurrency.max(1),
        bg_rows: m.bg_rows.unwrap_or_else(|| {
            c.shape
                .as_ref()
                .and_then(|s| s.first().copied())
                .unwrap_or(1)
        }),
        durations: m
            .phase
            .map_or([m.fg_duration, m.bg_duration, m.both_duration], |d| [d; 3]),
        targets: parse_targets(&m.target_latency)?,
        goals: MixedGoals {
            max_fg_p99_ms: m.goal_fg_p99.as_secs_f64() * 1000.0,
            max_fg_p99_ratio: m.goal_fg_p99_ratio,
            min_bg_throughput_ratio: m.goal_bg_throughput_ratio,
        },
        warmup: c.warmup,
        show_progress: !c.quiet,
    };
    let fg_spec = workload(c, params)?.spec().clone();
    let fg_target = target(c, &c.url, m.max_in_flight)?;
    let bg_target = target(c, &c.url, plan.bg_concurrency)?;
    crate::mixed::run_mixed(&fg_target, &bg_target, &fg_spec, &plan).await
}

async fn run_streams(
    c: &Common,
    s: &crate::streams::StreamsArgs,
    params: &serde_json::Map<String, serde_json::Value>,
) -> Result<crate::streams::StreamsOutcome, BenchError> {
    if c.protocol != Protocol::HttpJson {
        return Err(BenchError::Config(
            "bench streams sends HTTP JSON (the goal is about the JSON a client sends): drop --protocol".into(),
        ));
    }
    let shape = c.shape.clone().unwrap_or_else(|| DEFAULT_SHAPE.to_vec());
    let [_, rows, features] = shape[..] else {
        return Err(BenchError::Config(format!(
            "bench streams needs a model input of shape [1, T, F], not {shape:?}"
        )));
    };
    let parameters = serde_json::Value::Object(params.clone()).to_string();
    let target = crate::streams::StreamsTarget {
        infer_url: target(c, &c.url, s.concurrency)?.infer_url().to_owned(),
        input_name: c.input_name.clone(),
        rows,
        features,
        parameters: parameters[1..parameters.len() - 1].to_owned(),
        seed: c.seed,
        timeout: c.timeout,
    };
    crate::streams::run_streams(&target, s).await
}

/// `PRIORITY=DURATION` or `PRIORITY=none`, e.g. `1=2ms`.
fn parse_targets(items: &[String]) -> Result<BTreeMap<u8, Duration>, BenchError> {
    let mut targets = BTreeMap::new();
    for item in items {
        let bad = |why: &str| BenchError::Config(format!("--target-latency `{item}`: {why}"));
        let (p, d) = item
            .split_once('=')
            .ok_or_else(|| bad("expected PRIORITY=DURATION, e.g. 1=2ms"))?;
        let p: u8 = p
            .trim()
            .parse()
            .ok()
            .filter(|p| (1..=5).contains(p))
            .ok_or_else(|| bad("the priority must be 1-5"))?;
        match d.trim() {
            "none" => {
                targets.remove(&p);
            }
            d => {
                targets.insert(p, parse_duration(d).map_err(|e| bad(&e))?);
            }
        }
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn params_parse_as_json_or_strings() {
        let p = parse_params(&["cache=false".into(), "tag=abc".into(), "n=3".into()]).unwrap();
        assert_eq!(p["cache"], serde_json::Value::Bool(false));
        assert_eq!(p["tag"], "abc");
        assert_eq!(p["n"], 3);
        assert!(parse_params(&["nokey".into()]).is_err());
    }

    #[test]
    fn targets_parse_with_none_and_refuse_bad_priorities() {
        let t = parse_targets(&["1=2ms".into(), "2=5ms".into(), "2=none".into()]).unwrap();
        assert_eq!(t, BTreeMap::from([(1, Duration::from_millis(2))]));
        assert!(parse_targets(&["6=1ms".into()]).is_err());
        assert!(parse_targets(&["1=soon".into()]).is_err());
        assert!(parse_targets(&["1".into()]).is_err());
    }
}
