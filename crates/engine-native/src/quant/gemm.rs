//! The low-precision GEMM entry points ([`int8_gemm`], [`bf16_gemm`]): they
//! take rows converted by `rows` and weights packed by `weights`, and
//! dispatch on the [`LowSimd`] level to the `avx512` or `avx2` kernels or
//! to the portable loops here, adding onto the fp32 destination.

use super::*;

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
pub(super) fn fill_bias(m: usize, dst: &mut [f32], dst_rs: usize, bias: Option<&[f32]>) {
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
pub(super) fn int8_gemm_body(m: usize, dst: &mut [f32], dst_rs: usize, a: QView<'_>, w: &QWeights) {
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
pub(super) fn bf16_gemm_body(m: usize, dst: &mut [f32], dst_rs: usize, bq: &[u16], w: &BWeights) {
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
pub(super) fn bf16_gemm_avx2(m: usize, dst: &mut [f32], dst_rs: usize, b: &[u16], w: &BWeights) {
    bf16_gemm_body(m, dst, dst_rs, b, w);
}
