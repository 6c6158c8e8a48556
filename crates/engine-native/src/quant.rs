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

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod gemm;
mod rows;
#[cfg(test)]
mod tests;
mod weights;

pub(crate) use gemm::*;
pub(crate) use rows::*;
pub(crate) use weights::*;
