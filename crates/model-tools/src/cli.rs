//! `tickserve model …`: the clap arguments of the model tools and what each
//! subcommand prints.
//!
//! Every option has a flag and a `TICKSERVE_*` environment variable. Paths
//! are relative to the current directory, like `tickserve serve`'s
//! `--model-repository`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde::Serialize;
use tickserve_repository::{
    ActivationsChoice, CalibrationMethodChoice, EngineChoice, ModelEntry, PrecisionChoice,
    QuantizationConfig, VersionConfig,
};

use crate::ToolError;
use crate::npy;
use crate::optimize::{self, CalibrationSource, OptimizePlan, Task, VariantSpec};
use crate::prune::{self, PruneOptions, PruneReport};
use crate::versions::{self, ExtraFile};

/// The validation set `optimize` uses when given no `--inputs`: the golden
/// fixture of the bundled model (`input.npy`, with `output.npy` as the
/// reference outputs).
pub const DEFAULT_VALIDATION_DIR: &str = "fixtures/golden/cnn_lstm";

#[derive(Debug, Args)]
pub struct ModelArgs {
    #[command(subcommand)]
    pub command: ModelCommand,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Prune a model version into a new version: L1 magnitude pruning of
    /// Conv1d and Linear weights, and optionally L2 pruning of Conv1d
    /// output channels (the model gets narrower and faster). The source
    /// version is not touched. Fine-tune the result yourself if the
    /// accuracy loss is too large (docs/optimization.md).
    Prune(PruneArgs),
    /// Compare variants of a model version (precisions of the native
    /// engine, pruning) on a validation set: samples/s at batch 1 and 32,
    /// error against fp32 and against reference outputs, argmax agreement,
    /// correlation. Optionally write the chosen variant as a new version.
    Optimize(OptimizeArgs),
}

/// Which model version to start from.
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// The model: its folder name in the repository.
    #[arg(env = "TICKSERVE_MODEL")]
    pub model: String,

    /// Model repository: <dir>/<model>/config.toml and
    /// <dir>/<model>/<version>/model.onnx.
    #[arg(
        long,
        env = "TICKSERVE_MODEL_REPOSITORY",
        value_name = "DIR",
        default_value = "models"
    )]
    pub model_repository: PathBuf,

    /// Version to start from. [default: the model's highest version]
    #[arg(long, env = "TICKSERVE_MODEL_VERSION", value_name = "N")]
    pub model_version: Option<u64>,
}

/// How much to prune.
#[derive(Debug, Args)]
pub struct PruneOptionArgs {
    /// Fraction of each Conv1d and Linear (Gemm) weight tensor set to zero,
    /// smallest magnitudes first (L1 unstructured pruning), 0 to <1.
    #[arg(
        long,
        env = "TICKSERVE_PRUNE_SPARSITY",
        value_name = "FRACTION",
        default_value_t = 0.3
    )]
    pub sparsity: f64,

    /// Fraction of each Conv1d's output channels removed, smallest filter
    /// L2 norm first, with the matching inputs of the next layer
    /// (structured pruning), 0 to <1.
    #[arg(
        long,
        env = "TICKSERVE_PRUNE_CHANNELS",
        value_name = "FRACTION",
        default_value_t = 0.0
    )]
    pub channels: f64,
}

impl PruneOptionArgs {
    fn options(&self) -> PruneOptions {
        PruneOptions {
            sparsity: self.sparsity,
            channels: self.channels,
        }
    }
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub prune: PruneOptionArgs,

    /// Version number to write. [default: one above the highest version]
    #[arg(long, env = "TICKSERVE_OUTPUT_VERSION", value_name = "N")]
    pub output_version: Option<u64>,

    /// Print the result as JSON instead of a table.
    #[arg(long, env = "TICKSERVE_JSON")]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct OptimizeArgs {
    #[command(flatten)]
    pub source: SourceArgs,

    /// Validation inputs: float32 .npy of shape [samples, <model input
    /// dims>]. [default: fixtures/golden/cnn_lstm/input.npy, with
    /// output.npy beside it as --reference]
    #[arg(long, env = "TICKSERVE_OPTIMIZE_INPUTS", value_name = "NPY")]
    pub inputs: Option<PathBuf>,

    /// Reference outputs for --inputs (e.g. the training framework's):
    /// float32 .npy of shape [samples, <model output dims>].
    #[arg(long, env = "TICKSERVE_OPTIMIZE_REFERENCE", value_name = "NPY")]
    pub reference: Option<PathBuf>,

    /// Variants to compare, comma-separated: a precision (fp32, bf16,
    /// int8, int8-static), "pruned" (fp32 after pruning with
    /// --sparsity/--channels), or "pruned+<precision>". int8-static
    /// calibrates on --calibration.
    #[arg(
        long,
        env = "TICKSERVE_OPTIMIZE_VARIANTS",
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "fp32,bf16,int8,pruned"
    )]
    pub variants: Vec<String>,

    /// Pruning of the "pruned" variants.
    #[command(flatten)]
    pub prune: PruneOptionArgs,

    /// Calibration inputs of the int8-static variants: float32 .npy of
    /// model inputs [samples, time, features], not the validation set.
    /// --write int8-static copies it into the new version. [default: the
    /// model's [quantization] calibration file, when it exists]
    #[arg(long, env = "TICKSERVE_OPTIMIZE_CALIBRATION", value_name = "NPY")]
    pub calibration: Option<PathBuf>,

    /// How int8-static turns the calibration values into ranges: minmax
    /// (observed range) or percentile (--percentile at the top, 100 − it
    /// at the bottom). [default: the model's [quantization] method]
    #[arg(
        long,
        env = "TICKSERVE_OPTIMIZE_CALIBRATION_METHOD",
        value_enum,
        value_name = "METHOD"
    )]
    pub calibration_method: Option<CalibrationMethodArg>,

    /// Percentile of --calibration-method percentile, in [50, 100].
    /// [default: the model's [quantization] percentile]
    #[arg(long, env = "TICKSERVE_OPTIMIZE_PERCENTILE", value_name = "P")]
    pub percentile: Option<f64>,

    /// How to read the outputs: classification reports argmax agreement,
    /// regression does not; both report Pearson correlation per output.
    /// auto: classification when the model has more than one output
    /// column.
    #[arg(
        long,
        env = "TICKSERVE_OPTIMIZE_TASK",
        value_enum,
        default_value = "auto"
    )]
    pub task: Task,

    /// Batch sizes to measure samples/s at, comma-separated.
    #[arg(
        long,
        env = "TICKSERVE_OPTIMIZE_BATCH_SIZES",
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "1,32"
    )]
    pub batch_sizes: Vec<usize>,

    /// Seconds of measurement per variant and batch size (split into
    /// interleaved rounds).
    #[arg(
        long,
        env = "TICKSERVE_OPTIMIZE_SECONDS",
        value_name = "SECONDS",
        default_value_t = 1.0
    )]
    pub seconds: f64,

    /// Engine threads per batch. [default: the model's config.toml `threads`]
    #[arg(long, env = "TICKSERVE_OPTIMIZE_THREADS", value_name = "N")]
    pub threads: Option<usize>,

    /// Write this variant as a new version of the model (its model.onnx
    /// and a version.toml with its precision; for int8-static also its
    /// [quantization] table and the calibration file, copied into the
    /// version as calibration.npy). Needs --max-abs-error.
    #[arg(
        long,
        env = "TICKSERVE_OPTIMIZE_WRITE",
        value_name = "VARIANT",
        requires = "max_abs_error"
    )]
    pub write: Option<String>,

    /// Refuse --write (exit status 1) when the variant's max abs error
    /// against fp32 on the validation set exceeds this.
    #[arg(long, env = "TICKSERVE_OPTIMIZE_MAX_ABS_ERROR", value_name = "ERROR")]
    pub max_abs_error: Option<f64>,

    /// Version number --write writes. [default: one above the highest version]
    #[arg(long, env = "TICKSERVE_OUTPUT_VERSION", value_name = "N")]
    pub output_version: Option<u64>,

    /// Print the result as JSON instead of tables.
    #[arg(long, env = "TICKSERVE_JSON")]
    pub json: bool,
}

/// `--calibration-method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CalibrationMethodArg {
    /// The smallest and largest value seen.
    Minmax,
    /// --percentile at the top, 100 − it at the bottom.
    Percentile,
}

/// The name of the calibration file inside a version written with a
/// static variant (its version.toml's `calibration`).
pub const VERSION_CALIBRATION_FILE: &str = "calibration.npy";

/// The calibration inputs of `optimize`: `--calibration`, else the
/// source version's configured `[quantization] calibration` file when it
/// exists (`Err` says why there is none); method and percentile from the
/// flags, else from the same configuration.
fn calibration_source(
    args: &OptimizeArgs,
    entry: &ModelEntry,
    source: u64,
) -> Result<Result<CalibrationSource, String>, ToolError> {
    let (configured, base) = entry.quantization_of(source);
    let path = match (&args.calibration, &configured.calibration) {
        (Some(path), _) => path.clone(),
        (None, Some(file)) if base.join(file).is_file() => base.join(file),
        (None, Some(file)) => {
            return Ok(Err(format!(
                "{}; the configured calibration file {} does not exist",
                optimize::NO_CALIBRATION,
                base.join(file).display()
            )));
        }
        (None, None) => return Ok(Err(optimize::NO_CALIBRATION.to_string())),
    };
    let method = match args.calibration_method {
        Some(CalibrationMethodArg::Minmax) => CalibrationMethodChoice::Minmax,
        Some(CalibrationMethodArg::Percentile) => CalibrationMethodChoice::Percentile,
        None => configured.method,
    };
    let percentile = args.percentile.unwrap_or(configured.percentile);
    if !(50.0..=100.0).contains(&percentile) {
        return Err(ToolError::InvalidArgument(format!(
            "--percentile is {percentile}; expected a value in [50, 100]"
        )));
    }
    Ok(Ok(CalibrationSource::read(path, method, percentile)?))
}

/// Runs a `tickserve model` subcommand, printing its result to stdout.
pub fn run(args: ModelArgs) -> Result<(), ToolError> {
    match args.command {
        ModelCommand::Prune(args) => run_prune(&args),
        ModelCommand::Optimize(args) => run_optimize(&args),
    }
}

/// A version a tool wrote.
#[derive(Debug, Serialize)]
pub struct WrittenVersion {
    pub model: String,
    pub version: u64,
    pub path: String,
    /// The variant the repository loaded it as.
    pub engine_variant: String,
}

#[derive(Debug, Serialize)]
struct PruneOutput<'a> {
    source_version: u64,
    #[serde(flatten)]
    report: &'a PruneReport,
    bytes_before: usize,
    bytes_after: usize,
    mflop_per_row_before: f64,
    mflop_per_row_after: f64,
    written: WrittenVersion,
}

fn mflop(bytes: &[u8]) -> Result<f64, ToolError> {
    let engine = tickserve_engine_native::NativeEngine::from_bytes(bytes)?;
    Ok(engine.architecture().flops_per_row as f64 / 1e6)
}

fn run_prune(args: &PruneArgs) -> Result<(), ToolError> {
    let root = &args.source.model_repository;
    let entry = versions::find_model(root, &args.source.model)?;
    let source = versions::source_version(&entry, args.source.model_version)?;
    let before = versions::model_bytes(&entry, source)?;
    let (after, report) = prune::prune_bytes(&before, &args.prune.options())?;
    // The new version runs like its source: same per-version settings,
    // and the calibration file its version.toml names (relative to the
    // version folder).
    let config = entry.version_configs.get(&source);
    let files: Vec<ExtraFile> = config
        .and_then(|c| c.quantization.as_ref())
        .and_then(|q| q.calibration.as_ref())
        .map(|file| ExtraFile {
            source: entry.dir.join(source.to_string()).join(file),
            name: file.display().to_string(),
        })
        .into_iter()
        .collect();
    let comment = [format!(
        "written by tickserve model prune from version {source} ({})",
        report.record
    )];
    let written = versions::write_version(
        root,
        &entry.name,
        args.output_version,
        &after,
        config,
        &files,
        &comment,
    )?;
    let output = PruneOutput {
        source_version: source,
        report: &report,
        bytes_before: before.len(),
        bytes_after: after.len(),
        mflop_per_row_before: mflop(&before)?,
        mflop_per_row_after: mflop(&after)?,
        written: WrittenVersion {
            model: entry.name.clone(),
            version: written.version,
            path: written.dir.display().to_string(),
            engine_variant: written.loaded.engine.variant(),
        },
    };
    if args.json {
        println!("{}", to_json(&output)?);
        return Ok(());
    }
    println!(
        "pruned {} version {source} into version {} ({}): {}",
        entry.name, output.written.version, output.written.path, report.record
    );
    let mut rows = vec![
        [
            "layer",
            "weights",
            "shape before",
            "shape after",
            "channels removed",
            "zeros",
            "sparsity",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for layer in &report.layers {
        rows.push(vec![
            layer.node.clone(),
            layer.weight.clone(),
            format!("{:?}", layer.dims_before),
            format!("{:?}", layer.dims_after),
            layer.channels_removed.to_string(),
            format!("{}/{}", layer.zeros, layer.weights),
            format!("{:.1} %", 100.0 * layer.sparsity()),
        ]);
    }
    print!("{}", crate::optimize::table_text(&rows));
    println!(
        "model file {} -> {} bytes; {:.2} -> {:.2} MFLOP per sample; loads as {}",
        output.bytes_before,
        output.bytes_after,
        output.mflop_per_row_before,
        output.mflop_per_row_after,
        output.written.engine_variant
    );
    Ok(())
}

#[derive(Debug, Serialize)]
struct OptimizeOutput<'a> {
    #[serde(flatten)]
    report: &'a optimize::OptimizeReport,
    written: Option<WrittenVersion>,
}

fn run_optimize(args: &OptimizeArgs) -> Result<(), ToolError> {
    let root = &args.source.model_repository;
    let entry = versions::find_model(root, &args.source.model)?;
    if entry.config.engine == EngineChoice::Onnxruntime {
        return Err(ToolError::InvalidArgument(format!(
            "model '{}' is configured with engine = \"onnxruntime\"; optimize compares variants of the native engine",
            entry.name
        )));
    }
    let source = versions::source_version(&entry, args.source.model_version)?;
    let model_bytes = versions::model_bytes(&entry, source)?;
    let (inputs_path, reference_path) = match &args.inputs {
        Some(inputs) => (inputs.clone(), args.reference.clone()),
        None => {
            let dir = PathBuf::from(DEFAULT_VALIDATION_DIR);
            (
                dir.join("input.npy"),
                Some(
                    args.reference
                        .clone()
                        .unwrap_or_else(|| dir.join("output.npy")),
                ),
            )
        }
    };
    let inputs = npy::read(&inputs_path)?;
    let reference = reference_path.as_deref().map(npy::read).transpose()?;
    let mut specs = args
        .variants
        .iter()
        .map(|v| VariantSpec::parse(v))
        .collect::<Result<Vec<_>, _>>()?;
    let chosen = args.write.as_deref().map(VariantSpec::parse).transpose()?;
    if let Some(chosen) = chosen
        && !specs.iter().any(|s| s.name() == chosen.name())
    {
        specs.push(chosen);
    }
    let mut seen = std::collections::HashSet::new();
    specs.retain(|s| seen.insert(s.name()));
    // Read only when a static variant runs; refused before any measurement
    // when one runs without calibration inputs.
    let calibration = if specs
        .iter()
        .any(|s| s.precision.activations == ActivationsChoice::Static)
    {
        Some(calibration_source(args, &entry, source)?.map_err(ToolError::InvalidArgument)?)
    } else {
        None
    };
    let calibrates_on_validation = calibration.as_ref().is_some_and(|c| {
        let same = |a: &std::path::Path, b: &std::path::Path| {
            std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok()
        };
        same(&c.data.path, &inputs_path)
    });
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        return Err(ToolError::InvalidArgument(format!(
            "--seconds is {}; expected a positive number",
            args.seconds
        )));
    }
    let plan = OptimizePlan {
        model: entry.name.clone(),
        version: source,
        model_bytes: &model_bytes,
        inputs: &inputs,
        reference: reference.as_ref(),
        variants: &specs,
        calibration: calibration.as_ref(),
        prune: args.prune.options(),
        task: args.task,
        threads: args.threads.unwrap_or(entry.config.threads).max(1),
        batch_sizes: &args.batch_sizes,
        seconds: args.seconds,
    };
    let (report, candidates) = optimize::run(&plan)?;
    let write = |chosen: VariantSpec| -> Result<WrittenVersion, ToolError> {
        let name = chosen.name();
        let result = report
            .variants
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| ToolError::InvalidArgument(format!("variant '{name}' was not run")))?;
        let bound = args.max_abs_error.unwrap_or(0.0);
        let error = result.vs_fp32.max_abs_error;
        if error.is_nan() || error > bound {
            return Err(ToolError::TooInaccurate {
                variant: name,
                error,
                bound,
            });
        }
        let candidate = candidates
            .iter()
            .find(|c| c.spec.name() == name)
            .ok_or_else(|| ToolError::InvalidArgument(format!("variant '{name}' was not run")))?;
        // A static variant's version carries its quantisation settings and
        // a copy of the calibration file, so it loads calibrated exactly as
        // measured here. A dynamic int8 version of a model configured with
        // static activations says "dynamic" explicitly.
        let mut files = Vec::new();
        let quantization = match (chosen.precision.activations, calibration.as_ref()) {
            (ActivationsChoice::Static, Some(c)) => {
                files.push(ExtraFile {
                    source: c.data.path.clone(),
                    name: VERSION_CALIBRATION_FILE.to_string(),
                });
                Some(QuantizationConfig {
                    activations: ActivationsChoice::Static,
                    calibration: Some(PathBuf::from(VERSION_CALIBRATION_FILE)),
                    method: c.method,
                    percentile: c.percentile,
                })
            }
            (ActivationsChoice::Static, None) => {
                return Err(ToolError::InvalidArgument(optimize::NO_CALIBRATION.into()));
            }
            (ActivationsChoice::Dynamic, _)
                if chosen.precision.choice == PrecisionChoice::Int8
                    && entry.config.quantization.activations == ActivationsChoice::Static =>
            {
                Some(QuantizationConfig::default())
            }
            (ActivationsChoice::Dynamic, _) => None,
        };
        let config = VersionConfig {
            precision: Some(chosen.precision.choice),
            quantization,
        };
        let comment = [
            format!("written by tickserve model optimize --write {name} from version {source}"),
            format!(
                "max abs error vs fp32 {error:.3e} on {} rows of {}",
                report.rows, report.inputs
            ),
        ];
        let written = versions::write_version(
            root,
            &entry.name,
            args.output_version,
            &candidate.model,
            Some(&config),
            &files,
            &comment,
        )?;
        let engine_variant = written.loaded.engine.variant();
        if engine_variant != result.engine_variant {
            let _ = std::fs::remove_dir_all(&written.dir);
            return Err(ToolError::InvalidArgument(format!(
                "the written version loads as {engine_variant}, not {}, with the model's config.toml; removed it",
                result.engine_variant
            )));
        }
        Ok(WrittenVersion {
            model: entry.name.clone(),
            version: written.version,
            path: written.dir.display().to_string(),
            engine_variant,
        })
    };
    // The comparison is printed before a refusal, so the numbers that
    // explain it are on screen.
    if !args.json {
        print!("{}", optimize::render(&report));
        if calibrates_on_validation {
            println!(
                "note: --calibration is the validation set itself, so the int8-static errors above are optimistic"
            );
        }
    }
    let written = chosen.map(write).transpose();
    let written = match written {
        Ok(w) => w,
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    to_json(&OptimizeOutput {
                        report: &report,
                        written: None
                    })?
                );
            }
            return Err(e);
        }
    };
    if args.json {
        println!(
            "{}",
            to_json(&OptimizeOutput {
                report: &report,
                written,
            })?
        );
    } else if let Some(w) = written {
        println!(
            "\nwrote {} version {} ({}): loads as {}",
            w.model, w.version, w.path, w.engine_variant
        );
    }
    Ok(())
}

fn to_json(value: &impl Serialize) -> Result<String, ToolError> {
    serde_json::to_string_pretty(value)
        .map_err(|e| ToolError::InvalidArgument(format!("cannot encode JSON: {e}")))
}
