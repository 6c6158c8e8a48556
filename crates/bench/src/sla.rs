//! The service-level agreement a run is judged against, and the verdict.
//!
//! An SLA file (TOML) holds the thresholds of seed-requirements.md
//! ("Benchmarks and SLA reports"): p50 ≤ 50 ms, p95 ≤ 80, p99 ≤ 100,
//! max ≤ 200, ≥ 50 requests/s, errors ≤ 1 % — the thresholds, checks,
//! health and advice of `tickserve_telemetry::sla`, which the server's
//! `/v2/sla` applies too. Any field may be left out
//! (the default stays); `[classes."priority N"]` tables override fields for
//! one priority class. [`evaluate`] checks a run's statistics: every
//! threshold over all requests, plus every overridden threshold on its
//! class, each with a recommendation when it fails; the share of passed
//! checks gives the health (healthy ≥ 90 %, warning ≥ 70 %, else critical)
//! and the process exit code.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use tickserve_telemetry::sla::{Check, Compliance, Health, Thresholds, recommendation};

use crate::stats::{GoodputLimits, RunStats};

/// Exit code of a run whose SLA verdict is "not compliant".
pub const EXIT_SLA_FAILED: u8 = 3;

/// Per-class overrides: only the fields given are checked on the class.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassOverride {
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub min_throughput_rps: Option<f64>,
    pub max_error_rate: Option<f64>,
}

/// The SLA file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "SlaFile")]
pub struct Sla {
    #[serde(flatten)]
    pub thresholds: Thresholds,
    /// Keyed by class label: `"priority 1"` … `"priority 5"`, `"default"`.
    #[serde(default)]
    pub classes: BTreeMap<String, ClassOverride>,
}

// A file may give any subset of the thresholds: read through a helper of
// options, then fill in the defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SlaFile {
    p50_ms: Option<f64>,
    p95_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
    min_throughput_rps: Option<f64>,
    max_error_rate: Option<f64>,
    #[serde(default)]
    classes: BTreeMap<String, ClassOverride>,
}

impl Sla {
    /// Parses an SLA file's text.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

impl From<SlaFile> for Sla {
    fn from(f: SlaFile) -> Self {
        let d = Thresholds::default();
        Self {
            thresholds: Thresholds {
                p50_ms: f.p50_ms.unwrap_or(d.p50_ms),
                p95_ms: f.p95_ms.unwrap_or(d.p95_ms),
                p99_ms: f.p99_ms.unwrap_or(d.p99_ms),
                max_ms: f.max_ms.unwrap_or(d.max_ms),
                min_throughput_rps: f.min_throughput_rps.unwrap_or(d.min_throughput_rps),
                max_error_rate: f.max_error_rate.unwrap_or(d.max_error_rate),
            },
            classes: f.classes,
        }
    }
}

impl Sla {
    /// The thresholds that apply to `class` (the defaults with its
    /// overrides).
    pub fn thresholds_for(&self, class: &str) -> Thresholds {
        let mut t = self.thresholds;
        if let Some(o) = self.classes.get(class) {
            t.p50_ms = o.p50_ms.unwrap_or(t.p50_ms);
            t.p95_ms = o.p95_ms.unwrap_or(t.p95_ms);
            t.p99_ms = o.p99_ms.unwrap_or(t.p99_ms);
            t.max_ms = o.max_ms.unwrap_or(t.max_ms);
            t.min_throughput_rps = o.min_throughput_rps.unwrap_or(t.min_throughput_rps);
            t.max_error_rate = o.max_error_rate.unwrap_or(t.max_error_rate);
        }
        t
    }

    /// Goodput counts a success within its class's `max_ms`.
    pub fn goodput_limits(&self) -> GoodputLimits {
        GoodputLimits {
            default_ms: Some(self.thresholds.max_ms),
            classes: self
                .classes
                .iter()
                .filter_map(|(class, o)| o.max_ms.map(|ms| (class.clone(), ms)))
                .collect(),
        }
    }
}

/// 0 when every check passed, [`EXIT_SLA_FAILED`] otherwise.
pub fn exit_code(compliance: &Compliance) -> u8 {
    if compliance.compliant {
        0
    } else {
        EXIT_SLA_FAILED
    }
}

/// Checks `stats` against `sla`.
pub fn evaluate(stats: &RunStats, sla: &Sla) -> Compliance {
    let mut checks = Vec::new();
    let mut add = |scope: &str, metric: &str, measured: f64, threshold: f64, at_most: bool| {
        checks.push(Check::new(scope, metric, measured, threshold, at_most));
    };
    let t = sla.thresholds;
    let o = &stats.overall;
    add("overall", "p50", o.latency_ms.median, t.p50_ms, true);
    add("overall", "p95", o.latency_ms.p95, t.p95_ms, true);
    add("overall", "p99", o.latency_ms.p99, t.p99_ms, true);
    add("overall", "max", o.latency_ms.max, t.max_ms, true);
    add(
        "overall",
        "throughput",
        o.throughput_rps,
        t.min_throughput_rps,
        false,
    );
    add(
        "overall",
        "error_rate",
        o.error_rate,
        t.max_error_rate,
        true,
    );
    for (class, ov) in &sla.classes {
        let Some(c) = stats.classes.get(class) else {
            continue;
        };
        let l = &c.latency_ms;
        let pairs = [
            ("p50", ov.p50_ms, l.median, true),
            ("p95", ov.p95_ms, l.p95, true),
            ("p99", ov.p99_ms, l.p99, true),
            ("max", ov.max_ms, l.max, true),
            ("throughput", ov.min_throughput_rps, c.throughput_rps, false),
            ("error_rate", ov.max_error_rate, c.error_rate, true),
        ];
        for (metric, threshold, measured, at_most) in pairs {
            if let Some(threshold) = threshold {
                add(class, metric, measured, threshold, at_most);
            }
        }
    }
    Compliance::from_checks(checks)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::stats::{ClassStats, LatencySummary};

    fn stats(p50: f64, p95: f64, p99: f64, max: f64, rps: f64, err: f64) -> RunStats {
        RunStats {
            duration_s: 1.0,
            overall: ClassStats {
                throughput_rps: rps,
                error_rate: err,
                latency_ms: LatencySummary {
                    median: p50,
                    p95,
                    p99,
                    max,
                    ..LatencySummary::default()
                },
                ..ClassStats::default()
            },
            classes: BTreeMap::new(),
        }
    }

    #[test]
    fn defaults_are_the_seed_thresholds_and_files_override_them() {
        let sla = Sla::parse("").unwrap();
        assert_eq!(sla, Sla::default());
        let sla = Sla::parse("p99_ms = 20\n[classes.\"priority 1\"]\nmax_ms = 10\n").unwrap();
        assert_eq!(sla.thresholds.p99_ms, 20.0);
        assert_eq!(sla.thresholds.p50_ms, 50.0);
        assert_eq!(sla.thresholds_for("priority 1").max_ms, 10.0);
        assert_eq!(sla.thresholds_for("priority 1").p99_ms, 20.0);
        assert_eq!(sla.thresholds_for("priority 2").max_ms, 200.0);
        assert!(Sla::parse("p99 = 3").is_err(), "unknown keys are refused");
        let limits = sla.goodput_limits();
        assert_eq!(limits.for_class("priority 1"), Some(10.0));
        assert_eq!(limits.for_class("priority 2"), Some(200.0));
    }

    #[test]
    fn all_checks_pass_is_healthy_and_exit_zero() {
        let c = evaluate(&stats(10.0, 20.0, 30.0, 40.0, 100.0, 0.0), &Sla::default());
        assert!(c.compliant);
        assert_eq!((c.passed, c.total), (6, 6));
        assert_eq!(c.health, Health::Healthy);
        assert_eq!(exit_code(&c), 0);
        assert!(c.recommendations.is_empty());
    }

    #[test]
    fn boundaries_pass_and_one_failure_of_six_is_a_warning() {
        // Exactly at the thresholds passes; max 201 fails: 5/6 = 83 %.
        let c = evaluate(
            &stats(50.0, 80.0, 100.0, 201.0, 50.0, 0.01),
            &Sla::default(),
        );
        assert!(!c.compliant);
        assert_eq!((c.passed, c.total), (5, 6));
        assert_eq!(c.health, Health::Warning);
        assert_eq!(exit_code(&c), EXIT_SLA_FAILED);
        assert_eq!(c.recommendations.len(), 1);
        assert!(c.recommendations[0].starts_with("[overall max]"));
    }

    #[test]
    fn two_failures_of_six_is_critical() {
        // 4/6 = 66.7 % < 70 %.
        let c = evaluate(
            &stats(10.0, 20.0, 300.0, 400.0, 100.0, 0.0),
            &Sla::default(),
        );
        assert_eq!((c.passed, c.total), (4, 6));
        assert_eq!(c.health, Health::Critical);
    }

    #[test]
    fn health_thresholds_are_inclusive() {
        assert_eq!(Health::from_pass_ratio(1.0), Health::Healthy);
        assert_eq!(Health::from_pass_ratio(0.9), Health::Healthy);
        assert_eq!(Health::from_pass_ratio(0.89), Health::Warning);
        assert_eq!(Health::from_pass_ratio(0.7), Health::Warning);
        assert_eq!(Health::from_pass_ratio(0.69), Health::Critical);
        assert_eq!(Health::from_pass_ratio(0.0), Health::Critical);
    }

    #[test]
    fn class_overrides_add_checks_on_that_class() {
        let sla =
            Sla::parse("[classes.\"priority 1\"]\np99_ms = 5\nmax_error_rate = 0.0\n").unwrap();
        let mut s = stats(10.0, 20.0, 30.0, 40.0, 100.0, 0.0);
        let mut p1 = s.overall.clone();
        p1.latency_ms.p99 = 7.0;
        s.classes.insert("priority 1".into(), p1);
        let c = evaluate(&s, &sla);
        assert_eq!(c.total, 8);
        assert_eq!(c.passed, 7);
        let failed: Vec<_> = c.checks.iter().filter(|c| !c.passed).collect();
        assert_eq!(failed[0].scope, "priority 1");
        assert_eq!(failed[0].metric, "p99");
        assert!(failed[0].recommendation.is_some());
    }
}
