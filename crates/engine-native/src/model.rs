//! The executable form of a CNN+LSTM model: a list of layers with weights
//! already laid out for the kernels, and the forward pass over a batch.
//!
//! Activations between sequence layers are kept sample-major, `[B, T, C]`
//! rows of `C` channels. That one layout serves every layer: a Conv1d tap is
//! a GEMM over rows shifted in time, the LSTM input projection is one GEMM
//! over all `B·T` rows, and the recurrent step reads the rows of time `t`
//! with a stride of `T·4H`. Transposes in the ONNX graph therefore cost
//! nothing at run time; the recogniser only tracks them.
//!
//! [`Plan::forward_into`] runs a batch on the calling thread. A one-row
//! batch on two threads runs split between layers instead ([`pipeline`]).

use crate::kernels::{
    PackedMatrix, PackedRecurrent, Simd, StepArgs, gemm_packed, lstm_cell, lstm_step, relu_in_place,
};
use crate::quant::{ActQuant, LowMat, LowSimd, Precision, Scratch, detect_low_simd};

mod pipeline;

pub(crate) use pipeline::{HandOff, HandOffBuffers};

/// From this many rows (per thread) an LSTM layer computes its input
/// projection inside the fused step instead of one GEMM up front (see
/// `Lstm::forward_fused_input`).
pub(crate) const FUSED_INPUT_MIN_ROWS: usize = 16;

/// Conv1d over time, stride 1, dilation 1.
#[derive(Debug, Clone)]
pub(crate) struct Conv1d {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub pad_begin: usize,
    pub pad_end: usize,
    /// `[kernel][in_channels][out_channels]`: one GEMM right-hand side per tap.
    pub taps: Vec<f32>,
    /// `taps`, one packed matrix per tap, for the fp32 GEMM.
    pub packed_taps: Vec<PackedMatrix>,
    pub bias: Vec<f32>,
    pub relu: bool,
    /// One reduced-precision copy of each tap, when the plan runs below
    /// fp32 (empty otherwise).
    pub low_taps: Vec<LowMat>,
}

/// One forward LSTM layer with ONNX gate order (i, o, f, c).
#[derive(Debug, Clone)]
pub(crate) struct Lstm {
    pub input: usize,
    pub hidden: usize,
    /// `[input][4·hidden]`, the transposed input weights.
    pub w_t: Vec<f32>,
    /// `w_t` packed for the fp32 GEMM.
    pub w_packed: PackedMatrix,
    /// `[hidden][4·hidden]`, the transposed recurrent weights.
    pub r_t: Vec<f32>,
    /// `r_t` packed for the fused step kernel of one SIMD level.
    pub r_packed: PackedRecurrent,
    /// `w_t` above `r_t`, packed for the fused step that also computes the
    /// input projection (batches of [`FUSED_INPUT_MIN_ROWS`] rows or more).
    pub wr_packed: PackedRecurrent,
    /// Input and recurrent biases summed, `[4·hidden]`.
    pub bias: Vec<f32>,
    /// Reduced-precision `w_t` and `r_t`, when the plan runs below fp32.
    pub w_low: Option<LowMat>,
    pub r_low: Option<LowMat>,
}

/// Fully connected layer `y = x·Wᵀ + b`.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub input: usize,
    pub output: usize,
    /// `[input][output]`.
    pub w_t: Vec<f32>,
    /// `w_t` packed for the fp32 GEMM.
    pub w_packed: PackedMatrix,
    pub bias: Vec<f32>,
    pub relu: bool,
    /// Reduced-precision `w_t`, when the plan runs below fp32.
    pub low: Option<LowMat>,
}

/// Everything one forward pass writes besides its output: the low-precision
/// kernels' SIMD level and converted rows, and every intermediate buffer.
///
/// One `Ctx` belongs to one worker at a time (the engine keeps a pool, see
/// `NativeEngine`). Buffers only grow: after the first call at a batch
/// size, a forward pass at that size or smaller allocates nothing.
pub(crate) struct Ctx {
    low_simd: LowSimd,
    pub(crate) scratch: Scratch,
    /// Sequence activations, alternating between layers.
    act: [Vec<f32>; 2],
    /// Conv1d: the zero-padded input and the full-length tap products.
    padded: Vec<f32>,
    full: Vec<f32>,
    /// LSTM: input projection of every step, hidden states (two, so a step
    /// reads one while it writes the other) and cell state.
    gates: Vec<f32>,
    h: [Vec<f32>; 2],
    c: Vec<f32>,
    /// Head activations, alternating between layers.
    head: [Vec<f32>; 2],
    /// What the two threads of the one-row pipeline share ([`HandOff`]).
    pub(crate) handoff: HandOffBuffers,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("low_simd", &self.low_simd)
            .field("gates", &self.gates.len())
            .finish_non_exhaustive()
    }
}

impl Ctx {
    pub(crate) fn new() -> Self {
        Self::with_low_simd(detect_low_simd())
    }

    /// A context that runs the low-precision kernels at `low_simd` (tests
    /// compare every level the CPU has).
    pub(crate) fn with_low_simd(low_simd: LowSimd) -> Self {
        Ctx {
            low_simd,
            scratch: Scratch::default(),
            act: Default::default(),
            padded: Vec::new(),
            full: Vec::new(),
            gates: Vec::new(),
            h: Default::default(),
            c: Vec::new(),
            head: Default::default(),
            handoff: HandOffBuffers::default(),
        }
    }
}

/// The first `len` values of `buf`, growing it if needed. Contents are
/// whatever the last call left: every user overwrites what it reads.
fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// Fills `dst` (`rows × bias.len()`) with copies of `bias`, the starting
/// value of a GEMM that accumulates onto it.
fn fill_rows(dst: &mut [f32], bias: &[f32]) {
    for row in dst.chunks_exact_mut(bias.len()) {
        row.copy_from_slice(bias);
    }
}

// A plan holds a handful of layers, built once at load: boxing the larger
// variant would only add an indirection to the forward pass.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub(crate) enum SeqLayer {
    Conv(Conv1d),
    Lstm(Lstm),
}

/// A recognised model: sequence layers over `[B, T, C]`, then the last time
/// step, then the head over `[B, C]`.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub time_steps: usize,
    pub features: usize,
    pub seq: Vec<SeqLayer>,
    pub head: Vec<Linear>,
    pub output_width: usize,
    pub precision: Precision,
    /// QDQ models: `(layer, q)` rounds the output of layer `layer`
    /// (sequence layers first, then the head) to `q`'s grid, for a
    /// QuantizeLinear/DequantizeLinear pair read by an fp32 layer (see
    /// recognise.rs). Empty for every other model.
    pub output_quant: Vec<(usize, ActQuant)>,
}

impl Plan {
    /// Repacks the fp32 weights for the kernels of SIMD level `simd`
    /// (which the caller has checked the CPU supports).
    pub fn set_simd(&mut self, simd: Simd) {
        for layer in &mut self.seq {
            match layer {
                SeqLayer::Conv(c) => {
                    c.packed_taps =
                        Conv1d::pack_taps(&c.taps, c.kernel, c.in_channels, c.out_channels, simd)
                }
                SeqLayer::Lstm(l) => {
                    l.w_packed = PackedMatrix::new(&l.w_t, l.input, 4 * l.hidden, simd);
                    l.r_packed = PackedRecurrent::new(&l.r_t, l.hidden, simd);
                    l.wr_packed =
                        PackedRecurrent::with_input(&l.w_t, l.input, &l.r_t, l.hidden, simd);
                }
            }
        }
        for linear in &mut self.head {
            linear.w_packed = PackedMatrix::new(&linear.w_t, linear.input, linear.output, simd);
        }
    }

    /// The SIMD level the kernels run at.
    pub fn simd(&self) -> Simd {
        self.seq
            .iter()
            .find_map(|layer| match layer {
                SeqLayer::Lstm(l) => Some(l.r_packed.simd()),
                SeqLayer::Conv(_) => None,
            })
            .unwrap_or_else(crate::kernels::detect_simd)
    }

    /// Converts the GEMM right-hand sides (conv taps, LSTM input and
    /// recurrent weights, head) to `precision`; fp32 drops the copies.
    ///
    /// The first sequence layer stays fp32: it reads the model's raw
    /// features, whose channels differ in scale within one row, and a
    /// per-row int8 scale (or bf16's 8-bit mantissa) loses the small ones.
    /// On the reference model that one layer alone made most of the error
    /// (int8 everywhere: max abs 5.9e-2 vs PyTorch; with the first conv in
    /// fp32: 1.7e-2) for under 5 % of the FLOPs. So does the last head
    /// layer (see below).
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
        for (index, layer) in self.seq.iter_mut().enumerate() {
            let precision = if index == 0 {
                Precision::Fp32
            } else {
                precision
            };
            match layer {
                SeqLayer::Conv(c) => {
                    let size = c.in_channels * c.out_channels;
                    c.low_taps = (0..c.kernel)
                        .filter_map(|t| {
                            LowMat::new(
                                precision,
                                &c.taps[t * size..(t + 1) * size],
                                c.in_channels,
                                c.out_channels,
                            )
                        })
                        .collect();
                }
                SeqLayer::Lstm(l) => {
                    l.w_low = LowMat::new(precision, &l.w_t, l.input, 4 * l.hidden);
                    l.r_low = LowMat::new(precision, &l.r_t, l.hidden, 4 * l.hidden);
                }
            }
        }
        // The last head layer stays fp32 too: it writes the logits, so its
        // rounding lands on the output unaveraged. On the reference model it
        // made most of bf16's error (max abs 1.49e-2 with it in bf16,
        // 5.7e-3 in fp32; int8: 1.70e-2 → 1.45e-2) for 192 of 12.6 M
        // multiply-adds per row.
        let last_head = self.head.len().saturating_sub(1);
        for (index, linear) in self.head.iter_mut().enumerate() {
            let precision = if index == last_head {
                Precision::Fp32
            } else {
                precision
            };
            linear.low = LowMat::new(precision, &linear.w_t, linear.input, linear.output);
        }
    }

    /// Runs `rows` samples of `[time_steps, features]` and writes
    /// `rows × output_width` values to `out`, using only `ctx`'s buffers.
    ///
    /// # Panics
    /// If `input` or `out` has the wrong length (the engine checks the
    /// batch first).
    pub(crate) fn forward_into(&self, ctx: &mut Ctx, rows: usize, input: &[f32], out: &mut [f32]) {
        assert_eq!(
            input.len(),
            rows * self.time_steps * self.features,
            "input length"
        );
        assert_eq!(out.len(), rows * self.output_width, "output length");
        let mut time = self.time_steps;
        let mut channels = self.features;
        // Taken out of `ctx` (no allocation) so layers can borrow `ctx`
        // mutably while reading one buffer and writing the other.
        let [mut cur, mut next] = std::mem::take(&mut ctx.act);
        let last = self.seq.len().saturating_sub(1);
        for (index, layer) in self.seq.iter().enumerate() {
            let src = if index == 0 {
                input
            } else {
                &cur[..rows * time * channels]
            };
            match layer {
                SeqLayer::Conv(conv) => {
                    time = conv.forward(ctx, rows, time, src, &mut next);
                    channels = conv.out_channels;
                }
                SeqLayer::Lstm(lstm) => {
                    // The recogniser only puts "last step" after the final
                    // sequence layer, so that LSTM can skip storing Y.
                    let last_only = index == last;
                    lstm.forward(ctx, rows, time, src, last_only, &mut next);
                    if last_only {
                        time = 1;
                    }
                    channels = lstm.hidden;
                }
            }
            std::mem::swap(&mut cur, &mut next);
            self.round_output(index, &mut cur[..rows * time * channels]);
        }
        // Last time step of each sample (when the LSTM has not already
        // returned only its final state).
        let vec: &[f32] = if self.seq.is_empty() {
            input
        } else if time == 1 {
            &cur[..rows * channels]
        } else {
            // `next` is free: the last layer's output is in `cur`.
            let v = sized(&mut next, rows * channels);
            for b in 0..rows {
                let start = (b * time + time - 1) * channels;
                v[b * channels..(b + 1) * channels].copy_from_slice(&cur[start..start + channels]);
            }
            v
        };
        self.forward_head(ctx, rows, channels, vec, out);
        // Put each buffer back in its own slot, so the next call grows
        // neither (each has reached the size its layers need).
        if self.seq.len() % 2 == 1 {
            std::mem::swap(&mut cur, &mut next);
        }
        ctx.act = [cur, next];
    }

    /// Runs the head on `vec` (`rows × channels`: each sample's last time
    /// step) and writes `rows × output_width` values to `out`.
    fn forward_head(
        &self,
        ctx: &mut Ctx,
        rows: usize,
        channels: usize,
        vec: &[f32],
        out: &mut [f32],
    ) {
        let [mut head_in, mut head_out] = std::mem::take(&mut ctx.head);
        match self.head.split_last() {
            None => out.copy_from_slice(vec),
            Some((final_layer, hidden_layers)) => {
                let mut width = channels;
                let mut src_is_vec = true;
                for (index, linear) in hidden_layers.iter().enumerate() {
                    let dst = sized(&mut head_out, rows * linear.output);
                    let src = if src_is_vec {
                        vec
                    } else {
                        &head_in[..rows * width]
                    };
                    linear.forward(ctx, rows, src, dst);
                    self.round_output(self.seq.len() + index, dst);
                    std::mem::swap(&mut head_in, &mut head_out);
                    src_is_vec = false;
                    width = linear.output;
                }
                let src = if src_is_vec {
                    vec
                } else {
                    &head_in[..rows * width]
                };
                final_layer.forward(ctx, rows, src, out);
                self.round_output(self.seq.len() + hidden_layers.len(), out);
            }
        }
        // Put each buffer back in its own slot, so the next call grows
        // neither (each has reached the size its layers need).
        if self.head.len().saturating_sub(1) % 2 == 1 {
            std::mem::swap(&mut head_in, &mut head_out);
        }
        ctx.head = [head_in, head_out];
    }

    /// Applies the QDQ roundings recorded for layer `index`'s output.
    fn round_output(&self, index: usize, values: &mut [f32]) {
        for (_, q) in self.output_quant.iter().filter(|(at, _)| *at == index) {
            q.fake_quantize(values);
        }
    }
}

impl Conv1d {
    /// One packed matrix per tap of `taps` (`[kernel][cin][cout]`).
    pub(crate) fn pack_taps(
        taps: &[f32],
        kernel: usize,
        cin: usize,
        cout: usize,
        simd: Simd,
    ) -> Vec<PackedMatrix> {
        (0..kernel)
            .map(|t| {
                PackedMatrix::new(&taps[t * cin * cout..(t + 1) * cin * cout], cin, cout, simd)
            })
            .collect()
    }

    /// Output time steps for `time` input steps (stride 1, no dilation).
    pub(crate) fn out_time(&self, time: usize) -> usize {
        time + self.pad_begin + self.pad_end + 1 - self.kernel
    }

    /// Writes `[B, T', C_out]` to `out` and returns `T'`.
    fn forward(
        &self,
        ctx: &mut Ctx,
        rows: usize,
        time: usize,
        input: &[f32],
        out: &mut Vec<f32>,
    ) -> usize {
        let (cin, cout, k) = (self.in_channels, self.out_channels, self.kernel);
        debug_assert_eq!(self.packed_taps.len(), k);
        let span = time + self.pad_begin + self.pad_end;
        let out_time = self.out_time(time);
        // Each sample's rows with its zero padding; the taps then read this
        // buffer shifted by 0..k rows, so no im2col copy is needed.
        let padded = sized(&mut ctx.padded, rows * span * cin);
        for b in 0..rows {
            let sample = &mut padded[b * span * cin..(b + 1) * span * cin];
            let (head, rest) = sample.split_at_mut(self.pad_begin * cin);
            let (body, tail) = rest.split_at_mut(time * cin);
            head.fill(0.0);
            body.copy_from_slice(&input[b * time * cin..(b + 1) * time * cin]);
            tail.fill(0.0);
        }
        let padded = &ctx.padded[..rows * span * cin];
        // Output row r of the shifted GEMMs is time r - b·span of sample b;
        // rows that straddle two samples are computed and then skipped.
        let full_rows = rows * span - (k - 1);
        let full = sized(&mut ctx.full, full_rows * cout);
        fill_rows(full, &self.bias);
        // Every padded row is converted once; tap `t` then reads the
        // converted rows shifted by `t`, as the fp32 taps below do.
        if let Some(first) = self.low_taps.first() {
            first.prepare(ctx.low_simd, rows * span, padded, cin, &mut ctx.scratch);
        }
        for (tap, low) in self.low_taps.iter().enumerate() {
            low.run_prepared(ctx.low_simd, full_rows, tap, full, cout, &ctx.scratch);
        }
        if self.low_taps.is_empty() {
            for (tap, w) in self.packed_taps.iter().enumerate() {
                gemm_packed(w, full_rows, full, cout, &padded[tap * cin..], cin);
            }
        }
        let dst = sized(out, rows * out_time * cout);
        for b in 0..rows {
            let start = b * span * cout;
            dst[b * out_time * cout..(b + 1) * out_time * cout]
                .copy_from_slice(&full[start..start + out_time * cout]);
        }
        if self.relu {
            relu_in_place(dst);
        }
        out_time
    }
}

impl Lstm {
    /// Writes `[B, T, H]` to `out`, or only the final `[B, H]` with
    /// `last_only`.
    fn forward(
        &self,
        ctx: &mut Ctx,
        rows: usize,
        time: usize,
        input: &[f32],
        last_only: bool,
        out: &mut Vec<f32>,
    ) {
        let hidden = self.hidden;
        let gates_width = 4 * hidden;
        if rows >= FUSED_INPUT_MIN_ROWS && self.w_low.is_none() && self.r_low.is_none() {
            self.forward_fused_input(ctx, rows, time, input, last_only, out);
            return;
        }
        // Input projection of every time step of every sample in one GEMM.
        let gates = sized(&mut ctx.gates, rows * time * gates_width);
        if let Some(low) = &self.w_low {
            // The bias goes in with the product: the int8 kernel writes
            // this `B·T·4H` buffer once instead of after a fill pass.
            low.matmul_bias(
                ctx.low_simd,
                rows * time,
                gates,
                gates_width,
                input,
                self.input,
                &self.bias,
                &mut ctx.scratch,
            );
        } else {
            self.project(gates, rows, time, input);
        }
        let [mut h_prev, mut h_next] = std::mem::take(&mut ctx.h);
        sized(&mut h_prev, rows * hidden);
        sized(&mut h_next, rows * hidden);
        let c = sized(&mut ctx.c, rows * hidden);
        // The initial state is zero: step 0 has no recurrent term and
        // starts from c = 0.
        c.fill(0.0);
        let y = sized(out, rows * if last_only { 1 } else { time } * hidden);
        // The low-precision projection is sample-major (`[B, T, 4H]`).
        let (step_offset, step_stride) = if self.w_low.is_some() {
            (gates_width, time * gates_width)
        } else {
            (rows * gates_width, gates_width)
        };
        let gates = &mut ctx.gates[..rows * time * gates_width];
        for t in 0..time {
            let offset = t * step_offset;
            if let Some(low) = &self.r_low {
                if t > 0 {
                    low.matmul_acc(
                        ctx.low_simd,
                        rows,
                        &mut gates[offset..],
                        step_stride,
                        &h_prev,
                        hidden,
                        &mut ctx.scratch,
                    );
                }
                for b in 0..rows {
                    let g =
                        &gates[offset + b * step_stride..offset + b * step_stride + gates_width];
                    let hb = &mut h_next[b * hidden..(b + 1) * hidden];
                    lstm_cell(
                        self.r_packed.simd(),
                        g,
                        &mut c[b * hidden..(b + 1) * hidden],
                        hb,
                    );
                }
            } else {
                lstm_step(
                    &self.r_packed,
                    StepArgs {
                        rows,
                        x: &[],
                        x_rs: 0,
                        recurrent: t > 0,
                        h_prev: &h_prev,
                        hp_rs: hidden,
                        gates: &gates[offset..],
                        g_rs: step_stride,
                        c,
                        h_next: &mut h_next,
                        hn_rs: hidden,
                    },
                );
            }
            if !last_only {
                store_step(y, &h_next, rows, time, t, hidden);
            }
            std::mem::swap(&mut h_prev, &mut h_next);
        }
        if last_only {
            y.copy_from_slice(&h_prev[..rows * hidden]);
        }
        ctx.h = [h_prev, h_next];
    }
}

impl Lstm {
    /// Writes bias + `x·W` in fp32 for `time` steps of `rows` samples
    /// (`input` sample-major, `[B, T, C]`) to `gates`, stored time-major,
    /// `[T, B, 4H]`: each step then reads one contiguous block that the
    /// prefetcher streams in (sample-major, a large batch's steps missed
    /// the cache on every row).
    fn project(&self, gates: &mut [f32], rows: usize, time: usize, input: &[f32]) {
        let gates_width = 4 * self.hidden;
        fill_rows(gates, &self.bias);
        for b in 0..rows {
            gemm_packed(
                &self.w_packed,
                time,
                &mut gates[b * gates_width..],
                rows * gates_width,
                &input[b * time * self.input..],
                self.input,
            );
        }
    }

    /// [`Lstm::forward`] for larger batches: each step computes its own
    /// input projection inside the fused step (weights `[W; R]`), so the
    /// `B·T·4H` projection buffer never exists. At batch 128 that buffer is
    /// 13 MB, written by one GEMM and read back from memory step by step;
    /// here the step's input rows come straight from the previous layer's
    /// output. Small batches keep the separate GEMM: per step they would
    /// stream `W` as well as `R` from L2, and there the stream is the cost.
    fn forward_fused_input(
        &self,
        ctx: &mut Ctx,
        rows: usize,
        time: usize,
        input: &[f32],
        last_only: bool,
        out: &mut Vec<f32>,
    ) {
        let hidden = self.hidden;
        let [mut h_prev, mut h_next] = std::mem::take(&mut ctx.h);
        sized(&mut h_prev, rows * hidden);
        sized(&mut h_next, rows * hidden);
        let c = sized(&mut ctx.c, rows * hidden);
        c.fill(0.0);
        let y = sized(out, rows * if last_only { 1 } else { time } * hidden);
        for t in 0..time {
            lstm_step(
                &self.wr_packed,
                StepArgs {
                    rows,
                    x: &input[t * self.input..],
                    x_rs: time * self.input,
                    recurrent: t > 0,
                    h_prev: &h_prev,
                    hp_rs: hidden,
                    gates: &self.bias,
                    g_rs: 0,
                    c,
                    h_next: &mut h_next,
                    hn_rs: hidden,
                },
            );
            if !last_only {
                store_step(y, &h_next, rows, time, t, hidden);
            }
            std::mem::swap(&mut h_prev, &mut h_next);
        }
        if last_only {
            y.copy_from_slice(&h_prev[..rows * hidden]);
        }
        ctx.h = [h_prev, h_next];
    }
}

/// Copies step `t`'s hidden state of every row (`h`, `[rows, hidden]`)
/// into the layer output `y` (`[rows, time, hidden]`).
fn store_step(y: &mut [f32], h: &[f32], rows: usize, time: usize, t: usize, hidden: usize) {
    for b in 0..rows {
        let dst = (b * time + t) * hidden;
        y[dst..dst + hidden].copy_from_slice(&h[b * hidden..(b + 1) * hidden]);
    }
}

impl Linear {
    /// Writes `rows × output` values to `out`.
    fn forward(&self, ctx: &mut Ctx, rows: usize, input: &[f32], out: &mut [f32]) {
        fill_rows(out, &self.bias);
        if let Some(low) = &self.low {
            low.matmul_acc(
                ctx.low_simd,
                rows,
                out,
                self.output,
                input,
                self.input,
                &mut ctx.scratch,
            );
        } else {
            gemm_packed(&self.w_packed, rows, out, self.output, input, self.input);
        }
        if self.relu {
            relu_in_place(out);
        }
    }
}
