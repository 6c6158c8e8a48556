//! tickserve's offline model tools: `tickserve model prune` and
//! `tickserve model optimize`.
//!
//! Both read a model version from the repository and can write a new
//! version beside it, never touching the source:
//!
//! * [`prune`] rewrites the ONNX file (fewer Conv1d channels, zeroed small
//!   weights) with the full ONNX schema ([`onnx`]), records what it did in
//!   the file's metadata, and checks that the new version loads;
//! * [`optimize`] runs the variants a user asks for (precisions of the
//!   native engine, pruning, combinations) on a validation set, measures
//!   their speed and their error against fp32 (and reference outputs), and
//!   can write the chosen one as a new version with a `version.toml`,
//!   refusing when its error exceeds a bound;
//! * [`versions`] picks the version number, writes the folder and loads it
//!   back through the repository, exactly as the server will.
//!
//! [`cli`] holds the clap arguments the `tickserve` binary mounts under
//! `model`.

pub mod cli;
pub mod npy;
pub mod onnx;
pub mod optimize;
pub mod prune;
pub mod versions;

use std::path::PathBuf;

/// Why a model tool failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Npy { path: PathBuf, reason: String },
    #[error("invalid ONNX model: {0}")]
    Onnx(String),
    #[error("cannot prune: {0}")]
    Prune(String),
    #[error(transparent)]
    Repository(#[from] tickserve_repository::RepositoryError),
    #[error(transparent)]
    Engine(#[from] tickserve_engine::EngineError),
    #[error(transparent)]
    Calibration(#[from] tickserve_engine_native::CalibrationError),
    #[error("{0}")]
    InvalidArgument(String),
    /// `optimize --write` would write a variant less accurate than the
    /// user's bound.
    #[error(
        "refusing to write variant '{variant}': its max abs error vs fp32 on the validation set is {error:.3e}, above --max-abs-error {bound:e}"
    )]
    TooInaccurate {
        variant: String,
        error: f64,
        bound: f64,
    },
}

impl ToolError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ToolError {
        let path = path.into();
        move |source| ToolError::Io { path, source }
    }
}
