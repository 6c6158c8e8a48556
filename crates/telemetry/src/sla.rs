//! The service-level agreement both the server's live view (`/v2/sla`) and
//! `tickserve bench` judge latency by: the thresholds of seed-requirements.md
//! ("Benchmarks and SLA reports": p50 ≤ 50 ms, p95 ≤ 80, p99 ≤ 100,
//! max ≤ 200, ≥ 50 requests/s, errors ≤ 1 %), one check per threshold, the
//! health from the share of checks passed (healthy ≥ 90 %, warning ≥ 70 %,
//! else critical) and what to try when a check fails. One module, so a run
//! measured by the bench and the server's own window give the same verdict
//! in the same words.

use serde::{Deserialize, Serialize};

/// Thresholds; latencies in milliseconds, the error rate as a fraction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub min_throughput_rps: f64,
    pub max_error_rate: f64,
}

impl Thresholds {
    /// The design document's SLA.
    pub const SEED: Thresholds = Thresholds {
        p50_ms: 50.0,
        p95_ms: 80.0,
        p99_ms: 100.0,
        max_ms: 200.0,
        min_throughput_rps: 50.0,
        max_error_rate: 0.01,
    };
}

impl Default for Thresholds {
    fn default() -> Self {
        Self::SEED
    }
}

/// The dashboard's alert thresholds (the design document's dashboard
/// configuration).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Alerts {
    pub p99_ms: f64,
    pub error_percent: f64,
    pub cpu_percent: f64,
    pub gpu_percent: f64,
}

pub const ALERTS: Alerts = Alerts {
    p99_ms: 100.0,
    error_percent: 1.0,
    cpu_percent: 90.0,
    gpu_percent: 85.0,
};

/// Overall health from the share of checks passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Warning,
    Critical,
}

impl Health {
    /// healthy ≥ 90 % of checks passed, warning ≥ 70 %, else critical.
    pub fn from_pass_ratio(ratio: f64) -> Self {
        if ratio >= 0.9 {
            Health::Healthy
        } else if ratio >= 0.7 {
            Health::Warning
        } else {
            Health::Critical
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

/// One threshold against one measured value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// `"overall"` or a class label.
    pub scope: String,
    /// `p50`, `p95`, `p99`, `max`, `throughput`, `error_rate`.
    pub metric: String,
    pub measured: f64,
    pub threshold: f64,
    /// `"<="` or `">="`.
    pub op: String,
    pub passed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recommendation: Option<String>,
}

impl Check {
    /// `measured` against `threshold`: at most it when `at_most`, else at
    /// least it; a failed check carries [`recommendation`]'s advice.
    pub fn new(scope: &str, metric: &str, measured: f64, threshold: f64, at_most: bool) -> Self {
        let passed = if at_most {
            measured <= threshold
        } else {
            measured >= threshold
        };
        Check {
            scope: scope.to_owned(),
            metric: metric.to_owned(),
            measured,
            threshold,
            op: if at_most { "<=" } else { ">=" }.to_owned(),
            passed,
            recommendation: (!passed).then(|| recommendation(metric).to_owned()),
        }
    }

    /// The latency and error-rate checks of one scope: latencies only when
    /// a request succeeded, the error rate when any request finished.
    pub fn latency_and_errors(scope: &str, figures: &LatencyFigures, t: &Thresholds) -> Vec<Check> {
        let mut checks = Vec::new();
        if figures.ok > 0 {
            checks.push(Check::new(scope, "p50", figures.p50_ms, t.p50_ms, true));
            checks.push(Check::new(scope, "p95", figures.p95_ms, t.p95_ms, true));
            checks.push(Check::new(scope, "p99", figures.p99_ms, t.p99_ms, true));
            checks.push(Check::new(scope, "max", figures.max_ms, t.max_ms, true));
        }
        if figures.requests > 0 {
            checks.push(Check::new(
                scope,
                "error_rate",
                figures.error_rate,
                t.max_error_rate,
                true,
            ));
        }
        checks
    }
}

/// What [`Check::latency_and_errors`] reads of a scope's measurements.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LatencyFigures {
    pub requests: u64,
    pub ok: u64,
    pub error_rate: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The verdict on a set of checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Compliance {
    pub compliant: bool,
    pub passed: usize,
    pub total: usize,
    pub pass_ratio: f64,
    pub health: Health,
    pub checks: Vec<Check>,
    pub recommendations: Vec<String>,
}

impl Compliance {
    /// The verdict on `checks`: compliant when all passed (or there are
    /// none), the health from the share passed, one recommendation per
    /// failed scope and metric.
    pub fn from_checks(checks: Vec<Check>) -> Self {
        let total = checks.len();
        let passed = checks.iter().filter(|c| c.passed).count();
        let pass_ratio = if total == 0 {
            1.0
        } else {
            passed as f64 / total as f64
        };
        let mut recommendations: Vec<String> = Vec::new();
        for c in checks.iter().filter(|c| !c.passed) {
            let advice = c
                .recommendation
                .clone()
                .unwrap_or_else(|| recommendation(&c.metric).to_owned());
            let text = format!("[{} {}] {advice}", c.scope, c.metric);
            if !recommendations.contains(&text) {
                recommendations.push(text);
            }
        }
        Compliance {
            compliant: passed == total,
            passed,
            total,
            pass_ratio,
            health: Health::from_pass_ratio(pass_ratio),
            checks,
            recommendations,
        }
    }
}

/// What to try when a metric misses its threshold.
pub fn recommendation(metric: &str) -> &'static str {
    match metric {
        "p50" => {
            "Median latency too high: the engine itself is slow for this load. Lower the class's max_queue_delay in the model's config, add engine instances (CPU cores), or scale out replicas."
        }
        "p95" | "p99" => {
            "Tail latency too high: requests wait in the queue. Lower max_batch_size or the class's max_queue_delay, give latency-critical traffic a higher priority, enable the result cache for repeated inputs, or add replicas."
        }
        "max" => {
            "Worst-case latency too high: look for stalls (GC, swapping, cold start without warm-up, noisy neighbours); set a queue timeout so requests fail fast instead of waiting, and check warm-up is enabled."
        }
        "throughput" => {
            "Throughput too low: raise max_batch_size so batches fill, add engine instances, enable the result cache, or scale out replicas (autoscale on request rate)."
        }
        "error_rate" => {
            "Too many errors: read the errors by reason. 429s mean admission control refused requests (a full priority queue, a deadline the queue ahead cannot meet, or a lower class shed for a higher one: add capacity or raise max_queue_size), 503s mean requests expired in the queue (raise default_timeout or add capacity), timeouts mean the server is overloaded, 4xx mean the client's requests are malformed."
        }
        _ => "Investigate this metric.",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_share_of_checks_passed() {
        let checks = |passed: usize, failed: usize| {
            (0..passed)
                .map(|_| Check::new("overall", "p50", 1.0, 50.0, true))
                .chain((0..failed).map(|_| Check::new("overall", "p99", 500.0, 100.0, true)))
                .collect::<Vec<_>>()
        };
        let all = Compliance::from_checks(checks(10, 0));
        assert!(all.compliant);
        assert_eq!(all.health, Health::Healthy);
        let most = Compliance::from_checks(checks(8, 2));
        assert!(!most.compliant);
        assert_eq!(most.health, Health::Warning);
        // One recommendation per failed scope and metric, not per check.
        assert_eq!(most.recommendations.len(), 1);
        assert!(most.recommendations[0].starts_with("[overall p99] Tail latency"));
        assert_eq!(
            Compliance::from_checks(checks(6, 4)).health,
            Health::Critical
        );
        assert!(Compliance::from_checks(Vec::new()).compliant);
    }

    #[test]
    fn throughput_is_a_floor_and_latencies_are_ceilings() {
        let low = Check::new("overall", "throughput", 10.0, 50.0, false);
        assert!(!low.passed);
        assert_eq!(low.op, ">=");
        assert!(low.recommendation.is_some());
        let fast = Check::new("overall", "p99", 10.0, 100.0, true);
        assert!(fast.passed && fast.recommendation.is_none());
        let none = Check::latency_and_errors(
            "x",
            &LatencyFigures {
                requests: 3,
                ..LatencyFigures::default()
            },
            &Thresholds::SEED,
        );
        // Three failures and no success: only the error rate is checked.
        assert_eq!(none.len(), 1);
        assert_eq!(none[0].metric, "error_rate");
    }
}
