//! Dense kernels of the native engine: a bounds-checked row-major GEMM over
//! the `gemm` crate, and the fused LSTM cell update.
//!
//! Every layer of the CNN+LSTM family reduces to GEMMs (convolution taps,
//! the LSTM input projection for all time steps, the recurrent product, the
//! head) plus element-wise work, so this is the whole numeric core.

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]`, all row-major with the given row
/// strides (column stride 1). With `accumulate` the product is added to
/// `dst`; otherwise `dst` is overwritten.
///
/// # Panics
/// If a stride or slice length would let the GEMM read or write out of
/// bounds. The engine computes every shape from the validated plan, so a
/// panic here is a bug, never a property of a request.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    rhs: &[f32],
    rhs_rs: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst_rs >= n && lhs_rs >= k && rhs_rs >= n, "GEMM strides");
    assert!(dst.len() >= (m - 1) * dst_rs + n, "GEMM dst bounds");
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                dst[row * dst_rs..row * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(lhs.len() >= (m - 1) * lhs_rs + k, "GEMM lhs bounds");
    assert!(rhs.len() >= (k - 1) * rhs_rs + n, "GEMM rhs bounds");
    // SAFETY: the asserts above keep every element the GEMM touches,
    // `base + row * rs + col` with row < rows and col < cols, inside its
    // slice; `dst` is borrowed mutably so it cannot alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            lhs_rs as isize,
            rhs.as_ptr(),
            1,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `e^x` to within about 2 ulp (Cephes' `expf` polynomial), written as
/// straight-line float and integer arithmetic so loops over it vectorise;
/// the libm call it replaces is scalar and made the LSTM cell update cost
/// more than all its GEMMs together.
#[inline(always)]
fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so `n · ln 2` is subtracted without rounding error.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 rounds to an integer and leaves it in the low
    // mantissa bits, without a (non-vectorising) call to `round`.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.376_26);
    let shifted = x.mul_add(LOG2E, ROUND);
    let n = shifted - ROUND;
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let r2 = r * r;
    let p = 1.987_569_1e-4f32
        .mul_add(r, 1.398_2e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 1.666_666_5e-1)
        .mul_add(r, 0.5);
    let y = p.mul_add(r2, r) + 1.0;
    y * f32::from_bits(((n_int + 127) << 23) as u32)
}

#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_fast(-x))
}

/// `tanh(x) = 1 − 2 / (e^{2x} + 1)`: absolute error below 1e-7, which is
/// what the 1e-5 agreement with PyTorch needs.
#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp_fast(2.0 * x) + 1.0)
}

/// The cell update of one row; `#[inline(always)]` so each CPU-specific
/// wrapper below gets its own vectorised copy.
#[inline(always)]
fn lstm_cell_body(gates: &[f32], c: &mut [f32], h: &mut [f32]) {
    let hidden = c.len();
    let h = &mut h[..hidden];
    let (i, rest) = gates.split_at(hidden);
    let (o, rest) = rest.split_at(hidden);
    let (f, g) = rest.split_at(hidden);
    let g = &g[..hidden];
    for j in 0..hidden {
        let cell = sigmoid(f[j]).mul_add(c[j], sigmoid(i[j]) * tanh(g[j]));
        c[j] = cell;
        h[j] = sigmoid(o[j]) * tanh(cell);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn lstm_cell_avx512(gates: &[f32], c: &mut [f32], h: &mut [f32]) {
    lstm_cell_body(gates, c, h);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn lstm_cell_avx2(gates: &[f32], c: &mut [f32], h: &mut [f32]) {
    lstm_cell_body(gates, c, h);
}

/// Columns one register block of the small-batch kernel covers: with up to
/// four rows that is 16 AVX-512 accumulators, all kept in registers.
const BLOCK_COLS: usize = 64;

/// Lays a row-major `[k][n]` matrix out for [`matmul_small_rows`]: for each
/// block of [`BLOCK_COLS`] columns, its `k` row pieces one after another,
/// then the remaining columns as a row-major `[k][n % BLOCK_COLS]`. The
/// kernel then streams every block sequentially (prefetcher-friendly)
/// instead of striding `n` floats per row, which matters because at small
/// batch sizes the recurrent weights are re-read from L2 every time step.
pub(crate) fn pack_columns(matrix: &[f32], k: usize, n: usize) -> Vec<f32> {
    let full = n / BLOCK_COLS * BLOCK_COLS;
    let mut packed = Vec::with_capacity(k * n);
    for col in (0..full).step_by(BLOCK_COLS) {
        for p in 0..k {
            packed.extend_from_slice(&matrix[p * n + col..p * n + col + BLOCK_COLS]);
        }
    }
    for p in 0..k {
        packed.extend_from_slice(&matrix[p * n + full..p * n + n]);
    }
    packed
}

/// `dst[r] += lhs[r] · rhs` for `R` rows, `rhs` packed by [`pack_columns`]:
/// the LSTM's recurrent product at small batch sizes, where a general
/// GEMM's packing and dispatch cost more than the arithmetic.
/// Accumulators for one 64-column block stay in registers while the
/// block's panel streams through once for all `R` rows; with one or two
/// rows, even and odd `p` accumulate separately so the FMA latency chain
/// does not limit throughput.
#[inline(always)]
fn small_rows_body<const R: usize>(
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    lhs_rs: usize,
    packed: &[f32],
) {
    let full = n / BLOCK_COLS * BLOCK_COLS;
    let split_chains = R <= 2;
    for (block, panel) in packed[..k * full].chunks_exact(k * BLOCK_COLS).enumerate() {
        let col = block * BLOCK_COLS;
        let mut acc = [[0.0f32; BLOCK_COLS]; R];
        let mut acc_odd = [[0.0f32; BLOCK_COLS]; R];
        let mut p = 0;
        if split_chains {
            while p + 1 < k {
                let (r0, r1) = panel[p * BLOCK_COLS..(p + 2) * BLOCK_COLS].split_at(BLOCK_COLS);
                for row in 0..R {
                    let a0 = lhs[row * lhs_rs + p];
                    let a1 = lhs[row * lhs_rs + p + 1];
                    for j in 0..BLOCK_COLS {
                        acc[row][j] = a0.mul_add(r0[j], acc[row][j]);
                        acc_odd[row][j] = a1.mul_add(r1[j], acc_odd[row][j]);
                    }
                }
                p += 2;
            }
        }
        while p < k {
            let r = &panel[p * BLOCK_COLS..(p + 1) * BLOCK_COLS];
            for row in 0..R {
                let a = lhs[row * lhs_rs + p];
                for j in 0..BLOCK_COLS {
                    acc[row][j] = a.mul_add(r[j], acc[row][j]);
                }
            }
            p += 1;
        }
        for row in 0..R {
            let out = &mut dst[row * dst_rs + col..row * dst_rs + col + BLOCK_COLS];
            for j in 0..BLOCK_COLS {
                out[j] += acc[row][j] + acc_odd[row][j];
            }
        }
    }
    // Columns past the last full block, stored row-major after the panels.
    let tail = n - full;
    if tail > 0 {
        let rest = &packed[k * full..k * n];
        for row in 0..R {
            let out = &mut dst[row * dst_rs + full..row * dst_rs + n];
            for p in 0..k {
                let a = lhs[row * lhs_rs + p];
                for (o, &v) in out.iter_mut().zip(&rest[p * tail..(p + 1) * tail]) {
                    *o = a.mul_add(v, *o);
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn small_rows_dispatch(
    rows: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    lhs_rs: usize,
    rhs: &[f32],
) {
    let mut row = 0;
    while row < rows {
        let d = &mut dst[row * dst_rs..];
        let l = &lhs[row * lhs_rs..];
        match rows - row {
            1 => small_rows_body::<1>(n, k, d, dst_rs, l, lhs_rs, rhs),
            2 => small_rows_body::<2>(n, k, d, dst_rs, l, lhs_rs, rhs),
            3 => small_rows_body::<3>(n, k, d, dst_rs, l, lhs_rs, rhs),
            _ => small_rows_body::<4>(n, k, d, dst_rs, l, lhs_rs, rhs),
        }
        row += 4;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn small_rows_avx512(
    rows: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    lhs_rs: usize,
    rhs: &[f32],
) {
    small_rows_dispatch(rows, n, k, dst, dst_rs, lhs, lhs_rs, rhs);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn small_rows_avx2(
    rows: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    lhs_rs: usize,
    rhs: &[f32],
) {
    small_rows_dispatch(rows, n, k, dst, dst_rs, lhs, lhs_rs, rhs);
}

/// Largest batch for which [`matmul_small_rows`] beats the general GEMM
/// (measured with `scripts/bench-engines.sh`).
pub(crate) const SMALL_ROWS_MAX: usize = 4;

/// `dst[rows×n] += lhs[rows×k] · rhs[k×n]` for few rows (see
/// [`small_rows_body`]); row-major with the given row strides, `rhs`
/// packed by [`pack_columns`].
///
/// # Panics
/// If a stride or length would reach outside a slice (a bug, as in
/// [`matmul`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_small_rows(
    simd: Simd,
    rows: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    lhs_rs: usize,
    rhs: &[f32],
) {
    if rows == 0 || n == 0 {
        return;
    }
    assert!(dst_rs >= n && lhs_rs >= k, "small GEMM strides");
    assert!(
        dst.len() >= (rows - 1) * dst_rs + n,
        "small GEMM dst bounds"
    );
    assert!(
        k == 0 || lhs.len() >= (rows - 1) * lhs_rs + k,
        "small GEMM lhs bounds"
    );
    assert!(rhs.len() >= k * n, "small GEMM rhs bounds");
    match simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Simd::Avx512` comes from `detect_simd` only after the
        // CPU reported every feature this function is compiled for.
        Simd::Avx512 => unsafe { small_rows_avx512(rows, n, k, dst, dst_rs, lhs, lhs_rs, rhs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 and FMA.
        Simd::Avx2 => unsafe { small_rows_avx2(rows, n, k, dst, dst_rs, lhs, lhs_rs, rhs) },
        _ => small_rows_dispatch(rows, n, k, dst, dst_rs, lhs, lhs_rs, rhs),
    }
}

/// SIMD level picked once per process from the CPU's features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Simd {
    Avx512,
    Avx2,
    Portable,
}

pub(crate) fn detect_simd() -> Simd {
    static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Simd::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Simd::Avx2;
            }
        }
        Simd::Portable
    })
}

/// One LSTM cell update for one row, gates in ONNX order (i, o, f, c):
/// `c ← σ(f)·c + σ(i)·tanh(g)`, `h ← σ(o)·tanh(c)`.
#[inline]
pub(crate) fn lstm_cell(simd: Simd, gates: &[f32], c: &mut [f32], h: &mut [f32]) {
    match simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Simd::Avx512` is only produced by `detect_simd` after
        // checking that the CPU has every feature the function enables.
        Simd::Avx512 => unsafe { lstm_cell_avx512(gates, c, h) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 and FMA.
        Simd::Avx2 => unsafe { lstm_cell_avx2(gates, c, h) },
        _ => lstm_cell_body(gates, c, h),
    }
}

pub(crate) fn relu_in_place(values: &mut [f32]) {
    for v in values {
        *v = v.max(0.0);
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn matmul_matches_naive_product_and_accumulates() {
        let (m, n, k) = (5, 7, 3);
        let lhs: Vec<f32> = (0..m * k).map(|v| v as f32 * 0.5 - 3.0).collect();
        let rhs: Vec<f32> = (0..k * n).map(|v| (v as f32).sin()).collect();
        let expected = naive(m, n, k, &lhs, &rhs);
        let mut dst = vec![9.0; m * n];
        matmul(m, n, k, &mut dst, n, false, &lhs, k, &rhs, n);
        for (a, b) in dst.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        matmul(m, n, k, &mut dst, n, true, &lhs, k, &rhs, n);
        for (a, b) in dst.iter().zip(&expected) {
            assert!((a - 2.0 * b).abs() < 1e-4);
        }
    }

    #[test]
    fn matmul_respects_row_strides() {
        // dst rows 10 apart, only the first 2 columns written.
        let lhs = [1.0, 2.0, 3.0, 4.0];
        let rhs = [1.0, 0.0, 0.0, 1.0];
        let mut dst = vec![-1.0; 12];
        matmul(2, 2, 2, &mut dst, 10, false, &lhs, 2, &rhs, 2);
        assert_eq!(&dst[0..2], &[1.0, 2.0]);
        assert_eq!(&dst[2..10], &[-1.0; 8]);
        assert_eq!(&dst[10..12], &[3.0, 4.0]);
    }

    fn sigmoid_exact(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    fn simd_levels() -> Vec<Simd> {
        let mut levels = vec![Simd::Portable];
        if detect_simd() != Simd::Portable {
            levels.push(Simd::Avx2);
        }
        if detect_simd() == Simd::Avx512 {
            levels.push(Simd::Avx512);
        }
        levels
    }

    #[test]
    fn small_rows_kernel_matches_the_general_gemm_on_every_simd_level() {
        // 96 and 200 columns exercise the tail after full 64-column blocks.
        for (rows, n, k) in [
            (1, 512, 128),
            (3, 96, 24),
            (4, 200, 7),
            (6, 128, 32),
            (2, 64, 1),
        ] {
            let lhs: Vec<f32> = (0..rows * k).map(|v| ((v as f32) * 0.7).sin()).collect();
            let rhs: Vec<f32> = (0..k * n).map(|v| ((v as f32) * 0.3).cos()).collect();
            let start: Vec<f32> = (0..rows * n).map(|v| v as f32 * 0.01).collect();
            let mut expected = start.clone();
            matmul(rows, n, k, &mut expected, n, true, &lhs, k, &rhs, n);
            let packed = pack_columns(&rhs, k, n);
            assert_eq!(packed.len(), rhs.len());
            for level in simd_levels() {
                let mut got = start.clone();
                matmul_small_rows(level, rows, n, k, &mut got, n, &lhs, k, &packed);
                for (g, e) in got.iter().zip(&expected) {
                    assert!((g - e).abs() < 1e-4, "{level:?} {rows}x{n}x{k}: {g} vs {e}");
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
        let gates: Vec<f32> = (0..4 * hidden)
            .map(|v| ((v as f32) * 0.37).sin() * 4.0)
            .collect();
        let c0: Vec<f32> = (0..hidden).map(|v| ((v as f32) * 0.11).cos()).collect();
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
}
