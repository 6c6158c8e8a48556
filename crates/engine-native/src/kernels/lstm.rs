//! The fused LSTM step: [`PackedRecurrent`] packs a layer's recurrent (and
//! optionally input) weights by hidden-unit block at load; each
//! [`lstm_step`] call streams them once, adding `h_prev·R` (and `x_t·W`) to
//! the gate rows and running the cell update on the block's accumulators
//! before they leave the registers ([`StepArgs`] carries the operands).

#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{Simd, group_rows, lanes, load_lanes, sigmoid, store_lanes, tanh};

/// The weights of one LSTM layer laid out for [`lstm_step`]: the hidden
/// units in blocks of `lanes` (one vector register), and for each block a
/// panel of `k_in + hidden` rows — the input weights `W` (none when the
/// input projection runs as a separate GEMM), then the recurrent weights
/// `R` — each row holding the block's weights for the four gates
/// (i, o, f, c) one after another (`4·lanes` floats; units past `hidden`
/// in the last block are zero). Every step then streams the whole matrix
/// once, front to back, and one block's accumulators hold all four gates of
/// the same units, so the cell update runs on them before they leave the
/// registers.
#[derive(Debug, Clone)]
pub(crate) struct PackedRecurrent {
    pub(super) simd: Simd,
    pub(super) lanes: usize,
    pub(super) k_in: usize,
    pub(super) hidden: usize,
    pub(super) data: Vec<f32>,
}

impl PackedRecurrent {
    /// Packs `r_t`, the `[hidden][4·hidden]` transposed recurrent weights,
    /// for the kernel of SIMD level `simd`.
    pub(crate) fn new(r_t: &[f32], hidden: usize, simd: Simd) -> Self {
        Self::with_input(&[], 0, r_t, hidden, simd)
    }

    /// Packs `w_t` (`[k_in][4·hidden]`) above `r_t`, so each step also
    /// computes its input projection `x_t·W` (see [`lstm_step`]).
    pub(crate) fn with_input(
        w_t: &[f32],
        k_in: usize,
        r_t: &[f32],
        hidden: usize,
        simd: Simd,
    ) -> Self {
        let lanes = lanes(simd);
        let blocks = hidden.div_ceil(lanes);
        let depth = k_in + hidden;
        let mut data = vec![0.0f32; blocks * depth * 4 * lanes];
        for block in 0..blocks {
            let j0 = block * lanes;
            let width = lanes.min(hidden - j0);
            for p in 0..depth {
                let (matrix, row) = if p < k_in { (w_t, p) } else { (r_t, p - k_in) };
                for gate in 0..4 {
                    let src = row * 4 * hidden + gate * hidden + j0;
                    let dst = ((block * depth + p) * 4 + gate) * lanes;
                    data[dst..dst + width].copy_from_slice(&matrix[src..src + width]);
                }
            }
        }
        PackedRecurrent {
            simd,
            lanes,
            k_in,
            hidden,
            data,
        }
    }

    pub(crate) fn simd(&self) -> Simd {
        self.simd
    }
}

/// The operands of one LSTM step for `rows` rows (see [`lstm_step`]);
/// every `*_rs` is the distance between two rows of the same buffer.
#[derive(Debug)]
pub(crate) struct StepArgs<'a> {
    pub rows: usize,
    /// This step's input rows (`k_in` values each), read only when the
    /// weights include `W`.
    pub x: &'a [f32],
    pub x_rs: usize,
    /// The previous hidden state; `recurrent = false` for the first step
    /// (zero state), which skips `h_prev · R`.
    pub recurrent: bool,
    pub h_prev: &'a [f32],
    pub hp_rs: usize,
    /// What the products are added to: the input projection with bias, or
    /// with `g_rs = 0` the bias alone (the same row for every row).
    pub gates: &'a [f32],
    pub g_rs: usize,
    /// Cell state, `rows × hidden` contiguous, updated in place.
    pub c: &'a mut [f32],
    /// The new hidden state (must not overlap `h_prev`).
    pub h_next: &'a mut [f32],
    pub hn_rs: usize,
}

/// One hidden block (`L` units, all four gates) of one LSTM step for `R`
/// rows starting at `row`: `4·R` accumulators take `x · W`, which is added
/// to the bias as [`gemm_packed`] adds it, then `h_prev · R` from zero,
/// which the cell update adds to that input part. Two chains added in the
/// unfused step's order: a row's bits depend neither on its batch nor on
/// whether the step computed the input projection itself.
#[inline(always)]
fn step_block<const L: usize, const R: usize>(
    panel: &[f32],
    k_in: usize,
    hidden: usize,
    j0: usize,
    row: usize,
    a: &mut StepArgs<'_>,
) {
    let k = if a.recurrent { hidden } else { 0 };
    let width = L.min(hidden - j0);
    let mut inputs = [[0.0f32; 128]; R];
    if k_in > 0 {
        let xs: [&[f32]; R] = std::array::from_fn(|r| {
            let start = (row + r) * a.x_rs;
            &a.x[start.min(a.x.len())..(start + k_in).min(a.x.len())]
        });
        let acc = accumulate_rows::<L, R>(panel, k_in, xs);
        for (r, (acc, input)) in acc.iter().zip(&mut inputs).enumerate() {
            let gates = &a.gates[(row + r) * a.g_rs..];
            for gate in 0..4 {
                for l in 0..width {
                    input[gate * L + l] = gates[gate * hidden + j0 + l] + acc[gate][l];
                }
            }
        }
    }
    let hs: [&[f32]; R] = std::array::from_fn(|r| {
        let start = (row + r) * a.hp_rs;
        &a.h_prev[start.min(a.h_prev.len())..(start + k).min(a.h_prev.len())]
    });
    let acc = accumulate_rows::<L, R>(&panel[k_in * 4 * L..], k, hs);
    for (r, (acc, input)) in acc.iter().zip(&inputs).enumerate() {
        let mut sums = [0.0f32; 128];
        for gate in 0..4 {
            sums[gate * L..(gate + 1) * L].copy_from_slice(&acc[gate]);
        }
        let b = row + r;
        let (gates, gates_hidden, gates_j0) = if k_in > 0 {
            (&input[..], L, 0)
        } else {
            (&a.gates[b * a.g_rs..], hidden, j0)
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
}

/// `Σ_p rows[r][p] · panel[p]` from zero, in `p` order, for `R` rows and
/// one block's four gates.
#[inline(always)]
fn accumulate_rows<const L: usize, const R: usize>(
    panel: &[f32],
    k: usize,
    rows: [&[f32]; R],
) -> [[[f32; L]; 4]; R] {
    let mut acc = [[[0.0f32; L]; 4]; R];
    for p in 0..k {
        let w = &panel[p * 4 * L..(p + 1) * 4 * L];
        for r in 0..R {
            let v = rows[r][p];
            for gate in 0..4 {
                for l in 0..L {
                    acc[r][gate][l] = v.mul_add(w[gate * L + l], acc[r][gate][l]);
                }
            }
        }
    }
    acc
}

/// Runs [`step_block`] over every hidden block, and within a block over the
/// rows in groups of `G` (the register budget: `4·G` accumulators). Blocks
/// are the outer loop so one block's panel is reused from L1 by every row
/// group before the next panel streams in.
#[inline(always)]
fn step_all<const L: usize, const G: usize>(w: &PackedRecurrent, a: &mut StepArgs<'_>) {
    assert_eq!(w.lanes, L, "weights packed for another SIMD level");
    let (hidden, k_in) = (w.hidden, w.k_in);
    for (block, panel) in w.data.chunks_exact((k_in + hidden) * 4 * L).enumerate() {
        let j0 = block * L;
        let mut row = 0;
        while row < a.rows {
            let n = group_rows(a.rows - row, G);
            match n {
                1 => step_block::<L, 1>(panel, k_in, hidden, j0, row, a),
                2 => step_block::<L, 2>(panel, k_in, hidden, j0, row, a),
                3 => step_block::<L, 3>(panel, k_in, hidden, j0, row, a),
                4 => step_block::<L, 4>(panel, k_in, hidden, j0, row, a),
                5 => step_block::<L, 5>(panel, k_in, hidden, j0, row, a),
                _ => step_block::<L, 6>(panel, k_in, hidden, j0, row, a),
            }
            row += n;
        }
    }
}

/// One LSTM time step for `a.rows` rows, fused: `gates + x·W + h_prev·R`
/// (`W` only when `w` was packed with input weights; otherwise `gates`
/// already holds bias and `x·W`), the gate activations and the cell
/// update, in one pass over the packed weights. `c` is updated in place
/// and the new hidden state goes to `h_next`; callers alternate two
/// hidden-state buffers.
///
/// # Panics
/// If a stride or length would reach outside a slice (a bug: the engine
/// computes every shape from the validated plan).
pub(crate) fn lstm_step(w: &PackedRecurrent, mut a: StepArgs<'_>) {
    let rows = a.rows;
    if rows == 0 {
        return;
    }
    let (hidden, k_in) = (w.hidden, w.k_in);
    let k = if a.recurrent { hidden } else { 0 };
    assert!(
        a.x_rs >= k_in && a.hp_rs >= k && a.hn_rs >= hidden,
        "LSTM step strides"
    );
    assert!(
        (a.g_rs == 0 || a.g_rs >= 4 * hidden) && a.gates.len() >= (rows - 1) * a.g_rs + 4 * hidden,
        "LSTM step gates"
    );
    assert!(
        k_in == 0 || a.x.len() >= (rows - 1) * a.x_rs + k_in,
        "LSTM step x"
    );
    assert!(
        k == 0 || a.h_prev.len() >= (rows - 1) * a.hp_rs + k,
        "LSTM step h_prev"
    );
    assert!(a.c.len() >= rows * hidden, "LSTM step c");
    assert!(
        a.h_next.len() >= (rows - 1) * a.hn_rs + hidden,
        "LSTM step h_next"
    );
    match w.simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `PackedRecurrent` of level `Avx512` is only built from a
        // level `detect_simd` returned or one the caller checked the CPU
        // has (`NativeEngine::with_simd`), so every feature is present.
        Simd::Avx512 => unsafe { x86::avx512::step(w, &mut a) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 and FMA.
        Simd::Avx2 => unsafe { x86::avx2::step(w, &mut a) },
        _ => step_all::<8, 3>(w, &mut a),
    }
}

/// The cell update of `width ≤ L` hidden units for one row, from the
/// recurrent sums `acc` (`4·L`, gate-major) and the input projection row
/// `gates` (`4·hidden`, ONNX order i, o, f, c). Written as loops over `L`
/// lanes so each SIMD wrapper gets a vectorised copy.
#[inline(always)]
pub(super) fn cell_lanes<const L: usize>(
    acc: &[f32],
    gates: &[f32],
    hidden: usize,
    j0: usize,
    width: usize,
    c: &mut [f32],
    h_next: &mut [f32],
) {
    let mut pre = [[0.0f32; L]; 4];
    for (gate, pre) in pre.iter_mut().enumerate() {
        let x = load_lanes::<L>(&gates[gate * hidden + j0..], width);
        for l in 0..L {
            pre[l] = x[l] + acc[gate * L + l];
        }
    }
    let mut cell = load_lanes::<L>(c, width);
    let mut h = [0.0f32; L];
    for l in 0..L {
        let [i, o, f, g] = [pre[0][l], pre[1][l], pre[2][l], pre[3][l]];
        cell[l] = sigmoid(f).mul_add(cell[l], sigmoid(i) * tanh(g));
        h[l] = sigmoid(o) * tanh(cell[l]);
    }
    store_lanes(c, &cell, width);
    store_lanes(h_next, &h, width);
}
