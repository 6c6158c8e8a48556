//! The model repository: which models exist, how each is configured, and
//! which engine runs it.
//!
//! The layout is Triton's, so existing repositories need only a
//! `config.toml` beside their versions:
//!
//! ```text
//! <repository>/<model>/config.toml
//! <repository>/<model>/<version>/model.onnx     (version: a positive integer)
//! <repository>/<model>/<version>/version.toml   (optional: per-version overrides)
//! ```
//!
//! Versions share their model's config.toml; a `version.toml` overrides the
//! few settings that describe how one version's file is run rather than how
//! the model is served (`precision`, and the `[quantization]` table), so
//! `tickserve model optimize --write int8-static` can add a static int8
//! version beside the fp32 one. A version.toml's `calibration` file is
//! relative to the *version* folder (optimize copies the file it measured
//! with there, so the version stays as measured when the model's own
//! calibration file changes); config.toml's is relative to the model folder.
//!
//! [`scan`] reads every model's configuration without touching the model
//! files, so a bad config fails fast; [`load_version`] then builds the
//! engine and checks that what the model file declares matches what the
//! config promises, so clients are never told one shape and served another.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tickserve_engine::{DataType, Engine, EngineError, TensorSpec};
use tickserve_engine_native::{Calibration, CalibrationMethod, NativeEngine, Precision};

mod stream;
pub use stream::{PadWith, StreamConfig, WarmupPolicy};

/// Name of the per-model configuration file.
pub const CONFIG_FILE: &str = "config.toml";
/// Name of the model file inside each version folder.
pub const MODEL_FILE: &str = "model.onnx";
/// Name of the optional per-version settings file inside a version folder.
pub const VERSION_FILE: &str = "version.toml";

/// Why the repository or one of its models cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("cannot read model repository {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model repository {0} holds no models (expected <model>/config.toml)")]
    Empty(PathBuf),
    #[error("invalid {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error(
        "model '{model}' has no version folders with a {MODEL_FILE} (expected {dir}/<version>/{MODEL_FILE})"
    )]
    NoVersions { model: String, dir: PathBuf },
    #[error("model '{model}' version {version}: {source}")]
    Engine {
        model: String,
        version: u64,
        #[source]
        source: EngineError,
    },
    #[error(
        "model '{model}' version {version}: config.toml does not match the model file: {reason}"
    )]
    Mismatch {
        model: String,
        version: u64,
        reason: String,
    },
}

/// Which engine runs a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// tickserve's own CNN+LSTM engine.
    Native,
    /// ONNX Runtime, loaded at run time from `ORT_DYLIB_PATH`.
    Onnxruntime,
    /// tickserve's CUDA engine (the native engine's model family on an
    /// NVIDIA GPU; CUDA loaded at run time). Without a driver, library or
    /// device, loading stops with a message naming what is missing.
    Cuda,
    /// The CUDA engine when a GPU is present and the graph is recognised,
    /// else the native engine when it recognises the graph, else ONNX
    /// Runtime when its library is present.
    #[default]
    Auto,
}

/// One input or output as config.toml declares it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorConfig {
    pub name: String,
    pub datatype: String,
    /// Dimensions without the batch axis.
    pub dims: Vec<usize>,
}

/// Numeric precision the native engine runs a model in (the ONNX file
/// stays fp32; see docs/optimization.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionChoice {
    #[default]
    Fp32,
    Bf16,
    Int8,
    /// TF32 tensor cores: the CUDA engine only.
    Tf32,
}

impl PrecisionChoice {
    /// The native engine's precision (`tf32`, a CUDA precision, is refused
    /// before this is asked).
    pub fn native(self) -> Precision {
        match self {
            PrecisionChoice::Fp32 | PrecisionChoice::Tf32 => Precision::Fp32,
            PrecisionChoice::Bf16 => Precision::Bf16,
            PrecisionChoice::Int8 => Precision::Int8,
        }
    }

    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PrecisionChoice::Fp32 => "fp32",
            PrecisionChoice::Bf16 => "bf16",
            PrecisionChoice::Int8 => "int8",
            PrecisionChoice::Tf32 => "tf32",
        }
    }
}

/// Where int8 activation scales come from (`[quantization] activations`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ActivationsChoice {
    /// Each row's own range, at run time.
    #[default]
    Dynamic,
    /// Fixed at load from the `calibration` file.
    Static,
}

/// How calibration values become a range (`[quantization] method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CalibrationMethodChoice {
    /// Smallest and largest value seen.
    #[default]
    Minmax,
    /// `percentile` at the top and `100 − percentile` at the bottom.
    Percentile,
}

/// `[quantization]`: int8 options of the native engine
/// (docs/optimization.md). Every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuantizationConfig {
    /// `"dynamic"` (default) or `"static"` (needs `precision = "int8"`
    /// and `calibration`).
    pub activations: ActivationsChoice,
    /// A float32 `.npy` of model inputs `[samples, time, features]`,
    /// relative to the model's folder (config.toml) or the version's
    /// folder (version.toml); read and calibrated on at load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<PathBuf>,
    /// `"minmax"` (default) or `"percentile"`.
    pub method: CalibrationMethodChoice,
    /// For `method = "percentile"`, in [50, 100].
    pub percentile: f64,
}

impl Default for QuantizationConfig {
    fn default() -> Self {
        QuantizationConfig {
            activations: ActivationsChoice::Dynamic,
            calibration: None,
            method: CalibrationMethodChoice::Minmax,
            percentile: 99.999,
        }
    }
}

impl QuantizationConfig {
    /// The engine's calibration method these settings name.
    pub fn method(&self) -> CalibrationMethod {
        match self.method {
            CalibrationMethodChoice::Minmax => CalibrationMethod::MinMax,
            CalibrationMethodChoice::Percentile => CalibrationMethod::Percentile(self.percentile),
        }
    }
}

/// How requests are merged into engine calls and scheduled
/// (docs/scheduling.md). Every field has a default, so a config may omit
/// the section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingConfig {
    /// When given, the max queue delay of every priority that does not set
    /// its own (e.g. `"5ms"`, `"500us"`). Without it each priority has the
    /// seed's delay: 2, 2, 5, 20, 20 ms.
    #[serde(with = "humantime_serde")]
    pub max_queue_delay: Option<Duration>,
    /// Requests (not rows) that may wait per priority, unless the priority
    /// sets its own; past it requests are refused with 429.
    pub max_queue_size: usize,
    /// Priority (1–5) of a request that names none.
    pub default_priority: u8,
    /// Whether an idle engine starts a batch as soon as the measured
    /// arrival rate says waiting is useless (true), or always waits for a
    /// full batch or the max queue delay (false).
    pub work_conserving: bool,
    /// A request older than this gains one priority level…
    #[serde(with = "humantime_serde")]
    pub aging_threshold: Duration,
    /// …and one more per further interval…
    #[serde(with = "humantime_serde")]
    pub aging_interval: Duration,
    /// …at most this many levels (never above priority 1).
    pub max_aging_levels: u8,
    /// Whether a batch with a priority that has a `target_latency` above
    /// its own runs in chunks, between which waiting requests of higher
    /// priorities go first.
    pub chunking: bool,
    /// Rows per chunk; without it, the most rows the measured engine time
    /// fits into the tightest higher target less one row's time.
    pub chunk_rows: Option<usize>,
    /// Per-priority policy, keyed by level `"1"` … `"5"`.
    pub priority: BTreeMap<String, PriorityConfig>,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_queue_delay: None,
            max_queue_size: 1000,
            default_priority: 3,
            work_conserving: true,
            aging_threshold: Duration::from_secs(1),
            aging_interval: Duration::from_secs(1),
            max_aging_levels: 2,
            chunking: true,
            chunk_rows: None,
            priority: BTreeMap::new(),
        }
    }
}

/// `[dynamic_batching.priority.<level>]`: what one priority overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriorityConfig {
    #[serde(with = "humantime_serde")]
    pub max_queue_delay: Option<Duration>,
    pub max_queue_size: Option<usize>,
    /// Deadline of a request that sets no `timeout` parameter.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Option<Duration>,
    /// Whether a request may set a shorter `timeout` of its own.
    pub allow_timeout_override: Option<bool>,
    /// The latency this priority is promised: lower priorities pad its
    /// batches only while it is predicted to be met, and run in chunks
    /// that fit it. `"0s"`: none (best effort). Defaults: 2 ms for
    /// priority 1, 5 ms for 2, none below.
    #[serde(with = "humantime_serde")]
    pub target_latency: Option<Duration>,
}

/// `[[instance_group]]`: engine workers reserved for some priorities and
/// optionally pinned to cores.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceGroupConfig {
    /// Engine worker threads in the group.
    #[serde(default = "default_instances")]
    pub count: usize,
    /// Priorities (1–5) its workers take; all when absent.
    #[serde(default)]
    pub priorities: Vec<u8>,
    /// CPU cores its workers are pinned to, one each, round robin; none:
    /// the OS places them.
    #[serde(default)]
    pub cores: Vec<usize>,
}

/// `[adaptive_batching]`: the live max batch size controller.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveBatchingConfig {
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    pub min_batch_size: usize,
    /// Halve the batch size above this CPU/GPU utilisation, percent.
    pub shrink_above_utilisation: u8,
    /// Double it below this utilisation…
    pub grow_below_utilisation: u8,
    /// …while memory use is below this, percent.
    pub grow_below_memory: u8,
    /// Priority-1 p99 latency objective…
    #[serde(with = "humantime_serde")]
    pub slo_p99: Duration,
    /// …halve when the p99 exceeds this percentage of it.
    pub slo_margin_percent: u8,
}

impl Default for AdaptiveBatchingConfig {
    fn default() -> Self {
        AdaptiveBatchingConfig {
            enabled: true,
            interval: Duration::from_secs(1),
            min_batch_size: 1,
            shrink_above_utilisation: 85,
            grow_below_utilisation: 30,
            grow_below_memory: 70,
            slo_p99: Duration::from_millis(50),
            slo_margin_percent: 80,
        }
    }
}

/// The model's result cache (`[cache]`; see docs/cache.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelCacheConfig {
    /// Whether this model's results are cached (when the server's cache
    /// is on).
    pub enabled: bool,
    /// How long an entry lives (e.g. `"30s"`); the server's
    /// `--cache-ttl` when absent.
    #[serde(with = "humantime_serde")]
    pub ttl: Option<Duration>,
}

impl Default for ModelCacheConfig {
    fn default() -> Self {
        ModelCacheConfig {
            enabled: true,
            ttl: None,
        }
    }
}

/// The contents of `<model>/config.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Defaults to the folder name; when given it must equal it.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub engine: EngineChoice,
    /// Largest number of rows in one engine call (and in one request).
    #[serde(default = "default_max_batch_size")]
    pub max_batch_size: usize,
    /// Engine worker threads for this model; each runs one batch at a time.
    #[serde(default = "default_instances")]
    pub instances: usize,
    /// Threads each engine instance uses inside one batch (the native
    /// engine splits the batch's rows between them; ONNX Runtime uses them
    /// as intra-op threads).
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// How long the native engine's helper threads (`threads > 1`) keep
    /// spinning after a call so that the next call finds them awake; "0s"
    /// parks them at once.
    #[serde(default = "default_helper_spin", with = "humantime_serde")]
    pub helper_spin: Duration,
    /// GEMM precision: "fp32", "bf16" or "int8" (native engine); "fp32",
    /// "tf32" or "bf16" (CUDA engine).
    #[serde(default)]
    pub precision: PrecisionChoice,
    /// CUDA engine: the device ordinal.
    #[serde(default)]
    pub device: usize,
    /// CUDA engine: the fraction of the GPU's memory its allocations stay
    /// under (the batch is also capped by free memory less 20 %).
    #[serde(default = "default_gpu_memory_fraction")]
    pub gpu_memory_fraction: f64,
    /// int8 activation scales: dynamic, or static from a calibration set.
    #[serde(default)]
    pub quantization: QuantizationConfig,
    #[serde(rename = "input")]
    pub inputs: Vec<TensorConfig>,
    #[serde(rename = "output")]
    pub outputs: Vec<TensorConfig>,
    #[serde(default)]
    pub dynamic_batching: BatchingConfig,
    #[serde(default)]
    pub adaptive_batching: AdaptiveBatchingConfig,
    /// Result caching of this model (the `[cache]` section).
    #[serde(default)]
    pub cache: ModelCacheConfig,
    /// Per-instrument windows kept by the server (the `[stream]` section;
    /// docs/streams.md).
    #[serde(default)]
    pub stream: StreamConfig,
    /// Engine workers by group (replaces `instances` when present).
    #[serde(default)]
    pub instance_group: Vec<InstanceGroupConfig>,
}

impl ModelConfig {
    /// Engine worker threads: the groups' counts, else `instances`.
    pub fn engine_instances(&self) -> usize {
        if self.instance_group.is_empty() {
            self.instances
        } else {
            self.instance_group.iter().map(|g| g.count).sum()
        }
    }
}

fn default_max_batch_size() -> usize {
    32
}

fn default_gpu_memory_fraction() -> f64 {
    0.85
}

fn default_instances() -> usize {
    1
}

fn default_threads() -> usize {
    1
}

fn default_helper_spin() -> Duration {
    tickserve_engine_native::DEFAULT_HELPER_SPIN
}

/// Longest `helper_spin`: each call may keep a core busy this long.
const MAX_HELPER_SPIN: Duration = Duration::from_secs(1);

/// The contents of `<model>/<version>/version.toml`: settings of one
/// version that override its model's config.toml. Every field is optional;
/// an absent file is the same as an empty one.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VersionConfig {
    /// GEMM precision of this version in the native engine; the model's
    /// `precision` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<PrecisionChoice>,
    /// int8 options of this version, replacing the model's whole
    /// `[quantization]` table when present (absent fields take their
    /// defaults, not the model's). Its `calibration` is relative to the
    /// version folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantizationConfig>,
}

/// A model found in the repository, configured but not yet loaded.
#[derive(Debug, Clone)]
pub struct ModelEntry {
    pub name: String,
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// Version numbers found, ascending.
    pub versions: Vec<u64>,
    /// The `version.toml` of each version that has one.
    pub version_configs: BTreeMap<u64, VersionConfig>,
}

/// A loaded model version, ready to hand to a scheduler.
#[derive(Debug, Clone)]
pub struct LoadedVersion {
    pub version: u64,
    pub engine: Arc<dyn Engine>,
}

/// Reads every `<model>/config.toml` under `root` and lists the versions.
/// Models are returned sorted by name.
pub fn scan(root: &Path) -> Result<Vec<ModelEntry>, RepositoryError> {
    let io = |source| RepositoryError::Io {
        path: root.to_path_buf(),
        source,
    };
    let mut models = Vec::new();
    for dir_entry in std::fs::read_dir(root).map_err(io)? {
        let dir = dir_entry.map_err(io)?.path();
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            continue;
        }
        let folder = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let config = read_config(&config_path)?;
        if let Some(name) = &config.name
            && name != &folder
        {
            return Err(RepositoryError::Config {
                path: config_path,
                reason: format!("name '{name}' differs from its folder '{folder}'"),
            });
        }
        let versions = list_versions(&dir)?;
        if versions.is_empty() {
            return Err(RepositoryError::NoVersions { model: folder, dir });
        }
        let mut version_configs = BTreeMap::new();
        for &version in &versions {
            let path = dir.join(version.to_string()).join(VERSION_FILE);
            if path.is_file() {
                let version_config = read_version_config(&path)?;
                check_version_config(&path, &version_config, &config)?;
                version_configs.insert(version, version_config);
            }
        }
        models.push(ModelEntry {
            name: folder,
            dir,
            config,
            versions,
            version_configs,
        });
    }
    if models.is_empty() {
        return Err(RepositoryError::Empty(root.to_path_buf()));
    }
    models.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(models)
}

/// Parses and checks one config.toml.
pub fn read_config(path: &Path) -> Result<ModelConfig, RepositoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| RepositoryError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |reason: String| RepositoryError::Config {
        path: path.to_path_buf(),
        reason,
    };
    let config: ModelConfig = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    if config.max_batch_size == 0 {
        return Err(invalid("max_batch_size must be at least 1".into()));
    }
    if config.instances == 0 {
        return Err(invalid("instances must be at least 1".into()));
    }
    if !config.instance_group.is_empty() && config.instances != 1 {
        return Err(invalid(
            "set either instances or [[instance_group]], not both (the groups' counts are the instances)".into(),
        ));
    }
    for (i, group) in config.instance_group.iter().enumerate() {
        if group.count == 0 {
            return Err(invalid(format!(
                "instance_group {}: count must be at least 1",
                i + 1
            )));
        }
        if let Some(bad) = group.priorities.iter().find(|p| !(1..=5).contains(*p)) {
            return Err(invalid(format!(
                "instance_group {}: priority {bad}; expected 1 (highest) to 5 (lowest)",
                i + 1
            )));
        }
    }
    if !config.instance_group.is_empty() {
        let served: std::collections::BTreeSet<u8> = config
            .instance_group
            .iter()
            .flat_map(|g| {
                if g.priorities.is_empty() {
                    vec![1, 2, 3, 4, 5]
                } else {
                    g.priorities.clone()
                }
            })
            .collect();
        if let Some(missing) = (1..=5).find(|p| !served.contains(p)) {
            return Err(invalid(format!(
                "no instance_group serves priority {missing}: its requests would never run"
            )));
        }
    }
    if config.dynamic_batching.chunk_rows == Some(0) {
        return Err(invalid(
            "dynamic_batching.chunk_rows must be at least 1".into(),
        ));
    }
    if config.threads == 0 {
        return Err(invalid("threads must be at least 1".into()));
    }
    if config.helper_spin > MAX_HELPER_SPIN {
        return Err(invalid(format!(
            "helper_spin is {:?}; at most {MAX_HELPER_SPIN:?} (after each call a helper keeps a core busy this long)",
            config.helper_spin
        )));
    }
    if !(config.gpu_memory_fraction > 0.0 && config.gpu_memory_fraction <= 1.0) {
        return Err(invalid(format!(
            "gpu_memory_fraction is {}; expected more than 0 and at most 1",
            config.gpu_memory_fraction
        )));
    }
    check_quantization(&config.quantization, config.precision, "model").map_err(invalid)?;
    let batching = &config.dynamic_batching;
    if batching.max_queue_size == 0 {
        return Err(invalid(
            "dynamic_batching.max_queue_size must be at least 1".into(),
        ));
    }
    if !(1..=5).contains(&batching.default_priority) {
        return Err(invalid(format!(
            "dynamic_batching.default_priority is {}; expected 1 (highest) to 5 (lowest)",
            batching.default_priority
        )));
    }
    for (level, policy) in &batching.priority {
        if !matches!(level.as_str(), "1" | "2" | "3" | "4" | "5") {
            return Err(invalid(format!(
                "[dynamic_batching.priority.{level}]: expected a priority level 1 to 5"
            )));
        }
        if policy.max_queue_size == Some(0) {
            return Err(invalid(format!(
                "dynamic_batching.priority.{level}.max_queue_size must be at least 1"
            )));
        }
        if policy.default_timeout.is_some_and(|t| t.is_zero()) {
            return Err(invalid(format!(
                "dynamic_batching.priority.{level}.default_timeout must be above zero"
            )));
        }
    }
    let adaptive = &config.adaptive_batching;
    if adaptive.min_batch_size == 0 || adaptive.min_batch_size > config.max_batch_size {
        return Err(invalid(format!(
            "adaptive_batching.min_batch_size is {}; expected 1 to max_batch_size ({})",
            adaptive.min_batch_size, config.max_batch_size
        )));
    }
    if adaptive.interval.is_zero() {
        return Err(invalid(
            "adaptive_batching.interval must be above zero".into(),
        ));
    }
    if config.cache.ttl.is_some_and(|ttl| ttl.is_zero()) {
        return Err(invalid("cache.ttl must be positive".into()));
    }
    config.stream.check().map_err(invalid)?;
    if config.inputs.is_empty() || config.outputs.is_empty() {
        return Err(invalid(
            "at least one [[input]] and one [[output]] are required".into(),
        ));
    }
    for tensor in config.inputs.iter().chain(&config.outputs) {
        if DataType::parse(&tensor.datatype).is_none() {
            return Err(invalid(format!(
                "'{}' has datatype '{}'; expected one of {}",
                tensor.name,
                tensor.datatype,
                DataType::ALL.map(DataType::as_str).join(", ")
            )));
        }
    }
    Ok(config)
}

/// The rules of a `[quantization]` table, the same in config.toml and
/// version.toml: static activations need int8 and a calibration file
/// (relative to the `folder`: "model" or "version"), the percentile a
/// value in [50, 100].
fn check_quantization(
    quantization: &QuantizationConfig,
    precision: PrecisionChoice,
    folder: &str,
) -> Result<(), String> {
    if quantization.activations == ActivationsChoice::Static {
        if precision != PrecisionChoice::Int8 {
            return Err(
                "[quantization] activations = \"static\" needs precision = \"int8\"".into(),
            );
        }
        if quantization.calibration.is_none() {
            return Err(format!(
                "[quantization] activations = \"static\" needs calibration = \"<file>.npy\" (model inputs, relative to the {folder} folder)"
            ));
        }
    }
    if !(50.0..=100.0).contains(&quantization.percentile) {
        return Err(format!(
            "[quantization] percentile {} is outside [50, 100]",
            quantization.percentile
        ));
    }
    Ok(())
}

/// Checks a version.toml (read from `path`) against its model's config:
/// its `[quantization]`, when it has one, follows config.toml's rules with
/// the version's precision (its own, else the model's).
pub fn check_version_config(
    path: &Path,
    version: &VersionConfig,
    model: &ModelConfig,
) -> Result<(), RepositoryError> {
    if let Some(quantization) = &version.quantization {
        let precision = version.precision.unwrap_or(model.precision);
        check_quantization(quantization, precision, "version").map_err(|reason| {
            RepositoryError::Config {
                path: path.to_path_buf(),
                reason,
            }
        })?;
    }
    Ok(())
}

/// Parses one version.toml (see [`check_version_config`] for the checks
/// that need the model's config).
pub fn read_version_config(path: &Path) -> Result<VersionConfig, RepositoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| RepositoryError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| RepositoryError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn list_versions(dir: &Path) -> Result<Vec<u64>, RepositoryError> {
    let io = |source| RepositoryError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut versions = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let Some(version) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|&v| v > 0)
        else {
            continue;
        };
        if path.join(MODEL_FILE).is_file() {
            versions.push(version);
        }
    }
    versions.sort_unstable();
    Ok(versions)
}

impl ModelEntry {
    /// The precision `version` runs in: its version.toml's, else the
    /// model's.
    pub fn precision_of(&self, version: u64) -> PrecisionChoice {
        self.version_configs
            .get(&version)
            .and_then(|v| v.precision)
            .unwrap_or(self.config.precision)
    }

    /// The int8 options `version` runs with, and the folder its
    /// `calibration` is relative to: its version.toml's `[quantization]`
    /// and the version folder, else the model's and the model folder.
    pub fn quantization_of(&self, version: u64) -> (&QuantizationConfig, PathBuf) {
        match self
            .version_configs
            .get(&version)
            .and_then(|v| v.quantization.as_ref())
        {
            Some(quantization) => (quantization, self.dir.join(version.to_string())),
            None => (&self.config.quantization, self.dir.clone()),
        }
    }

    /// Loads one version with the configured engine and checks it against
    /// the config.
    fn load_native(
        &self,
        version: u64,
        path: &Path,
        precision: PrecisionChoice,
    ) -> Result<NativeEngine, EngineError> {
        if precision == PrecisionChoice::Tf32 {
            return Err(EngineError::Unsupported(
                "precision = \"tf32\" is a CUDA precision; the native engine runs fp32, bf16 or int8".into(),
            ));
        }
        let mut engine = NativeEngine::load(path)?
            .with_threads(self.config.threads, self.config.engine_instances())?
            .with_helper_spin(self.config.helper_spin)
            .with_precision(precision.native());
        if engine.is_qdq() && precision == PrecisionChoice::Bf16 {
            return Err(EngineError::Unsupported(
                "the model carries its own int8 quantisation (QuantizeLinear/DequantizeLinear); precision = \"bf16\" does not apply: set \"int8\" or leave the default".into(),
            ));
        }
        // Static activations apply to int8 versions only: a version whose
        // version.toml sets another precision runs that precision.
        let (quantization, base) = self.quantization_of(version);
        if let (PrecisionChoice::Int8, ActivationsChoice::Static, Some(file)) = (
            precision,
            quantization.activations,
            &quantization.calibration,
        ) {
            let calibration = Calibration::read_npy(&base.join(file), quantization.method())
                .map_err(|e| EngineError::Unsupported(format!("static int8: {e}")))?;
            engine = engine.with_static_int8(&calibration)?;
        }
        let arch = engine.architecture();
        tracing::debug!(
            model = %self.name,
            conv_layers = arch.conv_layers,
            lstm_layers = arch.lstm_layers,
            head_layers = arch.head_layers,
            mflop_per_row = arch.flops_per_row as f64 / 1e6,
            "native engine recognised the graph"
        );
        Ok(engine)
    }

    #[cfg(feature = "onnxruntime")]
    fn load_onnxruntime(
        &self,
        path: &Path,
        precision: PrecisionChoice,
    ) -> Result<Arc<dyn Engine>, EngineError> {
        Self::refuse_precision_for_onnxruntime(precision)?;
        let engine = tickserve_engine_ort::OrtEngine::load(
            path,
            self.config.threads,
            self.config.engine_instances(),
        )?;
        Ok(Arc::new(engine))
    }

    /// ONNX Runtime runs the graph as exported; a reduced precision would
    /// silently not apply, so it is refused instead.
    fn refuse_precision_for_onnxruntime(precision: PrecisionChoice) -> Result<(), EngineError> {
        if precision == PrecisionChoice::Fp32 {
            return Ok(());
        }
        Err(EngineError::Unsupported(format!(
            "precision = \"{}\" is applied by the native engine only; ONNX Runtime runs the model as exported (fp32): set precision = \"fp32\" or engine = \"native\"",
            precision.as_str()
        )))
    }

    #[cfg(not(feature = "onnxruntime"))]
    fn load_onnxruntime(
        &self,
        _path: &Path,
        precision: PrecisionChoice,
    ) -> Result<Arc<dyn Engine>, EngineError> {
        Self::refuse_precision_for_onnxruntime(precision)?;
        Err(EngineError::Unsupported(
            "this tickserve was built without the `onnxruntime` feature".into(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn load_cuda(
        &self,
        path: &Path,
        precision: PrecisionChoice,
    ) -> Result<Arc<dyn Engine>, EngineError> {
        use tickserve_engine_cuda::{CudaEngine, CudaOptions, CudaPrecision};
        let precision = match precision {
            PrecisionChoice::Fp32 => CudaPrecision::Fp32,
            PrecisionChoice::Tf32 => CudaPrecision::Tf32,
            PrecisionChoice::Bf16 => CudaPrecision::Bf16,
            PrecisionChoice::Int8 => {
                return Err(EngineError::Unsupported(
                    "the CUDA engine runs fp32, tf32 or bf16, not int8".into(),
                ));
            }
        };
        let options = CudaOptions {
            device: self.config.device,
            precision,
            max_batch_size: self.config.max_batch_size,
            workers: self.config.instances,
            gpu_memory_fraction: self.config.gpu_memory_fraction,
            ..CudaOptions::default()
        };
        Ok(Arc::new(CudaEngine::load(path, &options)?))
    }

    #[cfg(not(feature = "cuda"))]
    fn load_cuda(
        &self,
        _path: &Path,
        _precision: PrecisionChoice,
    ) -> Result<Arc<dyn Engine>, EngineError> {
        Err(EngineError::Unsupported(
            "this tickserve was built without the `cuda` feature".into(),
        ))
    }

    /// `engine = "auto"` on a machine with a usable GPU: the CUDA engine,
    /// or `None` (after logging why) when the CPU engines should be tried.
    #[cfg(feature = "cuda")]
    fn try_auto_cuda(
        &self,
        version: u64,
        path: &Path,
        precision: PrecisionChoice,
    ) -> Option<Arc<dyn Engine>> {
        if let Err(missing) = tickserve_engine_cuda::probe(self.config.device) {
            tracing::info!(model = %self.name, version, reason = %missing, "engine auto: no usable GPU; using the CPU engines");
            return None;
        }
        match self.load_cuda(path, precision) {
            Ok(engine) => {
                tracing::info!(model = %self.name, version, "engine auto: a GPU is present and the graph is recognised; using the CUDA engine");
                Some(engine)
            }
            Err(reason) => {
                tracing::info!(model = %self.name, version, reason = %reason, "engine auto: the CUDA engine cannot run this model; using the CPU engines");
                None
            }
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn try_auto_cuda(
        &self,
        _version: u64,
        _path: &Path,
        _precision: PrecisionChoice,
    ) -> Option<Arc<dyn Engine>> {
        None
    }

    pub fn load_version(&self, version: u64) -> Result<LoadedVersion, RepositoryError> {
        let path = self.dir.join(version.to_string()).join(MODEL_FILE);
        let engine_error = |source| RepositoryError::Engine {
            model: self.name.clone(),
            version,
            source,
        };
        let precision = self.precision_of(version);
        let engine: Arc<dyn Engine> = match self.config.engine {
            EngineChoice::Native => Arc::new(
                self.load_native(version, &path, precision)
                    .map_err(engine_error)?,
            ),
            EngineChoice::Onnxruntime => self
                .load_onnxruntime(&path, precision)
                .map_err(engine_error)?,
            EngineChoice::Cuda => self.load_cuda(&path, precision).map_err(engine_error)?,
            EngineChoice::Auto => match self.try_auto_cuda(version, &path, precision) {
                Some(cuda) => cuda,
                None => self
                    .load_auto_cpu(version, &path, precision)
                    .map_err(engine_error)?,
            },
        };
        self.loaded(version, engine)
    }

    /// `engine = "auto"` without the CUDA engine: native when it
    /// recognises the graph, else ONNX Runtime.
    fn load_auto_cpu(
        &self,
        version: u64,
        path: &Path,
        precision: PrecisionChoice,
    ) -> Result<Arc<dyn Engine>, EngineError> {
        Ok(match self.load_native(version, path, precision) {
            Ok(native) => Arc::new(native),
            Err(EngineError::Unsupported(native_reason)) => {
                match self.load_onnxruntime(path, precision) {
                    Ok(engine) => {
                        tracing::info!(model = %self.name, version, reason = %native_reason, "the native engine does not run this graph; using ONNX Runtime");
                        engine
                    }
                    Err(ort_error) => {
                        return Err(EngineError::Unsupported(format!(
                            "no engine can serve it: native engine: {native_reason}; ONNX Runtime: {ort_error}"
                        )));
                    }
                }
            }
            Err(other) => return Err(other),
        })
    }

    fn loaded(
        &self,
        version: u64,
        engine: Arc<dyn Engine>,
    ) -> Result<LoadedVersion, RepositoryError> {
        tracing::info!(model = %self.name, version, engine = %engine.variant(), threads = self.config.threads, helper_spin = ?self.config.helper_spin, "model loaded");
        let signature = engine.signature();
        let check = |kind: &str, config: &[TensorConfig], actual: &[TensorSpec]| {
            check_tensors(kind, config, actual).map_err(|reason| RepositoryError::Mismatch {
                model: self.name.clone(),
                version,
                reason,
            })
        };
        check("input", &self.config.inputs, &signature.inputs)?;
        check("output", &self.config.outputs, &signature.outputs)?;
        Ok(LoadedVersion { version, engine })
    }
}

fn check_tensors(kind: &str, config: &[TensorConfig], actual: &[TensorSpec]) -> Result<(), String> {
    for declared in config {
        let Some(found) = actual.iter().find(|a| a.name == declared.name) else {
            let names: Vec<&str> = actual.iter().map(|a| a.name.as_str()).collect();
            return Err(format!(
                "{kind} '{}' is not in the model, which has {kind}s {names:?}",
                declared.name
            ));
        };
        if found.datatype.as_str() != declared.datatype {
            return Err(format!(
                "{kind} '{}' is {} in config.toml but {} in the model",
                declared.name, declared.datatype, found.datatype
            ));
        }
        if found.dims != declared.dims {
            return Err(format!(
                "{kind} '{}' has dims {:?} in config.toml but {:?} in the model",
                declared.name, declared.dims, found.dims
            ));
        }
    }
    if let Some(missing) = actual
        .iter()
        .find(|a| !config.iter().any(|c| c.name == a.name))
    {
        return Err(format!(
            "the model's {kind} '{}' is not declared in config.toml",
            missing.name
        ));
    }
    Ok(())
}
