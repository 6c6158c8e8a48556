//! Reduced-precision weights and their GEMM kernels: int8 and bf16.
//!
//! A model is always read as fp32 from ONNX; [`LowMat::new`] converts one
//! GEMM right-hand side (`[k][n]`, row-major, as the fp32 layers keep it)
//! at load. At run time each call converts its left-hand rows (int8: a
//! scale and zero point per row; bf16: round to nearest even), runs the
//! low-precision dot products and adds `row_scale · col_scale · dot` (int8)
//! or the fp32 sum (bf16) onto the fp32 destination, which already holds
//! the bias. Everything around the GEMMs (gate non-linearities, cell state,
//! ReLU) stays fp32.
//!
//! Weight layout, shared by every SIMD level so one packing serves all:
//! columns in blocks of 16 (zero-padded), and inside a block, for each
//! group of 4 (int8) or 2 (bf16) consecutive `k`, the 16 columns' group
//! values next to each other: exactly one 64-byte operand of `vpdpbusd`
//! or `vdpbf16ps`. Left-hand rows are padded with zeros to whole groups.
//!
//! int8 activations are asymmetric unsigned bytes per row (`x ≈ scale ·
//! (u − zero_point)`, 255 steps between the row's minimum and maximum,
//! zero exact), weights symmetric signed bytes per output column: exactly
//! what `vpdpbusd` multiplies (u8 × i8). The zero point is taken out after
//! the integer sums, `Σ (u − z)·w = Σ u·w − z · Σ w`, with `Σ w` per column
//! precomputed. The int32 sums are exact on every path (255 · 127 · k <
//! 2^31 for k < 66 000), so all SIMD levels give bit-identical dot
//! products. Asymmetric activations halve the rounding error of
//! symmetric ones on this model family, where most GEMM inputs are ReLU
//! outputs (never negative).
//!
//! Where the activation scale comes from is the weights' business
//! ([`QWeights::act`]): none means dynamic (each row's own range, scanned
//! per call); a fixed [`ActQuant`] comes from calibration
//! (`calibrate.rs`) or from a QDQ model's own QuantizeLinear
//! (`recognise.rs`). The kernels are the same for all three.
//!
//! SIMD levels ([`LowSimd`]): AVX-512 VNNI/BF16, AVX2 (a hand-written
//! int8 kernel, see [`avx2`]) and portable loops, detected in
//! `crate::kernels::simd` with the fp32 levels.

#[cfg(test)]
pub(crate) use crate::kernels::simd::low_simd_levels;
pub(crate) use crate::kernels::simd::{LowSimd, detect_low_simd};

/// Numeric precision the native engine runs a model's GEMMs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// The model as exported.
    #[default]
    Fp32,
    /// Weights and activations rounded to bfloat16, fp32 accumulation.
    Bf16,
    /// Weights int8 per output channel, activations int8 per row at run
    /// time, int32 accumulation.
    Int8,
}

impl Precision {
    /// Every precision, in the order tables list them.
    pub const ALL: [Precision; 3] = [Precision::Fp32, Precision::Bf16, Precision::Int8];

    /// The configuration spelling (`"fp32"`, `"bf16"`, `"int8"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        }
    }

    /// Parses the configuration spelling.
    pub fn parse(name: &str) -> Option<Precision> {
        Precision::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Columns per packed block (one 512-bit register of int32/fp32 lanes).
const COLS: usize = 16;

/// An int8 GEMM right-hand side, quantised per output column.
#[derive(Debug, Clone)]
pub(crate) struct QWeights {
    k: usize,
    n: usize,
    /// `k` rounded up to a multiple of 4.
    k_pad: usize,
    /// `[n/16 blocks][k_pad/4 groups][16 columns][4]`.
    packed: Vec<i8>,
    /// Dequantisation scale of each (padded) column.
    col_scale: Vec<f32>,
    /// `Σ_k w[k][j]`, to take each row's zero point out of its sums.
    col_sum: Vec<i32>,
    /// Fixed quantisation of the left-hand rows (int8 static, QDQ); `None`
    /// quantises each row from its own range at run time (dynamic).
    pub(crate) act: Option<ActQuant>,
    /// Which GEMM input this is, for the calibration [`Observer`].
    pub(crate) site: usize,
}

/// Fixed quantisation of one GEMM input, for static int8 and QDQ models:
/// `x ≈ scale · (q − zero)` with `q` an unsigned byte. Values outside
/// `[−scale·zero, scale·(255 − zero)]` saturate to the nearest end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ActQuant {
    pub scale: f32,
    pub zero: i32,
}

impl ActQuant {
    /// 255 steps over `[lo, hi]` widened to include 0, so zeros (padding,
    /// ReLU outputs) stay exact: the same rule as a dynamic row.
    pub(crate) fn from_range(lo: f32, hi: f32) -> Self {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
        let zero = round_small(-lo * (1.0 / scale)).clamp(0.0, 255.0);
        ActQuant {
            scale,
            zero: zero as i32,
        }
    }

    /// Rounds `values` to the grid in place (QuantizeLinear then
    /// DequantizeLinear), for QDQ pairs whose consumer runs in fp32.
    pub(crate) fn fake_quantize(&self, values: &mut [f32]) {
        let (inv, zero) = (1.0 / self.scale, self.zero as f32);
        for v in values {
            *v = (quantize_one(*v, inv, zero) - zero) * self.scale;
        }
    }
}

/// `v / scale + zero` rounded to nearest even and saturated to [0, 255],
/// as a float holding an integer.
#[inline(always)]
fn quantize_one(v: f32, inv: f32, zero: f32) -> f32 {
    let y = v * inv + zero;
    let y = if y < 0.0 { 0.0 } else { y };
    let y = if y > 255.0 { 255.0 } else { y };
    round_small(y)
}

/// A bf16 GEMM right-hand side.
#[derive(Debug, Clone)]
pub(crate) struct BWeights {
    k: usize,
    n: usize,
    /// `k` rounded up to a multiple of 2.
    k_pad: usize,
    /// `[n/16 blocks][k_pad/2 pairs][16 columns][2]` bf16 bit patterns.
    packed: Vec<u16>,
}

/// A GEMM right-hand side held in a reduced precision.
#[derive(Debug, Clone)]
pub(crate) enum LowMat {
    /// Boxed: the int8 form carries more bookkeeping than the bf16 one.
    Int8(Box<QWeights>),
    Bf16(BWeights),
}

fn blocks(n: usize) -> usize {
    n.div_ceil(COLS)
}

/// Rounds to the nearest bf16, ties to even (NaN kept quiet). Written
/// with a select instead of an early return so row loops vectorise.
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet = ((bits >> 16) | 0x40) as u16;
    if x.is_nan() { quiet } else { rounded }
}

pub(crate) fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

impl QWeights {
    /// Quantises `w[k][n]` (row-major) symmetrically per column.
    pub(crate) fn new(w: &[f32], k: usize, n: usize) -> Self {
        let k_pad = k.div_ceil(4) * 4;
        let n_pad = blocks(n) * COLS;
        let mut col_scale = vec![0.0f32; n_pad];
        let mut col_sum = vec![0i32; n_pad];
        let mut q = vec![0i8; k_pad * n_pad];
        for j in 0..n {
            let max = (0..k).map(|p| w[p * n + j].abs()).fold(0.0f32, f32::max);
            let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
            col_scale[j] = scale;
            let mut sum = 0i32;
            for p in 0..k {
                let v = (w[p * n + j] / scale).round().clamp(-127.0, 127.0) as i8;
                q[p * n_pad + j] = v;
                sum += v as i32;
            }
            col_sum[j] = sum;
        }
        Self::pack(k, n, &q, col_scale, col_sum)
    }

    /// Already-quantised weights `q[k][n]` with one scale per column (a
    /// QDQ model's own int8 initializer and scales), used as they are.
    pub(crate) fn from_quantized(q: &[i8], k: usize, n: usize, scales: &[f32]) -> Self {
        let k_pad = k.div_ceil(4) * 4;
        let n_pad = blocks(n) * COLS;
        let mut padded = vec![0i8; k_pad * n_pad];
        let mut col_scale = vec![1.0f32; n_pad];
        let mut col_sum = vec![0i32; n_pad];
        for j in 0..n {
            col_scale[j] = scales[j];
            for p in 0..k {
                padded[p * n_pad + j] = q[p * n + j];
                col_sum[j] += q[p * n + j] as i32;
            }
        }
        Self::pack(k, n, &padded, col_scale, col_sum)
    }

    /// Packs `q[k_pad][n_pad]` (zero-padded) into the kernels' layout.
    fn pack(k: usize, n: usize, q: &[i8], col_scale: Vec<f32>, col_sum: Vec<i32>) -> Self {
        let k_pad = k.div_ceil(4) * 4;
        let n_pad = blocks(n) * COLS;
        let groups = k_pad / 4;
        let mut packed = vec![0i8; k_pad * n_pad];
        for b in 0..blocks(n) {
            for g in 0..groups {
                for c in 0..COLS {
                    for e in 0..4 {
                        packed[((b * groups + g) * COLS + c) * 4 + e] =
                            q[(g * 4 + e) * n_pad + b * COLS + c];
                    }
                }
            }
        }
        QWeights {
            k,
            n,
            k_pad,
            packed,
            col_scale,
            col_sum,
            act: None,
            site: 0,
        }
    }
}

impl BWeights {
    pub(crate) fn new(w: &[f32], k: usize, n: usize) -> Self {
        let k_pad = k.div_ceil(2) * 2;
        let pairs = k_pad / 2;
        let mut packed = vec![0u16; blocks(n) * COLS * k_pad];
        for b in 0..blocks(n) {
            for g in 0..pairs {
                for c in 0..COLS {
                    for e in 0..2 {
                        let (p, j) = (g * 2 + e, b * COLS + c);
                        if p < k && j < n {
                            packed[((b * pairs + g) * COLS + c) * 2 + e] = to_bf16(w[p * n + j]);
                        }
                    }
                }
            }
        }
        BWeights {
            k,
            n,
            k_pad,
            packed,
        }
    }
}

/// Int8 activation rows: unsigned bytes with a scale and zero point per
/// row.
#[derive(Debug, Default, Clone)]
pub(crate) struct QRows {
    /// `m` rows of `k_pad` bytes (padding 0: it meets zero weights).
    pub q: Vec<u8>,
    pub scale: Vec<f32>,
    pub zero: Vec<i32>,
}

/// Rounds a value in [0, 2^22) to the nearest integer, ties to even:
/// adding 1.5·2^23 leaves no fraction bits. Plain arithmetic, so the row
/// loops vectorise (`f32::round` is a libm call on baseline x86-64).
#[inline(always)]
fn round_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

impl QRows {
    /// Rows `row0..` (of `k_pad` bytes each) as the kernels read them.
    pub(crate) fn view(&self, row0: usize, k_pad: usize) -> QView<'_> {
        QView {
            q: &self.q[row0 * k_pad..],
            scale: &self.scale[row0..],
            zero: &self.zero[row0..],
        }
    }
}

/// Borrowed int8 activation rows, starting at some row of a [`QRows`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct QView<'a> {
    pub q: &'a [u8],
    pub scale: &'a [f32],
    pub zero: &'a [i32],
}

/// Quantises `m` rows of `k` values (row stride `rs`) to unsigned bytes,
/// one scale and zero point per row, into rows of `k_pad` bytes.
pub(crate) fn quantize_rows(
    simd: LowSimd,
    m: usize,
    k: usize,
    k_pad: usize,
    src: &[f32],
    rs: usize,
    out: &mut QRows,
) {
    // Not cleared: every level writes each row's `k` bytes and zeroes its
    // padding itself, so the buffer (reused every call, e.g. for the
    // recurrent product of every LSTM step) is not memset first.
    out.q.resize(m * k_pad, 0);
    out.scale.clear();
    out.zero.clear();
    match simd {
        #[cfg(target_arch = "x86_64")]
        LowSimd::Avx512 => {
            assert!(m == 0 || (rs >= k && src.len() >= (m - 1) * rs + k));
            // SAFETY: `LowSimd::Avx512` comes from `detect_low_simd` only
            // after the CPU reported avx512f and avx512bw; the bounds of
            // `src` were checked just above and `out.q` holds `m` rows.
            unsafe { avx512_rows::quantize(m, k, k_pad, src, rs, out) }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `LowSimd::Avx2` is only used where avx2 and fma exist.
        LowSimd::Avx2 => unsafe { quantize_avx2(m, k, k_pad, src, rs, out) },
        _ => quantize_body(m, k, k_pad, src, rs, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_avx2(m: usize, k: usize, k_pad: usize, src: &[f32], rs: usize, out: &mut QRows) {
    quantize_body(m, k, k_pad, src, rs, out);
}

/// A row's scale, reciprocal and zero point from its range (which
/// includes 0). Shared by every level so they agree bit for bit.
#[inline(always)]
fn row_params(lo: f32, hi: f32) -> (f32, f32, f32) {
    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
    let inv = 1.0 / scale;
    let zero = round_small(-lo * inv).clamp(0.0, 255.0);
    (scale, inv, zero)
}

#[inline(always)]
fn quantize_body(m: usize, k: usize, k_pad: usize, src: &[f32], rs: usize, out: &mut QRows) {
    const LANES: usize = 16;
    for r in 0..m {
        let row = &src[r * rs..r * rs + k];
        // Lane-wise minimum and maximum, reduced at the end: a single
        // running min/max is an ordered reduction LLVM will not vectorise.
        let (mut lo, mut hi) = ([0.0f32; LANES], [0.0f32; LANES]);
        let mut chunks = row.chunks_exact(LANES);
        // Compare-and-select, not `f32::min`: its NaN rules kept LLVM
        // from vectorising this loop at all.
        for chunk in &mut chunks {
            for j in 0..LANES {
                lo[j] = if chunk[j] < lo[j] { chunk[j] } else { lo[j] };
                hi[j] = if chunk[j] > hi[j] { chunk[j] } else { hi[j] };
            }
        }
        for (j, &v) in chunks.remainder().iter().enumerate() {
            lo[j] = if v < lo[j] { v } else { lo[j] };
            hi[j] = if v > hi[j] { v } else { hi[j] };
        }
        let lo = lo.iter().fold(0.0f32, |a, &v| a.min(v));
        let hi = hi.iter().fold(0.0f32, |a, &v| a.max(v));
        let (scale, inv, zero) = row_params(lo, hi);
        quantize_row(&mut out.q[r * k_pad..r * k_pad + k], row, inv, zero);
        out.q[r * k_pad + k..(r + 1) * k_pad].fill(0);
        out.scale.push(scale);
        out.zero.push(zero as i32);
    }
}

/// An AVX-512 lane mask with the first `n` of 16 lanes set (all 16 from
/// `n = 16` on): the tail of a row or of a column block.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lanes16(n: usize) -> u16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as u16
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512_rows {
    //! Dynamic row quantisation in AVX-512 intrinsics. The auto-vectorised
    //! [`super::quantize_body`] stored the bytes one at a time and reduced
    //! the range through memory; with this, quantising fell from 15 % to
    //! 6 % of a batch-32 dynamic int8 profile (it runs for every GEMM
    //! input, the recurrent `h` of every LSTM step included).
    //! It computes exactly what the portable loop does: `min`/`max` with
    //! the new value first (a NaN keeps the running value, as the
    //! compare-and-select does), `v·inv` and `+ zero` as two roundings (no
    //! FMA), the clamp, and rounding to nearest even (`vcvtps2dq` under the
    //! default MXCSR, equal to the 1.5·2^23 trick on [0, 255]).

    use std::arch::x86_64::*;

    use super::{QRows, row_params};

    /// Lanes of a 16-value chunk inside a row of `len` from `at`.
    #[inline(always)]
    fn mask(len: usize, at: usize) -> __mmask16 {
        super::lanes16(len - at)
    }

    /// # Safety
    /// The CPU must support avx512f/bw/vl; `src` holds `m` rows of `k`
    /// values at stride `rs`, and `out.q` `m` rows of `k_pad >= k` bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn quantize(
        m: usize,
        k: usize,
        k_pad: usize,
        src: &[f32],
        rs: usize,
        out: &mut QRows,
    ) {
        assert!(k_pad >= k && out.q.len() >= m * k_pad);
        for r in 0..m {
            let row = src[r * rs..r * rs + k].as_ptr();
            // SAFETY (this block): every load reads `row[at..at + 16]`
            // masked to the row's `k` values; every store writes
            // `q[r·k_pad + at..]` masked to the row's `k_pad` bytes.
            unsafe {
                // Two accumulator pairs hide the min/max latency.
                let zero_v = _mm512_setzero_ps();
                let (mut lo0, mut hi0, mut lo1, mut hi1) = (zero_v, zero_v, zero_v, zero_v);
                let mut at = 0;
                while at + 32 <= k {
                    let a = _mm512_loadu_ps(row.add(at));
                    let b = _mm512_loadu_ps(row.add(at + 16));
                    lo0 = _mm512_min_ps(a, lo0);
                    hi0 = _mm512_max_ps(a, hi0);
                    lo1 = _mm512_min_ps(b, lo1);
                    hi1 = _mm512_max_ps(b, hi1);
                    at += 32;
                }
                while at < k {
                    // Masked-off lanes load 0, which the range holds anyway.
                    let a = _mm512_maskz_loadu_ps(mask(k, at), row.add(at));
                    lo0 = _mm512_min_ps(a, lo0);
                    hi0 = _mm512_max_ps(a, hi0);
                    at += 16;
                }
                let lo = _mm512_reduce_min_ps(_mm512_min_ps(lo1, lo0));
                let hi = _mm512_reduce_max_ps(_mm512_max_ps(hi1, hi0));
                let (scale, inv, zero) = row_params(lo, hi);
                let (inv_v, zp_v) = (_mm512_set1_ps(inv), _mm512_set1_ps(zero));
                let top = _mm512_set1_ps(255.0);
                let dst = out.q.as_mut_ptr().add(r * k_pad);
                let mut at = 0;
                while at < k_pad {
                    let y = if at < k {
                        let v = _mm512_maskz_loadu_ps(mask(k, at), row.add(at));
                        let y = _mm512_add_ps(_mm512_mul_ps(v, inv_v), zp_v);
                        // The bound second: a NaN `y` becomes 0, as the
                        // portable loop's low byte of NaN + 1.5·2^23 is.
                        _mm512_min_ps(_mm512_max_ps(y, zero_v), top)
                    } else {
                        zero_v
                    };
                    // Lanes past `k` (the padding) hold 0 → byte 0.
                    let y = _mm512_maskz_mov_ps(mask(k.max(at), at), y);
                    let bytes = _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(y));
                    _mm_mask_storeu_epi8(dst.add(at).cast(), mask(k_pad, at), bytes);
                    at += 16;
                }
                out.scale.push(scale);
                out.zero.push(zero as i32);
            }
        }
    }
}

#[inline(always)]
fn quantize_row(dst: &mut [u8], row: &[f32], inv: f32, zero: f32) {
    for (d, &v) in dst.iter_mut().zip(row) {
        // Clamped to [0, 255] (rounding can step just outside), then
        // rounded by adding 1.5·2^23: the integer is the low mantissa
        // byte, so no float-to-int conversion is needed.
        let y = v * inv + zero;
        let y = if y < 0.0 { 0.0 } else { y };
        let y = if y > 255.0 { 255.0 } else { y };
        *d = (y + 12_582_912.0).to_bits() as u8;
    }
}

/// Quantises `m` rows with one fixed scale and zero point (static int8):
/// no scan for each row's range, values outside it saturate.
#[allow(clippy::too_many_arguments)]
pub(crate) fn quantize_rows_static(
    simd: LowSimd,
    m: usize,
    k: usize,
    k_pad: usize,
    src: &[f32],
    rs: usize,
    act: ActQuant,
    out: &mut QRows,
) {
    out.q.clear();
    out.q.resize(m * k_pad, 0);
    out.scale.clear();
    out.scale.resize(m, act.scale);
    out.zero.clear();
    out.zero.resize(m, act.zero);
    let (inv, zero) = (1.0 / act.scale, act.zero as f32);
    match simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `LowSimd::Avx512` comes from `detect_low_simd` only after
        // the CPU reported avx512f and avx512bw.
        LowSimd::Avx512 => unsafe { quantize_static_avx512(m, k, k_pad, src, rs, inv, zero, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `LowSimd::Avx2` is only used where avx2 and fma exist.
        LowSimd::Avx2 => unsafe { quantize_static_avx2(m, k, k_pad, src, rs, inv, zero, out) },
        _ => quantize_static_body(m, k, k_pad, src, rs, inv, zero, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn quantize_static_avx512(
    m: usize,
    k: usize,
    k_pad: usize,
    src: &[f32],
    rs: usize,
    inv: f32,
    zero: f32,
    out: &mut QRows,
) {
    quantize_static_body(m, k, k_pad, src, rs, inv, zero, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn quantize_static_avx2(
    m: usize,
    k: usize,
    k_pad: usize,
    src: &[f32],
    rs: usize,
    inv: f32,
    zero: f32,
    out: &mut QRows,
) {
    quantize_static_body(m, k, k_pad, src, rs, inv, zero, out);
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn quantize_static_body(
    m: usize,
    k: usize,
    k_pad: usize,
    src: &[f32],
    rs: usize,
    inv: f32,
    zero: f32,
    out: &mut QRows,
) {
    for r in 0..m {
        quantize_row(
            &mut out.q[r * k_pad..r * k_pad + k],
            &src[r * rs..r * rs + k],
            inv,
            zero,
        );
    }
}

/// Rounds `m` rows of `k` values to bf16 rows of `k_pad` (zero-padded).
fn bf16_rows(
    simd: LowSimd,
    m: usize,
    k: usize,
    k_pad: usize,
    src: &[f32],
    rs: usize,
    dst: &mut Vec<u16>,
) {
    dst.clear();
    dst.resize(m * k_pad, 0);
    match simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `LowSimd::Avx512` comes from `detect_low_simd` only after
        // the CPU reported avx512f and avx512bw.
        LowSimd::Avx512 => unsafe { bf16_rows_avx512(m, k, k_pad, src, rs, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `LowSimd::Avx2` is only used where avx2 and fma exist.
        LowSimd::Avx2 => unsafe { bf16_rows_avx2(m, k, k_pad, src, rs, dst) },
        _ => bf16_rows_body(m, k, k_pad, src, rs, dst),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn bf16_rows_avx512(m: usize, k: usize, k_pad: usize, src: &[f32], rs: usize, dst: &mut [u16]) {
    bf16_rows_body(m, k, k_pad, src, rs, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn bf16_rows_avx2(m: usize, k: usize, k_pad: usize, src: &[f32], rs: usize, dst: &mut [u16]) {
    bf16_rows_body(m, k, k_pad, src, rs, dst);
}

#[inline(always)]
fn bf16_rows_body(m: usize, k: usize, k_pad: usize, src: &[f32], rs: usize, dst: &mut [u16]) {
    for r in 0..m {
        for (d, &v) in dst[r * k_pad..r * k_pad + k]
            .iter_mut()
            .zip(&src[r * rs..r * rs + k])
        {
            *d = to_bf16(v);
        }
    }
}

/// Per-call scratch for converted left-hand rows.
#[derive(Default)]
pub(crate) struct Scratch {
    q: QRows,
    b: Vec<u16>,
    /// Set only while calibrating: collects every int8 GEMM input.
    pub(crate) observer: Option<Observer>,
}

/// The fp32 values each int8 GEMM input received during calibration,
/// indexed by [`QWeights::site`].
#[derive(Debug, Default)]
pub(crate) struct Observer {
    pub values: Vec<Vec<f32>>,
}

impl Observer {
    fn record(&mut self, site: usize, m: usize, k: usize, lhs: &[f32], rs: usize) {
        if self.values.len() <= site {
            self.values.resize_with(site + 1, Vec::new);
        }
        for r in 0..m {
            self.values[site].extend_from_slice(&lhs[r * rs..r * rs + k]);
        }
    }
}

impl LowMat {
    pub(crate) fn new(precision: Precision, w: &[f32], k: usize, n: usize) -> Option<LowMat> {
        match precision {
            Precision::Fp32 => None,
            Precision::Int8 => Some(LowMat::Int8(Box::new(QWeights::new(w, k, n)))),
            Precision::Bf16 => Some(LowMat::Bf16(BWeights::new(w, k, n))),
        }
    }

    /// `dst[m×n] += lhs[m×k] · W` with row strides `dst_rs` and `lhs_rs`.
    ///
    /// # Panics
    /// If a stride or slice length would reach out of bounds (a bug: every
    /// shape comes from the validated plan).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul_acc(
        &self,
        simd: LowSimd,
        m: usize,
        dst: &mut [f32],
        dst_rs: usize,
        lhs: &[f32],
        lhs_rs: usize,
        scratch: &mut Scratch,
    ) {
        self.prepare(simd, m, lhs, lhs_rs, scratch);
        self.run_prepared(simd, m, 0, dst, dst_rs, scratch);
    }

    /// `dst[m×n] = bias + lhs[m×k] · W`: [`Self::matmul_acc`] onto rows
    /// filled with `bias` (`n` values), without the fill pass for int8.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul_bias(
        &self,
        simd: LowSimd,
        m: usize,
        dst: &mut [f32],
        dst_rs: usize,
        lhs: &[f32],
        lhs_rs: usize,
        bias: &[f32],
        scratch: &mut Scratch,
    ) {
        match self {
            LowMat::Int8(w) if m > 0 => {
                self.prepare(simd, m, lhs, lhs_rs, scratch);
                int8_gemm(
                    simd,
                    m,
                    dst,
                    dst_rs,
                    scratch.q.view(0, w.k_pad),
                    w,
                    Some(bias),
                );
            }
            _ => {
                fill_bias(m, dst, dst_rs, Some(bias));
                self.matmul_acc(simd, m, dst, dst_rs, lhs, lhs_rs, scratch);
            }
        }
    }

    /// Converts `m` left-hand rows into `scratch`, for [`Self::run_prepared`]
    /// on this or any other `LowMat` of the same precision and `k`.
    pub(crate) fn prepare(
        &self,
        simd: LowSimd,
        m: usize,
        lhs: &[f32],
        lhs_rs: usize,
        scratch: &mut Scratch,
    ) {
        if m == 0 {
            return;
        }
        match self {
            LowMat::Int8(w) => {
                assert!(lhs_rs >= w.k && lhs.len() >= (m - 1) * lhs_rs + w.k);
                if let Some(observer) = &mut scratch.observer {
                    observer.record(w.site, m, w.k, lhs, lhs_rs);
                }
                match w.act {
                    Some(act) => quantize_rows_static(
                        simd,
                        m,
                        w.k,
                        w.k_pad,
                        lhs,
                        lhs_rs,
                        act,
                        &mut scratch.q,
                    ),
                    None => quantize_rows(simd, m, w.k, w.k_pad, lhs, lhs_rs, &mut scratch.q),
                }
            }
            LowMat::Bf16(w) => {
                assert!(lhs_rs >= w.k && lhs.len() >= (m - 1) * lhs_rs + w.k);
                bf16_rows(simd, m, w.k, w.k_pad, lhs, lhs_rs, &mut scratch.b);
            }
        }
    }

    /// `dst[m×n] += rows[row0..row0+m] · W` over rows [`Self::prepare`]d.
    ///
    /// # Panics
    /// If fewer than `row0 + m` rows were prepared.
    pub(crate) fn run_prepared(
        &self,
        simd: LowSimd,
        m: usize,
        row0: usize,
        dst: &mut [f32],
        dst_rs: usize,
        scratch: &Scratch,
    ) {
        if m == 0 {
            return;
        }
        match self {
            LowMat::Int8(w) => {
                int8_gemm(simd, m, dst, dst_rs, scratch.q.view(row0, w.k_pad), w, None);
            }
            LowMat::Bf16(w) => {
                bf16_gemm(simd, m, dst, dst_rs, &scratch.b[row0 * w.k_pad..], w);
            }
        }
    }
}

/// `dst[r][j] += scale[r] · col_scale[j] · Σ_k (q[r][k] − zero[r]) · w[k][j]`
/// over quantised rows of `w.k_pad` bytes.
///
/// # Panics
/// If `dst` or `a` are too short for `m` rows.
///
/// With `bias` (`n` values), `dst[r][j] = bias[j] + …` instead: the same
/// result as filling each row with `bias` first, but the AVX-512 kernel
/// reads the bias in place of `dst`, so a large `dst` (the LSTM's input
/// projection of every step) is written once instead of filled, read
/// back and written again.
pub(crate) fn int8_gemm(
    simd: LowSimd,
    m: usize,
    dst: &mut [f32],
    dst_rs: usize,
    a: QView<'_>,
    w: &QWeights,
    bias: Option<&[f32]>,
) {
    if m == 0 || w.n == 0 {
        return;
    }
    assert!(
        dst_rs >= w.n && dst.len() >= (m - 1) * dst_rs + w.n,
        "int8 dst"
    );
    assert!(
        a.q.len() >= m * w.k_pad && a.scale.len() >= m && a.zero.len() >= m,
        "int8 lhs"
    );
    assert!(bias.is_none_or(|b| b.len() == w.n), "int8 bias");
    match simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `LowSimd::Avx512` comes from `detect_low_simd` only after
        // the CPU reported avx512f, avx512bw and avx512vnni; the asserts
        // above are the bounds the kernel relies on.
        LowSimd::Avx512 => unsafe { avx512::int8_gemm(m, dst, dst_rs, a, w, bias) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `LowSimd::Avx2` is only used where avx2 and fma exist;
        // the asserts above are the bounds the kernel relies on.
        LowSimd::Avx2 => {
            fill_bias(m, dst, dst_rs, bias);
            unsafe { avx2::int8_gemm(m, dst, dst_rs, a, w) }
        }
        _ => {
            fill_bias(m, dst, dst_rs, bias);
            int8_gemm_body(m, dst, dst_rs, a, w)
        }
    }
}

/// Fills `m` rows of `dst` with `bias`, for the kernels that accumulate.
fn fill_bias(m: usize, dst: &mut [f32], dst_rs: usize, bias: Option<&[f32]>) {
    if let Some(bias) = bias {
        for r in 0..m {
            dst[r * dst_rs..r * dst_rs + bias.len()].copy_from_slice(bias);
        }
    }
}

/// `dst[r][j] += Σ_k b[r][k] · w[k][j]` over bf16 rows of `w.k_pad`.
///
/// # Panics
/// If `dst` or `b` are too short for `m` rows.
pub(crate) fn bf16_gemm(
    simd: LowSimd,
    m: usize,
    dst: &mut [f32],
    dst_rs: usize,
    b: &[u16],
    w: &BWeights,
) {
    if m == 0 || w.n == 0 {
        return;
    }
    assert!(
        dst_rs >= w.n && dst.len() >= (m - 1) * dst_rs + w.n,
        "bf16 dst"
    );
    assert!(b.len() >= m * w.k_pad, "bf16 lhs");
    match simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `LowSimd::Avx512` comes from `detect_low_simd` only after
        // the CPU reported avx512f, avx512bw and avx512bf16; the asserts
        // above are the bounds the kernel relies on.
        LowSimd::Avx512 => unsafe { avx512::bf16_gemm(m, dst, dst_rs, b, w) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 and FMA.
        LowSimd::Avx2 => unsafe { bf16_gemm_avx2(m, dst, dst_rs, b, w) },
        _ => bf16_gemm_body(m, dst, dst_rs, b, w),
    }
}

/// Portable int8 GEMM: the same integer sums as `vpdpbusd`, one 16-column
/// block at a time.
#[inline(always)]
fn int8_gemm_body(m: usize, dst: &mut [f32], dst_rs: usize, a: QView<'_>, w: &QWeights) {
    let groups = w.k_pad / 4;
    for b in 0..blocks(w.n) {
        let panel = &w.packed[b * groups * COLS * 4..(b + 1) * groups * COLS * 4];
        let cols = COLS.min(w.n - b * COLS);
        for r in 0..m {
            let row = &a.q[r * w.k_pad..(r + 1) * w.k_pad];
            let mut acc = [0i32; COLS];
            for (u, wg) in row.chunks_exact(4).zip(panel.chunks_exact(COLS * 4)) {
                for (c, wc) in acc.iter_mut().zip(wg.chunks_exact(4)) {
                    *c += u[0] as i32 * wc[0] as i32
                        + u[1] as i32 * wc[1] as i32
                        + u[2] as i32 * wc[2] as i32
                        + u[3] as i32 * wc[3] as i32;
                }
            }
            let out = &mut dst[r * dst_rs + b * COLS..r * dst_rs + b * COLS + cols];
            for (c, o) in out.iter_mut().enumerate() {
                let j = b * COLS + c;
                let dot = acc[c] - a.zero[r] * w.col_sum[j];
                *o = (a.scale[r] * w.col_scale[j]).mul_add(dot as f32, *o);
            }
        }
    }
}

/// Portable bf16 GEMM with `vdpbf16ps`'s order of operations: per pair,
/// the odd product is added first, then the even one (both exact in fp32).
#[inline(always)]
fn bf16_gemm_body(m: usize, dst: &mut [f32], dst_rs: usize, bq: &[u16], w: &BWeights) {
    let pairs = w.k_pad / 2;
    for b in 0..blocks(w.n) {
        let panel = &w.packed[b * pairs * COLS * 2..(b + 1) * pairs * COLS * 2];
        let cols = COLS.min(w.n - b * COLS);
        for r in 0..m {
            let row = &bq[r * w.k_pad..(r + 1) * w.k_pad];
            let mut acc = [0.0f32; COLS];
            for (a, wg) in row.chunks_exact(2).zip(panel.chunks_exact(COLS * 2)) {
                let (a0, a1) = (from_bf16(a[0]), from_bf16(a[1]));
                for (c, wc) in acc.iter_mut().zip(wg.chunks_exact(2)) {
                    *c += a1 * from_bf16(wc[1]);
                    *c += a0 * from_bf16(wc[0]);
                }
            }
            let out = &mut dst[r * dst_rs + b * COLS..r * dst_rs + b * COLS + cols];
            for (o, a) in out.iter_mut().zip(acc) {
                *o += a;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn bf16_gemm_avx2(m: usize, dst: &mut [f32], dst_rs: usize, b: &[u16], w: &BWeights) {
    bf16_gemm_body(m, dst, dst_rs, b, w);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The int8 GEMM for CPUs with AVX2 but without AVX-512 VNNI.
    //!
    //! AVX2's byte multiply, `vpmaddubsw`, adds each pair of u8 × i8
    //! products into a *saturating* i16: 2 · 255 · 127 = 64 770 does not
    //! fit in 32 767, and our activations use the whole 0–255 range, so it
    //! would clip. Instead both operands are widened to i16 and multiplied
    //! with `vpmaddwd` (i16 × i16, pairs summed into i32), which is exact.
    //! The sums are then bit-identical to `vpdpbusd`'s and the portable
    //! loop's.
    //!
    //! The packed weights are the VNNI layout (per 16-column block and
    //! group of 4 `k`: 16 columns × 4 bytes). Each 16-byte quarter (4
    //! columns × 4 `k`) widens to one register of 16 i16; the row's 4
    //! activation bytes, widened and repeated 4 times, multiply it, giving
    //! two i32 lanes per column (`k` 0–1 and 2–3). Those accumulate over
    //! all groups and are added together once, at the end of the tile.
    //! The rows are widened to i16 once per call, so a group's activations
    //! are one 8-byte broadcast (10–15 % faster than widening in the inner
    //! loop; 3-row tiles were no faster than 2).

    use std::arch::x86_64::*;

    use super::{COLS, QView, QWeights, blocks};

    /// # Safety
    /// The CPU must support avx2 and fma; `int8_gemm` checked the bounds:
    /// `dst` holds `m` rows of `w.n` (stride `dst_rs`), `a` `m` rows of
    /// `w.k_pad`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn int8_gemm(
        m: usize,
        dst: &mut [f32],
        dst_rs: usize,
        a: QView<'_>,
        w: &QWeights,
    ) {
        // The rows widened to i16 once, so each group's 4 values are one
        // 8-byte broadcast in the inner loop (every column block reuses them).
        let wide: Vec<i16> = a.q[..m * w.k_pad].iter().map(|&u| i16::from(u)).collect();
        let mut r = 0;
        while r < m {
            let rows = (m - r).min(2);
            for b in 0..blocks(w.n) {
                // SAFETY: rows r..r+rows < m and block b < nb.
                unsafe {
                    if rows == 2 {
                        tile::<2>(r, b, dst, dst_rs, a, &wide, w);
                    } else {
                        tile::<1>(r, b, dst, dst_rs, a, &wide, w);
                    }
                }
            }
            r += rows;
        }
    }

    /// Rows `r0..r0+R` × the 16 columns of block `b`: 4·R accumulators
    /// plus the activations and one weight register fit AVX2's 16.
    ///
    /// # Safety
    /// As [`int8_gemm`], with rows `r0..r0+R` and block `b` in range.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize>(
        r0: usize,
        b: usize,
        dst: &mut [f32],
        dst_rs: usize,
        a: QView<'_>,
        wide: &[i16],
        w: &QWeights,
    ) {
        let groups = w.k_pad / 4;
        let mut acc = [[_mm256_setzero_si256(); 4]; R];
        let panel = w.packed[b * groups * COLS * 4..(b + 1) * groups * COLS * 4].as_ptr();
        let qp = wide.as_ptr();
        for g in 0..groups {
            let mut u = [_mm256_setzero_si256(); R];
            for (r, v) in u.iter_mut().enumerate() {
                // SAFETY: row r0+r < m and 4g+4 ≤ k_pad: inside `wide`
                // (m rows of k_pad).
                let four = unsafe {
                    qp.add((r0 + r) * w.k_pad + g * 4)
                        .cast::<i64>()
                        .read_unaligned()
                };
                // The group's 4 i16, repeated 4 times.
                *v = _mm256_set1_epi64x(four);
            }
            for quarter in 0..4 {
                // SAFETY: group g < groups of this block's panel, 16 bytes
                // at 16·quarter < 64: inside `packed`.
                let wv = unsafe {
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(
                        panel.add((g * COLS + quarter * 4) * 4).cast(),
                    ))
                };
                for (row, v) in acc.iter_mut().zip(&u) {
                    row[quarter] = _mm256_add_epi32(row[quarter], _mm256_madd_epi16(*v, wv));
                }
            }
        }
        let cols = COLS.min(w.n - b * COLS);
        for (r, row) in acc.iter().enumerate() {
            // Quarter q holds, per 128-bit half, [c a, c b, c+1 a, c+1 b]:
            // columns 4q, 4q+1 below and 4q+2, 4q+3 above. Adding the
            // pairs of quarters 0 and 1 gives [0 1 4 5 | 2 3 6 7]; the
            // 64-bit permute puts them in order.
            let mut sums = [0i32; COLS];
            let lo = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(row[0], row[1]));
            let hi = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(row[2], row[3]));
            // SAFETY: `sums` holds 16 i32, two registers' worth.
            unsafe {
                _mm256_storeu_si256(sums.as_mut_ptr().cast(), lo);
                _mm256_storeu_si256(sums.as_mut_ptr().add(8).cast(), hi);
            }
            let (scale, zero) = (a.scale[r0 + r], a.zero[r0 + r]);
            let start = (r0 + r) * dst_rs + b * COLS;
            let out = &mut dst[start..start + cols];
            for (c, o) in out.iter_mut().enumerate() {
                let j = b * COLS + c;
                let dot = sums[c] - zero * w.col_sum[j];
                // The portable loop's expression, so the levels agree.
                *o = (scale * w.col_scale[j]).mul_add(dot as f32, *o);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! `vpdpbusd` / `vdpbf16ps` kernels: tiles of up to 4 rows × 4 column
    //! blocks (64 columns), 16 accumulators that stay in registers while
    //! the tile's weight panels stream through once.

    use std::arch::x86_64::*;

    use super::{BWeights, COLS, QView, QWeights, blocks};

    use super::lanes16 as mask;

    /// # Safety
    /// The CPU must support avx512f/bw/vnni; `int8_gemm` checked the
    /// bounds: `dst` holds `m` rows of `w.n`, `q` `m` rows of `w.k_pad`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn int8_gemm(
        m: usize,
        dst: &mut [f32],
        dst_rs: usize,
        a: QView<'_>,
        w: &QWeights,
        bias: Option<&[f32]>,
    ) {
        let nb = blocks(w.n);
        let mut r = 0;
        while r < m {
            let rows = (m - r).min(4);
            let mut b = 0;
            while b < nb {
                let cb = (nb - b).min(4);
                // SAFETY: rows r..r+rows < m and blocks b..b+cb < nb, so
                // every access is inside the bounds the caller checked.
                unsafe {
                    match (rows, cb) {
                        (4, 4) => int8_tile::<4, 4>(r, b, dst, dst_rs, a, w, bias),
                        (4, 3) => int8_tile::<4, 3>(r, b, dst, dst_rs, a, w, bias),
                        (4, 2) => int8_tile::<4, 2>(r, b, dst, dst_rs, a, w, bias),
                        (4, _) => int8_tile::<4, 1>(r, b, dst, dst_rs, a, w, bias),
                        (3, 4) => int8_tile::<3, 4>(r, b, dst, dst_rs, a, w, bias),
                        (3, _) => int8_tile::<3, 1>(r, b, dst, dst_rs, a, w, bias),
                        (2, 4) => int8_tile::<2, 4>(r, b, dst, dst_rs, a, w, bias),
                        (2, _) => int8_tile::<2, 1>(r, b, dst, dst_rs, a, w, bias),
                        (_, 4) => int8_tile::<1, 4>(r, b, dst, dst_rs, a, w, bias),
                        (_, _) => int8_tile::<1, 1>(r, b, dst, dst_rs, a, w, bias),
                    }
                }
                b += if rows == 4 || cb == 4 { cb } else { 1 };
            }
            r += rows;
        }
    }

    /// # Safety
    /// As [`int8_gemm`], with rows `r0..r0+R` and blocks `b0..b0+C` in range.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn int8_tile<const R: usize, const C: usize>(
        r0: usize,
        b0: usize,
        dst: &mut [f32],
        dst_rs: usize,
        a: QView<'_>,
        w: &QWeights,
        bias: Option<&[f32]>,
    ) {
        let groups = w.k_pad / 4;
        let q = a.q;
        let mut acc = [[_mm512_setzero_si512(); C]; R];
        let wp = w.packed.as_ptr();
        let qp = q.as_ptr();
        for g in 0..groups {
            let mut wv = [_mm512_setzero_si512(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                // SAFETY: block b0+c < nb and group g < groups index a
                // 64-byte run inside `packed` (length nb·groups·64).
                *v = unsafe {
                    _mm512_loadu_si512(wp.add(((b0 + c) * groups + g) * COLS * 4).cast())
                };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: row r0+r < m and 4g+4 ≤ k_pad: inside `q`.
                let word = unsafe {
                    qp.add((r0 + r) * w.k_pad + g * 4)
                        .cast::<i32>()
                        .read_unaligned()
                };
                let u = _mm512_set1_epi32(word);
                for (c, v) in row.iter_mut().enumerate() {
                    *v = _mm512_dpbusd_epi32(*v, u, wv[c]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            let rs = _mm512_set1_ps(a.scale[r0 + r]);
            let zero = _mm512_set1_epi32(a.zero[r0 + r]);
            for (c, v) in row.iter().enumerate() {
                let col = (b0 + c) * COLS;
                let k = mask(w.n - col);
                // SAFETY: `col_sum`/`col_scale` hold nb·16 entries.
                let (sum, cs) = unsafe {
                    (
                        _mm512_loadu_si512(w.col_sum.as_ptr().add(col).cast()),
                        _mm512_loadu_ps(w.col_scale.as_ptr().add(col)),
                    )
                };
                let off = _mm512_mullo_epi32(zero, sum);
                let dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(*v, off));
                let d = dst.as_mut_ptr().wrapping_add((r0 + r) * dst_rs + col);
                // SAFETY: the mask limits the access to columns < n of row
                // r0+r, inside `dst` (and of `bias`, which holds n values);
                // masked-off lanes are not touched.
                unsafe {
                    let old = match bias {
                        Some(bias) => _mm512_maskz_loadu_ps(k, bias.as_ptr().add(col)),
                        None => _mm512_maskz_loadu_ps(k, d),
                    };
                    let new = _mm512_fmadd_ps(_mm512_mul_ps(rs, cs), dot, old);
                    _mm512_mask_storeu_ps(d, k, new);
                }
            }
        }
    }

    /// # Safety
    /// The CPU must support avx512f/bw/bf16; `bf16_gemm` checked the
    /// bounds: `dst` holds `m` rows of `w.n`, `b` `m` rows of `w.k_pad`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn bf16_gemm(
        m: usize,
        dst: &mut [f32],
        dst_rs: usize,
        b: &[u16],
        w: &BWeights,
    ) {
        let nb = blocks(w.n);
        let mut r = 0;
        while r < m {
            let rows = (m - r).min(4);
            let mut blk = 0;
            while blk < nb {
                let cb = (nb - blk).min(4);
                // SAFETY: as in `int8_gemm`.
                unsafe {
                    match (rows, cb) {
                        (4, 4) => bf16_tile::<4, 4>(r, blk, dst, dst_rs, b, w),
                        (4, _) => bf16_tile::<4, 1>(r, blk, dst, dst_rs, b, w),
                        (3, 4) => bf16_tile::<3, 4>(r, blk, dst, dst_rs, b, w),
                        (3, _) => bf16_tile::<3, 1>(r, blk, dst, dst_rs, b, w),
                        (2, 4) => bf16_tile::<2, 4>(r, blk, dst, dst_rs, b, w),
                        (2, _) => bf16_tile::<2, 1>(r, blk, dst, dst_rs, b, w),
                        (_, 4) => bf16_tile::<1, 4>(r, blk, dst, dst_rs, b, w),
                        (_, _) => bf16_tile::<1, 1>(r, blk, dst, dst_rs, b, w),
                    }
                }
                blk += if cb == 4 { 4 } else { 1 };
            }
            r += rows;
        }
    }

    /// # Safety
    /// As [`bf16_gemm`], with rows `r0..r0+R` and blocks `b0..b0+C` in range.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn bf16_tile<const R: usize, const C: usize>(
        r0: usize,
        b0: usize,
        dst: &mut [f32],
        dst_rs: usize,
        b: &[u16],
        w: &BWeights,
    ) {
        let pairs = w.k_pad / 2;
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let wp = w.packed.as_ptr();
        let bp = b.as_ptr();
        for g in 0..pairs {
            let mut wv = [_mm512_setzero_si512(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                // SAFETY: block b0+c and pair g index a 64-byte run inside
                // `packed` (length nb·pairs·32 u16).
                *v =
                    unsafe { _mm512_loadu_si512(wp.add(((b0 + c) * pairs + g) * COLS * 2).cast()) };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: row r0+r < m and 2g+2 ≤ k_pad: inside `b`.
                let word = unsafe {
                    bp.add((r0 + r) * w.k_pad + g * 2)
                        .cast::<i32>()
                        .read_unaligned()
                };
                let a: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(word)) };
                for (c, v) in row.iter_mut().enumerate() {
                    // SAFETY: same-size reinterpretation of 32 bf16 lanes.
                    let wb: __m512bh = unsafe { std::mem::transmute(wv[c]) };
                    *v = _mm512_dpbf16_ps(*v, a, wb);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                let col = (b0 + c) * COLS;
                let k = mask(w.n - col);
                let d = dst.as_mut_ptr().wrapping_add((r0 + r) * dst_rs + col);
                // SAFETY: the mask limits the access to columns < n of row
                // r0+r, inside `dst`.
                unsafe {
                    let old = _mm512_maskz_loadu_ps(k, d);
                    _mm512_mask_storeu_ps(d, k, _mm512_add_ps(old, *v));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
                dst[r * w.n + j] =
                    (a.scale[r] * w.col_scale[j]).mul_add(dot as f32, dst[r * w.n + j]);
            }
        }
    }

    #[test]
    fn int8_kernels_equal_exact_integer_arithmetic_on_every_level() {
        for (seed, &(m, n, k)) in SHAPES.iter().enumerate() {
            let w = values(k * n, seed as u32);
            let x = values(m * k, 100 + seed as u32);
            let qw = QWeights::new(&w, k, n);
            let mut a = QRows::default();
            quantize_rows(LowSimd::Portable, m, k, qw.k_pad, &x, k, &mut a);
            // Raw integer dot products: unit scales, zero start.
            let mut unit = a.clone();
            unit.scale.iter_mut().for_each(|s| *s = 1.0);
            let mut raw_w = qw.clone();
            raw_w.col_scale.iter_mut().for_each(|s| *s = 1.0);
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
        let qw = QWeights::new(&w, k, n);
        let mut x = vec![1.0f32; m * k];
        x[0] = 0.0;
        let mut a = QRows::default();
        quantize_rows(LowSimd::Portable, m, k, qw.k_pad, &x, k, &mut a);
        assert_eq!((a.q[1], a.zero[0]), (255, 0));
        let mut unit = a.clone();
        unit.scale.iter_mut().for_each(|s| *s = 1.0);
        let mut raw_w = qw.clone();
        raw_w.col_scale.iter_mut().for_each(|s| *s = 1.0);
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
            let qw = QWeights::new(&values(k * n, 3), k, n);
            let mut a = QRows::default();
            quantize_rows(
                LowSimd::Portable,
                m,
                k,
                qw.k_pad,
                &values(m * k, 4),
                k,
                &mut a,
            );
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
        let qw = QWeights::new(&values(k * n, 1), k, n);
        let mut a = QRows::default();
        quantize_rows(
            LowSimd::Portable,
            m,
            k,
            qw.k_pad,
            &values(m * k, 2),
            k,
            &mut a,
        );
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
}
