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

/// Rows in the next register group when `remaining` rows are left and a
/// group holds at most `max`: the rows are spread evenly over the fewest
/// groups (8 rows → 4 + 4, not 6 + 2), because a group of one or two rows
/// does too few FMAs per weight load to keep up with the stream.
fn group_rows(remaining: usize, max: usize) -> usize {
    let groups = remaining.div_ceil(max);
    remaining.div_ceil(groups.max(1))
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
                let count = group_rows(tile_end - row, G);
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
        Simd::Avx512 => unsafe { x86::avx512::gemm(w, m, dst, dst_rs, lhs, lhs_rs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 and FMA.
        Simd::Avx2 => unsafe { x86::avx2::gemm(w, m, dst, dst_rs, lhs, lhs_rs) },
        _ => gemm_all::<8, 3>(w, m, dst, dst_rs, lhs, lhs_rs),
    }
}

/// The weights of one LSTM layer laid out for [`lstm_step`]: the hidden
/// units in blocks of `lanes` (one vector register), and for each block a
/// panel of `k_in + hidden` rows — the input weights `W` (none when the
/// input projection runs as a separate GEMM), then the recurrent weights
/// `R` — each row holding the block's weights for the four gates
/// (i, o, f, c) one after another (`4·lanes` floats; units past `hidden`
/// in the last block are zero). Every step then streams the whole matrix
/// once, front to back, and one block's accumulators hold all four gates of
/// the same units, so the cell update runs on them before they leave the
/// registers.
#[derive(Debug, Clone)]
pub(crate) struct PackedRecurrent {
    simd: Simd,
    lanes: usize,
    k_in: usize,
    hidden: usize,
    data: Vec<f32>,
}

impl PackedRecurrent {
    /// Packs `r_t`, the `[hidden][4·hidden]` transposed recurrent weights,
    /// for the kernel of SIMD level `simd`.
    pub(crate) fn new(r_t: &[f32], hidden: usize, simd: Simd) -> Self {
        Self::with_input(&[], 0, r_t, hidden, simd)
    }

    /// Packs `w_t` (`[k_in][4·hidden]`) above `r_t`, so each step also
    /// computes its input projection `x_t·W` (see [`lstm_step`]).
    pub(crate) fn with_input(
        w_t: &[f32],
        k_in: usize,
        r_t: &[f32],
        hidden: usize,
        simd: Simd,
    ) -> Self {
        let lanes = lanes(simd);
        let blocks = hidden.div_ceil(lanes);
        let depth = k_in + hidden;
        let mut data = vec![0.0f32; blocks * depth * 4 * lanes];
        for block in 0..blocks {
            let j0 = block * lanes;
            let width = lanes.min(hidden - j0);
            for p in 0..depth {
                let (matrix, row) = if p < k_in { (w_t, p) } else { (r_t, p - k_in) };
                for gate in 0..4 {
                    let src = row * 4 * hidden + gate * hidden + j0;
                    let dst = ((block * depth + p) * 4 + gate) * lanes;
                    data[dst..dst + width].copy_from_slice(&matrix[src..src + width]);
                }
            }
        }
        PackedRecurrent {
            simd,
            lanes,
            k_in,
            hidden,
            data,
        }
    }

    pub(crate) fn simd(&self) -> Simd {
        self.simd
    }
}

/// The operands of one LSTM step for `rows` rows (see [`lstm_step`]);
/// every `*_rs` is the distance between two rows of the same buffer.
#[derive(Debug)]
pub(crate) struct StepArgs<'a> {
    pub rows: usize,
    /// This step's input rows (`k_in` values each), read only when the
    /// weights include `W`.
    pub x: &'a [f32],
    pub x_rs: usize,
    /// The previous hidden state; `recurrent = false` for the first step
    /// (zero state), which skips `h_prev · R`.
    pub recurrent: bool,
    pub h_prev: &'a [f32],
    pub hp_rs: usize,
    /// What the products are added to: the input projection with bias, or
    /// with `g_rs = 0` the bias alone (the same row for every row).
    pub gates: &'a [f32],
    pub g_rs: usize,
    /// Cell state, `rows × hidden` contiguous, updated in place.
    pub c: &'a mut [f32],
    /// The new hidden state (must not overlap `h_prev`).
    pub h_next: &'a mut [f32],
    pub hn_rs: usize,
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
/// rows starting at `row`: `4·R` accumulators take `x · W`, which is added
/// to the bias as [`gemm_packed`] adds it, then `h_prev · R` from zero,
/// which the cell update adds to that input part. Two chains added in the
/// unfused step's order: a row's bits depend neither on its batch nor on
/// whether the step computed the input projection itself.
#[inline(always)]
fn step_block<const L: usize, const R: usize>(
    panel: &[f32],
    k_in: usize,
    hidden: usize,
    j0: usize,
    row: usize,
    a: &mut StepArgs<'_>,
) {
    let k = if a.recurrent { hidden } else { 0 };
    let width = L.min(hidden - j0);
    let mut inputs = [[0.0f32; 128]; R];
    if k_in > 0 {
        let xs: [&[f32]; R] = std::array::from_fn(|r| {
            let start = (row + r) * a.x_rs;
            &a.x[start.min(a.x.len())..(start + k_in).min(a.x.len())]
        });
        let acc = accumulate_rows::<L, R>(panel, k_in, xs);
        for (r, (acc, input)) in acc.iter().zip(&mut inputs).enumerate() {
            let gates = &a.gates[(row + r) * a.g_rs..];
            for gate in 0..4 {
                for l in 0..width {
                    input[gate * L + l] = gates[gate * hidden + j0 + l] + acc[gate][l];
                }
            }
        }
    }
    let hs: [&[f32]; R] = std::array::from_fn(|r| {
        let start = (row + r) * a.hp_rs;
        &a.h_prev[start.min(a.h_prev.len())..(start + k).min(a.h_prev.len())]
    });
    let acc = accumulate_rows::<L, R>(&panel[k_in * 4 * L..], k, hs);
    for (r, (acc, input)) in acc.iter().zip(&inputs).enumerate() {
        let mut sums = [0.0f32; 128];
        for gate in 0..4 {
            sums[gate * L..(gate + 1) * L].copy_from_slice(&acc[gate]);
        }
        let b = row + r;
        let (gates, gates_hidden, gates_j0) = if k_in > 0 {
            (&input[..], L, 0)
        } else {
            (&a.gates[b * a.g_rs..], hidden, j0)
        };
        cell_lanes::<L>(
            &sums,
            gates,
            gates_hidden,
            gates_j0,
            width,
            &mut a.c[b * hidden + j0..],
            &mut a.h_next[b * a.hn_rs + j0..],
        );
    }
}

/// `Σ_p rows[r][p] · panel[p]` from zero, in `p` order, for `R` rows and
/// one block's four gates.
#[inline(always)]
fn accumulate_rows<const L: usize, const R: usize>(
    panel: &[f32],
    k: usize,
    rows: [&[f32]; R],
) -> [[[f32; L]; 4]; R] {
    let mut acc = [[[0.0f32; L]; 4]; R];
    for p in 0..k {
        let w = &panel[p * 4 * L..(p + 1) * 4 * L];
        for r in 0..R {
            let v = rows[r][p];
            for gate in 0..4 {
                for l in 0..L {
                    acc[r][gate][l] = v.mul_add(w[gate * L + l], acc[r][gate][l]);
                }
            }
        }
    }
    acc
}

/// Runs [`step_block`] over every hidden block, and within a block over the
/// rows in groups of `G` (the register budget: `4·G` accumulators). Blocks
/// are the outer loop so one block's panel is reused from L1 by every row
/// group before the next panel streams in.
#[inline(always)]
fn step_all<const L: usize, const G: usize>(w: &PackedRecurrent, a: &mut StepArgs<'_>) {
    assert_eq!(w.lanes, L, "weights packed for another SIMD level");
    let (hidden, k_in) = (w.hidden, w.k_in);
    for (block, panel) in w.data.chunks_exact((k_in + hidden) * 4 * L).enumerate() {
        let j0 = block * L;
        let mut row = 0;
        while row < a.rows {
            let n = group_rows(a.rows - row, G);
            match n {
                1 => step_block::<L, 1>(panel, k_in, hidden, j0, row, a),
                2 => step_block::<L, 2>(panel, k_in, hidden, j0, row, a),
                3 => step_block::<L, 3>(panel, k_in, hidden, j0, row, a),
                4 => step_block::<L, 4>(panel, k_in, hidden, j0, row, a),
                5 => step_block::<L, 5>(panel, k_in, hidden, j0, row, a),
                _ => step_block::<L, 6>(panel, k_in, hidden, j0, row, a),
            }
            row += n;
        }
    }
}

/// One LSTM time step for `a.rows` rows, fused: `gates + x·W + h_prev·R`
/// (`W` only when `w` was packed with input weights; otherwise `gates`
/// already holds bias and `x·W`), the gate activations and the cell
/// update, in one pass over the packed weights. `c` is updated in place
/// and the new hidden state goes to `h_next`; callers alternate two
/// hidden-state buffers.
///
/// # Panics
/// If a stride or length would reach outside a slice (a bug: the engine
/// computes every shape from the validated plan).
pub(crate) fn lstm_step(w: &PackedRecurrent, mut a: StepArgs<'_>) {
    let rows = a.rows;
    if rows == 0 {
        return;
    }
    let (hidden, k_in) = (w.hidden, w.k_in);
    let k = if a.recurrent { hidden } else { 0 };
    assert!(
        a.x_rs >= k_in && a.hp_rs >= k && a.hn_rs >= hidden,
        "LSTM step strides"
    );
    assert!(
        (a.g_rs == 0 || a.g_rs >= 4 * hidden) && a.gates.len() >= (rows - 1) * a.g_rs + 4 * hidden,
        "LSTM step gates"
    );
    assert!(
        k_in == 0 || a.x.len() >= (rows - 1) * a.x_rs + k_in,
        "LSTM step x"
    );
    assert!(
        k == 0 || a.h_prev.len() >= (rows - 1) * a.hp_rs + k,
        "LSTM step h_prev"
    );
    assert!(a.c.len() >= rows * hidden, "LSTM step c");
    assert!(
        a.h_next.len() >= (rows - 1) * a.hn_rs + hidden,
        "LSTM step h_next"
    );
    match w.simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `PackedRecurrent` of level `Avx512` is only built from a
        // level `detect_simd` returned or one the caller checked the CPU
        // has (`NativeEngine::with_simd`), so every feature is present.
        Simd::Avx512 => unsafe { x86::avx512::step(w, &mut a) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 and FMA.
        Simd::Avx2 => unsafe { x86::avx2::step(w, &mut a) },
        _ => step_all::<8, 3>(w, &mut a),
    }
}

/// The cell update of `width ≤ L` hidden units for one row, from the
/// recurrent sums `acc` (`4·L`, gate-major) and the input projection row
/// `gates` (`4·hidden`, ONNX order i, o, f, c). Written as loops over `L`
/// lanes so each SIMD wrapper gets a vectorised copy.
#[inline(always)]
fn cell_lanes<const L: usize>(
    acc: &[f32],
    gates: &[f32],
    hidden: usize,
    j0: usize,
    width: usize,
    c: &mut [f32],
    h_next: &mut [f32],
) {
    let mut pre = [[0.0f32; L]; 4];
    for (gate, pre) in pre.iter_mut().enumerate() {
        let x = load_lanes::<L>(&gates[gate * hidden + j0..], width);
        for l in 0..L {
            pre[l] = x[l] + acc[gate * L + l];
        }
    }
    let mut cell = load_lanes::<L>(c, width);
    let mut h = [0.0f32; L];
    for l in 0..L {
        let [i, o, f, g] = [pre[0][l], pre[1][l], pre[2][l], pre[3][l]];
        cell[l] = sigmoid(f).mul_add(cell[l], sigmoid(i) * tanh(g));
        h[l] = sigmoid(o) * tanh(cell[l]);
    }
    store_lanes(c, &cell, width);
    store_lanes(h_next, &h, width);
}

/// The AVX-512 and AVX2 forms of [`gemm_block`] and [`step_block`] with
/// explicit vector registers: the compiler does not keep the portable
/// form's `[[[f32; L]; 4]; R]` accumulators in registers (measured 4×
/// slower), and these loops are the engine's whole inner loop.
#[cfg(target_arch = "x86_64")]
mod x86 {
    macro_rules! kernels {
        ($name:ident, $feature:literal, $lanes:literal, $group:literal, $vector:ty, $zero:ident, $load:ident,
         $store:ident, $set1:ident, $fma:ident, $add:ident) => {
            pub(super) mod $name {
                #[allow(clippy::wildcard_imports)]
                use std::arch::x86_64::*;

                use super::super::{PackedMatrix, PackedRecurrent, StepArgs, cell_lanes};

                type Vector = $vector;

                const L: usize = $lanes;

                /// `R` rows × one `4·L`-column block of `dst += lhs · panel`.
                ///
                /// # Safety
                /// The CPU has `$feature`; `panel` holds `k·4·L` floats;
                /// rows `0..R` of `lhs` (stride `lhs_rs`) hold `k` floats
                /// and of `dst` (stride `dst_rs`) `cols ≤ 4·L` floats.
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn gemm_block<const R: usize>(
                    panel: *const f32,
                    k: usize,
                    cols: usize,
                    dst: *mut f32,
                    dst_rs: usize,
                    lhs: *const f32,
                    lhs_rs: usize,
                ) {
                    // SAFETY: the caller guarantees every offset below is in
                    // bounds (see `# Safety`).
                    unsafe {
                        let mut acc = [[$zero(); 4]; R];
                        for p in 0..k {
                            let w = panel.add(p * 4 * L);
                            let w = [
                                $load(w),
                                $load(w.add(L)),
                                $load(w.add(2 * L)),
                                $load(w.add(3 * L)),
                            ];
                            for (r, acc) in acc.iter_mut().enumerate() {
                                let a = $set1(*lhs.add(r * lhs_rs + p));
                                for v in 0..4 {
                                    acc[v] = $fma(a, w[v], acc[v]);
                                }
                            }
                        }
                        for (r, acc) in acc.iter().enumerate() {
                            let d = dst.add(r * dst_rs);
                            if cols == 4 * L {
                                for v in 0..4 {
                                    $store(d.add(v * L), $add($load(d.add(v * L)), acc[v]));
                                }
                            } else {
                                let mut sums = [0.0f32; 4 * L];
                                for v in 0..4 {
                                    $store(sums.as_mut_ptr().add(v * L), acc[v]);
                                }
                                for (j, sum) in sums.iter().enumerate().take(cols) {
                                    *d.add(j) += sum;
                                }
                            }
                        }
                    }
                }

                /// [`super::super::gemm_packed`] at this level.
                ///
                /// # Safety
                /// The CPU has `$feature`; `gemm_packed` checked the bounds.
                #[target_feature(enable = $feature)]
                pub(crate) unsafe fn gemm(
                    w: &PackedMatrix,
                    m: usize,
                    dst: &mut [f32],
                    dst_rs: usize,
                    lhs: &[f32],
                    lhs_rs: usize,
                ) {
                    assert_eq!(w.lanes, L, "weights packed for another SIMD level");
                    let (k, n, width) = (w.k, w.n, 4 * L);
                    for tile in (0..m).step_by(super::super::GEMM_TILE_ROWS) {
                        let tile_end = m.min(tile + super::super::GEMM_TILE_ROWS);
                        for (block, panel) in w.data.chunks_exact(k * width).enumerate() {
                            let col = block * width;
                            let cols = width.min(n - col);
                            let mut row = tile;
                            while row < tile_end {
                                let count = super::super::group_rows(tile_end - row, $group);
                                let d = dst[row * dst_rs + col..].as_mut_ptr();
                                let l = lhs[row * lhs_rs..].as_ptr();
                                macro_rules! go {
                                    ($r:literal) => {
                                        // SAFETY: `gemm_packed` checked that `count`
                                        // rows from `row` fit `dst` and `lhs`.
                                        unsafe {
                                            gemm_block::<$r>(
                                                panel.as_ptr(),
                                                k,
                                                cols,
                                                d,
                                                dst_rs,
                                                l,
                                                lhs_rs,
                                            )
                                        }
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

                /// `acc[r] += Σ_p src[r·rs + p] · panel[p]` over `k` rows
                /// of the panel, for `R` rows.
                ///
                /// # Safety
                /// The CPU has `$feature`; `panel` holds `k·4·L` floats and
                /// rows `0..R` of `src` (stride `rs`) hold `k` floats.
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn accumulate<const R: usize>(
                    acc: &mut [[Vector; 4]; R],
                    panel: *const f32,
                    k: usize,
                    src: *const f32,
                    rs: usize,
                ) {
                    // SAFETY: the caller guarantees every offset below is in
                    // bounds (see `# Safety`).
                    unsafe {
                        for p in 0..k {
                            let w = panel.add(p * 4 * L);
                            let w = [
                                $load(w),
                                $load(w.add(L)),
                                $load(w.add(2 * L)),
                                $load(w.add(3 * L)),
                            ];
                            for (r, acc) in acc.iter_mut().enumerate() {
                                let a = $set1(*src.add(r * rs + p));
                                for v in 0..4 {
                                    acc[v] = $fma(a, w[v], acc[v]);
                                }
                            }
                        }
                    }
                }

                /// [`accumulate`] for one row over two hidden blocks at once
                /// (`panels[0]`, `panels[1]`): eight independent FMA chains
                /// hide the FMA latency that four would expose, and each
                /// block's chain runs in the same order as in `accumulate`,
                /// so a row alone gets the bits it gets in a batch.
                ///
                /// # Safety
                /// As [`accumulate`], for both panels.
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn accumulate_pair(
                    acc: &mut [[Vector; 4]; 2],
                    panels: [*const f32; 2],
                    k: usize,
                    src: *const f32,
                ) {
                    // SAFETY: the caller guarantees every offset below is in
                    // bounds (see `# Safety`).
                    unsafe {
                        for p in 0..k {
                            let a = $set1(*src.add(p));
                            for (acc, panel) in acc.iter_mut().zip(panels) {
                                let w = panel.add(p * 4 * L);
                                for v in 0..4 {
                                    acc[v] = $fma(a, $load(w.add(v * L)), acc[v]);
                                }
                            }
                        }
                    }
                }

                /// The input part of one row's gates for one hidden block:
                /// what the step adds `x·W` to (the bias, `gates` of the
                /// row) plus that product, rounded as the separate GEMM
                /// rounds it (`gemm_packed` adds its sums to the bias the
                /// same way), so the fused and unfused steps agree bit for
                /// bit.
                ///
                /// # Safety
                /// The CPU has `$feature`.
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn input_part(
                    acc: &[Vector; 4],
                    gates: &[f32],
                    hidden: usize,
                    j0: usize,
                    width: usize,
                ) -> [f32; 4 * L] {
                    let mut part = [0.0f32; 4 * L];
                    for (v, acc) in acc.iter().enumerate() {
                        let bias = &gates[v * hidden + j0..v * hidden + j0 + width];
                        let out = part[v * L..].as_mut_ptr();
                        if width == L {
                            // SAFETY: `bias` and `part` hold L floats here.
                            unsafe { $store(out, $add($load(bias.as_ptr()), *acc)) };
                        } else {
                            // SAFETY: `part` holds 4·L floats.
                            unsafe { $store(out, *acc) };
                            for (sum, bias) in part[v * L..v * L + width].iter_mut().zip(bias) {
                                *sum += bias;
                            }
                        }
                    }
                    part
                }

                /// Adds the input part to a row's recurrent sums and runs the
                /// cell update: `input` is that row's [`input_part`] when the
                /// step computes `x·W` itself, else the row of `a.gates`.
                ///
                /// # Safety
                /// The CPU has `$feature`; row `b` is in bounds.
                #[allow(clippy::too_many_arguments)]
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn finish_row(
                    acc: &[Vector; 4],
                    input: Option<&[f32; 4 * L]>,
                    hidden: usize,
                    j0: usize,
                    width: usize,
                    b: usize,
                    a: &mut StepArgs<'_>,
                ) {
                    let mut sums = [0.0f32; 4 * L];
                    for (v, acc) in acc.iter().enumerate() {
                        // SAFETY: `sums` holds 4·L floats.
                        unsafe { $store(sums.as_mut_ptr().add(v * L), *acc) };
                    }
                    let (gates, gates_hidden, gates_j0) = match input {
                        Some(part) => (&part[..], L, 0),
                        None => (&a.gates[b * a.g_rs..], hidden, j0),
                    };
                    cell_lanes::<L>(
                        &sums,
                        gates,
                        gates_hidden,
                        gates_j0,
                        width,
                        &mut a.c[b * hidden + j0..],
                        &mut a.h_next[b * a.hn_rs + j0..],
                    );
                }

                /// `R` rows from `row` × one hidden block of the fused step.
                /// The input product and the recurrent product run as two
                /// chains from zero, added as the unfused step adds them, so
                /// a row's bits do not depend on which step its batch used.
                ///
                /// # Safety
                /// The CPU has `$feature`; `lstm_step` checked that rows
                /// `row..row + R` are in bounds; `panel` holds
                /// `(k_in + hidden)·4·L` floats.
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn step_block<const R: usize>(
                    panel: &[f32],
                    k_in: usize,
                    hidden: usize,
                    j0: usize,
                    row: usize,
                    a: &mut StepArgs<'_>,
                ) {
                    let width = L.min(hidden - j0);
                    let mut inputs = [[0.0f32; 4 * L]; R];
                    if k_in > 0 {
                        let mut acc = [[$zero(); 4]; R];
                        // SAFETY: `lstm_step` checked `x` holds these rows.
                        unsafe {
                            accumulate::<R>(
                                &mut acc,
                                panel.as_ptr(),
                                k_in,
                                a.x.as_ptr().add(row * a.x_rs),
                                a.x_rs,
                            );
                            for (r, acc) in acc.iter().enumerate() {
                                inputs[r] = input_part(
                                    acc,
                                    &a.gates[(row + r) * a.g_rs..],
                                    hidden,
                                    j0,
                                    width,
                                );
                            }
                        }
                    }
                    let mut acc = [[$zero(); 4]; R];
                    if a.recurrent {
                        // SAFETY: `lstm_step` checked `h_prev` holds these rows.
                        unsafe {
                            accumulate::<R>(
                                &mut acc,
                                panel.as_ptr().add(k_in * 4 * L),
                                hidden,
                                a.h_prev.as_ptr().add(row * a.hp_rs),
                                a.hp_rs,
                            )
                        };
                    }
                    for (r, acc) in acc.iter().enumerate() {
                        let input = (k_in > 0).then_some(&inputs[r]);
                        // SAFETY: row `row + r` is in bounds (see `# Safety`).
                        unsafe { finish_row(acc, input, hidden, j0, width, row + r, a) };
                    }
                }

                /// [`step_block`] for a one-row step over two neighbouring
                /// hidden blocks (`j0` and `j0 + L`), with [`accumulate_pair`].
                ///
                /// # Safety
                /// The CPU has `$feature`; `lstm_step` checked row 0 is in
                /// bounds; both panels hold `(k_in + hidden)·4·L` floats and
                /// the second block starts below `hidden`.
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn step_pair(
                    panels: [&[f32]; 2],
                    k_in: usize,
                    hidden: usize,
                    j0: usize,
                    a: &mut StepArgs<'_>,
                ) {
                    let starts = [j0, j0 + L];
                    let widths = starts.map(|j| L.min(hidden - j));
                    let mut inputs = [[0.0f32; 4 * L]; 2];
                    if k_in > 0 {
                        let mut acc = [[$zero(); 4]; 2];
                        // SAFETY: `lstm_step` checked `x` holds row 0.
                        unsafe {
                            accumulate_pair(
                                &mut acc,
                                panels.map(<[f32]>::as_ptr),
                                k_in,
                                a.x.as_ptr(),
                            );
                            for i in 0..2 {
                                inputs[i] =
                                    input_part(&acc[i], a.gates, hidden, starts[i], widths[i]);
                            }
                        }
                    }
                    let mut acc = [[$zero(); 4]; 2];
                    if a.recurrent {
                        // SAFETY: `lstm_step` checked `h_prev` holds row 0.
                        unsafe {
                            accumulate_pair(
                                &mut acc,
                                panels.map(|p| p.as_ptr().add(k_in * 4 * L)),
                                hidden,
                                a.h_prev.as_ptr(),
                            )
                        };
                    }
                    for i in 0..2 {
                        let input = (k_in > 0).then_some(&inputs[i]);
                        // SAFETY: row 0 is in bounds (see `# Safety`).
                        unsafe { finish_row(&acc[i], input, hidden, starts[i], widths[i], 0, a) };
                    }
                }

                /// [`super::super::lstm_step`] at this level.
                ///
                /// # Safety
                /// The CPU has `$feature`; `lstm_step` checked the bounds.
                #[target_feature(enable = $feature)]
                pub(crate) unsafe fn step(w: &PackedRecurrent, a: &mut StepArgs<'_>) {
                    assert_eq!(w.lanes, L, "weights packed for another SIMD level");
                    let (hidden, k_in) = (w.hidden, w.k_in);
                    let panel_len = (k_in + hidden) * 4 * L;
                    if a.rows == 1 {
                        // One row leaves one block four chains; two blocks
                        // at a time give it eight.
                        let mut pairs = w.data.chunks(2 * panel_len).enumerate();
                        for (pair, panels) in &mut pairs {
                            let j0 = pair * 2 * L;
                            // SAFETY: `lstm_step` checked row 0; a pair's
                            // second panel is a whole block below `hidden`.
                            unsafe {
                                if panels.len() == 2 * panel_len {
                                    let (first, second) = panels.split_at(panel_len);
                                    step_pair([first, second], k_in, hidden, j0, a);
                                } else {
                                    step_block::<1>(panels, k_in, hidden, j0, 0, a);
                                }
                            }
                        }
                        return;
                    }
                    for (block, panel) in w.data.chunks_exact(panel_len).enumerate() {
                        let j0 = block * L;
                        let mut row = 0;
                        while row < a.rows {
                            let count = super::super::group_rows(a.rows - row, $group);
                            // SAFETY: `count` rows from `row` are in bounds.
                            unsafe {
                                match count {
                                    1 => step_block::<1>(panel, k_in, hidden, j0, row, a),
                                    2 => step_block::<2>(panel, k_in, hidden, j0, row, a),
                                    3 => step_block::<3>(panel, k_in, hidden, j0, row, a),
                                    4 => step_block::<4>(panel, k_in, hidden, j0, row, a),
                                    5 => step_block::<5>(panel, k_in, hidden, j0, row, a),
                                    _ => step_block::<6>(panel, k_in, hidden, j0, row, a),
                                }
                            }
                            row += count;
                        }
                    }
                }
            }
        };
    }

    // 6 rows × 4 vectors = 24 of the 32 zmm registers.
    kernels!(
        avx512,
        "avx512f,avx512vl,avx2,fma",
        16,
        6,
        __m512,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps
    );
    // 3 rows × 4 vectors = 12 of the 16 ymm registers.
    kernels!(
        avx2,
        "avx2,fma",
        8,
        3,
        __m256,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps
    );
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
            // The same step with the input projection inside: `k_in` input
            // values per row (stride 5 wider), `W`, and a bias row that
            // every row shares (`g_rs = 0`).
            let k_in = 11;
            let x_rs = k_in + 5;
            let x: Vec<f32> = (0..rows * x_rs)
                .map(|v| ((v as f32) * 0.29).cos())
                .collect();
            let w_t: Vec<f32> = (0..k_in * 4 * hidden)
                .map(|v| ((v as f32) * 0.53).sin() * 0.3)
                .collect();
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
                for (recurrent, fused) in
                    [(true, false), (false, false), (true, true), (false, true)]
                {
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
