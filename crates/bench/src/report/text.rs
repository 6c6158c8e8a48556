//! The text report (stdout).

use std::fmt::Write as _;

use super::{Report, latency_rows, mean, mixed_rows, open_loop_cells, ratio_text, target_text};
use crate::mixed::MixedReport;
use crate::stats::RunStats;

/// The text report.
pub(super) fn render(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "tickserve bench {} — {}", r.mode, r.target);
    let _ = writeln!(o, "{}", "=".repeat(60));
    if let Some(m) = &r.mixed {
        mixed_text(&mut o, m);
    }
    if let Some(s) = &r.streams {
        crate::streams::text(&mut o, s);
    }
    let title = if r.mixed.is_some() {
        "Results, both classes together"
    } else if r.streams.is_some() {
        "Results, stream ticks"
    } else {
        "Results"
    };
    section(&mut o, title, &r.result);
    if let Some(s) = &r.stress {
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
    if let Some(c) = &r.compare {
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
    let c = &r.compliance;
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

fn section(o: &mut String, title: &str, r: &RunStats) {
    let _ = writeln!(o, "\n{title} ({:.1} s)", r.duration_s);
    const WIDTHS: [usize; 14] = [12, 8, 7, 9, 9, 8, 8, 8, 8, 8, 8, 8, 8, 8];
    let header = [
        "class", "requests", "err %", "req/s", "goodput", "mean", "p50", "p90", "p95", "p99",
        "p99.9", "min", "max", "std",
    ];
    table_line(o, &header, 1, &WIDTHS);
    for row in latency_rows(r, r.classes.len() > 1) {
        table_line(o, &row, 1, &WIDTHS);
    }
    let _ = writeln!(
        o,
        "  (latencies in ms; goodput = req/s within the SLA's max latency)"
    );
    if let Some([p50, p99, max, late]) = open_loop_cells(r) {
        let _ = writeln!(
            o,
            "  open loop: latency above is from the intended send time (coordinated-omission corrected)\n  from the actual send time: p50 {p50}  p99 {p99}  max {max} ms; late sends: {late}"
        );
    }
    if !r.overall.errors_by_reason.is_empty() {
        let _ = writeln!(o, "  errors by reason:");
        for (reason, n) in &r.overall.errors_by_reason {
            let _ = writeln!(o, "    {reason}: {n}");
        }
    }
}

/// One line of a table: two spaces, then each cell padded to its width,
/// the first `left` cells to the left, the others to the right.
fn table_line(o: &mut String, cells: &[impl std::fmt::Display], left: usize, widths: &[usize]) {
    o.push(' ');
    for (i, (cell, &w)) in cells.iter().zip(widths).enumerate() {
        let _ = if i < left {
            write!(o, " {cell:<w$}")
        } else {
            write!(o, " {cell:>w$}")
        };
    }
    o.push('\n');
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
    const WIDTHS: [usize; 12] = [17, 11, 8, 8, 6, 6, 6, 9, 9, 9, 8, 8];
    let header = [
        "phase", "class", "requests", "200", "429", "503", "other", "req/s", "rows/s", "goodput",
        "p50 ms", "p99 ms",
    ];
    table_line(o, &header, 2, &WIDTHS);
    for row in mixed_rows(m) {
        table_line(o, &row, 2, &WIDTHS);
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
