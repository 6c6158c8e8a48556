//! The recognised model as plain fp32 weights, for engines that run the
//! same family on other hardware (the CUDA engine) and for tools that
//! rebuild the model elsewhere (PyTorch in `scripts/gpu-check.sh`).
//!
//! Layouts are the ones the native kernels start from: row-major,
//! "input by output" (`x · W`), LSTM gates in ONNX order (i, o, f, c).

use crate::model::{Plan, SeqLayer};
use crate::quant::Precision;

/// A recognised CNN+LSTM model: sequence layers over `[B, T, C]`, the last
/// time step, then the head over `[B, C]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelWeights {
    pub time_steps: usize,
    pub features: usize,
    pub seq: Vec<SeqWeights>,
    pub head: Vec<LinearWeights>,
    pub output_width: usize,
}

/// One sequence layer.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqWeights {
    Conv(ConvWeights),
    Lstm(LstmWeights),
}

/// Conv1d over time, stride 1, dilation 1.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvWeights {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub pad_begin: usize,
    pub pad_end: usize,
    /// `[kernel][in_channels][out_channels]`.
    pub taps: Vec<f32>,
    pub bias: Vec<f32>,
    pub relu: bool,
}

impl ConvWeights {
    /// Output time steps for `time` input steps.
    pub fn out_time(&self, time: usize) -> usize {
        time + self.pad_begin + self.pad_end + 1 - self.kernel
    }
}

/// One forward LSTM layer, zero initial state.
#[derive(Debug, Clone, PartialEq)]
pub struct LstmWeights {
    pub input: usize,
    pub hidden: usize,
    /// `[input][4·hidden]`, gates i, o, f, c.
    pub w_t: Vec<f32>,
    /// `[hidden][4·hidden]`, gates i, o, f, c.
    pub r_t: Vec<f32>,
    /// Input and recurrent biases summed, `[4·hidden]`.
    pub bias: Vec<f32>,
}

/// `y = x · w_t + bias`, optionally followed by ReLU.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearWeights {
    pub input: usize,
    pub output: usize,
    /// `[input][output]`.
    pub w_t: Vec<f32>,
    pub bias: Vec<f32>,
    pub relu: bool,
}

impl ModelWeights {
    /// Output time steps of the sequence layers for the model's input
    /// length (before the last step is taken).
    pub fn seq_time_steps(&self) -> usize {
        self.seq
            .iter()
            .fold(self.time_steps, |time, layer| match layer {
                SeqWeights::Conv(conv) => conv.out_time(time),
                SeqWeights::Lstm(_) => time,
            })
    }
}

/// The plan's fp32 weights; `Err` for a QDQ plan (its int8 layers and
/// activation roundings have no fp32 equivalent).
pub(crate) fn export(plan: &Plan) -> Result<ModelWeights, String> {
    if plan.precision == Precision::Int8 || !plan.output_quant.is_empty() {
        return Err("a QDQ (int8) model has no plain fp32 weights".into());
    }
    let seq = plan
        .seq
        .iter()
        .map(|layer| match layer {
            SeqLayer::Conv(c) => SeqWeights::Conv(ConvWeights {
                in_channels: c.in_channels,
                out_channels: c.out_channels,
                kernel: c.kernel,
                pad_begin: c.pad_begin,
                pad_end: c.pad_end,
                taps: c.taps.clone(),
                bias: c.bias.clone(),
                relu: c.relu,
            }),
            SeqLayer::Lstm(l) => SeqWeights::Lstm(LstmWeights {
                input: l.input,
                hidden: l.hidden,
                w_t: l.w_t.clone(),
                r_t: l.r_t.clone(),
                bias: l.bias.clone(),
            }),
        })
        .collect();
    let head = plan
        .head
        .iter()
        .map(|l| LinearWeights {
            input: l.input,
            output: l.output,
            w_t: l.w_t.clone(),
            bias: l.bias.clone(),
            relu: l.relu,
        })
        .collect();
    Ok(ModelWeights {
        time_steps: plan.time_steps,
        features: plan.features,
        seq,
        head,
        output_width: plan.output_width,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::NativeEngine;

    use super::*;

    fn load(relative: &str) -> NativeEngine {
        NativeEngine::load(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(relative),
        )
        .expect("fixture model")
    }

    #[test]
    fn the_reference_model_exports_its_layers_and_shapes() {
        let w = load("models/cnn_lstm/1/model.onnx").weights().unwrap();
        assert_eq!((w.time_steps, w.features, w.output_width), (50, 60, 3));
        assert_eq!(w.seq.len(), 4);
        assert_eq!(w.seq_time_steps(), 50);
        match &w.seq[0] {
            SeqWeights::Conv(c) => {
                assert_eq!((c.in_channels, c.out_channels, c.kernel), (60, 64, 3));
                assert_eq!(c.taps.len(), 3 * 60 * 64);
                assert_eq!(c.bias.len(), 64);
            }
            other => panic!("expected a convolution, got {other:?}"),
        }
        match &w.seq[3] {
            SeqWeights::Lstm(l) => {
                assert_eq!((l.input, l.hidden), (128, 128));
                assert_eq!(
                    (l.w_t.len(), l.r_t.len(), l.bias.len()),
                    (128 * 512, 128 * 512, 512)
                );
            }
            other => panic!("expected an LSTM, got {other:?}"),
        }
        assert_eq!(w.head.len(), 2);
        assert!(w.head[0].relu && !w.head[1].relu);
    }

    #[test]
    fn a_qdq_model_has_no_plain_weights() {
        let err = load("fixtures/models/cnn_lstm_qdq/model.onnx")
            .weights()
            .unwrap_err();
        assert!(err.to_string().contains("QDQ"), "{err}");
    }
}
