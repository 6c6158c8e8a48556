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
//!
//! Triton's `config.pbtxt` is read instead of config.toml when a folder
//! has it (never both), and a folder with only `<version>/model.onnx`
//! serves with defaults and the model file's inputs and outputs.
//!
//! The crate is split by responsibility: `config` (the config.toml and
//! version.toml types and their checks), `pbtxt` (Triton's config.pbtxt
//! and its JSON form, mapped onto the same types), `scan` (finding models
//! and their versions on disk) and `load` (building an engine for one
//! version and checking it against the configuration).

use std::path::{Path, PathBuf};

use tickserve_engine::EngineError;

mod config;
mod load;
mod pbtxt;
mod scan;
mod stream;

pub use config::{
    ActivationsChoice, AdaptiveBatchingConfig, BatchingConfig, CalibrationMethodChoice,
    EngineChoice, InstanceGroupConfig, ModelCacheConfig, ModelConfig, PrecisionChoice,
    PriorityConfig, QuantizationConfig, TensorConfig, VersionConfig, VersionPolicy,
    check_version_config, parse_config, parse_version_config, read_config, read_version_config,
};
pub use load::LoadedVersion;
pub use pbtxt::{Pbtxt, parse_json_config, parse_pbtxt, read_pbtxt};
pub use scan::{ConfigSource, ModelEntry, model_names, scan, scan_model, scan_model_with};
pub use stream::{PadWith, StreamConfig, WarmupPolicy};

/// Name of the per-model configuration file.
pub const CONFIG_FILE: &str = "config.toml";
/// Name of Triton's per-model configuration file (crate::pbtxt).
pub const PBTXT_FILE: &str = "config.pbtxt";
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
    #[error(
        "model repository {0} holds no models (expected <model>/config.toml, <model>/config.pbtxt or <model>/<version>/model.onnx)"
    )]
    Empty(PathBuf),
    #[error("invalid {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error(
        "model '{model}' has no version folders with a {MODEL_FILE} (expected {dir}/<version>/{MODEL_FILE})"
    )]
    NoVersions { model: String, dir: PathBuf },
    #[error("model '{model}' version {version}: {}: {source}", file.display())]
    Engine {
        model: String,
        version: u64,
        /// The model file.
        file: PathBuf,
        #[source]
        source: EngineError,
    },
    #[error("model '{model}' version {version}: {file} does not match the model file: {reason}")]
    Mismatch {
        model: String,
        version: u64,
        /// The configuration file (`config.toml` or `config.pbtxt`).
        file: &'static str,
        reason: String,
    },
}

impl RepositoryError {
    /// The error of an I/O call on `path`, for `map_err`.
    pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> RepositoryError + Copy + '_ {
        move |source| RepositoryError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
