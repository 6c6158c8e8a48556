//! The report of a bench run in three forms: text for people (the
//! sections of seed-requirements.md's report), JSON with every number
//! under a versioned schema for machines, and one self-contained HTML file
//! with SVG plots drawn here (no scripts, no network).

use std::collections::BTreeMap;
use std::fmt::Write as _;

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
    /// `latency`, `load`, `rate`, `stress`, `compare`, `mixed`.
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
}

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "tickserve bench {} — {}", self.mode, self.target);
        let _ = writeln!(o, "{}", "=".repeat(60));
        if let Some(m) = &self.mixed {
            mixed_text(&mut o, m);
        }
        section(&mut o, "Results", &self.result);
        if let Some(s) = &self.stress {
            let _ = writeln!(o, "\nStress test (by {})", s.by);
            let _ = writeln!(
                o,
                "  {:>10} {:>10} {:>10} {:>10} {:>8}  SLA",
                s.by, "req/s", "p50 ms", "p99 ms", "errors"
            );
            for step in &s.steps {
                let st = &step.stats.overall;
                let _ = writeln!(
                    o,
                    "  {:>10} {:>10.1} {:>10.2} {:>10.2} {:>7.2}%  {}",
                    step.level,
                    st.throughput_rps,
                    st.latency_ms.median,
                    st.latency_ms.p99,
                    st.error_rate * 100.0,
                    if step.compliance.compliant {
                        "met"
                    } else {
                        "missed"
                    }
                );
            }
            let _ = writeln!(o, "  stopped: {}", s.stopped_because);
            match s.last_compliant_level {
                Some(l) => {
                    let _ = writeln!(o, "  last step within SLA: {} {l}", s.by);
                }
                None => {
                    let _ = writeln!(o, "  no step met the SLA");
                }
            }
        }
        if let Some(c) = &self.compare {
            let _ = writeln!(
                o,
                "\nComparison ({} workload, {} repeats)\n  baseline:  {}\n  candidate: {}",
                c.workload, c.repeats, c.baseline, c.candidate
            );
            for i in &c.improvements {
                let _ = writeln!(
                    o,
                    "  {:<16} baseline {:>9.2}  candidate {:>9.2}  improvement {:+.1}% ± {:.1}% (95% CI)",
                    i.metric,
                    mean(&i.baseline),
                    mean(&i.candidate),
                    i.improvement_pct,
                    i.ci95_pct
                );
            }
        }
        let c = &self.compliance;
        let _ = writeln!(
            o,
            "\nSLA compliance: {} ({} of {} checks passed, {:.0}%) — health: {}",
            if c.compliant {
                "COMPLIANT"
            } else {
                "NOT COMPLIANT"
            },
            c.passed,
            c.total,
            c.pass_ratio * 100.0,
            c.health.as_str()
        );
        for check in &c.checks {
            let _ = writeln!(
                o,
                "  [{}] {:<12} {:<21} {:>10.3} {} {}",
                if check.passed { "PASS" } else { "FAIL" },
                check.scope,
                check.metric,
                check.measured,
                check.op,
                check.threshold
            );
        }
        if !c.recommendations.is_empty() {
            let _ = writeln!(o, "\nRecommendations");
            for r in &c.recommendations {
                let _ = writeln!(o, "  - {r}");
            }
        }
        o
    }

    /// One HTML file with inline SVG plots.
    pub fn to_html(&self) -> String {
        let mut body = String::new();
        let c = &self.compliance;
        let _ = write!(
            body,
            "<h1>tickserve bench {} — {}</h1><p class=\"health {}\">SLA: <b>{}</b>, {} of {} checks passed — health <b>{}</b></p>",
            esc(&self.mode),
            esc(&self.target),
            c.health.as_str(),
            if c.compliant {
                "compliant"
            } else {
                "not compliant"
            },
            c.passed,
            c.total,
            c.health.as_str()
        );
        if let Some(m) = &self.mixed {
            mixed_html(&mut body, m);
        }
        body.push_str("<h2>Latency per class</h2>");
        body.push_str(&stats_table(&self.result));
        let series: Vec<(String, Vec<(f64, f64)>)> =
            std::iter::once(("all".to_owned(), self.result.overall.cdf.clone()))
                .chain(
                    self.result
                        .classes
                        .iter()
                        .filter(|_| self.result.classes.len() > 1)
                        .map(|(k, v)| (k.clone(), v.cdf.clone())),
                )
                .map(|(k, pts)| {
                    // x: percentile on the "nines" scale, log10(1/(1-p)).
                    let pts = pts
                        .into_iter()
                        .map(|(p, ms)| (nines(p), ms))
                        .collect::<Vec<_>>();
                    (k, pts)
                })
                .collect();
        body.push_str(&line_chart(
            "Latency by percentile (CDF)",
            "percentile (0, 90, 99, 99.9, … : log scale of nines)",
            "latency ms",
            &series,
            Some(&NINES_TICKS),
        ));
        if let Some(s) = &self.stress {
            let rps: Vec<(f64, f64)> = s
                .steps
                .iter()
                .map(|st| (st.level, st.stats.overall.throughput_rps))
                .collect();
            let p99: Vec<(f64, f64)> = s
                .steps
                .iter()
                .map(|st| (st.level, st.stats.overall.latency_ms.p99))
                .collect();
            let _ = write!(
                body,
                "<h2>Stress by {}</h2><p>Stopped: {}. Last step within SLA: {}.</p>",
                esc(&s.by),
                esc(&s.stopped_because),
                s.last_compliant_level
                    .map_or("none".to_owned(), |l| l.to_string())
            );
            body.push_str(&line_chart(
                &format!("Throughput against {}", s.by),
                &s.by,
                "requests/s",
                &[("throughput".to_owned(), rps)],
                None,
            ));
            body.push_str(&line_chart(
                &format!("p99 latency against {}", s.by),
                &s.by,
                "p99 ms",
                &[("p99".to_owned(), p99)],
                None,
            ));
        }
        if let Some(cmp) = &self.compare {
            let _ = write!(
                body,
                "<h2>Compare</h2><p>baseline: {}<br>candidate: {}<br>{} repeats of the {} workload</p><table><tr><th>metric</th><th>baseline</th><th>candidate</th><th>improvement</th></tr>",
                esc(&cmp.baseline),
                esc(&cmp.candidate),
                cmp.repeats,
                esc(&cmp.workload)
            );
            for i in &cmp.improvements {
                let _ = write!(
                    body,
                    "<tr><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:+.1}% ± {:.1}%</td></tr>",
                    esc(&i.metric),
                    mean(&i.baseline),
                    mean(&i.candidate),
                    i.improvement_pct,
                    i.ci95_pct
                );
            }
            body.push_str("</table>");
            body.push_str(&bar_chart(&cmp.improvements));
        }
        body.push_str("<h2>SLA checks</h2><table><tr><th>scope</th><th>metric</th><th>measured</th><th>threshold</th><th>result</th></tr>");
        for ch in &c.checks {
            let _ = write!(
                body,
                "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{:.3}</td><td>{} {}</td><td>{}</td></tr>",
                if ch.passed { "pass" } else { "fail" },
                esc(&ch.scope),
                esc(&ch.metric),
                ch.measured,
                esc(&ch.op),
                ch.threshold,
                if ch.passed { "pass" } else { "FAIL" }
            );
        }
        body.push_str("</table>");
        if !c.recommendations.is_empty() {
            body.push_str("<h2>Recommendations</h2><ul>");
            for r in &c.recommendations {
                let _ = write!(body, "<li>{}</li>", esc(r));
            }
            body.push_str("</ul>");
        }
        let _ = write!(
            body,
            "<h2>Settings</h2><pre>{}</pre>",
            esc(&serde_json::to_string_pretty(&self.settings).unwrap_or_default())
        );
        format!(
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>tickserve bench {}</title><style>{CSS}</style></head><body>{body}</body></html>\n",
            esc(&self.mode)
        )
    }
}

const CSS: &str = "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}tr.fail td{background:#fdd}.health.healthy{color:#070}.health.warning{color:#a60}.health.critical{color:#c00}svg{background:#fafafa;border:1px solid #ddd;margin:.5em 0}pre{white-space:pre-wrap;word-break:break-all}";

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn nines(p: f64) -> f64 {
    let rest = (1.0 - p / 100.0).max(1e-6);
    -rest.log10()
}

fn section(o: &mut String, title: &str, r: &RunStats) {
    let _ = writeln!(o, "\n{title} ({:.1} s)", r.duration_s);
    let _ = writeln!(
        o,
        "  {:<12} {:>8} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "class",
        "requests",
        "err %",
        "req/s",
        "goodput",
        "mean",
        "p50",
        "p90",
        "p95",
        "p99",
        "p99.9",
        "min",
        "max",
        "std"
    );
    let mut rows: Vec<(&str, &ClassStats)> = vec![("all", &r.overall)];
    if r.classes.len() > 1 {
        rows.extend(r.classes.iter().map(|(k, v)| (k.as_str(), v)));
    }
    for (name, c) in rows {
        let l = &c.latency_ms;
        let _ = writeln!(
            o,
            "  {:<12} {:>8} {:>7.2} {:>9.1} {:>9.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            name,
            c.requests,
            c.error_rate * 100.0,
            c.throughput_rps,
            c.goodput_rps,
            l.mean,
            l.median,
            l.p90,
            l.p95,
            l.p99,
            l.p999,
            l.min,
            l.max,
            l.std
        );
    }
    let _ = writeln!(
        o,
        "  (latencies in ms; goodput = req/s within the SLA's max latency)"
    );
    if let Some(a) = &r.overall.actual_latency_ms {
        let _ = writeln!(
            o,
            "  open loop: latency above is from the intended send time (coordinated-omission corrected)\n  from the actual send time: p50 {:.2}  p99 {:.2}  max {:.2} ms; late sends: {}",
            a.median,
            a.p99,
            a.max,
            r.overall.late_sends.unwrap_or(0)
        );
    }
    if !r.overall.errors_by_reason.is_empty() {
        let _ = writeln!(o, "  errors by reason:");
        for (reason, n) in &r.overall.errors_by_reason {
            let _ = writeln!(o, "    {reason}: {n}");
        }
    }
}

/// The rows of a mixed run's table: phase, role, class.
fn mixed_rows(m: &MixedReport) -> Vec<(&str, &str, &PhaseClass)> {
    let mut rows = Vec::new();
    for p in &m.phases {
        if let Some(c) = &p.foreground {
            rows.push((p.name.as_str(), "foreground", c));
        }
        if let Some(c) = &p.background {
            rows.push((p.name.as_str(), "background", c));
        }
    }
    rows
}

fn target_text(t: Option<f64>) -> String {
    t.map_or("none".to_owned(), |ms| format!("{ms} ms"))
}

fn ratio_text(r: Option<f64>, unit: &str) -> String {
    r.map_or("n/a".to_owned(), |r| match unit {
        "%" => format!("{:.1} %", r * 100.0),
        _ => format!("{r:.2}{unit}"),
    })
}

fn mixed_text(o: &mut String, m: &MixedReport) {
    let (f, b, s, g) = (&m.foreground, &m.background, &m.summary, &m.goals);
    let _ = writeln!(
        o,
        "\nMixed workload\n  foreground: {} ({}, {} row(s)/request, target {})\n  background: {} ({}, {} row(s)/request, target {})",
        f.class,
        f.load,
        f.rows_per_request,
        target_text(f.target_ms),
        b.class,
        b.load,
        b.rows_per_request,
        target_text(b.target_ms)
    );
    let _ = writeln!(
        o,
        "  {:<17} {:<11} {:>8} {:>8} {:>6} {:>6} {:>6} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "phase",
        "class",
        "requests",
        "200",
        "429",
        "503",
        "other",
        "req/s",
        "rows/s",
        "goodput",
        "p50 ms",
        "p99 ms"
    );
    for (phase, role, c) in mixed_rows(m) {
        let n = &c.counts;
        let l = &c.stats.latency_ms;
        let _ = writeln!(
            o,
            "  {:<17} {:<11} {:>8} {:>8} {:>6} {:>6} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>8.2} {:>8.2}",
            phase,
            role,
            n.requests,
            n.ok,
            n.http_429,
            n.http_503,
            n.other,
            c.stats.throughput_rps,
            c.rows_per_s,
            c.stats.goodput_rps,
            l.median,
            l.p99
        );
    }
    let _ = writeln!(
        o,
        "  (goodput = successes/s within the class's target; foreground latency from the intended send time)"
    );
    let _ = writeln!(
        o,
        "  foreground p50/p99: {:.2}/{:.2} ms alone, {:.2}/{:.2} ms under the flood; p99 ratio {} (goal <= {}x, p99 <= {} ms)",
        s.fg_p50_alone_ms,
        s.fg_p99_alone_ms,
        s.fg_p50_flood_ms,
        s.fg_p99_flood_ms,
        ratio_text(s.fg_p99_ratio, "x"),
        g.max_fg_p99_ratio,
        g.max_fg_p99_ms
    );
    let _ = writeln!(
        o,
        "  background: {:.1} req/s ({:.1} rows/s) alone, {:.1} req/s ({:.1} rows/s) with the foreground; {} of alone (goal >= {:.0} %)",
        s.bg_rps_alone,
        s.bg_rows_per_s_alone,
        s.bg_rps_with_fg,
        s.bg_rows_per_s_with_fg,
        ratio_text(s.bg_throughput_ratio, "%"),
        g.min_bg_throughput_ratio * 100.0
    );
    let _ = writeln!(
        o,
        "  foreground errors other than 429: {} (goal 0)",
        s.fg_errors_not_429
    );
}

fn mixed_html(body: &mut String, m: &MixedReport) {
    let (f, b, s) = (&m.foreground, &m.background, &m.summary);
    let _ = write!(
        body,
        "<h2>Mixed workload</h2><p>Foreground: {} — {}, {} row(s)/request, target {}.<br>Background: {} — {}, {} row(s)/request, target {}.</p>",
        esc(&f.class),
        esc(&f.load),
        f.rows_per_request,
        target_text(f.target_ms),
        esc(&b.class),
        esc(&b.load),
        b.rows_per_request,
        target_text(b.target_ms)
    );
    body.push_str("<table><tr><th>phase</th><th>class</th><th>requests</th><th>200</th><th>429</th><th>503</th><th>other</th><th>req/s</th><th>rows/s</th><th>goodput</th><th>p50 ms</th><th>p99 ms</th></tr>");
    for (phase, role, c) in mixed_rows(m) {
        let n = &c.counts;
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.2}</td><td>{:.2}</td></tr>",
            esc(phase),
            role,
            n.requests,
            n.ok,
            n.http_429,
            n.http_503,
            n.other,
            c.stats.throughput_rps,
            c.rows_per_s,
            c.stats.goodput_rps,
            c.stats.latency_ms.median,
            c.stats.latency_ms.p99
        );
    }
    let _ = write!(
        body,
        "</table><p>Foreground p99 under the flood / alone: {:.2} / {:.2} ms = {}. Background throughput with the foreground / alone: {:.1} / {:.1} req/s = {}. Foreground errors other than 429: {}.</p>",
        s.fg_p99_flood_ms,
        s.fg_p99_alone_ms,
        ratio_text(s.fg_p99_ratio, "×"),
        s.bg_rps_with_fg,
        s.bg_rps_alone,
        ratio_text(s.bg_throughput_ratio, "%"),
        s.fg_errors_not_429
    );
    let series: Vec<(String, Vec<(f64, f64)>)> = m
        .phases
        .iter()
        .filter_map(|p| {
            p.foreground.as_ref().map(|c| {
                let pts = c.stats.cdf.iter().map(|&(q, ms)| (nines(q), ms)).collect();
                (format!("foreground, {}", p.name), pts)
            })
        })
        .collect();
    body.push_str(&line_chart(
        "Foreground latency alone and under the flood (CDF)",
        "percentile (0, 90, 99, 99.9, … : log scale of nines)",
        "latency ms",
        &series,
        Some(&NINES_TICKS),
    ));
}

const NINES_TICKS: [(f64, &str); 5] = [
    (0.0, "0"),
    (1.0, "90"),
    (2.0, "99"),
    (3.0, "99.9"),
    (4.0, "99.99"),
];

fn stats_table(r: &RunStats) -> String {
    let mut t = String::from(
        "<table><tr><th>class</th><th>requests</th><th>errors %</th><th>req/s</th><th>goodput</th><th>mean</th><th>p50</th><th>p90</th><th>p95</th><th>p99</th><th>p99.9</th><th>min</th><th>max</th><th>std</th></tr>",
    );
    let mut rows: Vec<(&str, &ClassStats)> = vec![("all", &r.overall)];
    rows.extend(r.classes.iter().map(|(k, v)| (k.as_str(), v)));
    for (name, c) in rows {
        let l = &c.latency_ms;
        let _ = write!(
            t,
            "<tr><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.1}</td><td>{:.1}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td></tr>",
            esc(name),
            c.requests,
            c.error_rate * 100.0,
            c.throughput_rps,
            c.goodput_rps,
            l.mean,
            l.median,
            l.p90,
            l.p95,
            l.p99,
            l.p999,
            l.min,
            l.max,
            l.std
        );
    }
    t.push_str("</table><p>Latencies in ms.");
    if let Some(a) = &r.overall.actual_latency_ms {
        let _ = write!(
            t,
            " Open loop: latencies are from the intended send time (coordinated-omission corrected). From the actual send time: p50 {:.2}, p99 {:.2}, max {:.2} ms. Late sends: {}.",
            a.median,
            a.p99,
            a.max,
            r.overall.late_sends.unwrap_or(0)
        );
    }
    t.push_str("</p>");
    if !r.overall.errors_by_reason.is_empty() {
        t.push_str("<p>Errors: ");
        let parts: Vec<String> = r
            .overall
            .errors_by_reason
            .iter()
            .map(|(k, v)| format!("{} × {v}", esc(k)))
            .collect();
        t.push_str(&parts.join(", "));
        t.push_str("</p>");
    }
    t
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const COLOURS: [&str; 7] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf",
];

const W: f64 = 760.0;
const H: f64 = 320.0;
const L: f64 = 70.0;
const R: f64 = 20.0;
const T: f64 = 30.0;
const B: f64 = 50.0;

/// An SVG line chart; `x_ticks` overrides the numeric x ticks.
fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    x_ticks: Option<&[(f64, &str)]>,
) -> String {
    let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if all.is_empty() {
        return format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"60\" role=\"img\"><title>{t}</title><text x=\"10\" y=\"35\" font-size=\"14\">{t}: no successful requests, nothing to plot</text></svg>",
            t = esc(title)
        );
    }
    let (mut x0, mut x1) = bounds(all.iter().map(|p| p.0));
    let (_, mut y1) = bounds(all.iter().map(|p| p.1));
    let y0 = 0.0;
    if let Some(t) = x_ticks {
        x0 = x0.min(t.first().map_or(0.0, |t| t.0));
        x1 = x1.max(x0 + 1e-9);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    y1 *= 1.05;
    let sx = |x: f64| L + (x - x0) / (x1 - x0) * (W - L - R);
    let sy = |y: f64| H - B - (y - y0) / (y1 - y0) * (H - T - B);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\"><title>{t}</title><text x=\"{cx}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">{t}</text>",
        t = esc(title),
        cx = W / 2.0
    );
    axes(&mut s, x_label, y_label);
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        let _ = write!(
            s,
            "<line x1=\"{L}\" x2=\"{}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"11\">{}</text>",
            W - R,
            L - 5.0,
            sy(y) + 4.0,
            fmt_num(y),
            py = sy(y)
        );
    }
    let ticks: Vec<(f64, String)> = match x_ticks {
        Some(t) => t
            .iter()
            .filter(|(x, _)| *x <= x1 + 1e-9)
            .map(|(x, l)| (*x, (*l).to_owned()))
            .collect(),
        None => (0..=5)
            .map(|i| {
                let x = x0 + (x1 - x0) * i as f64 / 5.0;
                (x, fmt_num(x))
            })
            .collect(),
    };
    for (x, label) in ticks {
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{}</text>",
            sx(x),
            H - B + 15.0,
            esc(&label)
        );
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        for &(x, y) in pts {
            let _ = write!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{colour}\"/>",
                sx(x),
                sy(y)
            );
        }
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"{colour}\">{}</text>",
            L + 10.0,
            T + 14.0 + 14.0 * i as f64,
            esc(name)
        );
    }
    s.push_str("</svg>");
    s
}

fn axes(s: &mut String, x_label: &str, y_label: &str) {
    let _ = write!(
        s,
        "<line x1=\"{L}\" y1=\"{T}\" x2=\"{L}\" y2=\"{yb}\" stroke=\"#333\"/><line x1=\"{L}\" y1=\"{yb}\" x2=\"{xr}\" y2=\"{yb}\" stroke=\"#333\"/><text x=\"{cx}\" y=\"{}\" text-anchor=\"middle\" font-size=\"12\">{}</text><text x=\"15\" y=\"{cy}\" text-anchor=\"middle\" font-size=\"12\" transform=\"rotate(-90 15 {cy})\">{}</text>",
        H - 12.0,
        esc(x_label),
        esc(y_label),
        yb = H - B,
        xr = W - R,
        cx = (L + W - R) / 2.0,
        cy = (T + H - B) / 2.0
    );
}

/// Before/after bars, one group per metric, each scaled to its own max.
fn bar_chart(items: &[Improvement]) -> String {
    if items.is_empty() {
        return String::new();
    }
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\"><title>Baseline against candidate</title><text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">Baseline (grey) against candidate (blue), mean of repeats</text>",
        W / 2.0
    );
    axes(&mut s, "metric", "value (own scale per metric)");
    let group = (W - L - R) / items.len() as f64;
    for (i, it) in items.iter().enumerate() {
        let (b, c) = (mean(&it.baseline), mean(&it.candidate));
        let top = b.max(c).max(1e-9);
        let gx = L + group * i as f64;
        let bw = group * 0.3;
        for (j, (v, colour)) in [(b, "#999"), (c, "#1f77b4")].into_iter().enumerate() {
            let h = v / top * (H - T - B - 20.0);
            let x = gx + group * 0.15 + bw * j as f64;
            let _ = write!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{h:.1}\" fill=\"{colour}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>",
                H - B - h,
                x + bw / 2.0,
                H - B - h - 3.0,
                fmt_num(v)
            );
        }
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{} ({:+.1}%)</text>",
            gx + group / 2.0,
            H - B + 15.0,
            esc(&it.metric),
            it.improvement_pct
        );
    }
    s.push_str("</svg>");
    s
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
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
