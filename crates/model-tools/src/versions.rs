//! Writing a new version into a model repository, and loading it back.
//!
//! A tool's output is a folder `<model>/<version>/` holding `model.onnx`
//! and, when the version needs settings of its own, a `version.toml` (and
//! the files it names, such as a static int8 calibration set). The
//! folder is checked by loading it through [`tickserve_repository`] with the
//! model's config.toml, exactly as `tickserve serve` will; a version that
//! does not load is removed again, so a failed tool run leaves the
//! repository as it found it.

use std::path::{Path, PathBuf};

use tickserve_repository::{self as repository, LoadedVersion, ModelEntry, VersionConfig};

use crate::ToolError;

/// A model of the repository at `root`, by name.
pub fn find_model(root: &Path, name: &str) -> Result<ModelEntry, ToolError> {
    let models = repository::scan(root)?;
    let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
    models.into_iter().find(|m| m.name == name).ok_or_else(|| {
        ToolError::InvalidArgument(format!(
            "no model '{name}' in {} (it has {names:?})",
            root.display()
        ))
    })
}

/// `requested` when given and present, else the model's latest version.
pub fn source_version(entry: &ModelEntry, requested: Option<u64>) -> Result<u64, ToolError> {
    match requested {
        Some(v) if entry.versions.contains(&v) => Ok(v),
        Some(v) => Err(ToolError::InvalidArgument(format!(
            "model '{}' has no version {v} (it has {:?})",
            entry.name, entry.versions
        ))),
        None => entry.versions.last().copied().ok_or_else(|| {
            ToolError::InvalidArgument(format!("model '{}' has no versions", entry.name))
        }),
    }
}

/// The bytes of a version's model file.
pub fn model_bytes(entry: &ModelEntry, version: u64) -> Result<Vec<u8>, ToolError> {
    let path = entry
        .dir
        .join(version.to_string())
        .join(repository::MODEL_FILE);
    std::fs::read(&path).map_err(ToolError::io(path))
}

/// A version written and loaded back.
#[derive(Debug)]
pub struct Written {
    pub version: u64,
    pub dir: PathBuf,
    pub loaded: LoadedVersion,
}

/// A file copied into a written version folder: from `source`, named
/// `name` there.
#[derive(Debug, Clone)]
pub struct ExtraFile {
    pub source: PathBuf,
    pub name: String,
}

/// Writes `model` (ONNX bytes), `files` and, when given, `config` as a new
/// version of the model at `root`/`name`: version `requested`, or the next
/// after the highest present. `comment` heads the version.toml (one `#`
/// line each). The version is then loaded through the repository; if that
/// fails, the folder is removed and the error returned.
pub fn write_version(
    root: &Path,
    name: &str,
    requested: Option<u64>,
    model: &[u8],
    config: Option<&VersionConfig>,
    files: &[ExtraFile],
    comment: &[String],
) -> Result<Written, ToolError> {
    let entry = find_model(root, name)?;
    let version = match requested {
        Some(0) => {
            return Err(ToolError::InvalidArgument(
                "--output-version must be a positive integer".into(),
            ));
        }
        Some(v) => v,
        None => entry.versions.last().map_or(1, |v| v + 1),
    };
    let dir = entry.dir.join(version.to_string());
    if dir.exists() {
        return Err(ToolError::InvalidArgument(format!(
            "{} already exists: choose another --output-version",
            dir.display()
        )));
    }
    std::fs::create_dir_all(&dir).map_err(ToolError::io(&dir))?;
    let written = write_files(&dir, model, config, files, comment).and_then(|()| {
        let entry = find_model(root, name)?;
        Ok(entry.load_version(version)?)
    });
    match written {
        Ok(loaded) => Ok(Written {
            version,
            dir,
            loaded,
        }),
        Err(e) => {
            // Best effort: the error that matters is the one returned.
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

fn write_files(
    dir: &Path,
    model: &[u8],
    config: Option<&VersionConfig>,
    files: &[ExtraFile],
    comment: &[String],
) -> Result<(), ToolError> {
    let path = dir.join(repository::MODEL_FILE);
    std::fs::write(&path, model).map_err(ToolError::io(path))?;
    for file in files {
        std::fs::copy(&file.source, dir.join(&file.name)).map_err(ToolError::io(&file.source))?;
    }
    if let Some(config) = config {
        let mut text: String = comment.iter().map(|line| format!("# {line}\n")).collect();
        text.push_str(
            &toml::to_string(config).map_err(|e| {
                ToolError::InvalidArgument(format!("cannot write version.toml: {e}"))
            })?,
        );
        let path = dir.join(repository::VERSION_FILE);
        std::fs::write(&path, text).map_err(ToolError::io(path))?;
    }
    Ok(())
}
