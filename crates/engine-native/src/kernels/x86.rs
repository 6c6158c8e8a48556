//! The AVX-512 and AVX2 forms of `gemm::gemm_block` and `lstm::step_block` with
//! explicit vector registers: the compiler does not keep the portable
//! form's `[[[f32; L]; 4]; R]` accumulators in registers (measured 4×
//! slower), and these loops are the engine's whole inner loop.
//!
//! Each level is one instantiation of the `kernels!` macro, so both levels
//! share one body and differ only in the intrinsics they name.

macro_rules! kernels {
    ($name:ident, $feature:literal, $lanes:literal, $group:literal, $vector:ty, $zero:ident, $load:ident,
     $store:ident, $set1:ident, $fma:ident, $add:ident) => {
        pub(super) mod $name {
            #[allow(clippy::wildcard_imports)]
            use std::arch::x86_64::*;

            use super::super::{PackedMatrix, PackedRecurrent, StepArgs, cell_lanes};

            type Vector = $vector;

            const L: usize = $lanes;

            /// `R` rows × one `4·L`-column block of `dst += lhs · panel`.
            ///
            /// # Safety
            /// The CPU has `$feature`; `panel` holds `k·4·L` floats;
            /// rows `0..R` of `lhs` (stride `lhs_rs`) hold `k` floats
            /// and of `dst` (stride `dst_rs`) `cols ≤ 4·L` floats.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn gemm_block<const R: usize>(
                panel: *const f32,
                k: usize,
                cols: usize,
                dst: *mut f32,
                dst_rs: usize,
                lhs: *const f32,
                lhs_rs: usize,
            ) {
                // SAFETY: the caller guarantees every offset below is in
                // bounds (see `# Safety`).
                unsafe {
                    let mut acc = [[$zero(); 4]; R];
                    for p in 0..k {
                        let w = panel.add(p * 4 * L);
                        let w = [
                            $load(w),
                            $load(w.add(L)),
                            $load(w.add(2 * L)),
                            $load(w.add(3 * L)),
                        ];
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let a = $set1(*lhs.add(r * lhs_rs + p));
                            for v in 0..4 {
                                acc[v] = $fma(a, w[v], acc[v]);
                            }
                        }
                    }
                    for (r, acc) in acc.iter().enumerate() {
                        let d = dst.add(r * dst_rs);
                        if cols == 4 * L {
                            for v in 0..4 {
                                $store(d.add(v * L), $add($load(d.add(v * L)), acc[v]));
                            }
                        } else {
                            let mut sums = [0.0f32; 4 * L];
                            for v in 0..4 {
                                $store(sums.as_mut_ptr().add(v * L), acc[v]);
                            }
                            for (j, sum) in sums.iter().enumerate().take(cols) {
                                *d.add(j) += sum;
                            }
                        }
                    }
                }
            }

            /// [`super::super::gemm_packed`] at this level.
            ///
            /// # Safety
            /// The CPU has `$feature`; `gemm_packed` checked the bounds.
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn gemm(
                w: &PackedMatrix,
                m: usize,
                dst: &mut [f32],
                dst_rs: usize,
                lhs: &[f32],
                lhs_rs: usize,
            ) {
                assert_eq!(w.lanes, L, "weights packed for another SIMD level");
                let (k, n, width) = (w.k, w.n, 4 * L);
                for tile in (0..m).step_by(super::super::GEMM_TILE_ROWS) {
                    let tile_end = m.min(tile + super::super::GEMM_TILE_ROWS);
                    for (block, panel) in w.data.chunks_exact(k * width).enumerate() {
                        let col = block * width;
                        let cols = width.min(n - col);
                        let mut row = tile;
                        while row < tile_end {
                            let count = super::super::group_rows(tile_end - row, $group);
                            let d = dst[row * dst_rs + col..].as_mut_ptr();
                            let l = lhs[row * lhs_rs..].as_ptr();
                            macro_rules! go {
                                ($r:literal) => {
                                    // SAFETY: `gemm_packed` checked that `count`
                                    // rows from `row` fit `dst` and `lhs`.
                                    unsafe {
                                        gemm_block::<$r>(
                                            panel.as_ptr(),
                                            k,
                                            cols,
                                            d,
                                            dst_rs,
                                            l,
                                            lhs_rs,
                                        )
                                    }
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

            /// `acc[r] += Σ_p src[r·rs + p] · panel[p]` over `k` rows
            /// of the panel, for `R` rows.
            ///
            /// # Safety
            /// The CPU has `$feature`; `panel` holds `k·4·L` floats and
            /// rows `0..R` of `src` (stride `rs`) hold `k` floats.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn accumulate<const R: usize>(
                acc: &mut [[Vector; 4]; R],
                panel: *const f32,
                k: usize,
                src: *const f32,
                rs: usize,
            ) {
                // SAFETY: the caller guarantees every offset below is in
                // bounds (see `# Safety`).
                unsafe {
                    for p in 0..k {
                        let w = panel.add(p * 4 * L);
                        let w = [
                            $load(w),
                            $load(w.add(L)),
                            $load(w.add(2 * L)),
                            $load(w.add(3 * L)),
                        ];
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let a = $set1(*src.add(r * rs + p));
                            for v in 0..4 {
                                acc[v] = $fma(a, w[v], acc[v]);
                            }
                        }
                    }
                }
            }

            /// [`accumulate`] for one row over two hidden blocks at once
            /// (`panels[0]`, `panels[1]`): eight independent FMA chains
            /// hide the FMA latency that four would expose, and each
            /// block's chain runs in the same order as in `accumulate`,
            /// so a row alone gets the bits it gets in a batch.
            ///
            /// # Safety
            /// As [`accumulate`], for both panels.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn accumulate_pair(
                acc: &mut [[Vector; 4]; 2],
                panels: [*const f32; 2],
                k: usize,
                src: *const f32,
            ) {
                // SAFETY: the caller guarantees every offset below is in
                // bounds (see `# Safety`).
                unsafe {
                    for p in 0..k {
                        let a = $set1(*src.add(p));
                        for (acc, panel) in acc.iter_mut().zip(panels) {
                            let w = panel.add(p * 4 * L);
                            for v in 0..4 {
                                acc[v] = $fma(a, $load(w.add(v * L)), acc[v]);
                            }
                        }
                    }
                }
            }

            /// The input part of one row's gates for one hidden block:
            /// what the step adds `x·W` to (the bias, `gates` of the
            /// row) plus that product, rounded as the separate GEMM
            /// rounds it (`gemm_packed` adds its sums to the bias the
            /// same way), so the fused and unfused steps agree bit for
            /// bit.
            ///
            /// # Safety
            /// The CPU has `$feature`.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn input_part(
                acc: &[Vector; 4],
                gates: &[f32],
                hidden: usize,
                j0: usize,
                width: usize,
            ) -> [f32; 4 * L] {
                let mut part = [0.0f32; 4 * L];
                for (v, acc) in acc.iter().enumerate() {
                    let bias = &gates[v * hidden + j0..v * hidden + j0 + width];
                    let out = part[v * L..].as_mut_ptr();
                    if width == L {
                        // SAFETY: `bias` and `part` hold L floats here.
                        unsafe { $store(out, $add($load(bias.as_ptr()), *acc)) };
                    } else {
                        // SAFETY: `part` holds 4·L floats.
                        unsafe { $store(out, *acc) };
                        for (sum, bias) in part[v * L..v * L + width].iter_mut().zip(bias) {
                            *sum += bias;
                        }
                    }
                }
                part
            }

            /// Adds the input part to a row's recurrent sums and runs the
            /// cell update: `input` is that row's [`input_part`] when the
            /// step computes `x·W` itself, else the row of `a.gates`.
            ///
            /// # Safety
            /// The CPU has `$feature`; row `b` is in bounds.
            #[allow(clippy::too_many_arguments)]
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn finish_row(
                acc: &[Vector; 4],
                input: Option<&[f32; 4 * L]>,
                hidden: usize,
                j0: usize,
                width: usize,
                b: usize,
                a: &mut StepArgs<'_>,
            ) {
                let mut sums = [0.0f32; 4 * L];
                for (v, acc) in acc.iter().enumerate() {
                    // SAFETY: `sums` holds 4·L floats.
                    unsafe { $store(sums.as_mut_ptr().add(v * L), *acc) };
                }
                let (gates, gates_hidden, gates_j0) = match input {
                    Some(part) => (&part[..], L, 0),
                    None => (&a.gates[b * a.g_rs..], hidden, j0),
                };
                cell_lanes::<L>(
                    &sums,
                    gates,
                    gates_hidden,
                    gates_j0,
                    width,
                    &mut a.c[b * hidden + j0..],
                    &mut a.h_next[b * a.hn_rs + j0..],
                );
            }

            /// `R` rows from `row` × one hidden block of the fused step.
            /// The input product and the recurrent product run as two
            /// chains from zero, added as the unfused step adds them, so
            /// a row's bits do not depend on which step its batch used.
            ///
            /// # Safety
            /// The CPU has `$feature`; `lstm_step` checked that rows
            /// `row..row + R` are in bounds; `panel` holds
            /// `(k_in + hidden)·4·L` floats.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn step_block<const R: usize>(
                panel: &[f32],
                k_in: usize,
                hidden: usize,
                j0: usize,
                row: usize,
                a: &mut StepArgs<'_>,
            ) {
                let width = L.min(hidden - j0);
                let mut inputs = [[0.0f32; 4 * L]; R];
                if k_in > 0 {
                    let mut acc = [[$zero(); 4]; R];
                    // SAFETY: `lstm_step` checked `x` holds these rows.
                    unsafe {
                        accumulate::<R>(
                            &mut acc,
                            panel.as_ptr(),
                            k_in,
                            a.x.as_ptr().add(row * a.x_rs),
                            a.x_rs,
                        );
                        for (r, acc) in acc.iter().enumerate() {
                            inputs[r] =
                                input_part(acc, &a.gates[(row + r) * a.g_rs..], hidden, j0, width);
                        }
                    }
                }
                let mut acc = [[$zero(); 4]; R];
                if a.recurrent {
                    // SAFETY: `lstm_step` checked `h_prev` holds these rows.
                    unsafe {
                        accumulate::<R>(
                            &mut acc,
                            panel.as_ptr().add(k_in * 4 * L),
                            hidden,
                            a.h_prev.as_ptr().add(row * a.hp_rs),
                            a.hp_rs,
                        )
                    };
                }
                for (r, acc) in acc.iter().enumerate() {
                    let input = (k_in > 0).then_some(&inputs[r]);
                    // SAFETY: row `row + r` is in bounds (see `# Safety`).
                    unsafe { finish_row(acc, input, hidden, j0, width, row + r, a) };
                }
            }

            /// [`step_block`] for a one-row step over two neighbouring
            /// hidden blocks (`j0` and `j0 + L`), with [`accumulate_pair`].
            ///
            /// # Safety
            /// The CPU has `$feature`; `lstm_step` checked row 0 is in
            /// bounds; both panels hold `(k_in + hidden)·4·L` floats and
            /// the second block starts below `hidden`.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn step_pair(
                panels: [&[f32]; 2],
                k_in: usize,
                hidden: usize,
                j0: usize,
                a: &mut StepArgs<'_>,
            ) {
                let starts = [j0, j0 + L];
                let widths = starts.map(|j| L.min(hidden - j));
                let mut inputs = [[0.0f32; 4 * L]; 2];
                if k_in > 0 {
                    let mut acc = [[$zero(); 4]; 2];
                    // SAFETY: `lstm_step` checked `x` holds row 0.
                    unsafe {
                        accumulate_pair(&mut acc, panels.map(<[f32]>::as_ptr), k_in, a.x.as_ptr());
                        for i in 0..2 {
                            inputs[i] = input_part(&acc[i], a.gates, hidden, starts[i], widths[i]);
                        }
                    }
                }
                let mut acc = [[$zero(); 4]; 2];
                if a.recurrent {
                    // SAFETY: `lstm_step` checked `h_prev` holds row 0.
                    unsafe {
                        accumulate_pair(
                            &mut acc,
                            panels.map(|p| p.as_ptr().add(k_in * 4 * L)),
                            hidden,
                            a.h_prev.as_ptr(),
                        )
                    };
                }
                for i in 0..2 {
                    let input = (k_in > 0).then_some(&inputs[i]);
                    // SAFETY: row 0 is in bounds (see `# Safety`).
                    unsafe { finish_row(&acc[i], input, hidden, starts[i], widths[i], 0, a) };
                }
            }

            /// [`super::super::lstm_step`] at this level.
            ///
            /// # Safety
            /// The CPU has `$feature`; `lstm_step` checked the bounds.
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn step(w: &PackedRecurrent, a: &mut StepArgs<'_>) {
                assert_eq!(w.lanes, L, "weights packed for another SIMD level");
                let (hidden, k_in) = (w.hidden, w.k_in);
                let panel_len = (k_in + hidden) * 4 * L;
                if a.rows == 1 {
                    // One row leaves one block four chains; two blocks
                    // at a time give it eight.
                    let mut pairs = w.data.chunks(2 * panel_len).enumerate();
                    for (pair, panels) in &mut pairs {
                        let j0 = pair * 2 * L;
                        // SAFETY: `lstm_step` checked row 0; a pair's
                        // second panel is a whole block below `hidden`.
                        unsafe {
                            if panels.len() == 2 * panel_len {
                                let (first, second) = panels.split_at(panel_len);
                                step_pair([first, second], k_in, hidden, j0, a);
                            } else {
                                step_block::<1>(panels, k_in, hidden, j0, 0, a);
                            }
                        }
                    }
                    return;
                }
                for (block, panel) in w.data.chunks_exact(panel_len).enumerate() {
                    let j0 = block * L;
                    let mut row = 0;
                    while row < a.rows {
                        let count = super::super::group_rows(a.rows - row, $group);
                        // SAFETY: `count` rows from `row` are in bounds.
                        unsafe {
                            match count {
                                1 => step_block::<1>(panel, k_in, hidden, j0, row, a),
                                2 => step_block::<2>(panel, k_in, hidden, j0, row, a),
                                3 => step_block::<3>(panel, k_in, hidden, j0, row, a),
                                4 => step_block::<4>(panel, k_in, hidden, j0, row, a),
                                5 => step_block::<5>(panel, k_in, hidden, j0, row, a),
                                _ => step_block::<6>(panel, k_in, hidden, j0, row, a),
                            }
                        }
                        row += count;
                    }
                }
            }
        }
    };
}

// 6 rows × 4 vectors = 24 of the 32 zmm registers.
kernels!(
    avx512,
    "avx512f,avx512vl,avx2,fma",
    16,
    6,
    __m512,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    _mm512_add_ps
);
// 3 rows × 4 vectors = 12 of the 16 ymm registers.
kernels!(
    avx2,
    "avx2,fma",
    8,
    3,
    __m256,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    _mm256_add_ps
);
