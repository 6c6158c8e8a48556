//! Low-precision weights: [`LowMat`] converts one fp32 GEMM right-hand side
//! at load into [`QWeights`] (int8 per output column, with the activation
//! quantisation [`ActQuant`] when it is fixed) or [`BWeights`] (bf16), in
//! the 16-column block layout every SIMD level reads; its `gemm` converts
//! the call's left-hand rows (`rows`) and runs the kernel of `gemm`.

use super::*;

/// An int8 GEMM right-hand side, quantised per output column.
#[derive(Debug, Clone)]
pub(crate) struct QWeights {
    pub(super) k: usize,
    pub(super) n: usize,
    /// `k` rounded up to a multiple of 4.
    pub(super) k_pad: usize,
    /// `[n/16 blocks][k_pad/4 groups][16 columns][4]`.
    pub(super) packed: Vec<i8>,
    /// Dequantisation scale of each (padded) column.
    pub(super) col_scale: Vec<f32>,
    /// `Σ_k w[k][j]`, to take each row's zero point out of its sums.
    pub(super) col_sum: Vec<i32>,
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
pub(super) fn quantize_one(v: f32, inv: f32, zero: f32) -> f32 {
    let y = v * inv + zero;
    let y = if y < 0.0 { 0.0 } else { y };
    let y = if y > 255.0 { 255.0 } else { y };
    round_small(y)
}

/// A bf16 GEMM right-hand side.
#[derive(Debug, Clone)]
pub(crate) struct BWeights {
    pub(super) k: usize,
    pub(super) n: usize,
    /// `k` rounded up to a multiple of 2.
    pub(super) k_pad: usize,
    /// `[n/16 blocks][k_pad/2 pairs][16 columns][2]` bf16 bit patterns.
    pub(super) packed: Vec<u16>,
}

/// A GEMM right-hand side held in a reduced precision.
#[derive(Debug, Clone)]
pub(crate) enum LowMat {
    /// Boxed: the int8 form carries more bookkeeping than the bf16 one.
    Int8(Box<QWeights>),
    Bf16(BWeights),
}

pub(super) fn blocks(n: usize) -> usize {
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
    pub(super) fn pack(
        k: usize,
        n: usize,
        q: &[i8],
        col_scale: Vec<f32>,
        col_sum: Vec<i32>,
    ) -> Self {
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
