//! `bench mixed`: does a latency-critical class stay fast while a
//! background class floods the server?
//!
//! One run, three phases of their own duration:
//!
//! 1. the foreground alone: open loop at a fixed rate (default priority 1,
//!    the pacing of `bench rate`, latency from the intended send time);
//! 2. the background alone: a closed-loop flood of C clients (default
//!    priority 5);
//! 3. both together.
//!
//! The report sets the foreground's p50/p99 under the flood beside its
//! numbers alone, and the background's throughput (requests/s and rows/s)
//! with the foreground beside its throughput alone; per class and phase the
//! 200/429/503/other counts and the goodput (successes within the class's
//! latency target). The verdict checks the goals of issue 15: foreground
//! p99 under the flood within a bound and within a multiple of its p99
//! alone, background throughput under the flood at least a share of its
//! throughput alone, and no foreground error other than 429.
//!
//! Every phase sends inputs of its own (seeds differ by phase and class),
//! so a server's result cache cannot answer phase 3 from phase 1.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::run::{Arrival, Limits, Measured, OpenLoop, Progress, Target, closed_loop, open_loop};
use crate::sla::{Check, Compliance};
use crate::stats::{ClassStats, GoodputLimits, Recorder, RunStats, class_label};
use crate::workload::{Workload, WorkloadSpec};

/// What a mixed run sends and what it is judged against.
#[derive(Debug, Clone)]
pub struct MixedPlan {
    /// Foreground: priority, requests/s, arrival process, in-flight cap,
    /// late-send threshold.
    pub fg_priority: u8,
    pub fg_rate: f64,
    pub fg_arrival: Arrival,
    pub fg_max_in_flight: usize,
    pub late_threshold: Duration,
    /// Background: priority, clients, rows per request.
    pub bg_priority: u8,
    pub bg_concurrency: usize,
    pub bg_rows: usize,
    /// Durations of the three phases: foreground alone, background alone,
    /// both.
    pub durations: [Duration; 3],
    /// Latency target per priority (goodput); classes without one count
    /// every success as good.
    pub targets: BTreeMap<u8, Duration>,
    pub goals: MixedGoals,
    /// Requests sent, not measured, before each class's first phase.
    pub warmup: u64,
    pub show_progress: bool,
}

/// The goals the verdict checks (issue 15's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MixedGoals {
    /// Foreground p99 under the flood at most this (ms).
    pub max_fg_p99_ms: f64,
    /// Foreground p99 under the flood at most this multiple of its p99
    /// alone.
    pub max_fg_p99_ratio: f64,
    /// Background throughput with the foreground at least this share of
    /// its throughput alone.
    pub min_bg_throughput_ratio: f64,
}

impl Default for MixedGoals {
    fn default() -> Self {
        Self {
            max_fg_p99_ms: 5.0,
            max_fg_p99_ratio: 3.0,
            min_bg_throughput_ratio: 0.9,
        }
    }
}

/// One of the two classes of a mixed run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixedClass {
    /// The class label in the statistics, `priority N`.
    pub class: String,
    pub priority: u8,
    /// How it loads the server, in words.
    pub load: String,
    pub rows_per_request: usize,
    /// Latency target for goodput (ms); `None`: every success is good.
    pub target_ms: Option<f64>,
}

/// Answers of one class in one phase, by status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusCounts {
    pub requests: u64,
    /// Successful (2xx) answers.
    pub ok: u64,
    pub http_429: u64,
    pub http_503: u64,
    /// Any other error: other statuses, timeouts, transport errors, sends
    /// over the in-flight cap.
    pub other: u64,
}

impl StatusCounts {
    pub fn of(c: &ClassStats) -> Self {
        let by = |reason: &str| c.errors_by_reason.get(reason).copied().unwrap_or(0);
        let (http_429, http_503) = (by("http 429"), by("http 503"));
        Self {
            requests: c.requests,
            ok: c.ok,
            http_429,
            http_503,
            other: c.errors.saturating_sub(http_429 + http_503),
        }
    }
}

/// One class in one phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PhaseClass {
    pub counts: StatusCounts,
    /// Successful rows per second (requests/s × rows per request).
    pub rows_per_s: f64,
    /// Everything else: latency, throughput, goodput, CDF.
    pub stats: ClassStats,
}

/// One phase of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MixedPhase {
    /// `foreground alone`, `background alone`, `both`.
    pub name: String,
    pub duration_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub foreground: Option<PhaseClass>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub background: Option<PhaseClass>,
}

/// The headline numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MixedSummary {
    pub fg_p50_alone_ms: f64,
    pub fg_p99_alone_ms: f64,
    pub fg_p50_flood_ms: f64,
    pub fg_p99_flood_ms: f64,
    /// p99 under the flood / p99 alone; `None` when nothing succeeded alone.
    pub fg_p99_ratio: Option<f64>,
    pub bg_rps_alone: f64,
    pub bg_rows_per_s_alone: f64,
    pub bg_rps_with_fg: f64,
    pub bg_rows_per_s_with_fg: f64,
    /// Throughput with the foreground / alone; `None` when nothing
    /// succeeded alone.
    pub bg_throughput_ratio: Option<f64>,
    /// Foreground errors other than 429, over both foreground phases.
    pub fg_errors_not_429: u64,
}

/// The mixed section of the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MixedReport {
    pub foreground: MixedClass,
    pub background: MixedClass,
    pub phases: Vec<MixedPhase>,
    pub summary: MixedSummary,
    pub goals: MixedGoals,
}

/// The outcome of a mixed run: its section, the statistics of the
/// "both" phase (the report's `result`) and the verdict on the goals.
#[derive(Debug)]
pub struct MixedOutcome {
    pub report: MixedReport,
    pub both: RunStats,
    pub checks: Vec<Check>,
}

pub const PHASES: [&str; 3] = ["foreground alone", "background alone", "both"];

/// The foreground's own runtime, on a thread of its own: a real-time
/// client is a separate process from the analytics flood, and in one
/// runtime the flood's client tasks (building, sending and reading
/// hundreds of requests) would delay the foreground's sends and reads and
/// count that delay as server latency.
struct Foreground {
    /// Always `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
    target: Target,
    open: OpenLoop,
}

impl Foreground {
    fn start(target: Target, open: OpenLoop) -> Result<Self, crate::BenchError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("bench-foreground")
            .build()
            .map_err(|e| {
                crate::BenchError::Config(format!("cannot start the foreground's runtime: {e}"))
            })?;
        Ok(Foreground {
            runtime: Some(runtime),
            target,
            open,
        })
    }

    /// One open-loop phase of the foreground on its runtime.
    async fn run(
        &self,
        workload: Arc<Workload>,
        limits: Limits,
        warmup: u64,
        progress: Progress,
    ) -> Result<Measured, crate::BenchError> {
        let (target, open) = (self.target.clone(), self.open);
        let runtime = self.runtime.as_ref().ok_or_else(|| {
            crate::BenchError::Config("the foreground's runtime has stopped".into())
        })?;
        runtime
            .spawn(
                async move { open_loop(&target, workload, open, limits, warmup, &progress).await },
            )
            .await
            .map_err(|e| crate::BenchError::Config(format!("the foreground's run failed: {e}")))
    }
}

impl Drop for Foreground {
    /// Ends the runtime without blocking the caller's (dropping a runtime
    /// inside another one would panic).
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs the three phases against `url`. `fg_spec` is the foreground's
/// request stream; the background's is the same with its own priority,
/// rows per request and seed.
pub async fn run_mixed(
    fg_target: &Target,
    bg_target: &Target,
    fg_spec: &WorkloadSpec,
    plan: &MixedPlan,
) -> Result<MixedOutcome, crate::BenchError> {
    let fg_label = class_label(Some(plan.fg_priority));
    let bg_label = class_label(Some(plan.bg_priority));
    let limits = GoodputLimits {
        default_ms: None,
        classes: plan
            .targets
            .iter()
            .map(|(&p, d)| (class_label(Some(p)), ms(*d)))
            .collect(),
    };
    let streams = |phase: u64| -> Result<(Arc<Workload>, Arc<Workload>), crate::BenchError> {
        let mut fg = fg_spec.clone();
        fg.priorities = Some(single(plan.fg_priority));
        fg.seed = fg_spec.seed.wrapping_add(2 * phase);
        let mut bg = fg_spec.clone();
        bg.priorities = Some(single(plan.bg_priority));
        bg.seed = fg_spec.seed.wrapping_add(2 * phase + 1);
        if let Some(rows) = bg.shape.first_mut() {
            *rows = plan.bg_rows.max(1);
        }
        Ok((Arc::new(Workload::new(fg)?), Arc::new(Workload::new(bg)?)))
    };
    let fg_open = OpenLoop {
        rate: plan.fg_rate,
        arrival: plan.fg_arrival,
        max_in_flight: plan.fg_max_in_flight,
        late_threshold: plan.late_threshold,
        seed: fg_spec.seed,
    };
    let limit = |d: Duration| Limits {
        duration: Some(d),
        count: None,
    };
    let [d_fg, d_bg, d_both] = plan.durations;
    let show = plan.show_progress;
    let foreground = Foreground::start(fg_target.clone(), fg_open)?;

    // 1. The foreground alone.
    let (fg_w, _) = streams(0)?;
    let p = Progress::new(show, PHASES[0], limit(d_fg));
    let fg_alone = foreground
        .run(fg_w, limit(d_fg), plan.warmup, p.clone())
        .await?;
    p.finish();

    // 2. The background alone.
    let (_, bg_w) = streams(1)?;
    let p = Progress::new(show, PHASES[1], limit(d_bg));
    let bg_alone = closed_loop(
        bg_target,
        bg_w,
        plan.bg_concurrency,
        limit(d_bg),
        plan.warmup,
        &p,
    )
    .await;
    p.finish();

    // 3. Both. One progress bar: two would overwrite each other.
    let (fg_w, bg_w) = streams(2)?;
    let p = Progress::new(show, PHASES[2], limit(d_both));
    let hidden = Progress::new(false, PHASES[2], limit(d_both));
    let (fg_both, bg_both) = tokio::join!(
        foreground.run(fg_w, limit(d_both), 0, p.clone()),
        closed_loop(
            bg_target,
            bg_w,
            plan.bg_concurrency,
            limit(d_both),
            0,
            &hidden
        ),
    );
    p.finish();
    drop(foreground);
    let fg_both = fg_both?;

    let fg_rows = fg_spec.shape.first().copied().unwrap_or(1).max(1);
    let bg_rows = plan.bg_rows.max(1);
    let class = |m: &Measured, label: &str, rows: usize| -> PhaseClass {
        let stats = m.recorder.summarise(m.elapsed, &limits);
        let c = stats.classes.get(label).cloned().unwrap_or_default();
        PhaseClass {
            counts: StatusCounts::of(&c),
            rows_per_s: c.throughput_rps * rows as f64,
            stats: c,
        }
    };
    let phases = vec![
        MixedPhase {
            name: PHASES[0].to_owned(),
            duration_s: fg_alone.elapsed.as_secs_f64(),
            foreground: Some(class(&fg_alone, &fg_label, fg_rows)),
            background: None,
        },
        MixedPhase {
            name: PHASES[1].to_owned(),
            duration_s: bg_alone.elapsed.as_secs_f64(),
            foreground: None,
            background: Some(class(&bg_alone, &bg_label, bg_rows)),
        },
        MixedPhase {
            name: PHASES[2].to_owned(),
            duration_s: fg_both.elapsed.max(bg_both.elapsed).as_secs_f64(),
            foreground: Some(class(&fg_both, &fg_label, fg_rows)),
            background: Some(class(&bg_both, &bg_label, bg_rows)),
        },
    ];
    let both = both_stats(
        &fg_both, &bg_both, &phases[2], &fg_label, &bg_label, &limits,
    );
    let summary = summarise(&phases);
    let checks = verdict(&summary, &plan.goals);
    let target_of = |p: u8| plan.targets.get(&p).map(|d| ms(*d));
    let report = MixedReport {
        foreground: MixedClass {
            class: fg_label,
            priority: plan.fg_priority,
            load: format!(
                "open loop, {} requests/s ({})",
                plan.fg_rate,
                match plan.fg_arrival {
                    Arrival::Constant => "constant",
                    Arrival::Poisson => "poisson",
                }
            ),
            rows_per_request: fg_rows,
            target_ms: target_of(plan.fg_priority),
        },
        background: MixedClass {
            class: bg_label,
            priority: plan.bg_priority,
            load: format!("closed loop, {} clients", plan.bg_concurrency),
            rows_per_request: bg_rows,
            target_ms: target_of(plan.bg_priority),
        },
        phases,
        summary,
        goals: plan.goals,
    };
    Ok(MixedOutcome {
        report,
        both,
        checks,
    })
}

fn single(priority: u8) -> crate::workload::PriorityMix {
    crate::workload::PriorityMix {
        weights: vec![(priority, 1)],
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The "both" phase as one run: all requests together, and each class as
/// measured by its own loop (the foreground keeps its open-loop numbers).
fn both_stats(
    fg: &Measured,
    bg: &Measured,
    phase: &MixedPhase,
    fg_label: &str,
    bg_label: &str,
    limits: &GoodputLimits,
) -> RunStats {
    let elapsed = fg.elapsed.max(bg.elapsed);
    let mut all = Recorder::new(false);
    all.merge(&fg.recorder);
    all.merge(&bg.recorder);
    let mut stats = all.summarise(elapsed, limits);
    for (label, class) in [(fg_label, &phase.foreground), (bg_label, &phase.background)] {
        if let Some(c) = class {
            stats.classes.insert(label.to_owned(), c.stats.clone());
        }
    }
    stats
}

/// The headline numbers of the three phases (in [`PHASES`] order).
pub fn summarise(phases: &[MixedPhase]) -> MixedSummary {
    let get = |i: usize| phases.get(i);
    let fg = |i: usize| get(i).and_then(|p| p.foreground.as_ref());
    let bg = |i: usize| get(i).and_then(|p| p.background.as_ref());
    let lat = |c: Option<&PhaseClass>| {
        c.map_or((0.0, 0.0), |c| {
            (c.stats.latency_ms.median, c.stats.latency_ms.p99)
        })
    };
    let (fg_p50_alone_ms, fg_p99_alone_ms) = lat(fg(0));
    let (fg_p50_flood_ms, fg_p99_flood_ms) = lat(fg(2));
    let rates =
        |c: Option<&PhaseClass>| c.map_or((0.0, 0.0), |c| (c.stats.throughput_rps, c.rows_per_s));
    let (bg_rps_alone, bg_rows_per_s_alone) = rates(bg(1));
    let (bg_rps_with_fg, bg_rows_per_s_with_fg) = rates(bg(2));
    let fg_ok_alone = fg(0).is_some_and(|c| c.counts.ok > 0);
    let fg_errors_not_429 = [fg(0), fg(2)]
        .into_iter()
        .flatten()
        .map(|c| c.counts.http_503 + c.counts.other)
        .sum();
    MixedSummary {
        fg_p50_alone_ms,
        fg_p99_alone_ms,
        fg_p50_flood_ms,
        fg_p99_flood_ms,
        fg_p99_ratio: (fg_ok_alone && fg_p99_alone_ms > 0.0)
            .then(|| fg_p99_flood_ms / fg_p99_alone_ms),
        bg_rps_alone,
        bg_rows_per_s_alone,
        bg_rps_with_fg,
        bg_rows_per_s_with_fg,
        bg_throughput_ratio: (bg_rps_alone > 0.0).then(|| bg_rps_with_fg / bg_rps_alone),
        fg_errors_not_429,
    }
}

/// The goal checks. A ratio that cannot be computed (nothing succeeded
/// alone) fails its check with a measured value of 0.
pub fn verdict(s: &MixedSummary, goals: &MixedGoals) -> Vec<Check> {
    let check = |scope: &str,
                 metric: &str,
                 measured: Option<f64>,
                 threshold: f64,
                 at_most: bool,
                 advice: &str| {
        let passed = measured.is_some_and(|m| {
            if at_most {
                m <= threshold
            } else {
                m >= threshold
            }
        });
        Check {
            scope: scope.to_owned(),
            metric: metric.to_owned(),
            measured: measured.unwrap_or(0.0),
            threshold,
            op: if at_most { "<=" } else { ">=" }.to_owned(),
            passed,
            recommendation: (!passed).then(|| advice.to_owned()),
        }
    };
    // Under a flood, a foreground request that answered nothing has no p99.
    let fg_flood_p99 = (s.fg_p99_flood_ms > 0.0).then_some(s.fg_p99_flood_ms);
    vec![
        check(
            "foreground",
            "p99 under flood",
            fg_flood_p99,
            goals.max_fg_p99_ms,
            true,
            "The foreground waits behind background work: keep its batches small (latency-budgeted padding), run background batches in preemptible chunks, or reserve an engine instance for it (docs/scheduling.md).",
        ),
        check(
            "foreground",
            "p99 flood/alone",
            s.fg_p99_ratio,
            goals.max_fg_p99_ratio,
            true,
            "The background flood slows the foreground: see the advice on the p99 under flood; a ratio without a p99 alone means the foreground failed on an idle server.",
        ),
        check(
            "background",
            "throughput with/alone",
            s.bg_throughput_ratio,
            goals.min_bg_throughput_ratio,
            false,
            "Protecting the foreground costs the background too much throughput: larger background chunks, fewer reserved instances, or less padding headroom.",
        ),
        check(
            "foreground",
            "errors not 429",
            Some(s.fg_errors_not_429 as f64),
            0.0,
            true,
            "Foreground requests failed other than by admission control (429): read the per-phase counts; 503 means they expired in the queue.",
        ),
    ]
}

/// The verdict on the goals, plus the SLA file's checks on the "both"
/// phase when one was given.
pub fn compliance(checks: Vec<Check>, sla_checks: Option<Compliance>) -> Compliance {
    let mut all = checks;
    if let Some(c) = sla_checks {
        all.extend(c.checks);
    }
    Compliance::from_checks(all)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::stats::LatencySummary;

    fn class(p50: f64, p99: f64, rps: f64, rows: usize, errors: &[(&str, u64)]) -> PhaseClass {
        let errors_by_reason: BTreeMap<String, u64> =
            errors.iter().map(|&(k, v)| (k.to_owned(), v)).collect();
        let stats = ClassStats {
            requests: 100 + errors_by_reason.values().sum::<u64>(),
            ok: 100,
            errors: errors_by_reason.values().sum(),
            errors_by_reason,
            throughput_rps: rps,
            latency_ms: LatencySummary {
                median: p50,
                p99,
                ..LatencySummary::default()
            },
            ..ClassStats::default()
        };
        PhaseClass {
            counts: StatusCounts::of(&stats),
            rows_per_s: rps * rows as f64,
            stats,
        }
    }

    fn phases(fg_flood_p99: f64, bg_with: f64, fg_errors: &[(&str, u64)]) -> Vec<MixedPhase> {
        let phase = |name: &str, fg, bg| MixedPhase {
            name: name.to_owned(),
            duration_s: 1.0,
            foreground: fg,
            background: bg,
        };
        vec![
            phase(PHASES[0], Some(class(0.9, 1.4, 100.0, 1, &[])), None),
            phase(PHASES[1], None, Some(class(20.0, 30.0, 1000.0, 4, &[]))),
            phase(
                PHASES[2],
                Some(class(2.0, fg_flood_p99, 100.0, 1, fg_errors)),
                Some(class(25.0, 35.0, bg_with, 4, &[])),
            ),
        ]
    }

    #[test]
    fn counts_split_errors_by_status() {
        let c = class(
            1.0,
            2.0,
            10.0,
            1,
            &[("http 429", 3), ("http 503", 2), ("timeout", 1)],
        );
        assert_eq!(
            c.counts,
            StatusCounts {
                requests: 106,
                ok: 100,
                http_429: 3,
                http_503: 2,
                other: 1
            }
        );
    }

    #[test]
    fn summary_and_verdict_meet_the_goals() {
        let s = summarise(&phases(4.0, 950.0, &[("http 429", 5)]));
        assert_eq!((s.fg_p50_alone_ms, s.fg_p99_alone_ms), (0.9, 1.4));
        assert_eq!((s.fg_p50_flood_ms, s.fg_p99_flood_ms), (2.0, 4.0));
        assert!((s.fg_p99_ratio.unwrap() - 4.0 / 1.4).abs() < 1e-9);
        assert_eq!((s.bg_rps_alone, s.bg_rows_per_s_alone), (1000.0, 4000.0));
        assert_eq!((s.bg_rps_with_fg, s.bg_rows_per_s_with_fg), (950.0, 3800.0));
        assert_eq!(s.bg_throughput_ratio, Some(0.95));
        assert_eq!(s.fg_errors_not_429, 0);
        let c = compliance(verdict(&s, &MixedGoals::default()), None);
        assert!(c.compliant, "{c:?}");
        assert_eq!(c.total, 4);
    }

    #[test]
    fn verdict_fails_each_missed_goal() {
        // p99 30 ms under flood (21× alone), background at 50 %, a 503.
        let s = summarise(&phases(30.0, 500.0, &[("http 503", 1)]));
        let c = compliance(verdict(&s, &MixedGoals::default()), None);
        assert!(!c.compliant);
        assert_eq!(c.passed, 0);
        assert_eq!(c.recommendations.len(), 4);
        // Nothing succeeded alone: the ratios cannot pass.
        let empty = summarise(&[]);
        assert_eq!(empty.fg_p99_ratio, None);
        assert!(
            verdict(&empty, &MixedGoals::default())
                .iter()
                .take(3)
                .all(|c| !c.passed)
        );
    }
}
