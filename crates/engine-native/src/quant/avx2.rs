//! The AVX2 + FMA int8 kernel (i16 `vpmaddwd`), for CPUs without AVX-512
//! VNNI; called from `gemm` with rows and weights in the shared layout.

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
