//! `tickserve bench mixed`: is a foreground class isolated from a
//! background flood?
//!
//! One run, three phases of the same length against the same server:
//! the foreground class alone (open loop at a fixed rate, latency from
//! the intended send time), the background flood alone (closed loop, many
//! clients), then both at once. The report sets the foreground's p50/p99
//! alone and under the flood side by side, with their ratio, the
//! background's throughput with and without the foreground, per-class
//! goodput (answered within the SLA's max latency) and counts by
//! outcome, and a verdict against the isolation goals (docs/scheduling.md).

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::run::{Arrival, Limits, Measured, OpenLoop, Progress, Target, closed_loop, open_loop};
use crate::sla::{Check, Compliance, Health, Sla};
use crate::stats::{ClassStats, RunStats};

/// Options of the mixed mode.
#[derive(Debug, Clone, Args, Serialize)]
pub struct MixedArgs {
    /// Priority of the foreground (real-time) requests.
    #[arg(long, default_value_t = 1)]
    pub fg_priority: u8,
    /// Foreground requests per second (open loop, constant spacing).
    #[arg(long, default_value_t = 100.0)]
    pub fg_rate: f64,
    /// Priority of the background flood.
    #[arg(long, default_value_t = 5)]
    pub bg_priority: u8,
    /// Closed-loop background clients.
    #[arg(long, default_value_t = 256)]
    pub bg_clients: usize,
    /// Length of each of the three phases.
    #[arg(long, default_value = "10s", value_parser = crate::cli::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub phase: Duration,
    /// Most foreground requests in flight.
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Verdict: foreground p99 under the flood at most this many ms…
    #[arg(long, default_value_t = 5.0)]
    pub max_fg_p99_ms: f64,
    /// …and at most this multiple of its p99 alone.
    #[arg(long, default_value_t = 3.0)]
    pub max_p99_ratio: f64,
    /// Verdict: background throughput with the foreground at least this
    /// share of its throughput alone.
    #[arg(long, default_value_t = 0.9)]
    pub min_bg_share: f64,
}

/// What a mixed run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MixedReport {
    pub fg_priority: u8,
    pub bg_priority: u8,
    pub fg_rate: f64,
    pub bg_clients: usize,
    pub phase_s: f64,
    pub fg_alone: RunStats,
    pub bg_alone: RunStats,
    /// Both phases at once: the foreground's and the background's stats.
    pub fg_under_flood: RunStats,
    pub bg_under_flood: RunStats,
    /// Foreground p99 under the flood over its p99 alone.
    pub p99_ratio: f64,
    /// Background throughput with the foreground over alone.
    pub bg_share: f64,
}

impl MixedReport {
    /// The isolation goals as SLA checks.
    pub fn verdict(&self, args: &MixedArgs) -> Compliance {
        let fg = &self.fg_under_flood.overall;
        let check = |metric: &str, measured: f64, op: &str, threshold: f64| Check {
            scope: format!("priority {}", self.fg_priority),
            metric: metric.to_owned(),
            measured,
            threshold,
            op: op.to_owned(),
            passed: if op == "<=" {
                measured <= threshold
            } else {
                measured >= threshold
            },
            recommendation: None,
        };
        let mut checks = vec![
            check(
                "p99 under flood (ms)",
                fg.latency_ms.p99,
                "<=",
                args.max_fg_p99_ms,
            ),
            check(
                "p99 under flood / p99 alone",
                self.p99_ratio,
                "<=",
                args.max_p99_ratio,
            ),
            check("errors under flood", fg.errors as f64, "<=", 0.0),
            check(
                "errors alone",
                self.fg_alone.overall.errors as f64,
                "<=",
                0.0,
            ),
        ];
        checks.push(Check {
            scope: format!("priority {}", self.bg_priority),
            ..check(
                "throughput under flood / alone",
                self.bg_share,
                ">=",
                args.min_bg_share,
            )
        });
        for c in &mut checks {
            if !c.passed {
                c.recommendation = Some(
                    "docs/scheduling.md, \"Real-time isolation\": targets, chunks, instance groups"
                        .to_owned(),
                );
            }
        }
        let passed = checks.iter().filter(|c| c.passed).count();
        let total = checks.len();
        let pass_ratio = passed as f64 / total as f64;
        Compliance {
            compliant: passed == total,
            passed,
            total,
            pass_ratio,
            health: Health::from_pass_ratio(pass_ratio),
            recommendations: checks
                .iter()
                .filter_map(|c| c.recommendation.clone())
                .take(1)
                .collect(),
            checks,
        }
    }

    /// Rows of the text and HTML tables: (label, value).
    pub fn rows(&self) -> Vec<(String, String)> {
        let (fa, ff) = (&self.fg_alone.overall, &self.fg_under_flood.overall);
        let (ba, bf) = (&self.bg_alone.overall, &self.bg_under_flood.overall);
        let mut rows = vec![
            (
                format!("priority {} p50 / p99 alone (ms)", self.fg_priority),
                format!("{:.2} / {:.2}", fa.latency_ms.median, fa.latency_ms.p99),
            ),
            (
                format!("priority {} p50 / p99 under flood (ms)", self.fg_priority),
                format!("{:.2} / {:.2}", ff.latency_ms.median, ff.latency_ms.p99),
            ),
            (
                "p99 ratio (flood / alone)".to_owned(),
                format!("{:.2}×", self.p99_ratio),
            ),
            (
                format!(
                    "priority {} req/s alone / with foreground",
                    self.bg_priority
                ),
                format!("{:.0} / {:.0}", ba.throughput_rps, bf.throughput_rps),
            ),
            (
                "background share kept".to_owned(),
                format!("{:.0} %", self.bg_share * 100.0),
            ),
        ];
        for (label, stats) in [
            ("foreground alone", fa),
            ("foreground under flood", ff),
            ("background alone", ba),
            ("background with foreground", bf),
        ] {
            rows.push((format!("{label}: outcomes"), outcomes(stats)));
            rows.push((
                format!("{label}: goodput (req/s within the SLA max latency)"),
                format!("{:.1} of {:.1}", stats.goodput_rps, stats.throughput_rps),
            ));
        }
        rows
    }
}

fn outcomes(stats: &ClassStats) -> String {
    let mut text = format!("{} ok", stats.ok);
    for (reason, n) in &stats.errors_by_reason {
        text.push_str(&format!(", {n} {reason}"));
    }
    text
}

/// The workloads and targets of the two classes.
#[derive(Debug)]
pub struct Classes {
    pub fg_target: Target,
    pub fg_workload: Arc<crate::workload::Workload>,
    pub bg_target: Target,
    pub bg_workload: Arc<crate::workload::Workload>,
}

fn summarise(m: Measured, sla: &Sla) -> RunStats {
    m.recorder.summarise(m.elapsed, sla)
}

/// Runs the three phases.
pub async fn run(
    args: &MixedArgs,
    classes: &Classes,
    sla: &Sla,
    warmup: u64,
    seed: u64,
    show_progress: bool,
) -> MixedReport {
    let phase = Limits {
        duration: Some(args.phase),
        count: None,
    };
    let open = OpenLoop {
        rate: args.fg_rate,
        arrival: Arrival::Constant,
        max_in_flight: args.max_in_flight,
        late_threshold: Duration::from_millis(5),
        seed,
    };
    let foreground = |label: &str| {
        let progress = Progress::new(show_progress, label, phase);
        async move {
            let m = open_loop(
                &classes.fg_target,
                Arc::clone(&classes.fg_workload),
                open,
                phase,
                warmup,
                &progress,
            )
            .await;
            progress.finish();
            m
        }
    };
    let background = |label: &str| {
        let progress = Progress::new(show_progress, label, phase);
        async move {
            let m = closed_loop(
                &classes.bg_target,
                Arc::clone(&classes.bg_workload),
                args.bg_clients,
                phase,
                warmup,
                &progress,
            )
            .await;
            progress.finish();
            m
        }
    };
    let fg_alone = summarise(foreground("foreground alone").await, sla);
    let bg_alone = summarise(background("background alone").await, sla);
    let (fg_flood, bg_flood) = tokio::join!(
        foreground("foreground under flood"),
        background("background with foreground")
    );
    let (fg_under_flood, bg_under_flood) = (summarise(fg_flood, sla), summarise(bg_flood, sla));
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    MixedReport {
        fg_priority: args.fg_priority,
        bg_priority: args.bg_priority,
        fg_rate: args.fg_rate,
        bg_clients: args.bg_clients,
        phase_s: args.phase.as_secs_f64(),
        p99_ratio: ratio(
            fg_under_flood.overall.latency_ms.p99,
            fg_alone.overall.latency_ms.p99,
        ),
        bg_share: ratio(
            bg_under_flood.overall.throughput_rps,
            bg_alone.overall.throughput_rps,
        ),
        fg_alone,
        bg_alone,
        fg_under_flood,
        bg_under_flood,
    }
}
