//! The configuration files: `<model>/config.toml` ([`ModelConfig`]) and
//! `<model>/<version>/version.toml` ([`VersionConfig`]), parsed with serde
//! and checked here, before any model file is read, so a bad config fails
//! fast with the file and the reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tickserve_engine::DataType;
use tickserve_engine_native::{CalibrationMethod, Precision};

use crate::RepositoryError;

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
    /// Dimensions without the batch axis, as clients send and receive them.
    pub dims: Vec<usize>,
    /// The dimensions the model file has, when they differ from `dims`
    /// (Triton's `reshape`): the same elements, only the shape differs.
    #[serde(default)]
    pub reshape: Option<Vec<usize>>,
}

impl TensorConfig {
    /// The dimensions the model file must have.
    pub fn model_dims(&self) -> &[usize] {
        self.reshape.as_deref().unwrap_or(&self.dims)
    }
}

/// Which of a model's versions are served (Triton's `version_policy`).
/// config.toml: `version_policy = { latest = 2 }`, `version_policy = "all"`
/// or `version_policy = { specific = [1, 3] }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionPolicy {
    /// The N highest version numbers.
    Latest(usize),
    /// Every version folder.
    All,
    /// These versions; each must exist.
    Specific(Vec<u64>),
}

impl Default for VersionPolicy {
    /// Triton's default: the latest version only.
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

impl VersionPolicy {
    /// The versions to serve out of those `found` (ascending), or the
    /// first version the policy names that is not there.
    pub fn select(&self, found: &[u64]) -> Result<Vec<u64>, u64> {
        match self {
            VersionPolicy::All => Ok(found.to_vec()),
            VersionPolicy::Latest(n) => Ok(found[found.len().saturating_sub(*n)..].to_vec()),
            VersionPolicy::Specific(wanted) => {
                let mut selected = Vec::with_capacity(wanted.len());
                for &version in wanted {
                    if !found.contains(&version) {
                        return Err(version);
                    }
                    selected.push(version);
                }
                selected.sort_unstable();
                selected.dedup();
                Ok(selected)
            }
        }
    }

    /// The problem with a policy that can serve nothing.
    pub(crate) fn check(&self) -> Result<(), String> {
        match self {
            VersionPolicy::Latest(0) => Err("version_policy latest must be at least 1".into()),
            VersionPolicy::Specific(v) if v.is_empty() => {
                Err("version_policy specific names no version".into())
            }
            VersionPolicy::Specific(v) if v.contains(&0) => {
                Err("version_policy specific: versions are positive integers".into())
            }
            _ => Ok(()),
        }
    }
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
    /// OS scheduling niceness its workers run background work at, −20 to
    /// 19 (Linux): higher yields the cores to the front end and the other
    /// workers when they are short. Batches led by a class with a
    /// `target_latency` keep the thread's own. Among idle workers of the
    /// same priorities, the lowest `nice` is offered work first. Negative
    /// values need `CAP_SYS_NICE`. None: the process's.
    #[serde(default)]
    pub nice: Option<i32>,
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
    /// Which versions are served; the latest one by default.
    #[serde(default)]
    pub version_policy: VersionPolicy,
    /// Inputs and outputs. config.toml must declare them; from a
    /// config.pbtxt they are optional and, like in an ONNX-only folder,
    /// completed from the model file when absent (crate::load).
    #[serde(rename = "input", default)]
    pub inputs: Vec<TensorConfig>,
    #[serde(rename = "output", default)]
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
    pub stream: crate::StreamConfig,
    /// Engine workers by group (replaces `instances` when present).
    #[serde(default)]
    pub instance_group: Vec<InstanceGroupConfig>,
    /// `engine = "auto"` without trying the CUDA engine (a config.pbtxt's
    /// `instance_group { kind: KIND_CPU }`; config.toml says `engine`).
    #[serde(skip)]
    pub cpu_only: bool,
}

impl Default for ModelConfig {
    /// Every setting at its default and no declared inputs or outputs:
    /// the configuration of a folder holding only model files.
    fn default() -> Self {
        ModelConfig::deserialize(toml::Table::new()).expect("every ModelConfig field has a default")
    }
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

/// Parses and checks one config.toml.
pub fn read_config(path: &Path) -> Result<ModelConfig, RepositoryError> {
    let text = std::fs::read_to_string(path).map_err(RepositoryError::io(path))?;
    parse_config(path, &text)
}

/// Parses and checks the text of a config.toml; `path` names it in
/// errors. (Also the entry point of the config fuzz target.)
pub fn parse_config(path: &Path, text: &str) -> Result<ModelConfig, RepositoryError> {
    let invalid = |reason: String| RepositoryError::Config {
        path: path.to_path_buf(),
        reason,
    };
    let config: ModelConfig = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    check_config(&config).map_err(invalid)?;
    if config.inputs.is_empty() || config.outputs.is_empty() {
        return Err(invalid(
            "at least one [[input]] and one [[output]] are required".into(),
        ));
    }
    Ok(config)
}

/// The rules every model configuration follows, whichever file it came
/// from (config.toml, config.pbtxt, or none).
pub(crate) fn check_config(config: &ModelConfig) -> Result<(), String> {
    let invalid = |reason: String| reason;
    config.version_policy.check()?;
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
        if let Some(nice) = group.nice.filter(|n| !(-20..=19).contains(n)) {
            return Err(invalid(format!(
                "instance_group {}: nice {nice}; expected -20 (most favoured) to 19 (least)",
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
    for tensor in config.inputs.iter().chain(&config.outputs) {
        if DataType::parse(&tensor.datatype).is_none() {
            return Err(invalid(format!(
                "'{}' has datatype '{}'; expected one of {}",
                tensor.name,
                tensor.datatype,
                DataType::ALL.map(DataType::as_str).join(", ")
            )));
        }
        if let Some(reshape) = &tensor.reshape
            && reshape.iter().product::<usize>() != tensor.dims.iter().product::<usize>()
        {
            return Err(invalid(format!(
                "'{}' has dims {:?} and reshape {reshape:?}: they must hold the same number of elements",
                tensor.name, tensor.dims
            )));
        }
    }
    Ok(())
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
    let text = std::fs::read_to_string(path).map_err(RepositoryError::io(path))?;
    parse_version_config(path, &text)
}

/// Parses the text of a version.toml; `path` names it in errors.
pub fn parse_version_config(path: &Path, text: &str) -> Result<VersionConfig, RepositoryError> {
    toml::from_str(text).map_err(|e| RepositoryError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
