//! Dense kernels of the native engine: a GEMM on pre-packed weights, the
//! LSTM cell update, and the fused LSTM step
//! (recurrent product, gate activations and cell update in one pass over
//! pre-packed weights).
//!
//! Every layer of the CNN+LSTM family reduces to GEMMs (convolution taps,
//! the LSTM input projection for all time steps, the recurrent product, the
//! head) plus element-wise work, so this is the whole numeric core.
//!
//! The GEMM is in `gemm`, the fused LSTM step in `lstm`, their explicit
//! AVX-512/AVX2 forms in `x86`, and CPU feature detection (for these and
//! the low-precision kernels of `crate::quant`) in `simd`; this file keeps
//! the activations and the per-row cell update they share.

mod gemm;
mod lstm;
pub(crate) mod simd;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(target_arch = "x86_64")]
use gemm::GEMM_TILE_ROWS;
pub(crate) use gemm::{PackedMatrix, gemm_packed};
#[cfg(target_arch = "x86_64")]
use lstm::cell_lanes;
pub(crate) use lstm::{PackedRecurrent, StepArgs, lstm_step};
pub use simd::{Simd, available_simd, detect_simd};

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
