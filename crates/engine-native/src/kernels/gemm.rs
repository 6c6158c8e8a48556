//! The packed GEMM `dst += lhs · W` of every layer (convolution taps, the
//! LSTM input projection, the head): [`PackedMatrix`] lays the constant
//! weights out once at load; [`gemm_packed`] streams them per call,
//! dispatching to the explicit AVX-512/AVX2 forms in `x86` or to the
//! portable const-generic loops below.

#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{Simd, group_rows, lanes, load_lanes, store_lanes};

/// A constant `[k][n]` GEMM right-hand side (weights) laid out for
/// [`gemm_packed`]: blocks of `4·lanes` columns, each block's `k` row
/// pieces one after another (the last block zero-padded), so the kernel
/// streams every block front to back.
#[derive(Debug, Clone)]
pub(crate) struct PackedMatrix {
    pub(super) simd: Simd,
    pub(super) lanes: usize,
    pub(super) k: usize,
    pub(super) n: usize,
    pub(super) data: Vec<f32>,
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
pub(super) const GEMM_TILE_ROWS: usize = 96;

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
