//! Read bandwidth of each cache level on this machine, for the batch-1
//! bound in docs/engines.md: the LSTM step at batch 1 streams its 256 KiB
//! of recurrent weights once per step, so its floor is set by how fast one
//! core reads a buffer of that size (from L2), not by FLOPs.
//!
//! `cargo run --release -p tickserve-engine-native --example bandwidth`
//!
//! Each size is read repeatedly with 512-bit (AVX-512) or 256-bit loads
//! into eight independent accumulators; the best of several passes is
//! reported, in bytes per nanosecond (GB/s).

use std::time::Instant;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_avx512(data: &[f32], passes: usize) -> f32 {
    use std::arch::x86_64::{
        __m512, _mm512_add_ps, _mm512_loadu_ps, _mm512_reduce_add_ps, _mm512_setzero_ps,
    };
    let mut acc: [__m512; 8] = [_mm512_setzero_ps(); 8];
    for _ in 0..passes {
        for chunk in data.chunks_exact(128) {
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: `chunk` holds 128 floats; this reads 16 at 16·i.
                let v = unsafe { _mm512_loadu_ps(chunk.as_ptr().add(16 * i)) };
                *acc = _mm512_add_ps(*acc, v);
            }
        }
    }
    acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_avx2(data: &[f32], passes: usize) -> f32 {
    use std::arch::x86_64::{__m256, _mm256_add_ps, _mm256_loadu_ps, _mm256_setzero_ps};
    let mut acc: [__m256; 8] = [_mm256_setzero_ps(); 8];
    for _ in 0..passes {
        for chunk in data.chunks_exact(64) {
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: `chunk` holds 64 floats; this reads 8 at 8·i.
                let v = unsafe { _mm256_loadu_ps(chunk.as_ptr().add(8 * i)) };
                *acc = _mm256_add_ps(*acc, v);
            }
        }
    }
    let mut lanes = [0.0f32; 8];
    let total = acc
        .iter()
        .fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a));
    // SAFETY: `lanes` holds 8 floats.
    unsafe { std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), total) };
    lanes.iter().sum()
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        let avx2 = std::arch::is_x86_feature_detected!("avx2");
        for kib in [16usize, 32, 128, 256, 512, 768, 4096, 16384, 262_144] {
            let data: Vec<f32> = (0..kib * 256).map(|i| (i % 13) as f32).collect();
            // About 256 MiB read per measurement.
            let passes = (262_144 / kib).max(1);
            let mut line = format!("{kib:>7} KiB:");
            for (name, ok) in [("avx512", avx512), ("avx2", avx2)] {
                if !ok {
                    continue;
                }
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let started = Instant::now();
                    // SAFETY: the feature was detected just above.
                    let s = unsafe {
                        if name == "avx512" {
                            sum_avx512(&data, passes)
                        } else {
                            sum_avx2(&data, passes)
                        }
                    };
                    std::hint::black_box(s);
                    best = best.min(started.elapsed().as_secs_f64());
                }
                let bytes = (kib * 1024 * passes) as f64;
                line += &format!("  {name} {:6.1} GB/s", bytes / best / 1e9);
            }
            println!("{line}");
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("bandwidth: x86-64 only");
}
