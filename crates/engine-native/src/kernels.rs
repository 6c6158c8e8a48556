//! Dense kernels of the native engine: a GEMM on pre-packed weights, the
//! LSTM cell update, and the fused LSTM step
//! (recurrent product, gate activations and cell update in one pass over
//! pre-packed weights).
//!
//! Every layer of the CNN+LSTM family reduces to GEMMs (convolution taps,
//! the LSTM input projection for all time steps, the recurrent product, the
//! head) plus element-wise work, so this is the whole numeric core.

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

/// Vector lanes of the fp32 kernels at each SIMD level.
fn lanes(simd: Simd) -> usize {
    match simd {
        Simd::Avx512 => 16,
        Simd::Avx2 | Simd::Portable => 8,
    }
}

/// A constant `[k][n]` GEMM right-hand side (weights) laid out for
/// [`gemm_packed`]: blocks of `4·lanes` columns, each block's `k` row
/// pieces one after another (the last block zero-padded), so the kernel
/// streams every block front to back.
#[derive(Debug, Clone)]
pub(crate) struct PackedMatrix {
    simd: Simd,
    lanes: usize,
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PackedMatrix {
    /// Packs the row-major `[k][n]` `matrix` for SIMD level `simd`.
    pub(crate) fn new(matrix: &[f32], k: usize, n: usize, simd: Simd) -> Self {
        let lanes = lanes(simd);
        let width = 4 * lanes;
        let blocks = n.div_ceil(width);
        let mut data = vec![0.0f32; blocks * k * width];
        for block in 0..blocks {
            let col = block * width;
            let cols = width.min(n - col);
            for p in 0..k {
                let dst = (block * k + p) * width;
                data[dst..dst + cols].copy_from_slice(&matrix[p * n + col..p * n + col + cols]);
            }
        }
        PackedMatrix {
            simd,
            lanes,
            k,
            n,
            data,
        }
    }
}

/// `R` rows × one block (`4·L` columns) of [`gemm_packed`]: `4·R` vector
/// accumulators stay in registers over the whole `k` loop, each step
/// loading four weight vectors and broadcasting one value per row.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gemm_block<const L: usize, const R: usize>(
    panel: &[f32],
    k: usize,
    cols: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    lhs_rs: usize,
) {
    let mut acc = [[[0.0f32; L]; 4]; R];
    let rows: [&[f32]; R] = std::array::from_fn(|r| &lhs[r * lhs_rs..r * lhs_rs + k]);
    for p in 0..k {
        let w = &panel[p * 4 * L..(p + 1) * 4 * L];
        for r in 0..R {
            let a = rows[r][p];
            for v in 0..4 {
                for l in 0..L {
                    acc[r][v][l] = a.mul_add(w[v * L + l], acc[r][v][l]);
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (v, acc) in acc.iter().enumerate() {
            let start = v * L;
            if start >= cols {
                break;
            }
            let width = L.min(cols - start);
            let out = &mut dst[r * dst_rs + start..];
            let mut sum = load_lanes::<L>(out, width);
            for l in 0..L {
                sum[l] += acc[l];
            }
            store_lanes(out, &sum, width);
        }
    }
}

/// Rows per tile of [`gemm_packed`]: a tile's left-hand rows (at most
/// 96 × k floats) stay in L1/L2 while every column block passes over them.
const GEMM_TILE_ROWS: usize = 96;

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gemm_all<const L: usize, const G: usize>(
    w: &PackedMatrix,
    m: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    lhs_rs: usize,
) {
    assert_eq!(w.lanes, L, "weights packed for another SIMD level");
    let (k, n, width) = (w.k, w.n, 4 * L);
    for tile in (0..m).step_by(GEMM_TILE_ROWS) {
        let tile_end = m.min(tile + GEMM_TILE_ROWS);
        for (block, panel) in w.data.chunks_exact(k * width).enumerate() {
            let col = block * width;
            let cols = width.min(n - col);
            let mut row = tile;
            while row < tile_end {
                let d = &mut dst[row * dst_rs + col..];
                let l = &lhs[row * lhs_rs..];
                let count = (tile_end - row).min(G);
                macro_rules! go {
                    ($r:literal) => {
                        gemm_block::<L, $r>(panel, k, cols, d, dst_rs, l, lhs_rs)
                    };
                }
                match count {
                    1 => go!(1),
                    2 => go!(2),
                    3 => go!(3),
                    4 => go!(4),
                    5 => go!(5),
                    _ => go!(6),
                }
                row += count;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn gemm_avx512(
    w: &PackedMatrix,
    m: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    lhs_rs: usize,
) {
    gemm_all::<16, 6>(w, m, dst, dst_rs, lhs, lhs_rs);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gemm_avx2(
    w: &PackedMatrix,
    m: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    lhs_rs: usize,
) {
    gemm_all::<8, 3>(w, m, dst, dst_rs, lhs, lhs_rs);
}

/// `dst[m×n] += lhs[m×k] · W` for pre-packed weights `W`, row-major with
/// the given row strides. Needs no buffer of its own, so a forward pass
/// built on it allocates nothing (the `gemm` crate allocates its packing
/// buffers on every call).
///
/// # Panics
/// If a stride or length would reach outside a slice (a bug, as in
/// [`lstm_step`]).
pub(crate) fn gemm_packed(
    w: &PackedMatrix,
    m: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    lhs_rs: usize,
) {
    let (k, n) = (w.k, w.n);
    if m == 0 || n == 0 || k == 0 {
        // An empty product adds nothing.
        return;
    }
    assert!(dst_rs >= n && lhs_rs >= k, "GEMM strides");
    assert!(dst.len() >= (m - 1) * dst_rs + n, "GEMM dst bounds");
    assert!(
        k == 0 || lhs.len() >= (m - 1) * lhs_rs + k,
        "GEMM lhs bounds"
    );
    match w.simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: weights of level `Avx512` are only packed for a level the
        // CPU has (`detect_simd`, or checked by `NativeEngine::with_simd`).
        Simd::Avx512 => unsafe { gemm_avx512(w, m, dst, dst_rs, lhs, lhs_rs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 and FMA.
        Simd::Avx2 => unsafe { gemm_avx2(w, m, dst, dst_rs, lhs, lhs_rs) },
        _ => gemm_all::<8, 3>(w, m, dst, dst_rs, lhs, lhs_rs),
    }
}

/// The recurrent weights of one LSTM layer laid out for [`lstm_step`]: the
/// hidden units in blocks of `lanes` (one vector register), and for each
/// block a panel of `hidden` rows, each row holding the block's weights
/// for the four gates (i, o, f, c) one after another (`4·lanes` floats;
/// units past `hidden` in the last block are zero). Every step then
/// streams the whole matrix once, front to back, and one block's
/// accumulators hold all four gates of the same units, so the cell update
/// runs on them before they leave the registers.
#[derive(Debug, Clone)]
pub(crate) struct PackedRecurrent {
    simd: Simd,
    lanes: usize,
    hidden: usize,
    data: Vec<f32>,
}

impl PackedRecurrent {
    /// Packs `r_t`, the `[hidden][4·hidden]` transposed recurrent weights,
    /// for the kernel of SIMD level `simd`.
    pub(crate) fn new(r_t: &[f32], hidden: usize, simd: Simd) -> Self {
        let lanes = lanes(simd);
        let blocks = hidden.div_ceil(lanes);
        let mut data = vec![0.0f32; blocks * hidden * 4 * lanes];
        for block in 0..blocks {
            let j0 = block * lanes;
            let width = lanes.min(hidden - j0);
            for p in 0..hidden {
                for gate in 0..4 {
                    let src = p * 4 * hidden + gate * hidden + j0;
                    let dst = ((block * hidden + p) * 4 + gate) * lanes;
                    data[dst..dst + width].copy_from_slice(&r_t[src..src + width]);
                }
            }
        }
        PackedRecurrent {
            simd,
            lanes,
            hidden,
            data,
        }
    }

    pub(crate) fn simd(&self) -> Simd {
        self.simd
    }
}

/// Copies `width ≤ L` values into a register-sized array (zeros after).
#[inline(always)]
fn load_lanes<const L: usize>(src: &[f32], width: usize) -> [f32; L] {
    let mut out = [0.0f32; L];
    if width == L {
        out.copy_from_slice(&src[..L]);
    } else {
        out[..width].copy_from_slice(&src[..width]);
    }
    out
}

#[inline(always)]
fn store_lanes<const L: usize>(dst: &mut [f32], values: &[f32; L], width: usize) {
    if width == L {
        dst[..L].copy_from_slice(values);
    } else {
        dst[..width].copy_from_slice(&values[..width]);
    }
}

/// One hidden block (`L` units, all four gates) of one LSTM step for `R`
/// rows: `4·R` vector accumulators take `h_prev · panel`, then the input
/// projection is added and the cell update runs on the registers, so the
/// gate pre-activations never go to memory. With one row, even and odd
/// `p` accumulate separately: eight independent FMA chains instead of four.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn step_block<const L: usize, const R: usize>(
    panel: &[f32],
    k: usize,
    hidden: usize,
    j0: usize,
    h_prev: &[f32],
    hp_rs: usize,
    gates: &[f32],
    g_rs: usize,
    c: &mut [f32],
    h_next: &mut [f32],
    hn_rs: usize,
) {
    let width = L.min(hidden - j0);
    let mut acc = [[[0.0f32; L]; 4]; R];
    let mut acc_odd = [[[0.0f32; L]; 4]; R];
    let rows: [&[f32]; R] = std::array::from_fn(|r| &h_prev[r * hp_rs..r * hp_rs + k]);
    let mut p = 0;
    if R == 1 {
        while p + 1 < k {
            let (w0, w1) = panel[p * 4 * L..(p + 2) * 4 * L].split_at(4 * L);
            let (a0, a1) = (rows[0][p], rows[0][p + 1]);
            for gate in 0..4 {
                for l in 0..L {
                    acc[0][gate][l] = a0.mul_add(w0[gate * L + l], acc[0][gate][l]);
                    acc_odd[0][gate][l] = a1.mul_add(w1[gate * L + l], acc_odd[0][gate][l]);
                }
            }
            p += 2;
        }
    }
    while p < k {
        let w = &panel[p * 4 * L..(p + 1) * 4 * L];
        for r in 0..R {
            let a = rows[r][p];
            for gate in 0..4 {
                for l in 0..L {
                    acc[r][gate][l] = a.mul_add(w[gate * L + l], acc[r][gate][l]);
                }
            }
        }
        p += 1;
    }
    for r in 0..R {
        let g = &gates[r * g_rs..r * g_rs + 4 * hidden];
        let mut pre = [[0.0f32; L]; 4];
        for gate in 0..4 {
            let x = load_lanes::<L>(&g[gate * hidden + j0..], width);
            for l in 0..L {
                pre[gate][l] = x[l] + (acc[r][gate][l] + acc_odd[r][gate][l]);
            }
        }
        let cr = &mut c[r * hidden + j0..r * hidden + j0 + width];
        let mut cell = load_lanes::<L>(cr, width);
        let mut h = [0.0f32; L];
        for l in 0..L {
            let [i, o, f, gg] = [pre[0][l], pre[1][l], pre[2][l], pre[3][l]];
            cell[l] = sigmoid(f).mul_add(cell[l], sigmoid(i) * tanh(gg));
            h[l] = sigmoid(o) * tanh(cell[l]);
        }
        store_lanes(cr, &cell, width);
        store_lanes(&mut h_next[r * hn_rs + j0..], &h, width);
    }
}

/// Runs [`step_block`] over every hidden block, and within a block over the
/// rows in groups of `G` (the register budget: `4·G` accumulators). Blocks
/// are the outer loop so one block's panel is reused from L1 by every row
/// group before the next panel streams in.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn step_all<const L: usize, const G: usize>(
    w: &PackedRecurrent,
    rows: usize,
    k: usize,
    h_prev: &[f32],
    hp_rs: usize,
    gates: &[f32],
    g_rs: usize,
    c: &mut [f32],
    h_next: &mut [f32],
    hn_rs: usize,
) {
    assert_eq!(w.lanes, L, "weights packed for another SIMD level");
    let hidden = w.hidden;
    for (block, panel) in w.data.chunks_exact(hidden * 4 * L).enumerate() {
        let j0 = block * L;
        let mut row = 0;
        while row < rows {
            let hp = &h_prev[row * hp_rs..];
            let g = &gates[row * g_rs..];
            let cc = &mut c[row * hidden..];
            let hn = &mut h_next[row * hn_rs..];
            let n = (rows - row).min(G);
            macro_rules! go {
                ($r:literal) => {
                    step_block::<L, $r>(panel, k, hidden, j0, hp, hp_rs, g, g_rs, cc, hn, hn_rs)
                };
            }
            match n {
                1 => go!(1),
                2 => go!(2),
                3 => go!(3),
                4 => go!(4),
                5 => go!(5),
                _ => go!(6),
            }
            row += n;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn step_avx512(
    w: &PackedRecurrent,
    rows: usize,
    k: usize,
    h_prev: &[f32],
    hp_rs: usize,
    gates: &[f32],
    g_rs: usize,
    c: &mut [f32],
    h_next: &mut [f32],
    hn_rs: usize,
) {
    // 6 rows × 4 gates = 24 of the 32 zmm registers.
    step_all::<16, 6>(w, rows, k, h_prev, hp_rs, gates, g_rs, c, h_next, hn_rs);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn step_avx2(
    w: &PackedRecurrent,
    rows: usize,
    k: usize,
    h_prev: &[f32],
    hp_rs: usize,
    gates: &[f32],
    g_rs: usize,
    c: &mut [f32],
    h_next: &mut [f32],
    hn_rs: usize,
) {
    // 3 rows × 4 gates = 12 of the 16 ymm registers.
    step_all::<8, 3>(w, rows, k, h_prev, hp_rs, gates, g_rs, c, h_next, hn_rs);
}

/// One LSTM time step for `rows` rows, fused: `gates + h_prev · R` (the
/// input projection `gates` already holds bias and `x·W`), the gate
/// activations and the cell update, in one pass over the packed weights.
/// `c` (`rows × hidden`, contiguous) is updated in place and the new hidden
/// state goes to `h_next`; `h_prev` and `h_next` must not overlap, so
/// callers alternate two buffers. With `recurrent = false` (the first step
/// from a zero state) only the cell update runs.
///
/// # Panics
/// If a stride or length would reach outside a slice (a bug: the engine
/// computes every shape from the validated plan).
#[allow(clippy::too_many_arguments)]
pub(crate) fn lstm_step(
    w: &PackedRecurrent,
    rows: usize,
    recurrent: bool,
    h_prev: &[f32],
    hp_rs: usize,
    gates: &[f32],
    g_rs: usize,
    c: &mut [f32],
    h_next: &mut [f32],
    hn_rs: usize,
) {
    if rows == 0 {
        return;
    }
    let hidden = w.hidden;
    let k = if recurrent { hidden } else { 0 };
    assert!(
        hp_rs >= k && g_rs >= 4 * hidden && hn_rs >= hidden,
        "LSTM step strides"
    );
    assert!(
        k == 0 || h_prev.len() >= (rows - 1) * hp_rs + k,
        "LSTM step h_prev"
    );
    assert!(
        gates.len() >= (rows - 1) * g_rs + 4 * hidden,
        "LSTM step gates"
    );
    assert!(c.len() >= rows * hidden, "LSTM step c");
    assert!(
        h_next.len() >= (rows - 1) * hn_rs + hidden,
        "LSTM step h_next"
    );
    match w.simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `PackedRecurrent` of level `Avx512` is only built from a
        // level `detect_simd` returned or one the caller checked the CPU
        // has (`NativeEngine::with_simd`), so every feature is present.
        Simd::Avx512 => unsafe {
            step_avx512(w, rows, k, h_prev, hp_rs, gates, g_rs, c, h_next, hn_rs)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 and FMA.
        Simd::Avx2 => unsafe {
            step_avx2(w, rows, k, h_prev, hp_rs, gates, g_rs, c, h_next, hn_rs)
        },
        _ => step_all::<8, 3>(w, rows, k, h_prev, hp_rs, gates, g_rs, c, h_next, hn_rs),
    }
}

/// The instruction set the fp32 kernels are compiled for. [`detect_simd`]
/// picks the best one the CPU has, once per process; tests force each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    /// AVX-512F/VL with FMA: 16-lane registers, 32 of them.
    Avx512,
    /// AVX2 with FMA: 8-lane registers, 16 of them.
    Avx2,
    /// Whatever the compile target allows (SSE2 on x86-64).
    Portable,
}

/// Every level this CPU can run, best first.
pub fn available_simd() -> Vec<Simd> {
    match detect_simd() {
        Simd::Avx512 => vec![Simd::Avx512, Simd::Avx2, Simd::Portable],
        Simd::Avx2 => vec![Simd::Avx2, Simd::Portable],
        Simd::Portable => vec![Simd::Portable],
    }
}

/// The best level this CPU supports (checked once per process).
pub fn detect_simd() -> Simd {
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

    fn sigmoid_exact(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
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
            let lhs: Vec<f32> = (0..m * k).map(|v| ((v as f32) * 0.7).sin()).collect();
            let rhs: Vec<f32> = (0..k * n).map(|v| ((v as f32) * 0.3).cos()).collect();
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
        // (24, 37); row counts covering every register group and remainder.
        for (rows, hidden) in [(1, 128), (2, 24), (7, 37), (13, 128), (6, 16), (32, 24)] {
            let r_t: Vec<f32> = (0..hidden * 4 * hidden)
                .map(|v| ((v as f32) * 0.37).cos() * 0.2)
                .collect();
            let h: Vec<f32> = (0..rows * hidden)
                .map(|v| ((v as f32) * 0.7).sin())
                .collect();
            let gates: Vec<f32> = (0..rows * 4 * hidden)
                .map(|v| ((v as f32) * 0.13).sin() * 2.0)
                .collect();
            let c0: Vec<f32> = (0..rows * hidden)
                .map(|v| ((v as f32) * 0.11).cos())
                .collect();
            let (c_ref, h_ref) = reference_step(rows, hidden, &r_t, &h, &gates, &c0);
            let zeros = vec![0.0; rows * hidden];
            let (c_first, h_first) = reference_step(rows, hidden, &r_t, &zeros, &gates, &c0);
            for level in simd_levels() {
                let packed = PackedRecurrent::new(&r_t, hidden, level);
                // The output row stride is wider than `hidden`: values
                // between rows must stay untouched.
                let hn_rs = hidden + 3;
                for (recurrent, c_exp, h_exp) in
                    [(true, &c_ref, &h_ref), (false, &c_first, &h_first)]
                {
                    let mut c = c0.clone();
                    let mut h_next = vec![-7.0; rows * hn_rs];
                    lstm_step(
                        &packed,
                        rows,
                        recurrent,
                        &h,
                        hidden,
                        &gates,
                        4 * hidden,
                        &mut c,
                        &mut h_next,
                        hn_rs,
                    );
                    for b in 0..rows {
                        for j in 0..hidden {
                            let i = b * hidden + j;
                            let what =
                                format!("{level:?} {rows}x{hidden} rec={recurrent} [{b}][{j}]");
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
