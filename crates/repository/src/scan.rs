//! Finding models on disk: every `<model>/config.toml` under the
//! repository root, its version folders and their `version.toml` files.
//! Nothing here reads a model file; crate::load does that.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::{
    ModelConfig, PrecisionChoice, QuantizationConfig, VersionConfig, check_version_config,
    read_config, read_version_config,
};
use crate::{CONFIG_FILE, MODEL_FILE, RepositoryError, VERSION_FILE};

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
}
