//! Finding models on disk: every model folder under the repository root
//! (one with a `config.toml`, a Triton `config.pbtxt`, or only
//! `<version>/model.onnx` files), its configuration, its version folders
//! and their `version.toml` files. Nothing here reads a model file;
//! crate::load does that.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::{
    ModelConfig, PrecisionChoice, QuantizationConfig, VersionConfig, check_version_config,
    read_config, read_version_config,
};
use crate::pbtxt::{Pbtxt, read_pbtxt};
use crate::{CONFIG_FILE, MODEL_FILE, PBTXT_FILE, RepositoryError, VERSION_FILE};

/// Which file a model's configuration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSource {
    /// tickserve's `config.toml`.
    Toml,
    /// Triton's `config.pbtxt`.
    Pbtxt,
    /// No configuration file: defaults, with inputs and outputs read from
    /// the model file.
    Model,
    /// The configuration a repository load request carried, which replaces
    /// the folder's file.
    Request,
}

impl ConfigSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ConfigSource::Toml => CONFIG_FILE,
            ConfigSource::Pbtxt => PBTXT_FILE,
            ConfigSource::Model => "model file",
            ConfigSource::Request => "load request config",
        }
    }
}

/// A model found in the repository, configured but not yet loaded.
#[derive(Debug, Clone)]
pub struct ModelEntry {
    pub name: String,
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// Version numbers found, ascending.
    pub versions: Vec<u64>,
    /// The versions the version policy serves, ascending.
    pub served: Vec<u64>,
    /// The `version.toml` of each version that has one.
    pub version_configs: BTreeMap<u64, VersionConfig>,
    pub source: ConfigSource,
    /// Fields of a config.pbtxt that tickserve does not apply (logged in
    /// one warning when the model is scanned).
    pub ignored: Vec<String>,
}

/// Reads every model folder under `root` and lists the versions; the
/// first invalid model fails the scan. Models are returned sorted by name.
pub fn scan(root: &Path) -> Result<Vec<ModelEntry>, RepositoryError> {
    let names = model_names(root)?;
    if names.is_empty() {
        return Err(RepositoryError::Empty(root.to_path_buf()));
    }
    names.iter().map(|name| scan_model(root, name)).collect()
}

/// The model folders under `root`, sorted: those with a configuration file
/// or at least one `<version>/model.onnx`. Other folders are skipped.
pub fn model_names(root: &Path) -> Result<Vec<String>, RepositoryError> {
    let mut names = Vec::new();
    for dir in folder_paths(root)? {
        let dir = dir?;
        if !dir.is_dir() {
            continue;
        }
        let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        if dir.join(CONFIG_FILE).is_file()
            || dir.join(PBTXT_FILE).is_file()
            || !list_versions(&dir)?.is_empty()
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Reads one model folder `root/name`.
pub fn scan_model(root: &Path, name: &str) -> Result<ModelEntry, RepositoryError> {
    scan_model_with(root, name, None)
}

/// Reads one model folder `root/name`, with `config` (a load request's,
/// Triton's JSON form) in place of the folder's configuration file when
/// given.
pub fn scan_model_with(
    root: &Path,
    name: &str,
    config: Option<Pbtxt>,
) -> Result<ModelEntry, RepositoryError> {
    let dir = root.join(name);
    if !dir.is_dir() {
        return Err(RepositoryError::Config {
            path: dir,
            reason: "no such model folder in the repository".into(),
        });
    }
    let toml_path = dir.join(CONFIG_FILE);
    let pbtxt_path = dir.join(PBTXT_FILE);
    let (config, source, ignored, config_path) = match (
        config,
        toml_path.is_file(),
        pbtxt_path.is_file(),
    ) {
        (Some(Pbtxt { config, ignored }), _, _) => {
            (config, ConfigSource::Request, ignored, dir.clone())
        }
        (None, true, true) => {
            return Err(RepositoryError::Config {
                path: dir,
                reason: format!(
                    "holds both {CONFIG_FILE} and {PBTXT_FILE}; keep one (the other would be silently ignored)"
                ),
            });
        }
        (None, true, false) => (
            read_config(&toml_path)?,
            ConfigSource::Toml,
            Vec::new(),
            toml_path,
        ),
        (None, false, true) => {
            let pbtxt = read_pbtxt(&pbtxt_path)?;
            (pbtxt.config, ConfigSource::Pbtxt, pbtxt.ignored, pbtxt_path)
        }
        (None, false, false) => (
            ModelConfig::default(),
            ConfigSource::Model,
            Vec::new(),
            dir.clone(),
        ),
    };
    if let Some(configured) = &config.name
        && configured != name
    {
        return Err(RepositoryError::Config {
            path: config_path,
            reason: format!("name '{configured}' differs from its folder '{name}'"),
        });
    }
    if !ignored.is_empty() {
        tracing::warn!(
            model = %name,
            file = %config_path.display(),
            ignored = %ignored.join(", "),
            "config.pbtxt sets fields tickserve does not apply; they have no effect"
        );
    }
    let versions = list_versions(&dir)?;
    if versions.is_empty() {
        return Err(RepositoryError::NoVersions {
            model: name.to_owned(),
            dir,
        });
    }
    let served = config.version_policy.select(&versions).map_err(|missing| {
        RepositoryError::Config {
            path: config_path.clone(),
            reason: format!(
                "version_policy names version {missing}, but there is no {}/{missing}/{MODEL_FILE}",
                dir.display()
            ),
        }
    })?;
    let mut version_configs = BTreeMap::new();
    for &version in &versions {
        let path = dir.join(version.to_string()).join(VERSION_FILE);
        if path.is_file() {
            let version_config = read_version_config(&path)?;
            check_version_config(&path, &version_config, &config)?;
            version_configs.insert(version, version_config);
        }
    }
    Ok(ModelEntry {
        name: name.to_owned(),
        dir,
        config,
        versions,
        served,
        version_configs,
        source,
        ignored,
    })
}

fn list_versions(dir: &Path) -> Result<Vec<u64>, RepositoryError> {
    let mut versions = Vec::new();
    for path in folder_paths(dir)? {
        let path = path?;
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

/// The paths in the folder `dir`, read as they are taken; an error names
/// `dir`.
fn folder_paths(
    dir: &Path,
) -> Result<impl Iterator<Item = Result<PathBuf, RepositoryError>> + '_, RepositoryError> {
    let io = RepositoryError::io(dir);
    let entries = std::fs::read_dir(dir).map_err(io)?;
    Ok(entries.map(move |entry| entry.map(|e| e.path()).map_err(io)))
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
}
