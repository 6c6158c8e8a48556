//! Static int8: fixed activation scales from a calibration set.
//!
//! Dynamic int8 scans every row for its range on every call. Static int8
//! fixes one scale and zero point per GEMM input at load instead, so a
//! call only rounds (no scan), and values outside the calibrated range
//! saturate to its ends.
//!
//! Flow: the plan is converted to int8 (weights as for dynamic int8), then
//! the calibration inputs run through it once with an [`Observer`] in the
//! scratch: every int8 GEMM input (each conv layer after the first, each
//! LSTM's input and recurrent state, each head layer) records the fp32
//! rows it receives. The activations observed are those of the int8 model
//! itself, layer after layer, so each range is the one its layer will see
//! when serving. A range is the observed minimum and maximum, or a
//! percentile of the values at each end (outliers then saturate instead
//! of widening every step); [`ActQuant::from_range`] turns it into a scale
//! and zero point stored in the layer's weights.

use std::path::{Path, PathBuf};

use crate::model::{Ctx, Plan, SeqLayer};
use crate::quant::{ActQuant, LowMat, Observer, Precision, QWeights};

/// How the values a GEMM input saw become its range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CalibrationMethod {
    /// The smallest and largest value seen.
    MinMax,
    /// The value at this percentile (e.g. 99.99) at the top, and at
    /// `100 − percentile` at the bottom.
    Percentile(f64),
}

/// Why a calibration set cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("cannot read calibration file {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("calibration file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Model inputs to calibrate on: `shape` is `[samples, time, features]`.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub path: PathBuf,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    pub method: CalibrationMethod,
}

impl Calibration {
    /// Reads a float32 `.npy` of shape `[samples, time, features]`.
    pub fn read_npy(path: &Path, method: CalibrationMethod) -> Result<Self, CalibrationError> {
        let unreadable = |reason: String| CalibrationError::Unreadable {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| unreadable(e.to_string()))?;
        let npy = npyz::NpyFile::new(&bytes[..])
            .map_err(|e| unreadable(format!("not a .npy file: {e}")))?;
        let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
        let data = npy
            .into_vec::<f32>()
            .map_err(|e| unreadable(format!("not float32 data: {e}")))?;
        Ok(Calibration {
            path: path.to_path_buf(),
            shape,
            data,
            method,
        })
    }

    fn invalid(&self, reason: String) -> CalibrationError {
        CalibrationError::Invalid {
            path: self.path.clone(),
            reason,
        }
    }
}

/// Calls `f` on every int8 GEMM input's weights with its site number; all
/// taps of one conv share a site (they read the same rows). Returns the
/// number of sites.
fn for_each_site(plan: &mut Plan, mut f: impl FnMut(usize, &mut QWeights)) -> usize {
    let mut site = 0;
    for layer in &mut plan.seq {
        match layer {
            SeqLayer::Conv(conv) => {
                let mut any = false;
                for tap in &mut conv.low_taps {
                    if let LowMat::Int8(q) = tap {
                        f(site, q);
                        any = true;
                    }
                }
                site += usize::from(any);
            }
            SeqLayer::Lstm(lstm) => {
                for low in [&mut lstm.w_low, &mut lstm.r_low] {
                    if let Some(LowMat::Int8(q)) = low {
                        f(site, q);
                        site += 1;
                    }
                }
            }
        }
    }
    for linear in &mut plan.head {
        if let Some(LowMat::Int8(q)) = &mut linear.low {
            f(site, q);
            site += 1;
        }
    }
    site
}

/// Converts `plan` to static int8 calibrated on `calibration`.
pub(crate) fn calibrate(
    plan: &mut Plan,
    calibration: &Calibration,
) -> Result<(), CalibrationError> {
    let expected = [plan.time_steps, plan.features];
    match calibration.shape.as_slice() {
        [samples, rest @ ..] if *samples > 0 && rest == expected => {}
        shape => {
            return Err(calibration.invalid(format!(
                "shape {shape:?}; expected [samples, {}, {}] (samples ≥ 1) like the model's input",
                expected[0], expected[1]
            )));
        }
    }
    if let Some(bad) = calibration.data.iter().find(|v| !v.is_finite()) {
        return Err(calibration.invalid(format!("holds a non-finite value ({bad})")));
    }
    if let CalibrationMethod::Percentile(p) = calibration.method
        && !(50.0..=100.0).contains(&p)
    {
        return Err(calibration.invalid(format!("percentile {p} is outside [50, 100]")));
    }
    plan.set_precision(Precision::Int8);
    for_each_site(plan, |site, q| q.site = site);
    let mut ctx = Ctx::new();
    ctx.scratch.observer = Some(Observer::default());
    let row_len = plan.time_steps * plan.features;
    let mut out = Vec::new();
    for chunk in calibration.data.chunks(32 * row_len) {
        let rows = chunk.len() / row_len;
        out.resize(rows * plan.output_width, 0.0);
        plan.forward_into(&mut ctx, rows, chunk, &mut out);
    }
    let mut observed = ctx.scratch.observer.take().unwrap_or_default().values;
    let ranges: Vec<ActQuant> = observed
        .iter_mut()
        .map(|values| {
            let (lo, hi) = range(values, calibration.method);
            ActQuant::from_range(lo, hi)
        })
        .collect();
    for_each_site(plan, |site, q| {
        q.act = Some(
            ranges
                .get(site)
                .copied()
                .unwrap_or(ActQuant::from_range(0.0, 0.0)),
        );
    });
    Ok(())
}

/// The range `method` keeps of `values` (reordered in place).
fn range(values: &mut [f32], method: CalibrationMethod) -> (f32, f32) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    match method {
        CalibrationMethod::MinMax => values
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v))),
        CalibrationMethod::Percentile(p) => {
            let last = (values.len() - 1) as f64;
            let rank = |q: f64| ((q / 100.0 * last).round() as usize).min(values.len() - 1);
            let (hi_rank, lo_rank) = (rank(p), rank(100.0 - p));
            let hi = *values.select_nth_unstable_by(hi_rank, f32::total_cmp).1;
            let lo = *values.select_nth_unstable_by(lo_rank, f32::total_cmp).1;
            (lo, hi)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_cut_the_tails_and_minmax_keeps_them() {
        let mut v: Vec<f32> = (0..=1000).map(|i| i as f32 - 500.0).collect();
        assert_eq!(range(&mut v, CalibrationMethod::MinMax), (-500.0, 500.0));
        assert_eq!(
            range(&mut v, CalibrationMethod::Percentile(99.0)),
            (-490.0, 490.0)
        );
        assert_eq!(
            range(&mut v, CalibrationMethod::Percentile(100.0)),
            (-500.0, 500.0)
        );
    }
}
