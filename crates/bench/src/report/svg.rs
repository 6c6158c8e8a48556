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
    // Round gridlines: the top of the y axis is the first tick at or above
    // the highest value.
    let y_ticks = nice_ticks(y0, y1, 5);
    y1 = y_ticks.last().copied().unwrap_or(y1).max(y1);
    let sx = |x: f64| L + (x - x0) / (x1 - x0) * (W - L - R);
    let sy = |y: f64| H - B - (y - y0) / (y1 - y0) * (H - T - B);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\"><title>{t}</title><text x=\"{cx}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">{t}</text>",
        t = esc(title),
        cx = W / 2.0
    );
    axes(&mut s, x_label, y_label);
    let y_step = y_ticks.get(1).map_or(1.0, |t| t - y_ticks[0]);
    for &y in &y_ticks {
        let _ = write!(
            s,
            "<line x1=\"{L}\" x2=\"{}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"#ddd\"/><line x1=\"{}\" x2=\"{L}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"#333\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"11\">{}</text>",
            W - R,
            L - 4.0,
            L - 6.0,
            sy(y) + 4.0,
            tick_label(y, y_step),
            py = sy(y)
        );
    }
    let ticks: Vec<(f64, String)> = match x_ticks {
        Some(t) => t
            .iter()
            .filter(|(x, _)| *x <= x1 + 1e-9)
            .map(|(x, l)| (*x, (*l).to_owned()))
            .collect(),
        None => {
            let ticks: Vec<f64> = nice_ticks(x0, x1, 6)
                .into_iter()
                .filter(|x| (x0 - 1e-9..=x1 + 1e-9).contains(x))
                .collect();
            let step = ticks.get(1).map_or(1.0, |t| t - ticks[0]);
            ticks
                .into_iter()
                .map(|x| (x, tick_label(x, step)))
                .collect()
        }
    };
    for (x, label) in ticks {
        let _ = write!(
            s,
            "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"#333\"/><text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{}</text>",
            H - B,
            H - B + 4.0,
            H - B + 16.0,
            esc(&label),
            px = sx(x)
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

/// Ticks at round values (1, 2, 2.5 or 5 × 10^k apart) from at or below
/// `lo` to at or above `hi`, about `n` intervals.
pub(super) fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).floor();
    let last = (hi / step).ceil();
    let count = ((last - first) as usize).min(100);
    (0..=count).map(|i| (first + i as f64) * step).collect()
}

/// A tick value with as many decimals as its step needs.
fn tick_label(v: f64, step: f64) -> String {
    // The fewest decimals that write the step exactly (2.5 → 1, 0.25 → 2).
    let decimals = (0..6)
        .find(|&d| {
            let scaled = step * 10f64.powi(d as i32);
            (scaled - scaled.round()).abs() < 1e-6
        })
        .unwrap_or(6);
    format!("{v:.decimals$}")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(nice_ticks(0.0, 9.3, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(
            nice_ticks(0.0, 0.42, 5),
            vec![0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5]
        );
        assert_eq!(tick_label(0.30000000000000004, 0.1), "0.3");
        assert_eq!(tick_label(7.5, 2.5), "7.5");
        assert_eq!(tick_label(5.0, 2.5), "5.0");
        assert_eq!(tick_label(0.25, 0.25), "0.25");
        assert_eq!(tick_label(1250.0, 250.0), "1250");
    }
}
