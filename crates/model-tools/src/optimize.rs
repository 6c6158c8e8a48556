//! `tickserve model optimize`: which variant of a model to serve.
//!
//! A *variant* is a precision of the native engine, optionally applied to
//! a pruned copy of the model (`int8`, `int8-static`, `pruned`,
//! `pruned+bf16`). Static int8 calibrates on a [`CalibrationSource`] (a
//! file of model inputs given by the user or configured for the model),
//! never on the validation set unless the user names it. For each
//! requested variant this module builds the engine, runs the whole
//! validation set through it, compares the outputs with the fp32 engine on
//! the unchanged model (and with reference outputs when given), and
//! measures its throughput at each batch size. The measurements run in
//! interleaved rounds (every variant and batch size gets a slice of each
//! round), so a change of machine load affects all variants alike and the
//! ratios between them stay meaningful on a busy machine.
//!
//! Adding a precision is one entry in [`PRECISIONS`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use tickserve_engine::{Batch, Engine};
use tickserve_engine_native::{Calibration, NativeEngine, Precision};
use tickserve_repository::{ActivationsChoice, CalibrationMethodChoice, PrecisionChoice};

use crate::ToolError;
use crate::npy::Dataset;
use crate::prune::PruneOptions;

/// Calibration inputs for static int8: the file, read once, and how its
/// values become ranges (the settings a written version.toml records).
#[derive(Debug, Clone)]
pub struct CalibrationSource {
    pub method: CalibrationMethodChoice,
    /// For `method = percentile`.
    pub percentile: f64,
    /// The file's values, with the engine's calibration method set.
    pub data: Calibration,
}

impl CalibrationSource {
    /// Reads `path` (float32 `.npy`, `[samples, time, features]`).
    pub fn read(
        path: PathBuf,
        method: CalibrationMethodChoice,
        percentile: f64,
    ) -> Result<CalibrationSource, ToolError> {
        let settings = tickserve_repository::QuantizationConfig {
            activations: ActivationsChoice::Static,
            calibration: Some(path.clone()),
            method,
            percentile,
        };
        Ok(CalibrationSource {
            method,
            percentile,
            data: Calibration::read_npy(&path, settings.method())?,
        })
    }

    /// `<file> (<samples> samples, <method>)`, for the report.
    pub fn record(&self) -> String {
        let method = match self.method {
            CalibrationMethodChoice::Minmax => "minmax".to_string(),
            CalibrationMethodChoice::Percentile => format!("percentile {}", self.percentile),
        };
        format!(
            "{} ({} samples, {method})",
            self.data.path.display(),
            self.data.shape.first().copied().unwrap_or(0)
        )
    }
}

/// What a precision may need besides the engine: the validation set and,
/// for static int8, the calibration inputs (`None` when none were given
/// or configured).
#[derive(Debug, Clone, Copy)]
pub struct VariantContext<'a> {
    pub inputs: &'a Dataset,
    pub calibration: Option<&'a CalibrationSource>,
}

/// The refusal of a static variant without calibration inputs.
pub const NO_CALIBRATION: &str = "static int8 needs calibration inputs (model inputs [samples, time, features], not the validation set): give --calibration <NPY>, or set [quantization] calibration in the model's config.toml";

/// One precision `optimize` can try: its name in `--variants`, the values a
/// written version's `version.toml` gets, and how to set it on an engine.
#[derive(Debug)]
pub struct PrecisionVariant {
    pub name: &'static str,
    pub choice: PrecisionChoice,
    /// `Static` when the variant calibrates (its version.toml then gets a
    /// `[quantization]` table and the calibration file).
    pub activations: ActivationsChoice,
    pub apply: fn(NativeEngine, &VariantContext<'_>) -> Result<NativeEngine, ToolError>,
}

/// Every precision `--variants` accepts, in table order.
pub const PRECISIONS: &[PrecisionVariant] = &[
    PrecisionVariant {
        name: "fp32",
        choice: PrecisionChoice::Fp32,
        activations: ActivationsChoice::Dynamic,
        apply: |engine, _| Ok(engine.with_precision(Precision::Fp32)),
    },
    PrecisionVariant {
        name: "bf16",
        choice: PrecisionChoice::Bf16,
        activations: ActivationsChoice::Dynamic,
        apply: |engine, _| Ok(engine.with_precision(Precision::Bf16)),
    },
    PrecisionVariant {
        name: "int8",
        choice: PrecisionChoice::Int8,
        activations: ActivationsChoice::Dynamic,
        apply: |engine, _| Ok(engine.with_precision(Precision::Int8)),
    },
    PrecisionVariant {
        name: "int8-static",
        choice: PrecisionChoice::Int8,
        activations: ActivationsChoice::Static,
        apply: |engine, context| {
            let calibration = context
                .calibration
                .ok_or_else(|| ToolError::InvalidArgument(NO_CALIBRATION.into()))?;
            Ok(engine.with_static_int8(&calibration.data)?)
        },
    },
];

/// The prefix that prunes the model before the precision applies.
pub const PRUNED: &str = "pruned";

/// A parsed `--variants` entry.
#[derive(Debug, Clone, Copy)]
pub struct VariantSpec {
    pub pruned: bool,
    pub precision: &'static PrecisionVariant,
}

impl VariantSpec {
    /// Parses `fp32`, `int8`, `pruned` (= `pruned+fp32`), `pruned+bf16`, ….
    pub fn parse(text: &str) -> Result<VariantSpec, ToolError> {
        let mut pruned = false;
        let mut precision = None;
        for part in text.trim().split('+') {
            match part.trim() {
                PRUNED if !pruned => pruned = true,
                name => match PRECISIONS.iter().find(|p| p.name == name) {
                    Some(p) if precision.is_none() => precision = Some(p),
                    _ => {
                        let names: Vec<&str> = PRECISIONS.iter().map(|p| p.name).collect();
                        return Err(ToolError::InvalidArgument(format!(
                            "unknown variant '{text}': expected a precision ({}), '{PRUNED}', or '{PRUNED}+<precision>'",
                            names.join(", ")
                        )));
                    }
                },
            }
        }
        Ok(VariantSpec {
            pruned,
            precision: precision.unwrap_or(&PRECISIONS[0]),
        })
    }

    /// The canonical name: `int8`, `pruned`, `pruned+int8`.
    pub fn name(&self) -> String {
        match (self.pruned, self.precision.choice) {
            (true, PrecisionChoice::Fp32) => PRUNED.to_string(),
            (true, _) => format!("{PRUNED}+{}", self.precision.name),
            (false, _) => self.precision.name.to_string(),
        }
    }
}

/// How the outputs are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Classification when the model has more than one output column,
    /// regression when it has one.
    Auto,
    /// Outputs are class scores: argmax agreement is reported.
    Classification,
    /// Outputs are values: argmax is not reported.
    Regression,
}

/// Agreement of a variant's outputs with other outputs of the same rows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Accuracy {
    pub max_abs_error: f64,
    pub mean_abs_error: f64,
    /// Fraction of rows whose argmax is the same (classification only).
    pub argmax_agreement: Option<f64>,
    /// Pearson correlation per output column (`None` where a column is
    /// constant).
    pub pearson: Vec<Option<f64>>,
}

/// Samples per second at one batch size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Throughput {
    pub batch: usize,
    pub samples_per_second: f64,
    /// Engine calls timed.
    pub calls: u64,
}

/// Everything measured for one variant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantResult {
    pub name: String,
    /// The engine's variant string, as the server reports it.
    pub engine_variant: String,
    pub model_bytes: usize,
    pub mflop_per_row: f64,
    pub throughput: Vec<Throughput>,
    pub vs_fp32: Accuracy,
    pub vs_reference: Option<Accuracy>,
}

/// The whole comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OptimizeReport {
    pub model: String,
    pub version: u64,
    pub inputs: String,
    pub reference: Option<String>,
    pub rows: usize,
    pub task: Task,
    pub threads: usize,
    pub seconds_per_measurement: f64,
    pub pruning: Option<String>,
    /// What the static variants calibrated on (when any ran).
    pub calibration: Option<String>,
    pub variants: Vec<VariantResult>,
}

/// What to compare.
#[derive(Debug)]
pub struct OptimizePlan<'a> {
    pub model: String,
    pub version: u64,
    /// The source version's ONNX file.
    pub model_bytes: &'a [u8],
    pub inputs: &'a Dataset,
    pub reference: Option<&'a Dataset>,
    pub variants: &'a [VariantSpec],
    /// Calibration inputs of the static variants.
    pub calibration: Option<&'a CalibrationSource>,
    pub prune: PruneOptions,
    pub task: Task,
    pub threads: usize,
    pub batch_sizes: &'a [usize],
    /// Time for each variant at each batch size.
    pub seconds: f64,
}

/// A variant ready to run: its engine and the file it was loaded from.
#[derive(Debug)]
pub struct Candidate {
    pub spec: VariantSpec,
    pub engine: NativeEngine,
    pub model: Vec<u8>,
}

/// Builds the engine of `spec` from the source file (pruned first when
/// the variant asks for it).
pub fn build(
    spec: VariantSpec,
    source: &[u8],
    prune: &PruneOptions,
    threads: usize,
    context: &VariantContext<'_>,
) -> Result<Candidate, ToolError> {
    let model = if spec.pruned {
        crate::prune::prune_bytes(source, prune)?.0
    } else {
        source.to_vec()
    };
    let engine = NativeEngine::from_bytes(&model)?.with_threads(threads, 1)?;
    let engine = (spec.precision.apply)(engine, context)?;
    Ok(Candidate {
        spec,
        engine,
        model,
    })
}

/// Runs every row of `inputs` through `engine`, 32 rows per call.
pub fn outputs(engine: &dyn Engine, inputs: &Dataset) -> Result<Vec<f32>, ToolError> {
    let row_len = inputs.row_len();
    let mut out = Vec::new();
    for chunk in inputs.values.chunks(32 * row_len) {
        let batch = Batch {
            rows: chunk.len() / row_len,
            inputs: vec![chunk.to_vec()],
        };
        out.extend(engine.infer(&batch)?.outputs.swap_remove(0));
    }
    Ok(out)
}

/// Compares `got` with `want`, both `rows × width`.
pub fn accuracy(got: &[f32], want: &[f32], width: usize, classification: bool) -> Accuracy {
    let rows = got.len() / width.max(1);
    let mut max_abs = 0.0f64;
    let mut sum_abs = 0.0f64;
    for (a, b) in got.iter().zip(want) {
        let d = (f64::from(*a) - f64::from(*b)).abs();
        max_abs = max_abs.max(d);
        sum_abs += d;
    }
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .map(|(i, _)| i)
    };
    let argmax_agreement = (classification && width > 1 && rows > 0).then(|| {
        let same = (0..rows)
            .filter(|&r| {
                argmax(&got[r * width..(r + 1) * width])
                    == argmax(&want[r * width..(r + 1) * width])
            })
            .count();
        same as f64 / rows as f64
    });
    let pearson = (0..width)
        .map(|c| {
            let x: Vec<f64> = (0..rows).map(|r| f64::from(got[r * width + c])).collect();
            let y: Vec<f64> = (0..rows).map(|r| f64::from(want[r * width + c])).collect();
            pearson(&x, &y)
        })
        .collect();
    Accuracy {
        max_abs_error: max_abs,
        mean_abs_error: if got.is_empty() {
            0.0
        } else {
            sum_abs / got.len() as f64
        },
        argmax_agreement,
        pearson,
    }
}

/// Pearson's r; `None` when either series is constant or empty.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len() as f64;
    if x.is_empty() {
        return None;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// A batch of `rows` rows taken from the validation set, cyclically.
fn batch_of(inputs: &Dataset, rows: usize) -> Batch {
    let row_len = inputs.row_len();
    let mut data = Vec::with_capacity(rows * row_len);
    for r in 0..rows {
        let r = r % inputs.rows();
        data.extend_from_slice(&inputs.values[r * row_len..(r + 1) * row_len]);
    }
    Batch {
        rows,
        inputs: vec![data],
    }
}

/// Rounds each measurement is split into.
const ROUNDS: u32 = 5;

/// Throughput of every candidate at every batch size: `seconds` each, in
/// [`ROUNDS`] interleaved slices after one warm-up call.
fn measure(
    candidates: &[Candidate],
    inputs: &Dataset,
    batch_sizes: &[usize],
    seconds: f64,
) -> Result<Vec<Vec<Throughput>>, ToolError> {
    let batches: Vec<Batch> = batch_sizes.iter().map(|&b| batch_of(inputs, b)).collect();
    let slice = Duration::from_secs_f64(seconds / f64::from(ROUNDS));
    let mut totals = vec![vec![(Duration::ZERO, 0u64); batches.len()]; candidates.len()];
    for candidate in candidates {
        for batch in &batches {
            candidate.engine.infer(batch)?;
        }
    }
    for _ in 0..ROUNDS {
        for (candidate, total) in candidates.iter().zip(&mut totals) {
            for (batch, (time, calls)) in batches.iter().zip(total.iter_mut()) {
                let start = Instant::now();
                loop {
                    std::hint::black_box(candidate.engine.infer(batch)?);
                    *calls += 1;
                    if start.elapsed() >= slice {
                        break;
                    }
                }
                *time += start.elapsed();
            }
        }
    }
    Ok(totals
        .into_iter()
        .map(|per_batch| {
            per_batch
                .into_iter()
                .zip(batch_sizes)
                .map(|((time, calls), &batch)| Throughput {
                    batch,
                    samples_per_second: (calls * batch as u64) as f64 / time.as_secs_f64(),
                    calls,
                })
                .collect()
        })
        .collect())
}

/// Builds, checks and measures every variant of `plan`.
pub fn run(plan: &OptimizePlan<'_>) -> Result<(OptimizeReport, Vec<Candidate>), ToolError> {
    if plan.inputs.rows() == 0 {
        return Err(ToolError::InvalidArgument(
            "the validation set is empty".into(),
        ));
    }
    if plan.batch_sizes.is_empty() || plan.batch_sizes.contains(&0) {
        return Err(ToolError::InvalidArgument(
            "--batch-sizes must list positive sizes".into(),
        ));
    }
    let baseline = NativeEngine::from_bytes(plan.model_bytes)?.with_threads(plan.threads, 1)?;
    let signature = baseline.signature().clone();
    if plan.inputs.row_dims() != signature.inputs[0].dims.as_slice() {
        return Err(ToolError::InvalidArgument(format!(
            "{} has samples of shape {:?}; the model takes {:?}",
            plan.inputs.path.display(),
            plan.inputs.row_dims(),
            signature.inputs[0].dims
        )));
    }
    let width = signature.outputs[0].row_len();
    if let Some(reference) = plan.reference
        && (reference.rows() != plan.inputs.rows() || reference.row_len() != width)
    {
        return Err(ToolError::InvalidArgument(format!(
            "{} has shape {:?}; expected {} rows of {width} outputs, one per input",
            reference.path.display(),
            reference.shape,
            plan.inputs.rows()
        )));
    }
    let classification = match plan.task {
        Task::Auto => width > 1,
        Task::Classification => true,
        Task::Regression => false,
    };
    let fp32 = outputs(&baseline, plan.inputs)?;
    let context = VariantContext {
        inputs: plan.inputs,
        calibration: plan.calibration,
    };
    let mut candidates = Vec::with_capacity(plan.variants.len());
    for &spec in plan.variants {
        candidates.push(build(
            spec,
            plan.model_bytes,
            &plan.prune,
            plan.threads,
            &context,
        )?);
    }
    let calibrates = plan
        .variants
        .iter()
        .any(|v| v.precision.activations == ActivationsChoice::Static);
    let throughput = measure(&candidates, plan.inputs, plan.batch_sizes, plan.seconds)?;
    let mut variants = Vec::with_capacity(candidates.len());
    for (candidate, throughput) in candidates.iter().zip(throughput) {
        let out = outputs(&candidate.engine, plan.inputs)?;
        variants.push(VariantResult {
            name: candidate.spec.name(),
            engine_variant: candidate.engine.variant(),
            model_bytes: candidate.model.len(),
            mflop_per_row: candidate.engine.architecture().flops_per_row as f64 / 1e6,
            throughput,
            vs_fp32: accuracy(&out, &fp32, width, classification),
            vs_reference: plan
                .reference
                .map(|r| accuracy(&out, &r.values, width, classification)),
        });
    }
    let report = OptimizeReport {
        model: plan.model.clone(),
        version: plan.version,
        inputs: plan.inputs.path.display().to_string(),
        reference: plan.reference.map(|r| r.path.display().to_string()),
        rows: plan.inputs.rows(),
        task: if classification {
            Task::Classification
        } else {
            Task::Regression
        },
        threads: plan.threads,
        seconds_per_measurement: plan.seconds,
        pruning: plan
            .variants
            .iter()
            .any(|v| v.pruned)
            .then(|| plan.prune.record()),
        calibration: plan
            .calibration
            .filter(|_| calibrates)
            .map(CalibrationSource::record),
        variants,
    };
    Ok((report, candidates))
}

fn fmt_opt(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "–".to_string(), |v| format!("{v:.digits$}"))
}

fn pearson_cell(pearson: &[Option<f64>]) -> String {
    if pearson.len() <= 4 {
        pearson
            .iter()
            .map(|r| fmt_opt(*r, 5))
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        let min = pearson.iter().flatten().copied().reduce(f64::min);
        format!("min {}", fmt_opt(min, 5))
    }
}

/// The report as text tables: speed and error against fp32, then error
/// against the reference outputs when given.
pub fn render(report: &OptimizeReport) -> String {
    let mut out = format!(
        "model {} version {}: {} validation rows from {}\nnative engine, {} thread(s), {:.2} s per variant and batch size (interleaved), task: {}\n",
        report.model,
        report.version,
        report.rows,
        report.inputs,
        report.threads,
        report.seconds_per_measurement,
        match report.task {
            Task::Classification => "classification",
            _ => "regression",
        }
    );
    if let Some(record) = &report.pruning {
        out.push_str(&format!("pruned = {record}\n"));
    }
    if let Some(record) = &report.calibration {
        out.push_str(&format!("int8-static calibrated on {record}\n"));
    }
    let mut header = vec![
        "variant".to_string(),
        "engine variant".to_string(),
        "MFLOP/row".to_string(),
    ];
    let batches: Vec<usize> = report
        .variants
        .first()
        .map(|v| v.throughput.iter().map(|t| t.batch).collect())
        .unwrap_or_default();
    for b in &batches {
        header.push(format!("samples/s b={b}"));
    }
    header.extend(
        [
            "max abs vs fp32",
            "mean abs vs fp32",
            "argmax vs fp32",
            "pearson vs fp32",
        ]
        .map(String::from),
    );
    let mut rows = vec![header];
    for v in &report.variants {
        let mut row = vec![
            v.name.clone(),
            v.engine_variant.clone(),
            format!("{:.2}", v.mflop_per_row),
        ];
        row.extend(
            v.throughput
                .iter()
                .map(|t| format!("{:.0}", t.samples_per_second)),
        );
        row.push(format!("{:.2e}", v.vs_fp32.max_abs_error));
        row.push(format!("{:.2e}", v.vs_fp32.mean_abs_error));
        row.push(
            v.vs_fp32
                .argmax_agreement
                .map_or_else(|| "–".into(), |a| format!("{:.1} %", 100.0 * a)),
        );
        row.push(pearson_cell(&v.vs_fp32.pearson));
        rows.push(row);
    }
    out.push_str(&table_text(&rows));
    if let Some(reference) = &report.reference {
        out.push_str(&format!("\nagainst the reference outputs {reference}:\n"));
        let mut rows = vec![
            [
                "variant",
                "max abs vs ref",
                "mean abs vs ref",
                "argmax vs ref",
                "pearson vs ref",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for v in &report.variants {
            if let Some(acc) = &v.vs_reference {
                rows.push(vec![
                    v.name.clone(),
                    format!("{:.2e}", acc.max_abs_error),
                    format!("{:.2e}", acc.mean_abs_error),
                    acc.argmax_agreement
                        .map_or_else(|| "–".into(), |a| format!("{:.1} %", 100.0 * a)),
                    pearson_cell(&acc.pearson),
                ]);
            }
        }
        out.push_str(&table_text(&rows));
    }
    out
}

/// Left-aligned columns separated by two spaces, a rule under the header.
pub fn table_text(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |row: &Vec<String>| {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(s, &w)| format!("{s}{}", " ".repeat(w - s.chars().count())))
            .collect();
        format!("{}\n", cells.join("  ").trim_end())
    };
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        out.push_str(&line(row));
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
            out.push_str(&format!("{}\n", rule.join("  ")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_parse_with_and_without_pruning() {
        for (text, name, pruned) in [
            ("fp32", "fp32", false),
            ("int8", "int8", false),
            ("int8-static", "int8-static", false),
            ("pruned+int8-static", "pruned+int8-static", true),
            ("pruned", "pruned", true),
            ("pruned+bf16", "pruned+bf16", true),
            ("int8+pruned", "pruned+int8", true),
            ("pruned+fp32", "pruned", true),
        ] {
            let spec = VariantSpec::parse(text).unwrap();
            assert_eq!(spec.name(), name, "{text}");
            assert_eq!(spec.pruned, pruned, "{text}");
        }
        for bad in ["fp16", "int8+bf16", "pruned+pruned", ""] {
            let err = VariantSpec::parse(bad).unwrap_err().to_string();
            assert!(err.contains("unknown variant"), "{bad}: {err}");
        }
    }

    #[test]
    fn accuracy_counts_errors_argmax_and_correlation() {
        let want = [1.0, 0.0, 0.0, 2.0, 3.0, 1.0];
        let got = [1.5, 0.0, 2.0, 1.0, 3.0, 1.0];
        let acc = accuracy(&got, &want, 2, true);
        assert_eq!(acc.max_abs_error, 2.0);
        assert!((acc.mean_abs_error - 3.5 / 6.0).abs() < 1e-12);
        // Row 1 flips from column 1 to column 0.
        assert_eq!(acc.argmax_agreement, Some(2.0 / 3.0));
        assert_eq!(acc.pearson.len(), 2);
        let same = accuracy(&want, &want, 2, false);
        assert_eq!(same.argmax_agreement, None);
        for r in same.pearson {
            assert!((r.unwrap() - 1.0).abs() < 1e-12);
        }
        assert_eq!(pearson(&[1.0, 1.0], &[0.0, 2.0]), None);
        let r = pearson(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]).unwrap();
        assert!((r + 1.0).abs() < 1e-12);
    }
}
