//! CPU feature detection for every kernel of the engine, in one place:
//! [`detect_simd`] picks the fp32 level ([`Simd`]) and [`detect_low_simd`]
//! the low-precision level ([`LowSimd`], int8/bf16 in `crate::quant`), each
//! once per process; the kernels dispatch on the value they are handed.

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
            if has_avx2_fma() {
                return Simd::Avx2;
            }
        }
        Simd::Portable
    })
}

/// AVX2 with FMA: the second level of both the fp32 and the low-precision
/// kernels.
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// SIMD level of the low-precision kernels, picked once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LowSimd {
    /// AVX-512 with VNNI (int8) and BF16 (bf16) instructions.
    Avx512,
    /// AVX2 + FMA: the int8 kernel of `crate::quant`'s `avx2` module (i16 `vpmaddwd`); bf16 and
    /// row conversions run the portable loops compiled for AVX2.
    Avx2,
    Portable,
}

/// The best level the CPU runs, lowered by `TICKSERVE_LOW_SIMD=avx2` or
/// `=portable` (to benchmark the AVX2 kernel on an AVX-512 machine; a
/// level above the CPU's is ignored).
pub(crate) fn detect_low_simd() -> LowSimd {
    static LEVEL: std::sync::OnceLock<LowSimd> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = best_low_simd();
        match std::env::var("TICKSERVE_LOW_SIMD").as_deref() {
            Ok("portable") => LowSimd::Portable,
            Ok("avx2") if best == LowSimd::Avx512 => LowSimd::Avx2,
            _ => best,
        }
    })
}

fn best_low_simd() -> LowSimd {
    {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512bf16")
            {
                return LowSimd::Avx512;
            }
            if has_avx2_fma() {
                return LowSimd::Avx2;
            }
        }
        LowSimd::Portable
    }
}

/// The levels the current CPU can run, for tests.
#[cfg(test)]
pub(crate) fn low_simd_levels() -> Vec<LowSimd> {
    let mut levels = vec![LowSimd::Portable];
    if detect_simd() != Simd::Portable {
        levels.push(LowSimd::Avx2);
    }
    if best_low_simd() == LowSimd::Avx512 {
        levels.push(LowSimd::Avx512);
    }
    levels
}
