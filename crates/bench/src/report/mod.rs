//! The report of a bench run in three forms: text for people (the
//! sections of seed-requirements.md's report), JSON with every number
//! under a versioned schema for machines, and one self-contained HTML file
//! with SVG plots drawn here (no scripts, no network).
//!
//! # Layout
//!
//! This module holds the report's data (what the JSON serialises);
//! [`text`] and [`html`] render it, [`svg`] draws the HTML's charts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::mixed::{MixedReport, PhaseClass};
use crate::sla::{Compliance, Sla};
use crate::stats::{ClassStats, RunStats};

/// Version of the JSON report's layout; bumped on any incompatible change.
pub const SCHEMA: &str = "tickserve-bench/v1";

/// One step of a stress run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StressStep {
    /// Concurrency (clients) or rate (requests/s) of the step.
    pub level: f64,
    pub stats: RunStats,
    pub compliance: Compliance,
}

/// A stress run: the steps, why it stopped, the last step within SLA.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StressReport {
    /// `"concurrency"` or `"rate"`.
    pub by: String,
    pub steps: Vec<StressStep>,
    pub stopped_because: String,
    pub last_compliant_level: Option<f64>,
}

/// One metric of a comparison over repeated runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Improvement {
    pub metric: String,
    /// Per repeat: the baseline's and the candidate's value.
    pub baseline: Vec<f64>,
    pub candidate: Vec<f64>,
    /// Mean improvement in % (positive = the candidate is better: higher
    /// throughput, lower latency) and the half-width of its 95 % CI.
    pub improvement_pct: f64,
    pub ci95_pct: f64,
}

/// A comparison of two targets on the same workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareReport {
    pub baseline: String,
    pub candidate: String,
    pub repeats: usize,
    pub workload: String,
    pub improvements: Vec<Improvement>,
    pub baseline_runs: Vec<RunStats>,
    pub candidate_runs: Vec<RunStats>,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub tool: String,
    /// `latency`, `load`, `rate`, `stress`, `compare`, `mixed`, `streams`.
    pub mode: String,
    /// Seconds since the Unix epoch at the start.
    pub started_unix_s: u64,
    pub target: String,
    /// The options of the run, as given.
    pub settings: serde_json::Value,
    /// The run judged against the SLA: the whole run; for stress the last
    /// step within SLA (else the first); for compare the candidate's last
    /// repeat; for mixed the phase with both classes.
    pub result: RunStats,
    pub sla: Sla,
    pub compliance: Compliance,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stress: Option<StressReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compare: Option<CompareReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mixed: Option<MixedReport>,
    /// `bench streams`: whole windows against stream ticks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<crate::streams::StreamsReport>,
}

mod html;
mod svg;
mod text;

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The text report.
    pub fn to_text(&self) -> String {
        text::render(self)
    }

    /// One HTML file with inline SVG plots.
    pub fn to_html(&self) -> String {
        html::render(self)
    }
}

pub(super) fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// The rows of a mixed run's table: phase, role, class.
/// The rows of the latency table, each cell formatted as both reports
/// show it: class, requests, error %, req/s, goodput, then mean, p50, p90,
/// p95, p99, p99.9, min, max and std in ms. "all" first, then each class
/// when `classes`.
pub(super) fn latency_rows(r: &RunStats, classes: bool) -> Vec<Vec<String>> {
    let mut rows: Vec<(&str, &ClassStats)> = vec![("all", &r.overall)];
    if classes {
        rows.extend(r.classes.iter().map(|(k, v)| (k.as_str(), v)));
    }
    rows.into_iter()
        .map(|(name, c)| {
            let l = &c.latency_ms;
            let mut cells = vec![
                name.to_owned(),
                c.requests.to_string(),
                format!("{:.2}", c.error_rate * 100.0),
                format!("{:.1}", c.throughput_rps),
                format!("{:.1}", c.goodput_rps),
            ];
            let ms = [
                l.mean, l.median, l.p90, l.p95, l.p99, l.p999, l.min, l.max, l.std,
            ];
            cells.extend(ms.map(|v| format!("{v:.2}")));
            cells
        })
        .collect()
}

/// An open-loop run's latencies from the actual send time, as both
/// reports show them: p50, p99 and max in ms, and the late sends. `None`
/// for a closed-loop run.
pub(super) fn open_loop_cells(r: &RunStats) -> Option<[String; 4]> {
    let a = r.overall.actual_latency_ms.as_ref()?;
    Some([
        format!("{:.2}", a.median),
        format!("{:.2}", a.p99),
        format!("{:.2}", a.max),
        r.overall.late_sends.unwrap_or(0).to_string(),
    ])
}

/// The rows of the mixed table, each cell formatted as both reports show
/// it: phase, class, requests, answers by status (200, 429, 503, other),
/// req/s, rows/s, goodput, p50 and p99 ms.
pub(super) fn mixed_rows(m: &MixedReport) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for p in &m.phases {
        for (role, c) in [("foreground", &p.foreground), ("background", &p.background)] {
            if let Some(c) = c {
                rows.push(mixed_cells(&p.name, role, c));
            }
        }
    }
    rows
}

fn mixed_cells(phase: &str, role: &str, c: &PhaseClass) -> Vec<String> {
    let n = &c.counts;
    let mut cells = vec![phase.to_owned(), role.to_owned()];
    cells.extend([n.requests, n.ok, n.http_429, n.http_503, n.other].map(|v| v.to_string()));
    let per_s = [c.stats.throughput_rps, c.rows_per_s, c.stats.goodput_rps];
    cells.extend(per_s.map(|v| format!("{v:.1}")));
    let ms = [c.stats.latency_ms.median, c.stats.latency_ms.p99];
    cells.extend(ms.map(|v| format!("{v:.2}")));
    cells
}

pub(super) fn target_text(t: Option<f64>) -> String {
    t.map_or("none".to_owned(), |ms| format!("{ms} ms"))
}

pub(super) fn ratio_text(r: Option<f64>, unit: &str) -> String {
    r.map_or("n/a".to_owned(), |r| match unit {
        "%" => format!("{:.1} %", r * 100.0),
        _ => format!("{r:.2}{unit}"),
    })
}

/// Improvement of `candidate` over `baseline` per repeat, in %:
/// `higher_is_better` for throughput, not for latency.
pub fn improvement(
    metric: &str,
    baseline: Vec<f64>,
    candidate: Vec<f64>,
    higher_is_better: bool,
) -> Improvement {
    let pct: Vec<f64> = baseline
        .iter()
        .zip(&candidate)
        .map(|(&b, &c)| {
            if b == 0.0 {
                0.0
            } else if higher_is_better {
                (c - b) / b * 100.0
            } else {
                (b - c) / b * 100.0
            }
        })
        .collect();
    let (m, half) = crate::stats::mean_ci95(&pct);
    Improvement {
        metric: metric.to_owned(),
        baseline,
        candidate,
        improvement_pct: m,
        ci95_pct: half,
    }
}

/// Counts by key, for plausibility checks on parsed reports.
pub fn sum_requests(classes: &BTreeMap<String, ClassStats>) -> u64 {
    classes.values().map(|c| c.requests).sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::sla::evaluate;
    use crate::stats::{Outcome, Recorder, Sample};
    use std::time::Duration;

    fn report() -> Report {
        let mut r = Recorder::new(false);
        for i in 1..=50u64 {
            r.record(&Sample {
                class: if i % 2 == 0 {
                    "priority 1"
                } else {
                    "priority 5"
                }
                .into(),
                outcome: if i == 7 {
                    Outcome::Status(503)
                } else {
                    Outcome::Ok
                },
                latency: Duration::from_millis(i),
                actual_latency: None,
                late: false,
                at: Duration::from_millis(i * 40),
            });
        }
        let sla = Sla::default();
        let stats = r.summarise(Duration::from_secs(1), &sla.goodput_limits());
        let compliance = evaluate(&stats, &sla);
        Report {
            schema: SCHEMA.into(),
            tool: "tickserve test".into(),
            mode: "load".into(),
            started_unix_s: 0,
            target: "http://x".into(),
            settings: serde_json::json!({"concurrency": 4}),
            result: stats,
            sla,
            compliance,
            stress: None,
            compare: Some(CompareReport {
                baseline: "a".into(),
                candidate: "b".into(),
                repeats: 2,
                workload: "load".into(),
                improvements: vec![improvement(
                    "throughput",
                    vec![100.0, 100.0],
                    vec![150.0, 130.0],
                    true,
                )],
                baseline_runs: vec![],
                candidate_runs: vec![],
            }),
            mixed: None,
            streams: None,
        }
    }

    #[test]
    fn json_round_trips_with_its_schema() {
        let r = report();
        let back: Report = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(back.schema, SCHEMA);
        assert_eq!(back.result.overall.requests, 50);
        assert_eq!(sum_requests(&back.result.classes), 50);
        assert_eq!(back.compliance, r.compliance);
    }

    #[test]
    fn text_has_the_report_sections() {
        let t = report().to_text();
        for s in [
            "Results",
            "priority 1",
            "http 503: 1",
            "SLA compliance",
            "Comparison",
            "+40.0%",
        ] {
            assert!(t.contains(s), "missing {s} in\n{t}");
        }
    }

    #[test]
    fn html_is_self_contained_with_plots() {
        let h = report().to_html();
        assert!(h.starts_with("<!DOCTYPE html>"));
        assert!(h.contains("<svg"));
        assert!(h.contains("Latency by percentile"));
        assert!(h.contains("Latency over time"));
        assert!(!h.contains("src=") && !h.contains("<link"));
        assert!(!h.contains("<script"));
    }

    #[test]
    fn improvement_is_signed_by_direction() {
        let t = improvement("throughput", vec![100.0], vec![120.0], true);
        assert!((t.improvement_pct - 20.0).abs() < 1e-9);
        let l = improvement("p99", vec![10.0, 10.0], vec![5.0, 5.0], false);
        assert!((l.improvement_pct - 50.0).abs() < 1e-9);
        assert_eq!(l.ci95_pct, 0.0);
    }
}
