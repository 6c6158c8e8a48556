//! The load loops: closed loop (C clients, each sending its next request
//! when the previous one is answered) and open loop (sends on a schedule,
//! never waiting for answers), with the HTTP client they share.
//!
//! Open-loop latency follows perf_analyzer (serving-systems.md §2.7) but
//! corrects instead of only warning: each request's latency is measured
//! from its *intended* send time, so a stalled server that delays the
//! sender is charged for the whole delay (no coordinated omission); the
//! latency from the actual send time and the number of late sends are
//! reported beside it. In-flight requests are capped: a send that would
//! pass the cap is not made and counts as an error ("dropped").
//!
//! Every loop stops at its deadline or its request count, whichever comes
//! first, and waits at most one request timeout for stragglers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use crate::stats::{Outcome, Recorder, Sample, class_label};
use crate::workload::{Payload, Request, Workload};

/// An OIP endpoint: base URL and model, and the protocol to speak.
#[derive(Debug, Clone)]
pub struct Target {
    http: reqwest::Client,
    infer_url: String,
    grpc: Option<GrpcTarget>,
    timeout: Duration,
}

/// The gRPC side of a target: HTTP/2 channels, used in turn (requests
/// multiplex on each; one per [`STREAMS_PER_CHANNEL`] clients, as servers
/// commonly allow a few hundred concurrent streams per connection), and
/// the model version to ask for.
#[derive(Debug, Clone)]
struct GrpcTarget {
    clients: Arc<[GrpcInferenceServiceClient<tonic::transport::Channel>]>,
    next: Arc<AtomicU64>,
    version: String,
}

/// Concurrent requests per gRPC channel.
const STREAMS_PER_CHANNEL: usize = 100;

impl Target {
    /// `base_url` like `http://127.0.0.1:8000`; `version` optional.
    /// `grpc_url` (like `http://127.0.0.1:8001`): send with gRPC there
    /// instead of HTTP; the channel connects on first use.
    pub fn new(
        base_url: &str,
        model: &str,
        version: Option<&str>,
        timeout: Duration,
        max_connections: usize,
        grpc_url: Option<&str>,
    ) -> Result<Self, crate::BenchError> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(max_connections)
            .tcp_nodelay(true)
            .timeout(timeout)
            .build()
            .map_err(|e| crate::BenchError::Config(format!("cannot build the HTTP client: {e}")))?;
        let base = base_url.trim_end_matches('/');
        let infer_url = match version {
            Some(v) => format!("{base}/v2/models/{model}/versions/{v}/infer"),
            None => format!("{base}/v2/models/{model}/infer"),
        };
        let grpc = match grpc_url {
            None => None,
            Some(url) => {
                let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
                    .map_err(|e| crate::BenchError::Config(format!("--grpc-url {url}: {e}")))?
                    .tcp_nodelay(true)
                    .timeout(timeout);
                let channels = max_connections.div_ceil(STREAMS_PER_CHANNEL).max(1);
                let clients = (0..channels)
                    .map(|_| {
                        GrpcInferenceServiceClient::new(endpoint.connect_lazy())
                            .max_decoding_message_size(usize::MAX)
                            .max_encoding_message_size(usize::MAX)
                    })
                    .collect();
                Some(GrpcTarget {
                    clients,
                    next: Arc::new(AtomicU64::new(0)),
                    version: version.unwrap_or_default().to_owned(),
                })
            }
        };
        Ok(Self {
            http,
            infer_url,
            grpc,
            timeout,
        })
    }

    pub fn infer_url(&self) -> &str {
        &self.infer_url
    }

    /// Sends one request and reads the whole response.
    pub async fn send(&self, request: Request) -> Outcome {
        let (body, header_len) = match request.payload {
            Payload::Json(body) => (body, None),
            Payload::Binary { body, header_len } => (body, Some(header_len)),
            Payload::Grpc(r) => return self.send_grpc(*r).await,
        };
        let mut post = self.http.post(&self.infer_url);
        post = match header_len {
            None => post.header("content-type", "application/json"),
            Some(n) => post
                .header("content-type", "application/octet-stream")
                .header("inference-header-content-length", n),
        };
        match post.body(body).send().await {
            Ok(response) => {
                let status = response.status();
                match response.bytes().await {
                    Ok(_) if status.is_success() => Outcome::Ok,
                    Ok(_) => Outcome::Status(status.as_u16()),
                    Err(e) => transport(&e),
                }
            }
            Err(e) => transport(&e),
        }
    }

    async fn send_grpc(&self, mut request: crate::proto::ModelInferRequest) -> Outcome {
        let Some(grpc) = &self.grpc else {
            return Outcome::Transport("gRPC request without --grpc-url".into());
        };
        request.model_version.clone_from(&grpc.version);
        let turn = grpc.next.fetch_add(1, Ordering::Relaxed) as usize;
        let mut client = grpc.clients[turn % grpc.clients.len()].clone();
        match tokio::time::timeout(self.timeout, client.model_infer(request)).await {
            Err(_) => Outcome::Timeout,
            Ok(Ok(_)) => Outcome::Ok,
            Ok(Err(status)) => grpc_outcome(&status),
        }
    }
}

/// A gRPC failure as the HTTP status the server maps the same error to
/// (docs/protocols.md), so both protocols count 429s and 503s alike.
fn grpc_outcome(status: &tonic::Status) -> Outcome {
    use tonic::Code;
    match status.code() {
        Code::InvalidArgument => Outcome::Status(400),
        Code::Unauthenticated => Outcome::Status(401),
        Code::NotFound => Outcome::Status(404),
        Code::ResourceExhausted => Outcome::Status(429),
        Code::Internal => Outcome::Status(500),
        Code::Unavailable if status.message().contains("tcp connect") => {
            Outcome::Transport("connect".into())
        }
        Code::Unavailable => Outcome::Status(503),
        Code::DeadlineExceeded | Code::Cancelled => Outcome::Timeout,
        code => Outcome::Transport(format!("grpc {code:?}")),
    }
}

fn transport(e: &reqwest::Error) -> Outcome {
    if e.is_timeout() {
        Outcome::Timeout
    } else if e.is_connect() {
        Outcome::Transport("connect".into())
    } else if e.is_body() || e.is_decode() {
        Outcome::Transport("response body".into())
    } else {
        Outcome::Transport("request".into())
    }
}

/// When a run stops: whichever comes first. At least one must be set.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub duration: Option<Duration>,
    pub count: Option<u64>,
}

/// Arrival process of an open-loop run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrival {
    /// Evenly spaced: one request every 1/R s.
    Constant,
    /// Exponential gaps with mean 1/R s (a Poisson process).
    Poisson,
}

/// Intended send offsets from the start of an open-loop run.
#[derive(Debug)]
pub struct Schedule {
    arrival: Arrival,
    gap: f64,
    next: f64,
    rng: StdRng,
}

impl Schedule {
    pub fn new(arrival: Arrival, rate: f64, seed: u64) -> Self {
        Self {
            arrival,
            gap: 1.0 / rate.max(1e-9),
            next: 0.0,
            rng: StdRng::seed_from_u64(seed),
        }
    }
}

impl Iterator for Schedule {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let at = self.next;
        let step = match self.arrival {
            Arrival::Constant => self.gap,
            Arrival::Poisson => {
                // Inverse transform: -ln(U)/λ with U in (0, 1].
                let u: f64 = 1.0 - self.rng.random::<f64>();
                -u.ln() * self.gap
            }
        };
        self.next += step;
        Some(Duration::from_secs_f64(at))
    }
}

/// The sample of an open-loop request: latency from the intended time
/// (coordinated-omission corrected) and from the actual send time.
pub fn open_loop_sample(
    class: String,
    outcome: Outcome,
    started: Instant,
    intended: Instant,
    sent: Instant,
    done: Instant,
    late_threshold: Duration,
) -> Sample {
    Sample {
        class,
        outcome,
        latency: done.saturating_duration_since(intended),
        actual_latency: Some(done.saturating_duration_since(sent)),
        late: sent.saturating_duration_since(intended) > late_threshold,
        at: intended.saturating_duration_since(started),
    }
}

/// The sample of a closed-loop request sent at `sent` and answered now.
pub fn closed_loop_sample(
    class: String,
    outcome: Outcome,
    started: Instant,
    sent: Instant,
) -> Sample {
    Sample {
        class,
        outcome,
        latency: sent.elapsed(),
        actual_latency: None,
        late: false,
        at: sent.saturating_duration_since(started),
    }
}

/// Records `sample` in the recorder the senders share (a poisoned lock
/// still holds valid samples).
pub fn record(recorder: &Mutex<Recorder>, sample: &Sample) {
    recorder
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .record(sample);
}

/// Live progress: a bar with the rate and p99 so far.
#[derive(Debug, Clone)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar drawn on stderr when it is a terminal and `show` is set.
    pub fn new(show: bool, label: &str, limits: Limits) -> Self {
        let bar = match limits.count {
            Some(n) if limits.duration.is_none() => ProgressBar::new(n),
            _ => ProgressBar::new(limits.duration.map_or(0, |d| d.as_millis() as u64)),
        };
        if !show {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        if let Ok(style) =
            ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {msg}")
        {
            bar.set_style(style);
        }
        bar.set_prefix(label.to_owned());
        Self { bar }
    }

    fn update(&self, recorder: &Mutex<Recorder>, started: Instant, limits: Limits) {
        let (n, errors, p99) = recorder
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .live();
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        match limits.count {
            Some(_) if limits.duration.is_none() => self.bar.set_position(n),
            _ => self.bar.set_position(started.elapsed().as_millis() as u64),
        }
        self.bar.set_message(format!(
            "{n} req, {:.0} req/s, p99 {p99:.1} ms, {errors} errors",
            n as f64 / secs
        ));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// A run's raw outcome: its samples and its wall time.
#[derive(Debug)]
pub struct Measured {
    pub recorder: Recorder,
    pub elapsed: Duration,
}

async fn warm_up(target: &Target, workload: &Workload, n: u64) {
    for i in 0..n {
        let _ = target.send(workload.request(u64::MAX - i)).await;
    }
}

/// C clients in closed loop.
pub async fn closed_loop(
    target: &Target,
    workload: Arc<Workload>,
    concurrency: usize,
    limits: Limits,
    warmup: u64,
    progress: &Progress,
) -> Measured {
    warm_up(target, &workload, warmup).await;
    let recorder = Arc::new(Mutex::new(Recorder::new(false)));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = limits.duration.map(|d| started + d);
    let count = limits.count.unwrap_or(u64::MAX);
    let mut clients = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (target, workload, recorder, next) = (
            target.clone(),
            workload.clone(),
            recorder.clone(),
            next.clone(),
        );
        clients.spawn(async move {
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= count {
                    break;
                }
                let request = workload.request(seq);
                let class = class_label(request.priority);
                let sent = Instant::now();
                let outcome = target.send(request).await;
                let sample = closed_loop_sample(class, outcome, started, sent);
                record(&recorder, &sample);
            }
        });
    }
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            joined = clients.join_next() => if joined.is_none() { break },
            _ = tick.tick() => progress.update(&recorder, started, limits),
        }
    }
    measured(recorder, started, limits, progress, false)
}

/// The run's measurements, once every sender has finished: the last
/// progress update, the samples and the time the run took.
fn measured(
    recorder: Arc<Mutex<Recorder>>,
    started: Instant,
    limits: Limits,
    progress: &Progress,
    open_loop: bool,
) -> Measured {
    let elapsed = started.elapsed();
    progress.update(&recorder, started, limits);
    Measured {
        recorder: take(recorder, open_loop),
        elapsed,
    }
}

/// The recorder back from the senders, once every one has finished.
pub fn take(recorder: Arc<Mutex<Recorder>>, open_loop: bool) -> Recorder {
    match Arc::try_unwrap(recorder) {
        Ok(m) => m.into_inner().unwrap_or_else(PoisonError::into_inner),
        // Every task has finished, so this cannot happen; keep the data
        // anyway by swapping it out.
        Err(shared) => std::mem::replace(
            &mut *shared.lock().unwrap_or_else(PoisonError::into_inner),
            Recorder::new(open_loop),
        ),
    }
}

/// Settings of an open-loop run.
#[derive(Debug, Clone, Copy)]
pub struct OpenLoop {
    pub rate: f64,
    pub arrival: Arrival,
    pub max_in_flight: usize,
    pub late_threshold: Duration,
    pub seed: u64,
}

/// Sends on the schedule of `open`, each request in its own task.
///
/// An OS thread keeps the schedule and only sleeps and spawns; the
/// requests run on the runtime. tokio's timer has 1 ms granularity, and
/// with it every request left up to a millisecond late, all of it charged
/// to the intended-time latency: at 100 requests/s against the bundled
/// model, p50 2.80–2.87 ms from the intended time against 1.31–1.33 ms
/// from the actual send; with the thread, 1.51–1.63 against 1.27–1.36
/// (docs/bench.md).
pub async fn open_loop(
    target: &Target,
    workload: Arc<Workload>,
    open: OpenLoop,
    limits: Limits,
    warmup: u64,
    progress: &Progress,
) -> Measured {
    warm_up(target, &workload, warmup).await;
    let recorder = Arc::new(Mutex::new(Recorder::new(true)));
    let cap = u32::try_from(open.max_in_flight.max(1)).unwrap_or(u32::MAX);
    let in_flight = Arc::new(Semaphore::new(cap as usize));
    let started = Instant::now();
    let mut pacer = tokio::task::spawn_blocking({
        let pacer = Pacer {
            runtime: tokio::runtime::Handle::current(),
            target: target.clone(),
            workload,
            open,
            limits,
            started,
            recorder: recorder.clone(),
            in_flight: in_flight.clone(),
        };
        move || pacer.run()
    });
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = &mut pacer => break,
            _ = tick.tick() => progress.update(&recorder, started, limits),
        }
    }
    // Stragglers: each request holds a permit until its answer is
    // recorded, and each has its own timeout, so this ends.
    loop {
        tokio::select! {
            _ = in_flight.acquire_many(cap) => break,
            _ = tick.tick() => progress.update(&recorder, started, limits),
        }
    }
    measured(recorder, started, limits, progress, true)
}

/// The thread that keeps an open loop's schedule (see [`open_loop`]).
struct Pacer {
    runtime: tokio::runtime::Handle,
    target: Target,
    workload: Arc<Workload>,
    open: OpenLoop,
    limits: Limits,
    started: Instant,
    recorder: Arc<Mutex<Recorder>>,
    in_flight: Arc<Semaphore>,
}

impl Pacer {
    fn run(self) {
        let count = self.limits.count.unwrap_or(u64::MAX);
        let schedule = Schedule::new(self.open.arrival, self.open.rate, self.open.seed);
        let late_threshold = self.open.late_threshold;
        for (seq, offset) in (0..count).zip(schedule) {
            if self.limits.duration.is_some_and(|d| offset >= d) {
                break;
            }
            let intended = self.started + offset;
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            let request = self.workload.request(seq);
            let class = class_label(request.priority);
            let recorder = self.recorder.clone();
            let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                let now = Instant::now();
                let sample = open_loop_sample(
                    class,
                    Outcome::Dropped,
                    self.started,
                    intended,
                    now,
                    now,
                    late_threshold,
                );
                record(&recorder, &sample);
                continue;
            };
            let target = self.target.clone();
            let started = self.started;
            self.runtime.spawn(async move {
                let sent = Instant::now();
                let outcome = target.send(request).await;
                let sample = open_loop_sample(
                    class,
                    outcome,
                    started,
                    intended,
                    sent,
                    Instant::now(),
                    late_threshold,
                );
                record(&recorder, &sample);
                // Released only once recorded: the caller waits for every
                // permit before it reads the recorder.
                drop(permit);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::sla::Sla;

    fn approx(got: f64, want: f64) -> bool {
        (got - want).abs() <= want.abs() * 1e-3 + 1e-9
    }

    #[test]
    fn constant_schedule_is_evenly_spaced() {
        let offsets: Vec<Duration> = Schedule::new(Arrival::Constant, 4.0, 0).take(3).collect();
        assert_eq!(
            offsets,
            vec![
                Duration::ZERO,
                Duration::from_millis(250),
                Duration::from_millis(500)
            ]
        );
    }

    #[test]
    fn poisson_schedule_has_the_requested_mean_rate() {
        let last = Schedule::new(Arrival::Poisson, 1000.0, 42)
            .nth(100_000)
            .unwrap();
        // 100 000 gaps of mean 1 ms: 100 s within 1 %.
        let secs = last.as_secs_f64();
        assert!((99.0..101.0).contains(&secs), "{secs}");
    }

    /// A synthetic run at 10 requests/s (one every 100 ms) for 2 s against
    /// a server that answers in 10 ms except request 5, which stalls for
    /// 1 s. The sender has one connection, so the stall holds back the
    /// sends of requests 6..=16: a closed-loop measurement sees one slow
    /// request; measured from the intended times, the requests queued
    /// behind the stall are charged for their wait.
    #[test]
    fn coordinated_omission_is_corrected_on_a_stalled_server() {
        let base = Instant::now();
        let ms = |n: u64| base + Duration::from_millis(n);
        let mut recorder = Recorder::new(true);
        let mut free_at = 0u64;
        for i in 0..20u64 {
            let intended = i * 100;
            let sent = intended.max(free_at);
            let service = if i == 5 { 1000 } else { 10 };
            let done = sent + service;
            free_at = done;
            recorder.record(&open_loop_sample(
                "default".into(),
                Outcome::Ok,
                base,
                ms(intended),
                ms(sent),
                ms(done),
                Duration::from_millis(1),
            ));
        }
        let s = recorder.summarise(Duration::from_secs(2), &Sla::default().goodput_limits());
        let corrected = &s.overall.latency_ms;
        let actual = s.overall.actual_latency_ms.as_ref().unwrap();
        // Request 5 is sent at 500 and done at 1500; request i in 6..=15
        // waits for it: sent at 1500 + 10 (i - 6), done 10 ms later, so
        // 1450 - 90 i ms after its intended time. Sorted: 10 ×9, 100, 190,
        // 280, 370, 460, 550, 640, 730, 820, 910, 1000.
        assert!(
            approx(corrected.median, 100.0),
            "median {}",
            corrected.median
        );
        assert!(approx(corrected.p90, 820.0), "p90 {}", corrected.p90);
        assert!(approx(corrected.p95, 910.0), "p95 {}", corrected.p95);
        assert!(approx(corrected.max, 1000.0), "max {}", corrected.max);
        assert!(approx(corrected.min, 10.0), "min {}", corrected.min);
        // From the actual sends: 19 × 10 ms and one 1000 ms.
        assert!(approx(actual.median, 10.0), "median {}", actual.median);
        assert!(approx(actual.p95, 10.0), "p95 {}", actual.p95);
        assert!(approx(actual.max, 1000.0), "max {}", actual.max);
        // Requests 6..=15 left late.
        assert_eq!(s.overall.late_sends, Some(10));
        // Within the 200 ms max SLA: the nine 10 ms ones, 100 and 190.
        assert_eq!(s.overall.good, 11);
    }
}
