//! Every kernel against a textbook form, on every SIMD level this CPU runs.

use super::*;

fn naive(m: usize, n: usize, k: usize, lhs: &[f32], rhs: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| lhs[i * k + p] * rhs[p * n + j]).sum();
        }
    }
    out
}

fn sigmoid_exact(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `len` test values `amplitude · sin(step · i)`.
fn sine(len: usize, step: f32, amplitude: f32) -> Vec<f32> {
    (0..len)
        .map(|v| ((v as f32) * step).sin() * amplitude)
        .collect()
}

/// `len` test values `amplitude · cos(step · i)`.
fn cosine(len: usize, step: f32, amplitude: f32) -> Vec<f32> {
    (0..len)
        .map(|v| ((v as f32) * step).cos() * amplitude)
        .collect()
}

fn simd_levels() -> Vec<Simd> {
    available_simd()
}

#[test]
fn packed_gemm_matches_the_naive_product_on_every_simd_level() {
    // Shapes with partial column blocks (3, 40, 100), row counts past a
    // tile (200) and every row-group remainder, k = 0 and 1.
    for (m, n, k) in [
        (1, 512, 128),
        (5, 3, 64),
        (7, 40, 9),
        (200, 100, 13),
        (13, 64, 1),
        (4, 16, 0),
    ] {
        let lhs = sine(m * k, 0.7, 1.0);
        let rhs = cosine(k * n, 0.3, 1.0);
        let product = naive(m, n, k, &lhs, &rhs);
        // dst rows 2 wider than n: the gap must stay untouched.
        let dst_rs = n + 2;
        let start: Vec<f32> = (0..m * dst_rs).map(|v| v as f32 * 0.01).collect();
        for level in simd_levels() {
            let packed = PackedMatrix::new(&rhs, k, n, level);
            let mut got = start.clone();
            gemm_packed(&packed, m, &mut got, dst_rs, &lhs, k);
            for i in 0..m {
                for j in 0..dst_rs {
                    let base = start[i * dst_rs + j];
                    let want = if j < n {
                        base + product[i * n + j]
                    } else {
                        base
                    };
                    let g = got[i * dst_rs + j];
                    assert!(
                        (g - want).abs() < 1e-4,
                        "{level:?} {m}x{n}x{k} [{i}][{j}]: {g} vs {want}"
                    );
                }
            }
        }
    }
}

/// The textbook LSTM step in f64: `gates + h·R`, then the cell update.
fn reference_step(
    rows: usize,
    hidden: usize,
    r_t: &[f32],
    h: &[f32],
    gates: &[f32],
    c: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    let (mut c_out, mut h_out) = (vec![0.0; rows * hidden], vec![0.0; rows * hidden]);
    for b in 0..rows {
        let pre = |gate: usize, j: usize| {
            let col = gate * hidden + j;
            gates[b * 4 * hidden + col] as f64
                + (0..hidden)
                    .map(|p| h[b * hidden + p] as f64 * r_t[p * 4 * hidden + col] as f64)
                    .sum::<f64>()
        };
        for j in 0..hidden {
            let cell = sigmoid_exact(pre(2, j)) * c[b * hidden + j] as f64
                + sigmoid_exact(pre(0, j)) * pre(3, j).tanh();
            c_out[b * hidden + j] = cell;
            h_out[b * hidden + j] = sigmoid_exact(pre(1, j)) * cell.tanh();
        }
    }
    (c_out, h_out)
}

#[test]
fn fused_step_matches_the_textbook_step_on_every_simd_level() {
    // Hidden sizes that fill whole blocks (128) and leave partial ones
    // (24, 37), and one wider than a block group (300); row counts
    // covering every register group and remainder.
    for (rows, hidden) in [
        (1, 128),
        (1, 37),
        (1, 300),
        (2, 24),
        (7, 37),
        (13, 128),
        (6, 16),
        (32, 24),
    ] {
        let r_t = cosine(hidden * 4 * hidden, 0.37, 0.2);
        let h = sine(rows * hidden, 0.7, 1.0);
        let gates = sine(rows * 4 * hidden, 0.13, 2.0);
        let c0 = cosine(rows * hidden, 0.11, 1.0);
        // The same step with the input projection inside: `k_in` input
        // values per row (stride 5 wider), `W`, and a bias row that
        // every row shares (`g_rs = 0`).
        let k_in = 11;
        let x_rs = k_in + 5;
        let x = cosine(rows * x_rs, 0.29, 1.0);
        let w_t = sine(k_in * 4 * hidden, 0.53, 0.3);
        let bias = &gates[..4 * hidden];
        let projected: Vec<f32> = (0..rows * 4 * hidden)
            .map(|i| {
                let (b, col) = (i / (4 * hidden), i % (4 * hidden));
                bias[col]
                    + (0..k_in)
                        .map(|p| x[b * x_rs + p] * w_t[p * 4 * hidden + col])
                        .sum::<f32>()
            })
            .collect();
        let zeros = vec![0.0; rows * hidden];
        for level in simd_levels() {
            let plain = PackedRecurrent::new(&r_t, hidden, level);
            let with_input = PackedRecurrent::with_input(&w_t, k_in, &r_t, hidden, level);
            for (recurrent, fused) in [(true, false), (false, false), (true, true), (false, true)] {
                let h_in = if recurrent { &h } else { &zeros };
                let pre = if fused { &projected } else { &gates };
                let (c_exp, h_exp) = reference_step(rows, hidden, &r_t, h_in, pre, &c0);
                let mut c = c0.clone();
                // The output row stride is wider than `hidden`: values
                // between rows must stay untouched.
                let hn_rs = hidden + 3;
                let mut h_next = vec![-7.0; rows * hn_rs];
                let args = StepArgs {
                    rows,
                    x: if fused { &x } else { &[] },
                    x_rs: if fused { x_rs } else { 0 },
                    recurrent,
                    h_prev: &h,
                    hp_rs: hidden,
                    gates: if fused { bias } else { &gates },
                    g_rs: if fused { 0 } else { 4 * hidden },
                    c: &mut c,
                    h_next: &mut h_next,
                    hn_rs,
                };
                lstm_step(if fused { &with_input } else { &plain }, args);
                for b in 0..rows {
                    for j in 0..hidden {
                        let i = b * hidden + j;
                        let what = format!(
                            "{level:?} {rows}x{hidden} rec={recurrent} input={fused} [{b}][{j}]"
                        );
                        assert!((c[i] as f64 - c_exp[i]).abs() < 2e-6, "c {what}");
                        let got = h_next[b * hn_rs + j] as f64;
                        assert!(
                            (got - h_exp[i]).abs() < 2e-6,
                            "h {what}: {got} vs {}",
                            h_exp[i]
                        );
                    }
                    assert_eq!(&h_next[b * hn_rs + hidden..(b + 1) * hn_rs], &[-7.0; 3]);
                }
            }
        }
    }
}

#[test]
fn fast_activations_are_accurate_over_the_whole_range() {
    let mut worst_sigmoid = 0.0f64;
    let mut worst_tanh = 0.0f64;
    let mut x = -100.0f32;
    while x <= 100.0 {
        worst_sigmoid = worst_sigmoid.max((sigmoid(x) as f64 - sigmoid_exact(x as f64)).abs());
        worst_tanh = worst_tanh.max((tanh(x) as f64 - (x as f64).tanh()).abs());
        x += 0.000_731;
    }
    assert!(worst_sigmoid < 2e-7, "sigmoid error {worst_sigmoid:e}");
    assert!(worst_tanh < 3e-7, "tanh error {worst_tanh:e}");
    assert!(sigmoid(-1000.0) < 1e-30);
    assert_eq!(sigmoid(1000.0), 1.0);
    assert_eq!(tanh(1000.0), 1.0);
    assert_eq!(tanh(-1000.0), -1.0);
}

#[test]
fn every_simd_level_computes_the_textbook_cell() {
    let hidden = 37; // not a multiple of any vector width
    let gates = sine(4 * hidden, 0.37, 4.0);
    let c0 = cosine(hidden, 0.11, 1.0);
    for level in simd_levels() {
        let mut c = c0.clone();
        let mut h = vec![0.0; hidden];
        lstm_cell(level, &gates, &mut c, &mut h);
        for j in 0..hidden {
            let g = |k: usize| gates[k * hidden + j] as f64;
            let cell = sigmoid_exact(g(2)) * c0[j] as f64 + sigmoid_exact(g(0)) * g(3).tanh();
            assert!((c[j] as f64 - cell).abs() < 1e-6, "{level:?} c[{j}]");
            assert!(
                (h[j] as f64 - sigmoid_exact(g(1)) * cell.tanh()).abs() < 1e-6,
                "{level:?} h[{j}]"
            );
        }
    }
}
