//! Measurements of one run: HDR latency histograms per priority class,
//! outcome counters, and their summary in SLA terms.
//!
//! Every finished request lands in a [`Recorder`] as one [`Sample`]. A
//! run's request tasks share one recorder behind a mutex (held for a few
//! hundred nanoseconds, never across an await). At the end,
//! [`Recorder::summarise`] turns the histograms into a [`RunStats`]: the
//! numbers the reports print and the SLA checks read. Latencies are kept in
//! microseconds with 3 significant digits (0.1 % error), from 1 µs to 1 h.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The latency within which a successful request counts as "good"
/// (goodput), per class. The SLA provides one
/// ([`crate::sla::Sla::goodput_limits`]); `bench mixed` builds its own
/// from the class latency targets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GoodputLimits {
    /// For classes without a limit of their own; `None`: every success
    /// is good.
    pub default_ms: Option<f64>,
    /// Keyed by class label.
    pub classes: BTreeMap<String, f64>,
}

impl GoodputLimits {
    /// The limit of `class` in ms, if any.
    pub fn for_class(&self, class: &str) -> Option<f64> {
        self.classes.get(class).copied().or(self.default_ms)
    }
}

/// The name of the class that requests without a priority fall into.
pub const DEFAULT_CLASS: &str = "default";

/// The class label of a request sent with `priority` (or none).
pub fn class_label(priority: Option<u8>) -> String {
    match priority {
        Some(p) => format!("priority {p}"),
        None => DEFAULT_CLASS.to_owned(),
    }
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx response, read to the end.
    Ok,
    /// A response with a non-2xx status.
    Status(u16),
    /// No response in time (`--timeout`).
    Timeout,
    /// Not sent: the open-loop in-flight cap was reached.
    Dropped,
    /// The connection failed or broke (reason given).
    Transport(String),
}

impl Outcome {
    /// The key of this outcome in `errors_by_reason`.
    pub fn reason(&self) -> String {
        match self {
            Outcome::Ok => "ok".to_owned(),
            Outcome::Status(code) => format!("http {code}"),
            Outcome::Timeout => "timeout".to_owned(),
            Outcome::Dropped => "in-flight cap exceeded (not sent)".to_owned(),
            Outcome::Transport(reason) => format!("transport: {reason}"),
        }
    }
}

/// One finished (or dropped) request.
#[derive(Debug, Clone)]
pub struct Sample {
    pub class: String,
    pub outcome: Outcome,
    /// Response time measured from the moment the request should have been
    /// sent (open loop: its scheduled time; closed loop: the send time).
    pub latency: Duration,
    /// Open loop only: response time from the actual send time.
    pub actual_latency: Option<Duration>,
    /// Open loop only: the send left later than scheduled by more than the
    /// late threshold.
    pub late: bool,
    /// When the request was due, from the start of the run (open loop: its
    /// intended send time; closed loop: its send time): its place on the
    /// latency-over-time chart.
    pub at: Duration,
}

/// Width of one point of the latency-over-time series.
pub const TIMELINE_STEP: Duration = Duration::from_secs(1);

/// One [`TIMELINE_STEP`] of a run.
#[derive(Debug)]
struct TimeBucket {
    /// Successful requests' latencies at 2 significant digits (1 %).
    latency: Histogram<u32>,
    requests: u64,
    errors: u64,
}

impl TimeBucket {
    fn new() -> Self {
        // 1 µs .. 1 h at 2 significant digits: fixed, valid bounds.
        let latency = match Histogram::new_with_bounds(1, 3_600_000_000, 2) {
            Ok(h) => h,
            Err(_) => unreachable!("constant histogram bounds are valid"),
        };
        Self {
            latency,
            requests: 0,
            errors: 0,
        }
    }
}

/// Latency over time: one point per [`TIMELINE_STEP`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// Start of the step, seconds from the start of the run.
    pub t_s: f64,
    pub requests: u64,
    pub errors: u64,
    /// Of the successful requests due in the step; `None` when none
    /// succeeded.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug)]
struct ClassRecorder {
    latency: Histogram<u64>,
    actual: Histogram<u64>,
    requests: u64,
    ok: u64,
    late: u64,
    errors: BTreeMap<String, u64>,
    timeline: Vec<TimeBucket>,
}

impl ClassRecorder {
    fn new() -> Self {
        Self {
            latency: new_histogram(),
            actual: new_histogram(),
            requests: 0,
            ok: 0,
            late: 0,
            errors: BTreeMap::new(),
            timeline: Vec::new(),
        }
    }

    fn bucket(&mut self, i: usize) -> &mut TimeBucket {
        if self.timeline.len() <= i {
            self.timeline.resize_with(i + 1, TimeBucket::new);
        }
        &mut self.timeline[i]
    }

    fn record(&mut self, sample: &Sample) {
        let step = (sample.at.as_nanos() / TIMELINE_STEP.as_nanos()) as usize;
        let bucket = self.bucket(step);
        bucket.requests += 1;
        if sample.outcome == Outcome::Ok {
            bucket.latency.saturating_record(micros(sample.latency));
        } else {
            bucket.errors += 1;
        }
        self.requests += 1;
        if sample.late {
            self.late += 1;
        }
        if sample.outcome == Outcome::Ok {
            self.ok += 1;
            self.latency.saturating_record(micros(sample.latency));
            if let Some(actual) = sample.actual_latency {
                self.actual.saturating_record(micros(actual));
            }
        } else {
            *self.errors.entry(sample.outcome.reason()).or_default() += 1;
        }
    }

    /// Adds `other`'s counts; its latency over time too when `timeline`
    /// (the live progress line needs no timeline).
    fn merge(&mut self, other: &ClassRecorder, timeline: bool) {
        if timeline {
            for (i, b) in other.timeline.iter().enumerate() {
                let mine = self.bucket(i);
                let _ = mine.latency.add(&b.latency);
                mine.requests += b.requests;
                mine.errors += b.errors;
            }
        }
        // Both histograms share the same bounds, so `add` cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.actual.add(&other.actual);
        self.requests += other.requests;
        self.ok += other.ok;
        self.late += other.late;
        for (reason, n) in &other.errors {
            *self.errors.entry(reason.clone()).or_default() += n;
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 h at 3 significant digits: fixed, valid bounds.
    match Histogram::new_with_bounds(1, 3_600_000_000, 3) {
        Ok(h) => h,
        Err(_) => unreachable!("constant histogram bounds are valid"),
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// Collects the samples of one run (or one stress step).
#[derive(Debug)]
pub struct Recorder {
    classes: BTreeMap<String, ClassRecorder>,
    open_loop: bool,
}

impl Recorder {
    /// `open_loop`: the run schedules its sends, so `actual_latency` and
    /// late sends are reported.
    pub fn new(open_loop: bool) -> Self {
        Self {
            classes: BTreeMap::new(),
            open_loop,
        }
    }

    pub fn record(&mut self, sample: &Sample) {
        self.classes
            .entry(sample.class.clone())
            .or_insert_with(ClassRecorder::new)
            .record(sample);
    }

    /// Adds `other`'s samples to this recorder's.
    pub fn merge(&mut self, other: &Recorder) {
        for (name, c) in &other.classes {
            self.classes
                .entry(name.clone())
                .or_insert_with(ClassRecorder::new)
                .merge(c, true);
        }
    }

    /// Requests recorded so far and the p99 of the successful ones (ms),
    /// for the live progress line.
    pub fn live(&self) -> (u64, u64, f64) {
        let mut all = ClassRecorder::new();
        for c in self.classes.values() {
            all.merge(c, false);
        }
        let p99 = if all.ok > 0 {
            all.latency.value_at_quantile(0.99) as f64 / 1000.0
        } else {
            0.0
        };
        (all.requests, all.requests - all.ok, p99)
    }

    /// The statistics of the run, over `elapsed` wall time. Goodput counts
    /// the successful requests at or under their class's limit.
    pub fn summarise(&self, elapsed: Duration, limits: &GoodputLimits) -> RunStats {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let mut all = ClassRecorder::new();
        for c in self.classes.values() {
            all.merge(c, true);
        }
        let mut classes = BTreeMap::new();
        let mut good_total = 0u64;
        for (name, c) in &self.classes {
            let limit = limits.for_class(name);
            let summary = class_stats(c, secs, limit, self.open_loop);
            good_total += summary.good;
            classes.insert(name.clone(), summary);
        }
        let mut overall = class_stats(&all, secs, limits.default_ms, self.open_loop);
        // The overall goodput honours each class's own limit.
        overall.good = good_total;
        overall.goodput_rps = good_total as f64 / secs;
        RunStats {
            duration_s: secs,
            overall,
            classes,
        }
    }
}

fn class_stats(c: &ClassRecorder, secs: f64, max_ms: Option<f64>, open_loop: bool) -> ClassStats {
    let errors = c.requests - c.ok;
    let good = match max_ms {
        _ if c.ok == 0 => 0,
        None => c.ok,
        Some(max_ms) => c.latency.count_between(0, (max_ms * 1000.0) as u64),
    };
    ClassStats {
        requests: c.requests,
        ok: c.ok,
        errors,
        error_rate: if c.requests == 0 {
            0.0
        } else {
            errors as f64 / c.requests as f64
        },
        errors_by_reason: c.errors.clone(),
        throughput_rps: c.ok as f64 / secs,
        good,
        goodput_rps: good as f64 / secs,
        latency_ms: LatencySummary::of(&c.latency),
        actual_latency_ms: open_loop.then(|| LatencySummary::of(&c.actual)),
        late_sends: open_loop.then_some(c.late),
        cdf: cdf_points(&c.latency),
        timeline: timeline_points(&c.timeline),
    }
}

fn timeline_points(buckets: &[TimeBucket]) -> Vec<TimelinePoint> {
    let ms = |us: u64| us as f64 / 1000.0;
    buckets
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let q = |quantile: f64| {
                (!b.latency.is_empty()).then(|| ms(b.latency.value_at_quantile(quantile)))
            };
            TimelinePoint {
                t_s: i as f64 * TIMELINE_STEP.as_secs_f64(),
                requests: b.requests,
                errors: b.errors,
                p50_ms: q(0.5),
                p99_ms: q(0.99),
            }
        })
        .collect()
}

/// Latency statistics in milliseconds. All zero when nothing succeeded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean: f64,
    pub median: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub min: f64,
    pub max: f64,
    pub std: f64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        // HDR quantiles are the highest value of their bucket: within
        // 0.1 % of the exact value, and never below it.
        let q = |quantile: f64| ms(h.value_at_quantile(quantile));
        Self {
            count: h.len(),
            mean: h.mean() / 1000.0,
            median: q(0.5),
            p90: q(0.90),
            p95: q(0.95),
            p99: q(0.99),
            p999: q(0.999),
            min: ms(h.min()),
            max: ms(h.max()),
            std: h.stdev() / 1000.0,
        }
    }
}

/// Statistics of one class (or of all requests).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClassStats {
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub errors_by_reason: BTreeMap<String, u64>,
    /// Successful requests per second.
    pub throughput_rps: f64,
    /// Successful requests within the class's max-latency SLA.
    pub good: u64,
    pub goodput_rps: f64,
    /// From the intended send time (coordinated-omission corrected in
    /// open-loop runs; the actual send time in closed-loop runs).
    pub latency_ms: LatencySummary,
    /// Open loop only: from the actual send time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_latency_ms: Option<LatencySummary>,
    /// Open loop only: sends that left later than scheduled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub late_sends: Option<u64>,
    /// (percentile, latency ms) points for CDF plots.
    pub cdf: Vec<(f64, f64)>,
    /// Latency over time, one point per second.
    #[serde(default)]
    pub timeline: Vec<TimelinePoint>,
}

/// Statistics of a whole run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunStats {
    pub duration_s: f64,
    pub overall: ClassStats,
    pub classes: BTreeMap<String, ClassStats>,
}

/// Percentiles at which the CDF plot samples the histogram: dense in the
/// tail, where SLAs live.
const CDF_PERCENTILES: [f64; 16] = [
    0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 97.5, 99.0, 99.5, 99.9, 99.95, 99.99, 99.999, 99.9999,
    100.0,
];

fn cdf_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    CDF_PERCENTILES
        .iter()
        .map(|&p| (p, h.value_at_percentile(p) as f64 / 1000.0))
        .collect()
}

/// Mean and the half-width of its two-sided 95 % confidence interval
/// (Student's t) over repeated measurements. A single value has no
/// interval (half-width infinite).
pub fn mean_ci95(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (0.0, f64::INFINITY);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, f64::INFINITY);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, t95(n - 1) * (var / n as f64).sqrt())
}

/// Two-sided 95 % quantile of Student's t with `df` degrees of freedom.
fn t95(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => TABLE[df - 1],
        _ => 1.96,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The seed SLA's goodput limit: 200 ms for every class.
    fn seed_limits() -> GoodputLimits {
        GoodputLimits {
            default_ms: Some(200.0),
            classes: BTreeMap::new(),
        }
    }

    /// Equal within the histogram's 3 significant digits.
    pub(crate) fn approx(got: f64, want: f64) -> bool {
        (got - want).abs() <= want.abs() * 1e-3 + 1e-9
    }

    fn ok(class: &str, ms: u64) -> Sample {
        Sample {
            class: class.to_owned(),
            outcome: Outcome::Ok,
            latency: Duration::from_millis(ms),
            actual_latency: None,
            late: false,
            at: Duration::from_millis(ms * 10),
        }
    }

    #[test]
    fn percentiles_of_1_to_100_ms_match_the_hand_computed_values() {
        let mut r = Recorder::new(false);
        for ms in 1..=100 {
            r.record(&ok(DEFAULT_CLASS, ms));
        }
        let s = r.summarise(Duration::from_secs(10), &seed_limits());
        let l = &s.overall.latency_ms;
        assert_eq!(l.count, 100);
        assert!(approx(l.min, 1.0), "min {}", l.min);
        assert!(approx(l.max, 100.0), "max {}", l.max);
        // Nearest-rank percentiles: the p-th of 100 sorted values.
        assert!(approx(l.median, 50.0), "median {}", l.median);
        assert!(approx(l.p90, 90.0), "p90 {}", l.p90);
        assert!(approx(l.p95, 95.0), "p95 {}", l.p95);
        assert!(approx(l.p99, 99.0), "p99 {}", l.p99);
        assert!(approx(l.p999, 100.0), "p999 {}", l.p999);
        assert!((l.mean - 50.5).abs() < 0.05, "{}", l.mean);
        // Population standard deviation of 1..=100: sqrt((100²-1)/12).
        assert!((l.std - 28.866).abs() < 0.05, "{}", l.std);
        assert_eq!(s.overall.throughput_rps, 10.0);
        // Default SLA max is 200 ms: all 100 are good.
        assert_eq!(s.overall.good, 100);
    }

    #[test]
    fn errors_are_counted_by_reason_and_per_class() {
        let mut r = Recorder::new(false);
        r.record(&ok("priority 1", 10));
        r.record(&ok("priority 1", 300));
        r.record(&Sample {
            outcome: Outcome::Status(503),
            ..ok("priority 5", 0)
        });
        r.record(&Sample {
            outcome: Outcome::Timeout,
            ..ok("priority 5", 0)
        });
        r.record(&ok("priority 5", 20));
        let s = r.summarise(Duration::from_secs(1), &seed_limits());
        assert_eq!(s.overall.requests, 5);
        assert_eq!(s.overall.ok, 3);
        assert_eq!(s.overall.errors, 2);
        assert_eq!(s.overall.error_rate, 0.4);
        assert_eq!(s.overall.errors_by_reason["http 503"], 1);
        assert_eq!(s.overall.errors_by_reason["timeout"], 1);
        let p1 = &s.classes["priority 1"];
        assert_eq!((p1.requests, p1.ok, p1.errors), (2, 2, 0));
        // 300 ms is over the 200 ms max: not good.
        assert_eq!(p1.good, 1);
        let p5 = &s.classes["priority 5"];
        assert_eq!((p5.requests, p5.ok, p5.errors), (3, 1, 2));
        assert_eq!(s.overall.good, 2);
        assert_eq!(s.overall.goodput_rps, 2.0);
    }

    /// The good requests of `samples` (one second's worth) under `limits`:
    /// in each of the two `classes`, then overall.
    fn good(samples: &[Sample], limits: &GoodputLimits, classes: [&str; 2]) -> (u64, u64, u64) {
        let mut r = Recorder::new(false);
        for sample in samples {
            r.record(sample);
        }
        let s = r.summarise(Duration::from_secs(1), limits);
        let [a, b] = classes.map(|c| s.classes[c].good);
        (a, b, s.overall.good)
    }

    #[test]
    fn goodput_uses_each_class_override() {
        let limits = GoodputLimits {
            classes: BTreeMap::from([("priority 1".to_owned(), 5.0)]),
            ..seed_limits()
        };
        let samples = [ok("priority 1", 10), ok("priority 3", 10)];
        assert_eq!(
            good(&samples, &limits, ["priority 1", "priority 3"]),
            (0, 1, 1)
        );
    }

    #[test]
    fn classes_without_a_limit_count_every_success_as_good() {
        let limits = GoodputLimits {
            default_ms: None,
            classes: BTreeMap::from([("priority 1".to_owned(), 2.0)]),
        };
        let samples = [
            ok("priority 1", 1),
            ok("priority 1", 10),
            ok("priority 5", 1000),
        ];
        assert_eq!(
            good(&samples, &limits, ["priority 1", "priority 5"]),
            (1, 1, 2)
        );
    }

    #[test]
    fn latency_over_time_has_a_point_per_second() {
        let mut r = Recorder::new(false);
        // ok(…, ms) is due at 10 × ms: 1..=100 ms spread over 0..1 s.
        for ms in 1..=100 {
            r.record(&ok("priority 1", ms));
        }
        r.record(&Sample {
            outcome: Outcome::Timeout,
            at: Duration::from_millis(2500),
            ..ok("priority 5", 0)
        });
        let s = r.summarise(Duration::from_secs(3), &seed_limits());
        let t = &s.overall.timeline;
        assert_eq!(t.len(), 3);
        assert_eq!((t[0].t_s, t[0].requests, t[0].errors), (0.0, 99, 0));
        // 1..=99 ms in the first second (100 ms is due at 1.0 s).
        assert!(approx(t[0].p50_ms.unwrap(), 50.0) || (t[0].p50_ms.unwrap() - 50.0).abs() < 0.6);
        assert_eq!(
            (t[1].requests, t[1].p99_ms.map(|v| v.round())),
            (1, Some(100.0))
        );
        assert_eq!((t[2].requests, t[2].errors, t[2].p50_ms), (1, 1, None));
        assert_eq!(s.classes["priority 5"].timeline.len(), 3);
        assert_eq!(s.classes["priority 5"].timeline[0].requests, 0);
    }

    #[test]
    fn confidence_interval_matches_a_hand_computed_case() {
        // mean 2, sample sd 1, n 3: half-width t(2) * 1/sqrt(3).
        let (mean, half) = mean_ci95(&[1.0, 2.0, 3.0]);
        assert_eq!(mean, 2.0);
        assert!((half - 4.303 / 3f64.sqrt()).abs() < 1e-9);
        assert!(mean_ci95(&[5.0]).1.is_infinite());
    }
}
