//! The AVX-512 VNNI (`vpdpbusd`, int8) and BF16 (`vdpbf16ps`) kernels and
//! their helpers; called from `gemm` with rows and weights in the shared layout.

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
            *v = unsafe { _mm512_loadu_si512(wp.add(((b0 + c) * groups + g) * COLS * 4).cast()) };
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
pub(super) unsafe fn bf16_gemm(m: usize, dst: &mut [f32], dst_rs: usize, b: &[u16], w: &BWeights) {
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
            *v = unsafe { _mm512_loadu_si512(wp.add(((b0 + c) * pairs + g) * COLS * 2).cast()) };
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
