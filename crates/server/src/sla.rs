//! The server's own SLA view: `GET /v2/sla` (JSON) and `GET /dashboard`
//! (a self-contained page that polls it).
//!
//! The inference path (crate::infer) reports every finished request, HTTP
//! or gRPC, to the [`SlaMonitor`] (model, priority class, latency,
//! success). The monitor keeps the requests of the last window (60 s, at most
//! [`MAX_SAMPLES`] of them) in a bounded ring; a query sorts each class's
//! latencies and checks them against the seed's SLA (seed-requirements.md,
//! "Benchmarks and SLA reports": p50 ≤ 50 ms, p95 ≤ 80, p99 ≤ 100,
//! max ≤ 200, ≥ 50 requests/s, errors ≤ 1 %; healthy ≥ 90 % of checks,
//! warning ≥ 70 %, else critical) — the same numbers `tickserve bench`
//! applies to its own measurements (crates/bench/src/sla.rs). The cache
//! hit rate comes from the result cache's own counters, queue lengths from
//! the schedulers' statistics, CPU, memory and GPU from the resource monitor
//! (the cgroup's limits where set, else the host's figures).
//!
//! Each request is recorded under its priority class (the request's own,
//! or the model's `default_priority`); `class: None` ("default") is for
//! requests that failed before a class could be read.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use serde::Serialize;

use tickserve_telemetry::sla::{
    ALERTS, Alerts, Check, Compliance, Health, LatencyFigures, Thresholds,
};

use crate::AppState;

/// Most requests kept in the window; older ones are dropped first.
pub const MAX_SAMPLES: usize = 200_000;
/// Length of the rolling window.
pub const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Entry {
    at: Instant,
    model: String,
    class: Option<u8>,
    latency_us: u64,
    ok: bool,
}

/// Rolling-window record of finished requests; cheap to record into.
#[derive(Debug)]
pub struct SlaMonitor {
    started: Instant,
    entries: Mutex<VecDeque<Entry>>,
}

impl Default for SlaMonitor {
    fn default() -> Self {
        Self::new()
    }
}

impl SlaMonitor {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            entries: Mutex::new(VecDeque::with_capacity(1024)),
        }
    }

    /// Records one finished request. `class` is its priority (1–5) when
    /// the request had one.
    pub fn record(&self, model: &str, class: Option<u8>, latency: Duration, ok: bool) {
        self.record_at(Instant::now(), model, class, latency, ok);
    }

    fn record_at(&self, at: Instant, model: &str, class: Option<u8>, latency: Duration, ok: bool) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= MAX_SAMPLES {
            entries.pop_front();
        }
        entries.push_back(Entry {
            at,
            model: model.to_owned(),
            class,
            latency_us: latency.as_micros() as u64,
            ok,
        });
    }

    /// The window's statistics and verdict as of `now`.
    pub fn view(&self, now: Instant) -> SlaView {
        let since = now.checked_sub(WINDOW).unwrap_or(self.started);
        // Seconds the window covers: shorter right after start.
        let span = now
            .saturating_duration_since(since.max(self.started))
            .as_secs_f64()
            .max(1.0);
        let mut groups: BTreeMap<(String, String), Vec<(u64, bool)>> = BTreeMap::new();
        {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            while entries.front().is_some_and(|e| e.at < since) {
                entries.pop_front();
            }
            for e in entries.iter() {
                let class = e
                    .class
                    .map_or_else(|| "default".to_owned(), |p| format!("priority {p}"));
                groups
                    .entry((e.model.clone(), class))
                    .or_default()
                    .push((e.latency_us, e.ok));
            }
        }
        let t = Thresholds::SEED;
        let mut classes = Vec::new();
        let mut checks = Vec::new();
        let mut all: Vec<(u64, bool)> = Vec::new();
        for ((model, class), samples) in groups {
            let stats = WindowStats::of(&samples, span);
            let scope = format!("{model} {class}");
            checks.extend(Check::latency_and_errors(&scope, &stats.figures(), &t));
            all.extend(samples);
            classes.push(ClassView {
                model,
                class,
                stats,
            });
        }
        let overall = WindowStats::of(&all, span);
        if overall.requests > 0 {
            checks.push(Check::new(
                "overall",
                "throughput",
                overall.rps,
                t.min_throughput_rps,
                false,
            ));
        }
        let verdict = Compliance::from_checks(checks);
        // The resource monitor's latest sample: the cgroup's figures
        // against its limits where set, else the host's.
        let resources = tickserve_scheduler::monitor::ResourceMonitor::global();
        SlaView {
            window_s: span,
            health: verdict.health,
            compliant: verdict.compliant,
            passed: verdict.passed,
            total: verdict.total,
            pass_ratio: verdict.pass_ratio,
            thresholds: t,
            alerts: ALERTS,
            overall,
            classes,
            checks: verdict.checks,
            recommendations: verdict.recommendations,
            queue_length: None,
            cache_hit_rate: None,
            cpu_percent: resources.cpu(),
            memory_percent: resources.memory(),
            memory_used_bytes: resources.memory_used_bytes(),
            // The busiest GPU (NVML), sampled by the resource monitor;
            // `null` without NVML.
            gpu_percent: resources.gpu(),
        }
    }
}

/// Statistics of the window for one class (or all).
#[derive(Debug, Clone, Default, Serialize)]
pub struct WindowStats {
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl WindowStats {
    fn figures(&self) -> LatencyFigures {
        LatencyFigures {
            requests: self.requests,
            ok: self.ok,
            error_rate: self.error_rate,
            p50_ms: self.p50_ms,
            p95_ms: self.p95_ms,
            p99_ms: self.p99_ms,
            max_ms: self.max_ms,
        }
    }

    fn of(samples: &[(u64, bool)], span_s: f64) -> Self {
        let mut ok: Vec<u64> = samples.iter().filter(|s| s.1).map(|s| s.0).collect();
        ok.sort_unstable();
        let requests = samples.len() as u64;
        let errors = requests - ok.len() as u64;
        // Nearest rank: the smallest value with at least q of the samples
        // at or below it.
        let q = |q: f64| -> f64 {
            if ok.is_empty() {
                return 0.0;
            }
            let rank = ((q * ok.len() as f64).ceil() as usize).clamp(1, ok.len());
            ok[rank - 1] as f64 / 1000.0
        };
        Self {
            requests,
            ok: ok.len() as u64,
            errors,
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            rps: ok.len() as f64 / span_s,
            p50_ms: q(0.5),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
            max_ms: ok.last().map_or(0.0, |&v| v as f64 / 1000.0),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassView {
    pub model: String,
    pub class: String,
    #[serde(flatten)]
    pub stats: WindowStats,
}

/// The body of `GET /v2/sla`.
#[derive(Debug, Clone, Serialize)]
pub struct SlaView {
    pub window_s: f64,
    pub health: Health,
    pub compliant: bool,
    pub passed: usize,
    pub total: usize,
    pub pass_ratio: f64,
    pub thresholds: Thresholds,
    pub alerts: Alerts,
    pub overall: WindowStats,
    pub classes: Vec<ClassView>,
    pub checks: Vec<Check>,
    pub recommendations: Vec<String>,
    /// Requests waiting in the batch queues, per model.
    pub queue_length: Option<BTreeMap<String, f64>>,
    /// Result-cache hits (any tier) / rows looked up since start; `None`
    /// without a cache or before its first lookup.
    pub cache_hit_rate: Option<f64>,
    /// CPU use, percent of the cgroup's quota where one is set, else of
    /// the machine; `null` in the first second.
    pub cpu_percent: Option<f64>,
    /// Memory in use, percent of the cgroup's limit where set, else of the
    /// machine.
    pub memory_percent: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    /// The busiest GPU's utilisation (NVML); `null` without one.
    pub gpu_percent: Option<f64>,
}

/// Requests waiting per model (all versions and classes), from each
/// scheduler's statistics.
fn queue_lengths(state: &AppState) -> BTreeMap<String, f64> {
    let Ok(registry) = state.registry() else {
        return BTreeMap::new();
    };
    registry
        .models()
        .into_iter()
        .map(|model| {
            let waiting: usize = model
                .versions
                .values()
                .flat_map(|version| version.scheduler().stats().classes)
                .map(|class| class.queue_length)
                .sum();
            (model.name.clone(), waiting as f64)
        })
        .collect()
}

/// Rows answered by either tier over rows looked up, from the cache's own
/// counters; `None` without a cache or before its first lookup.
fn cache_hit_rate(stats: &tickserve_cache::CacheStats) -> Option<f64> {
    (stats.l1.hits + stats.l1.misses > 0).then_some(stats.hit_rate)
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/v2/sla", get(sla))
        .route("/dashboard", get(dashboard))
        .with_state(state)
}

async fn sla(State(state): State<AppState>) -> Json<SlaView> {
    let monitor = state.sla.clone();
    let queues = queue_lengths(&state);
    let cache = state.cache.as_ref().map(|layer| layer.cache.stats());
    // Sorting the window and reading /proc is blocking work.
    let view = tokio::task::spawn_blocking(move || {
        let mut view = monitor.view(Instant::now());
        view.queue_length = Some(queues);
        view.cache_hit_rate = cache.as_ref().and_then(cache_hit_rate);
        view
    })
    .await;
    match view {
        Ok(v) => Json(v),
        // Only a panic in the closure gets here; answer with an empty view.
        Err(_) => Json(SlaMonitor::new().view(Instant::now())),
    }
}

async fn dashboard() -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Html(include_str!("dashboard.html")),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn window_statistics_match_hand_computed_values() {
        let m = SlaMonitor::new();
        let t0 = Instant::now();
        for ms in 1..=100u64 {
            m.record_at(t0, "cnn_lstm", None, Duration::from_millis(ms), true);
        }
        m.record_at(t0, "cnn_lstm", None, Duration::from_millis(5), false);
        let v = m.view(t0 + Duration::from_secs(10));
        assert_eq!(v.classes.len(), 1);
        let c = &v.classes[0];
        assert_eq!(
            (c.class.as_str(), c.stats.requests, c.stats.errors),
            ("default", 101, 1)
        );
        assert_eq!(c.stats.p50_ms, 50.0);
        assert_eq!(c.stats.p95_ms, 95.0);
        assert_eq!(c.stats.p99_ms, 99.0);
        assert_eq!(c.stats.max_ms, 100.0);
        assert!((c.stats.rps - 10.0).abs() < 0.01, "{}", c.stats.rps);
        // p50 50 ≤ 50 passes, p95 95 > 80 fails, p99 99 ≤ 100 passes,
        // max 100 ≤ 200, errors 1/101 = 0.99 % ≤ 1 %, throughput 10 < 50
        // fails: 4 of 6 = 67 % < 70 %.
        assert_eq!((v.passed, v.total), (4, 6));
        assert_eq!(v.health.as_str(), "critical");
        assert_eq!(v.recommendations.len(), 2);
    }

    #[test]
    fn old_requests_leave_the_window_and_classes_are_separate() {
        let m = SlaMonitor::new();
        let t0 = Instant::now();
        m.record_at(t0, "m", Some(1), Duration::from_millis(500), true);
        let later = t0 + WINDOW + Duration::from_secs(1);
        m.record_at(later, "m", Some(1), Duration::from_millis(5), true);
        m.record_at(later, "m", Some(5), Duration::from_millis(7), true);
        let v = m.view(later);
        let names: Vec<_> = v.classes.iter().map(|c| c.class.as_str()).collect();
        assert_eq!(names, vec!["priority 1", "priority 5"]);
        assert_eq!(v.classes[0].stats.requests, 1);
        assert_eq!(v.classes[0].stats.max_ms, 5.0);
    }

    #[test]
    fn no_traffic_is_healthy_with_no_checks() {
        let v = SlaMonitor::new().view(Instant::now());
        assert_eq!(v.total, 0);
        assert_eq!(v.health.as_str(), "healthy");
    }
}
