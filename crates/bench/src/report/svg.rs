//! The SVG charts of the HTML report, drawn by hand: no scripts, no
//! network.

use std::fmt::Write as _;

use super::{Improvement, mean};

pub(super) fn esc(s: &str) -> String {
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
pub(super) fn line_chart(
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
pub(super) fn bar_chart(items: &[Improvement]) -> String {
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
