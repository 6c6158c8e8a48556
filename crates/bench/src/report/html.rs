//! The HTML report: one self-contained file, tables and inline SVG.

use std::fmt::Write as _;

use super::svg::{bar_chart, esc, line_chart};
use super::{
    Report, StressStep, latency_rows, mean, mixed_rows, open_loop_cells, ratio_text, target_text,
};
use crate::mixed::MixedReport;
use crate::stats::{ClassStats, RunStats, TimelinePoint};

/// A stress chart: its title, y axis, series name and a step's value.
type StepMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&StressStep) -> f64,
);

/// One HTML file with inline SVG plots.
pub(super) fn render(r: &Report) -> String {
    let mut body = String::new();
    let c = &r.compliance;
    let _ = write!(
        body,
        "<h1>tickserve bench {} — {}</h1><p class=\"health {}\">SLA: <b>{}</b>, {} of {} checks passed — health <b>{}</b></p>",
        esc(&r.mode),
        esc(&r.target),
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
    if let Some(m) = &r.mixed {
        mixed_html(&mut body, m);
    }
    body.push_str("<h2>Latency per class</h2>");
    body.push_str(&stats_table(&r.result));
    let series: Vec<(String, Vec<(f64, f64)>)> =
        std::iter::once(("all".to_owned(), r.result.overall.cdf.clone()))
            .chain(
                r.result
                    .classes
                    .iter()
                    .filter(|_| r.result.classes.len() > 1)
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
    body.push_str(&cdf_chart("Latency by percentile (CDF)", &series));
    body.push_str(&timeline_chart(&r.result));
    if let Some(s) = &r.stress {
        let _ = write!(
            body,
            "<h2>Stress by {}</h2><p>Stopped: {}. Last step within SLA: {}.</p>",
            esc(&s.by),
            esc(&s.stopped_because),
            s.last_compliant_level
                .map_or("none".to_owned(), |l| l.to_string())
        );
        // One chart per metric against the stepped level.
        let metrics: [StepMetric; 2] = [
            ("Throughput", "requests/s", "throughput", |st| {
                st.stats.overall.throughput_rps
            }),
            ("p99 latency", "p99 ms", "p99", |st| {
                st.stats.overall.latency_ms.p99
            }),
        ];
        for (title, y, name, value) in metrics {
            let points = s.steps.iter().map(|st| (st.level, value(st))).collect();
            body.push_str(&line_chart(
                &format!("{title} against {}", s.by),
                &s.by,
                y,
                &[(name.to_owned(), points)],
                None,
            ));
        }
    }
    if let Some(cmp) = &r.compare {
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
        esc(&serde_json::to_string_pretty(&r.settings).unwrap_or_default())
    );
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>tickserve bench {}</title><style>{CSS}</style></head><body>{body}</body></html>\n",
        esc(&r.mode)
    )
}

const CSS: &str = "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}tr.fail td{background:#fdd}.health.healthy{color:#070}.health.warning{color:#a60}.health.critical{color:#c00}svg{background:#fafafa;border:1px solid #ddd;margin:.5em 0}pre{white-space:pre-wrap;word-break:break-all}";

fn nines(p: f64) -> f64 {
    let rest = (1.0 - p / 100.0).max(1e-6);
    -rest.log10()
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
    for row in mixed_rows(m) {
        table_row(body, &row);
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
    body.push_str(&cdf_chart(
        "Foreground latency alone and under the flood (CDF)",
        &series,
    ));
}

/// Latency by percentile, the percentiles on the scale of nines.
fn cdf_chart(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    line_chart(
        title,
        "percentile (0, 90, 99, 99.9, … : log scale of nines)",
        "latency ms",
        series,
        Some(&NINES_TICKS),
    )
}

const NINES_TICKS: [(f64, &str); 5] = [
    (0.0, "0"),
    (1.0, "90"),
    (2.0, "99"),
    (3.0, "99.9"),
    (4.0, "99.99"),
];

/// p50 and p99 per second of the run (all requests) and p99 per class.
fn timeline_chart(r: &RunStats) -> String {
    let points = |c: &ClassStats, pick: fn(&TimelinePoint) -> Option<f64>| -> Vec<(f64, f64)> {
        c.timeline
            .iter()
            .filter_map(|p| pick(p).map(|v| (p.t_s, v)))
            .collect()
    };
    let mut series = vec![
        ("p50, all".to_owned(), points(&r.overall, |p| p.p50_ms)),
        ("p99, all".to_owned(), points(&r.overall, |p| p.p99_ms)),
    ];
    if r.classes.len() > 1 {
        for (name, c) in &r.classes {
            series.push((format!("p99, {name}"), points(c, |p| p.p99_ms)));
        }
    }
    line_chart(
        "Latency over time",
        "seconds since the start (one point per second of requests due)",
        "latency ms",
        &series,
        None,
    )
}

/// One table row, its cells escaped.
fn table_row(t: &mut String, cells: &[String]) {
    t.push_str("<tr>");
    for cell in cells {
        let _ = write!(t, "<td>{}</td>", esc(cell));
    }
    t.push_str("</tr>");
}

fn stats_table(r: &RunStats) -> String {
    let mut t = String::from(
        "<table><tr><th>class</th><th>requests</th><th>errors %</th><th>req/s</th><th>goodput</th><th>mean</th><th>p50</th><th>p90</th><th>p95</th><th>p99</th><th>p99.9</th><th>min</th><th>max</th><th>std</th></tr>",
    );
    for row in latency_rows(r, true) {
        table_row(&mut t, &row);
    }
    t.push_str("</table><p>Latencies in ms.");
    if let Some([p50, p99, max, late]) = open_loop_cells(r) {
        let _ = write!(
            t,
            " Open loop: latencies are from the intended send time (coordinated-omission corrected). From the actual send time: p50 {p50}, p99 {p99}, max {max} ms. Late sends: {late}."
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
