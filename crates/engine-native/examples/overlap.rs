//! How much GEMM work one core can hide under the batch-1 LSTM step's
//! weight stream, for the one-thread batch-1 analysis in docs/engines.md.
//!
//! `cargo run --release -p tickserve-engine-native --example overlap`
//!
//! The step at one row is a matrix-vector product over 256 KiB of weights
//! that come from L2; its FMA units sit about half idle while it waits. A
//! kernel that interleaved other layers' GEMMs into that stream (a
//! wavefront over layers and time) would only pay off if the core ran the
//! two at once. This times the stream alone (the reference model's step
//! shape: 8 blocks × 128 × 64 floats, two rows of the panel per
//! iteration), a side GEMM alone (`side` FMAs per iteration on a panel that
//! stays in L1), and both interleaved in one loop. Perfect overlap would
//! make "both" equal the larger of the two; no overlap, their sum.

use std::time::Instant;

#[cfg(target_arch = "x86_64")]
mod probe {
    use std::arch::x86_64::{
        __m512, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps,
        _mm512_storeu_ps,
    };

    /// Hidden units per block and blocks in the reference model's step.
    const BLOCK: usize = 64;
    const BLOCKS: usize = 8;
    const HIDDEN: usize = 128;

    /// The stream (when `STREAM`) and `SIDE` side FMAs per iteration.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `panel` holds `BLOCKS·HIDDEN·BLOCK` floats,
    /// `h` `HIDDEN`, `side` `HIDDEN·16`, `x` `8·HIDDEN`, `out` 1 152.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn run<const SIDE: usize, const STREAM: bool>(
        panel: &[f32],
        h: &[f32],
        side: &[f32],
        x: &[f32],
        out: &mut [f32],
    ) {
        // SAFETY: every offset below is within the sizes the caller
        // guarantees.
        unsafe {
            let mut side_acc: [__m512; 8] = [_mm512_setzero_ps(); 8];
            for block in 0..BLOCKS {
                let base = panel.as_ptr().add(block * HIDDEN * BLOCK);
                let mut acc: [__m512; 8] = [_mm512_setzero_ps(); 8];
                for p in (0..HIDDEN).step_by(2) {
                    if STREAM {
                        let w = base.add(p * BLOCK);
                        let a0 = _mm512_set1_ps(*h.as_ptr().add(p));
                        let a1 = _mm512_set1_ps(*h.as_ptr().add(p + 1));
                        for v in 0..4 {
                            acc[v] = _mm512_fmadd_ps(a0, _mm512_loadu_ps(w.add(v * 16)), acc[v]);
                            acc[4 + v] = _mm512_fmadd_ps(
                                a1,
                                _mm512_loadu_ps(w.add((4 + v) * 16)),
                                acc[4 + v],
                            );
                        }
                    }
                    // Side GEMM: SIDE / 2 rows × 16 columns, two k per
                    // iteration, weights from L1.
                    let b0 = _mm512_loadu_ps(side.as_ptr().add(p * 16));
                    let b1 = _mm512_loadu_ps(side.as_ptr().add((p + 1) * 16));
                    for (r, acc) in side_acc.iter_mut().enumerate().take(SIDE / 2) {
                        let xa = _mm512_set1_ps(*x.as_ptr().add(r * HIDDEN + p));
                        let xb = _mm512_set1_ps(*x.as_ptr().add(r * HIDDEN + p + 1));
                        *acc = _mm512_fmadd_ps(xa, b0, *acc);
                        *acc = _mm512_fmadd_ps(xb, b1, *acc);
                    }
                }
                for (v, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(out.as_mut_ptr().add(block * 128 + v * 16), *acc);
                }
            }
            for (r, acc) in side_acc.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(1024 + r * 16), *acc);
            }
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            println!("overlap: needs AVX-512F");
            return;
        }
        let panel: Vec<f32> = (0..65_536).map(|v| (v as f32 * 0.1).sin() * 0.01).collect();
        let h = vec![0.01f32; 128];
        let side: Vec<f32> = (0..2048).map(|v| (v as f32 * 0.3).cos()).collect();
        let x: Vec<f32> = (0..1024).map(|v| (v as f32 * 0.7).sin()).collect();
        let mut out = vec![0.0f32; 1152];
        let calls = 20_000;
        // Best of 5 passes of `calls` calls, µs per call.
        let mut time = |f: &mut dyn FnMut(&mut [f32])| {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let started = Instant::now();
                for _ in 0..calls {
                    f(&mut out);
                    std::hint::black_box(&out);
                }
                best = best.min(started.elapsed().as_secs_f64() / calls as f64 * 1e6);
            }
            best
        };
        // SAFETY (every call below): AVX-512F was detected above and the
        // buffers have the sizes `run` needs.
        let stream = time(&mut |o| unsafe { probe::run::<0, true>(&panel, &h, &side, &x, o) });
        println!("stream alone (256 KiB from L2): {stream:.3} µs");
        macro_rules! row {
            ($side:literal) => {{
                let alone =
                    time(&mut |o| unsafe { probe::run::<$side, false>(&panel, &h, &side, &x, o) });
                let both =
                    time(&mut |o| unsafe { probe::run::<$side, true>(&panel, &h, &side, &x, o) });
                let hidden = (stream + alone - both) / alone.min(stream) * 100.0;
                println!(
                    "{:2} side FMAs per iteration: alone {alone:.3} µs, with the stream {both:.3} µs \
                     ({hidden:.0} % of the shorter one hidden)",
                    $side
                );
            }};
        }
        row!(4);
        row!(8);
        row!(16);
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("overlap: x86-64 only");
}
