//! Left-hand (activation) rows of the low-precision GEMMs, converted per
//! call: int8 rows with a scale and zero point per row, dynamic
//! ([`quantize_rows`]) or fixed ([`quantize_rows_static`]), or bf16 rows
//! ([`bf16_rows`]); the converted rows live in the per-call [`Scratch`],
//! which also carries the calibration [`Observer`].

use super::*;

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
pub(super) fn round_small(x: f32) -> f32 {
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
pub(super) fn quantize_avx2(
    m: usize,
    k: usize,
    k_pad: usize,
    src: &[f32],
    rs: usize,
    out: &mut QRows,
) {
    quantize_body(m, k, k_pad, src, rs, out);
}

/// A row's scale, reciprocal and zero point from its range (which
/// includes 0). Shared by every level so they agree bit for bit.
#[inline(always)]
pub(super) fn row_params(lo: f32, hi: f32) -> (f32, f32, f32) {
    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
    let inv = 1.0 / scale;
    let zero = round_small(-lo * inv).clamp(0.0, 255.0);
    (scale, inv, zero)
}

#[inline(always)]
pub(super) fn quantize_body(
    m: usize,
    k: usize,
    k_pad: usize,
    src: &[f32],
    rs: usize,
    out: &mut QRows,
) {
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
pub(super) fn lanes16(n: usize) -> u16 {
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
pub(super) fn quantize_row(dst: &mut [u8], row: &[f32], inv: f32, zero: f32) {
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
pub(super) fn quantize_static_avx512(
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
pub(super) fn quantize_static_avx2(
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
pub(super) fn quantize_static_body(
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
pub(super) fn bf16_rows(
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
pub(super) fn bf16_rows_avx512(
    m: usize,
    k: usize,
    k_pad: usize,
    src: &[f32],
    rs: usize,
    dst: &mut [u16],
) {
    bf16_rows_body(m, k, k_pad, src, rs, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) fn bf16_rows_avx2(
    m: usize,
    k: usize,
    k_pad: usize,
    src: &[f32],
    rs: usize,
    dst: &mut [u16],
) {
    bf16_rows_body(m, k, k_pad, src, rs, dst);
}

#[inline(always)]
pub(super) fn bf16_rows_body(
    m: usize,
    k: usize,
    k_pad: usize,
    src: &[f32],
    rs: usize,
    dst: &mut [u16],
) {
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
    pub(super) q: QRows,
    pub(super) b: Vec<u16>,
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
    pub(super) fn record(&mut self, site: usize, m: usize, k: usize, lhs: &[f32], rs: usize) {
        if self.values.len() <= site {
            self.values.resize_with(site + 1, Vec::new);
        }
        for r in 0..m {
            self.values[site].extend_from_slice(&lhs[r * rs..r * rs + k]);
        }
    }
}
