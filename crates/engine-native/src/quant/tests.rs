//! The low-precision kernels against plain integer/bf16 arithmetic, on
//! every SIMD level this CPU runs.

use super::*;

/// Deterministic pseudo-random values in [-1, 1).
fn values(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

/// The operands of an int8 GEMM: `w` (`k × n`) quantised per column, and
/// the `m` rows of `x` (`k` wide) per row on the portable level.
fn int8_operands(m: usize, k: usize, n: usize, w: &[f32], x: &[f32]) -> (QWeights, QRows) {
    let qw = QWeights::new(w, k, n);
    let mut a = QRows::default();
    quantize_rows(LowSimd::Portable, m, k, qw.k_pad, x, k, &mut a);
    (qw, a)
}

/// `a` and `qw` with every scale 1, so that a GEMM of them yields the raw
/// integer sums.
fn with_unit_scales(a: &QRows, qw: &QWeights) -> (QRows, QWeights) {
    let mut unit = a.clone();
    unit.scale.iter_mut().for_each(|s| *s = 1.0);
    let mut raw_w = qw.clone();
    raw_w.col_scale.iter_mut().for_each(|s| *s = 1.0);
    (unit, raw_w)
}

/// Shapes that cover partial 4-groups, partial 16-column blocks,
/// fewer and more than one 4×4-block tile, and 1 row.
const SHAPES: [(usize, usize, usize); 7] = [
    (1, 512, 128),
    (3, 3, 64),
    (4, 64, 60),
    (5, 200, 7),
    (9, 48, 130),
    (2, 17, 1),
    (33, 512, 64),
];

/// The int8 arithmetic in i64 from the quantised operands, with the
/// same fp32 dequantisation expression as the kernels.
fn int8_reference(m: usize, a: &QRows, w: &QWeights, dst: &mut [f32]) {
    let n_pad = blocks(w.n) * COLS;
    let groups = w.k_pad / 4;
    // Unpack to [k][n] first so the reference does not share the
    // kernels' indexing.
    let mut wq = vec![0i8; w.k_pad * n_pad];
    for b in 0..blocks(w.n) {
        for g in 0..groups {
            for c in 0..COLS {
                for e in 0..4 {
                    wq[(g * 4 + e) * n_pad + b * COLS + c] =
                        w.packed[((b * groups + g) * COLS + c) * 4 + e];
                }
            }
        }
    }
    for r in 0..m {
        for j in 0..w.n {
            let dot: i64 = (0..w.k)
                .map(|p| {
                    (a.q[r * w.k_pad + p] as i64 - a.zero[r] as i64) * wq[p * n_pad + j] as i64
                })
                .sum();
            assert!(dot.abs() < 1 << 24, "test sums must stay exact in fp32");
            dst[r * w.n + j] = (a.scale[r] * w.col_scale[j]).mul_add(dot as f32, dst[r * w.n + j]);
        }
    }
}

#[test]
fn int8_kernels_equal_exact_integer_arithmetic_on_every_level() {
    for (seed, &(m, n, k)) in SHAPES.iter().enumerate() {
        let w = values(k * n, seed as u32);
        let x = values(m * k, 100 + seed as u32);
        let (qw, a) = int8_operands(m, k, n, &w, &x);
        // Raw integer dot products: unit scales, zero start.
        let (unit, raw_w) = with_unit_scales(&a, &qw);
        let mut expected_raw = vec![0.0f32; m * n];
        int8_reference(m, &unit, &raw_w, &mut expected_raw);
        let start = values(m * n, 200 + seed as u32);
        let mut expected = start.clone();
        int8_reference(m, &a, &qw, &mut expected);
        for level in low_simd_levels() {
            let mut raw = vec![0.0f32; m * n];
            int8_gemm(level, m, &mut raw, n, unit.view(0, qw.k_pad), &raw_w, None);
            assert_eq!(raw, expected_raw, "{level:?} {m}x{n}x{k}: int32 sums");
            let mut got = start.clone();
            int8_gemm(level, m, &mut got, n, a.view(0, qw.k_pad), &qw, None);
            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                // One fused vs separate multiply-add in the dequantisation.
                assert!(
                    (g - e).abs() <= 2.0 * f32::EPSILON * e.abs().max(1.0),
                    "{level:?} {m}x{n}x{k}[{i}]: {g} vs {e}"
                );
            }
        }
    }
}

#[test]
fn int8_kernels_do_not_saturate_at_the_extremes() {
    // Every product at its largest magnitude, 255 · ±127, all of one
    // sign within a column: the sums `vpmaddubsw` would clip to i16
    // (2 · 255 · 127 > 32 767) must come out exact on every level.
    let (m, k, n) = (3, 512, 40);
    let w: Vec<f32> = (0..k * n)
        .map(|i| if (i % n) % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let mut x = vec![1.0f32; m * k];
    x[0] = 0.0;
    let (qw, a) = int8_operands(m, k, n, &w, &x);
    assert_eq!((a.q[1], a.zero[0]), (255, 0));
    let (unit, raw_w) = with_unit_scales(&a, &qw);
    let mut expected = vec![0.0f32; m * n];
    int8_reference(m, &unit, &raw_w, &mut expected);
    assert_eq!(expected[0], (255 * 127 * (k as i32 - 1)) as f32);
    assert_eq!(expected[1], -(255 * 127 * (k as i32 - 1)) as f32);
    for level in low_simd_levels() {
        let mut got = vec![0.0f32; m * n];
        int8_gemm(level, m, &mut got, n, unit.view(0, qw.k_pad), &raw_w, None);
        assert_eq!(got, expected, "{level:?}");
    }
}

#[test]
fn a_bias_gives_what_filling_the_rows_with_it_first_gives_on_every_level() {
    // Partial column blocks and row tiles, and a destination stride
    // wider than n whose extra columns must stay untouched.
    for (m, k, n) in [(9, 48, 130), (5, 200, 7), (33, 64, 256)] {
        let rs = n + 5;
        let (qw, a) = int8_operands(m, k, n, &values(k * n, 3), &values(m * k, 4));
        let bias = values(n, 5);
        for level in low_simd_levels() {
            let mut expected = values(m * rs, 6);
            for r in 0..m {
                expected[r * rs..r * rs + n].copy_from_slice(&bias);
            }
            int8_gemm(level, m, &mut expected, rs, a.view(0, qw.k_pad), &qw, None);
            let mut got = values(m * rs, 6);
            int8_gemm(
                level,
                m,
                &mut got,
                rs,
                a.view(0, qw.k_pad),
                &qw,
                Some(&bias),
            );
            assert_eq!(got, expected, "{level:?} m={m} k={k} n={n}");
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_vnni_and_bf16_kernels_are_tested_where_the_cpu_has_them() {
    let has = std::arch::is_x86_feature_detected!("avx512vnni")
        && std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512bw");
    assert_eq!(low_simd_levels().contains(&LowSimd::Avx512), has);
}

#[test]
fn int8_kernels_respect_the_destination_row_stride() {
    let (m, n, k, rs) = (6, 40, 12, 57);
    let (qw, a) = int8_operands(m, k, n, &values(k * n, 1), &values(m * k, 2));
    for level in low_simd_levels() {
        let mut dst = vec![7.0f32; (m - 1) * rs + n + 5];
        int8_gemm(level, m, &mut dst, rs, a.view(0, qw.k_pad), &qw, None);
        for r in 0..m - 1 {
            assert!(dst[r * rs + n..(r + 1) * rs].iter().all(|&v| v == 7.0));
        }
        assert!(dst[(m - 1) * rs + n..].iter().all(|&v| v == 7.0));
    }
}

#[test]
fn quantisation_is_symmetric_per_column_and_asymmetric_per_row() {
    let w = [0.5, -2.0, -1.0, 1.0, 0.25, 0.0];
    let qw = QWeights::new(&w, 3, 2);
    assert_eq!(qw.col_scale[0], 1.0 / 127.0);
    assert_eq!(qw.col_scale[1], 2.0 / 127.0);
    let mut a = QRows::default();
    quantize_rows(
        LowSimd::Portable,
        2,
        3,
        4,
        &[0.5, -1.0, 0.25, 0.0, 2.0, 1.0],
        3,
        &mut a,
    );
    // Row 0 spans [-1, 0.5]: 255 steps of 1.5/255, zero at 170.
    assert_eq!(a.scale, vec![1.5 / 255.0, 2.0 / 255.0]);
    assert_eq!(a.zero, vec![170, 0]);
    // 0.25 → 212.5, ties to even; 1.0 / (2/255) is 127.49999 in fp32.
    assert_eq!(&a.q, &[255, 0, 212, 0, 0, 255, 127, 0]);
}

#[test]
fn every_level_quantises_rows_identically() {
    let x = values(7 * 61, 9);
    let mut expected = QRows::default();
    quantize_rows(LowSimd::Portable, 7, 61, 64, &x, 61, &mut expected);
    for level in low_simd_levels() {
        let mut got = QRows::default();
        quantize_rows(level, 7, 61, 64, &x, 61, &mut got);
        assert_eq!(
            (&got.q, &got.scale, &got.zero),
            (&expected.q, &expected.scale, &expected.zero)
        );
    }
}

#[test]
fn every_level_quantises_rows_identically_into_a_reused_buffer() {
    // Row widths around the 16- and 32-value chunks, padding from none
    // to a whole chunk, a row stride wider than the row, an all-zero
    // row, a constant row, values past ±1 and a NaN; the buffer holds
    // stale bytes from a longer earlier call, as the LSTM's reused
    // scratch does, so the padding must be zeroed by every level.
    for (m, k, k_pad) in [
        (5, 61, 64),
        (3, 64, 64),
        (4, 100, 128),
        (2, 5, 8),
        (3, 33, 64),
    ] {
        let rs = k + 3;
        let mut x = values(m * rs, k as u32);
        x[..k].fill(0.0);
        x[rs..rs + k].fill(-0.75);
        if m > 2 {
            x[2 * rs] = 40.0;
            x[2 * rs + 1] = -3.0;
        }
        if m > 3 {
            x[3 * rs + k / 2] = f32::NAN;
        }
        let mut expected = QRows::default();
        quantize_rows(LowSimd::Portable, m, k, k_pad, &x, rs, &mut expected);
        for row in 0..m {
            assert!(
                expected.q[row * k_pad + k..(row + 1) * k_pad]
                    .iter()
                    .all(|&b| b == 0)
            );
        }
        for level in low_simd_levels() {
            let mut got = QRows {
                q: vec![0xAA; (m + 2) * k_pad],
                scale: vec![9.0; m + 2],
                zero: vec![7; m + 2],
            };
            quantize_rows(level, m, k, k_pad, &x, rs, &mut got);
            assert_eq!(
                (&got.q, &got.scale, &got.zero),
                (&expected.q, &expected.scale, &expected.zero),
                "{level:?} m={m} k={k} k_pad={k_pad}"
            );
        }
    }
}

#[test]
fn static_quantisation_saturates_outside_the_range_on_every_level() {
    // Range [-1, 2]: scale 3/255, zero point 85 (−1 → 0, 2 → 255).
    let act = ActQuant::from_range(-1.0, 2.0);
    assert_eq!((act.scale, act.zero), (3.0 / 255.0, 85));
    // A range that excludes 0 is widened to include it.
    assert_eq!(ActQuant::from_range(0.5, 2.0).zero, 0);
    let x = [0.0, -1.0, 2.0, -7.0, 9.0, 1.0, 0.5];
    for level in low_simd_levels() {
        let mut q = QRows::default();
        quantize_rows_static(level, 1, 7, 8, &x, 7, act, &mut q);
        // 1.0 → 85 + 85 = 170; 0.5 → 85 + 42.5 = 127.5 → 128 (nearest even).
        assert_eq!(q.q, [85, 0, 255, 0, 255, 170, 128, 0], "{level:?}");
        assert_eq!((q.scale[0], q.zero[0]), (act.scale, act.zero));
    }
    // Rounding onto the grid (QDQ pairs read by fp32 layers).
    let mut v = [-7.0, 1.0, 0.0];
    act.fake_quantize(&mut v);
    assert_eq!(v, [-85.0 * act.scale, 85.0 * act.scale, 0.0]);
}

#[test]
fn every_level_rounds_rows_to_bf16_identically() {
    let mut x = values(5 * 37, 11);
    x[3] = f32::NAN;
    x[4] = f32::INFINITY;
    let mut expected = Vec::new();
    bf16_rows(LowSimd::Portable, 5, 37, 38, &x, 37, &mut expected);
    assert_eq!(expected[4], 0x7f80);
    assert!(from_bf16(expected[3]).is_nan());
    for level in low_simd_levels() {
        let mut got = Vec::new();
        bf16_rows(level, 5, 37, 38, &x, 37, &mut got);
        assert_eq!(got, expected, "{level:?}");
    }
}

#[test]
fn bf16_rounds_to_nearest_even() {
    assert_eq!(to_bf16(1.0), 0x3f80);
    // 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties to even.
    assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
    assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
    assert_eq!(from_bf16(to_bf16(-3.5)), -3.5);
    assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
}

#[test]
fn bf16_kernels_are_exact_where_the_arithmetic_is() {
    // Values k/64 with |k| ≤ 64 are exact in bf16, and every partial
    // sum below is a multiple of 2^-12 under 2^11, exact in fp32: any
    // summation order gives the same bits.
    for (seed, &(m, n, k)) in SHAPES.iter().enumerate() {
        let snap = |v: Vec<f32>| -> Vec<f32> {
            v.into_iter().map(|x| (x * 64.0).round() / 64.0).collect()
        };
        let w = snap(values(k * n, seed as u32));
        let x = snap(values(m * k, 50 + seed as u32));
        let bw = BWeights::new(&w, k, n);
        let mut b = Vec::new();
        bf16_rows(LowSimd::Portable, m, k, bw.k_pad, &x, k, &mut b);
        let mut expected = vec![0.0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| x[r * k + p] as f64 * w[p * n + j] as f64)
                    .sum();
                expected[r * n + j] = dot as f32;
            }
        }
        for level in low_simd_levels() {
            let mut got = vec![0.0f32; m * n];
            bf16_gemm(level, m, &mut got, n, &b, &bw);
            assert_eq!(got, expected, "{level:?} {m}x{n}x{k}");
        }
    }
}

#[test]
fn bf16_kernels_agree_with_fp64_within_bf16_rounding() {
    for (seed, &(m, n, k)) in SHAPES.iter().enumerate() {
        let w = values(k * n, seed as u32);
        let x = values(m * k, 70 + seed as u32);
        let bw = BWeights::new(&w, k, n);
        let mut b = Vec::new();
        bf16_rows(LowSimd::Portable, m, k, bw.k_pad, &x, k, &mut b);
        for level in low_simd_levels() {
            let mut got = vec![0.0f32; m * n];
            bf16_gemm(level, m, &mut got, n, &b, &bw);
            for r in 0..m {
                for j in 0..n {
                    let mut exact = 0.0f64;
                    let mut bound = 0.0f64;
                    for p in 0..k {
                        let (a, v) = (x[r * k + p] as f64, w[p * n + j] as f64);
                        exact += a * v;
                        bound += (a * v).abs();
                    }
                    // Two bf16 roundings (2^-8 each) plus fp32 sums.
                    let err = (got[r * n + j] as f64 - exact).abs();
                    assert!(
                        err <= bound * (2.0 / 256.0 + k as f64 * 1.2e-7) + 1e-6,
                        "{level:?} {m}x{n}x{k} [{r},{j}]: error {err:e}, bound {bound}"
                    );
                }
            }
        }
    }
}
