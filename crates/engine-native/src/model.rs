//! The executable form of a CNN+LSTM model: a list of layers with weights
//! already laid out for the kernels, and the forward pass over a batch.
//!
//! Activations between sequence layers are kept sample-major, `[B, T, C]`
//! rows of `C` channels. That one layout serves every layer: a Conv1d tap is
//! a GEMM over rows shifted in time, the LSTM input projection is one GEMM
//! over all `B·T` rows, and the recurrent step reads the rows of time `t`
//! with a stride of `T·4H`. Transposes in the ONNX graph therefore cost
//! nothing at run time; the recogniser only tracks them.

use crate::kernels::{
    SMALL_ROWS_MAX, detect_simd, lstm_cell, matmul, matmul_small_rows, relu_in_place,
};
use crate::quant::{ActQuant, LowMat, LowSimd, Precision, Scratch, detect_low_simd};

/// `rows` copies of `bias`, the starting value of a GEMM that accumulates
/// onto it (built by appending: no zero fill that is overwritten at once).
fn repeat_rows(rows: usize, bias: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * bias.len());
    for _ in 0..rows {
        out.extend_from_slice(bias);
    }
    out
}

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
    /// `[hidden][4·hidden]`, the transposed recurrent weights.
    pub r_t: Vec<f32>,
    /// `r_t` packed for the small-batch recurrent kernel.
    pub r_packed: Vec<f32>,
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
    pub bias: Vec<f32>,
    pub relu: bool,
    /// Reduced-precision `w_t`, when the plan runs below fp32.
    pub low: Option<LowMat>,
}

/// How one forward pass runs its GEMMs: the SIMD levels picked for this
/// CPU and the scratch buffers low-precision layers convert rows into.
pub(crate) struct Ctx {
    simd: crate::kernels::Simd,
    low_simd: LowSimd,
    pub(crate) scratch: Scratch,
}

impl Ctx {
    pub(crate) fn new() -> Self {
        Self::with_low_simd(detect_low_simd())
    }

    /// A context that runs the low-precision kernels at `low_simd` (tests
    /// compare every level the CPU has).
    pub(crate) fn with_low_simd(low_simd: LowSimd) -> Self {
        Ctx {
            simd: detect_simd(),
            low_simd,
            scratch: Scratch::default(),
        }
    }
}

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

    pub fn forward(&self, rows: usize, input: &[f32]) -> Vec<f32> {
        self.forward_with(&mut Ctx::new(), rows, input)
    }

    /// Runs `rows` samples of `[time_steps, features]` and returns
    /// `rows × output_width` values.
    pub(crate) fn forward_with(&self, ctx: &mut Ctx, rows: usize, input: &[f32]) -> Vec<f32> {
        let mut time = self.time_steps;
        let mut channels = self.features;
        let mut act = input.to_vec();
        let last = self.seq.len().saturating_sub(1);
        for (index, layer) in self.seq.iter().enumerate() {
            match layer {
                SeqLayer::Conv(conv) => {
                    let (out, out_time) = conv.forward(ctx, rows, time, &act);
                    act = out;
                    time = out_time;
                    channels = conv.out_channels;
                }
                SeqLayer::Lstm(lstm) => {
                    // The recogniser only puts "last step" after the final
                    // sequence layer, so that LSTM can skip storing Y.
                    let last_only = index == last;
                    act = lstm.forward(ctx, rows, time, &act, last_only);
                    if last_only {
                        time = 1;
                    }
                    channels = lstm.hidden;
                }
            }
            self.round_output(index, &mut act);
        }
        // Last time step of each sample (a no-op when the LSTM already
        // returned only its final state).
        let mut vec = if time == 1 {
            act
        } else {
            let mut v = Vec::with_capacity(rows * channels);
            for b in 0..rows {
                let start = (b * time + time - 1) * channels;
                v.extend_from_slice(&act[start..start + channels]);
            }
            v
        };
        for (index, linear) in self.head.iter().enumerate() {
            vec = linear.forward(ctx, rows, &vec);
            self.round_output(self.seq.len() + index, &mut vec);
        }
        vec
    }

    /// Applies the QDQ roundings recorded for layer `index`'s output.
    fn round_output(&self, index: usize, values: &mut [f32]) {
        for (_, q) in self.output_quant.iter().filter(|(at, _)| *at == index) {
            q.fake_quantize(values);
        }
    }
}

impl Conv1d {
    fn forward(&self, ctx: &mut Ctx, rows: usize, time: usize, input: &[f32]) -> (Vec<f32>, usize) {
        let (cin, cout, k) = (self.in_channels, self.out_channels, self.kernel);
        let span = time + self.pad_begin + self.pad_end;
        let out_time = span + 1 - k;
        // Each sample's rows with its zero padding; the taps then read this
        // buffer shifted by 0..k rows, so no im2col copy is needed.
        let mut padded = vec![0.0f32; rows * span * cin];
        for b in 0..rows {
            let dst = (b * span + self.pad_begin) * cin;
            padded[dst..dst + time * cin]
                .copy_from_slice(&input[b * time * cin..(b + 1) * time * cin]);
        }
        // Output row r of the shifted GEMMs is time r - b·span of sample b;
        // rows that straddle two samples are computed and then skipped.
        let full_rows = rows * span - (k - 1);
        let mut full = repeat_rows(full_rows, &self.bias);
        // Every padded row is converted once; tap `t` then reads the
        // converted rows shifted by `t`, as the fp32 taps below do.
        if let Some(first) = self.low_taps.first() {
            first.prepare(ctx.low_simd, rows * span, &padded, cin, &mut ctx.scratch);
        }
        for (tap, low) in self.low_taps.iter().enumerate() {
            low.run_prepared(ctx.low_simd, full_rows, tap, &mut full, cout, &ctx.scratch);
        }
        for tap in 0..if self.low_taps.is_empty() { k } else { 0 } {
            matmul(
                full_rows,
                cout,
                cin,
                &mut full,
                cout,
                true,
                &padded[tap * cin..],
                cin,
                &self.taps[tap * cin * cout..(tap + 1) * cin * cout],
                cout,
            );
        }
        let mut out = Vec::with_capacity(rows * out_time * cout);
        for b in 0..rows {
            let start = b * span * cout;
            out.extend_from_slice(&full[start..start + out_time * cout]);
        }
        if self.relu {
            relu_in_place(&mut out);
        }
        (out, out_time)
    }
}

impl Lstm {
    /// Returns `[B, T, H]`, or only the final `[B, H]` with `last_only`.
    fn forward(
        &self,
        ctx: &mut Ctx,
        rows: usize,
        time: usize,
        input: &[f32],
        last_only: bool,
    ) -> Vec<f32> {
        let hidden = self.hidden;
        let gates_width = 4 * hidden;
        // Input projection of every time step of every sample in one GEMM.
        let mut gates = repeat_rows(rows * time, &self.bias);
        if let Some(low) = &self.w_low {
            low.matmul_acc(
                ctx.low_simd,
                rows * time,
                &mut gates,
                gates_width,
                input,
                self.input,
                &mut ctx.scratch,
            );
        } else {
            matmul(
                rows * time,
                gates_width,
                self.input,
                &mut gates,
                gates_width,
                true,
                input,
                self.input,
                &self.w_t,
                gates_width,
            );
        }
        let mut h = vec![0.0f32; rows * hidden];
        let mut c = vec![0.0f32; rows * hidden];
        let mut y = if last_only {
            Vec::new()
        } else {
            vec![0.0f32; rows * time * hidden]
        };
        let step_stride = time * gates_width;
        let simd = ctx.simd;
        for t in 0..time {
            let offset = t * gates_width;
            if let (true, Some(low)) = (t > 0, &self.r_low) {
                low.matmul_acc(
                    ctx.low_simd,
                    rows,
                    &mut gates[offset..],
                    step_stride,
                    &h,
                    hidden,
                    &mut ctx.scratch,
                );
            } else if t > 0 && rows <= SMALL_ROWS_MAX {
                matmul_small_rows(
                    simd,
                    rows,
                    gates_width,
                    hidden,
                    &mut gates[offset..],
                    step_stride,
                    &h,
                    hidden,
                    &self.r_packed,
                );
            } else if t > 0 {
                // The initial state is zero, so step 0 has no recurrent term.
                matmul(
                    rows,
                    gates_width,
                    hidden,
                    &mut gates[offset..],
                    step_stride,
                    true,
                    &h,
                    hidden,
                    &self.r_t,
                    gates_width,
                );
            }
            for b in 0..rows {
                let g = &gates[offset + b * step_stride..offset + b * step_stride + gates_width];
                let hb = &mut h[b * hidden..(b + 1) * hidden];
                lstm_cell(simd, g, &mut c[b * hidden..(b + 1) * hidden], hb);
                if !last_only {
                    let dst = (b * time + t) * hidden;
                    y[dst..dst + hidden].copy_from_slice(hb);
                }
            }
        }
        if last_only { h } else { y }
    }
}

impl Linear {
    fn forward(&self, ctx: &mut Ctx, rows: usize, input: &[f32]) -> Vec<f32> {
        let mut out = repeat_rows(rows, &self.bias);
        if let Some(low) = &self.low {
            low.matmul_acc(
                ctx.low_simd,
                rows,
                &mut out,
                self.output,
                input,
                self.input,
                &mut ctx.scratch,
            );
        } else {
            matmul(
                rows,
                self.output,
                self.input,
                &mut out,
                self.output,
                true,
                input,
                self.input,
                &self.w_t,
                self.output,
            );
        }
        if self.relu {
            relu_in_place(&mut out);
        }
        out
    }
}
