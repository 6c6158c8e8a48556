//! The models a server serves, and how that set changes while it runs.
//!
//! ```text
//!  start ──▶ load the models the control mode names (fail fast)
//!  poll task (--model-control-mode poll): every interval, fingerprint
//!     each model folder (paths, sizes, mtimes) ──▶ changed? load_model
//!     ──▶ folder gone? unload_model
//!  POST …/load, …/unload (explicit mode), gRPC RepositoryModelLoad/Unload
//!  load_model: scan the folder ──▶ load + warm up every served version
//!     beside the old ones ──▶ swap the model map ──▶ old versions drain
//! ```
//!
//! The map of models is an `Arc` behind a `RwLock` that is only held to
//! clone or replace that `Arc`, so requests never wait for a load; a load
//! builds its new [`Model`] first, off the async runtime, then swaps it in.
//! Requests that already hold an old [`ModelVersion`] (crate::infer keeps
//! its `Arc` until the answer) finish on the old engine and scheduler,
//! which are dropped with the last of them: that is the drain. Loads are
//! serialised by one mutex (engines are loaded one at a time), but never
//! block requests to any model.
//!
//! A failed load leaves what was served in place and records the reason,
//! which the repository index reports as UNAVAILABLE.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use tickserve_engine::{Batch, Engine};
use tickserve_repository::{self as repository, ModelEntry, RepositoryError};
use tickserve_scheduler::{Priority, Scheduler, os_thread};

use crate::error::ServeError;
use crate::models::{Model, ModelVersion};
use crate::version_stats::CacheStats;

/// Which models are loaded, and who may change that (Triton's
/// `--model-control-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ControlMode {
    /// Every model at start, no changes while running.
    #[default]
    None,
    /// Every model at start; the repository is re-read every poll interval
    /// and changed, added or removed models are loaded or unloaded.
    Poll,
    /// Only the `load_models` at start; the load and unload endpoints
    /// change the set.
    Explicit,
}

impl ControlMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlMode::None => "none",
            ControlMode::Poll => "poll",
            ControlMode::Explicit => "explicit",
        }
    }
}

/// How the set of served models is managed (docs/models.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelControl {
    pub mode: ControlMode,
    /// Explicit mode: models to load at start (`*`: every one).
    pub load_models: Vec<String>,
    /// Poll mode: how often the repository is re-read.
    pub poll_interval: Duration,
}

impl Default for ModelControl {
    fn default() -> Self {
        ModelControl {
            mode: ControlMode::None,
            load_models: Vec::new(),
            poll_interval: Duration::from_secs(5),
        }
    }
}

/// One row of the repository index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    /// Empty when the row is about the model rather than one version.
    pub version: String,
    /// `READY`, `LOADING` or `UNAVAILABLE`.
    pub state: &'static str,
    pub reason: String,
}

/// The files of a model folder (relative path, size, modification time):
/// poll mode reloads a model when this changes.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// What the index says about a model beyond its served versions.
#[derive(Debug, Default)]
struct Status {
    loading: bool,
    unloaded: bool,
    /// The last load's failure (version when one version failed) and the
    /// folder's fingerprint then, so polling does not retry until it
    /// changes.
    failure: Option<(Option<u64>, String, Fingerprint)>,
    /// The fingerprint of the folder the served model was loaded from.
    loaded_from: Option<Fingerprint>,
}

/// All served models, by name, and their load state.
#[derive(Debug)]
pub struct ModelRegistry {
    root: PathBuf,
    runtime: tokio::runtime::Handle,
    control: ModelControl,
    models: RwLock<Arc<BTreeMap<String, Arc<Model>>>>,
    status: Mutex<BTreeMap<String, Status>>,
    loads: Mutex<()>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding it leaves plain data behind; keep serving.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ModelRegistry {
    /// Loads and warms up the models `control` names at start. Blocking:
    /// call it off the async runtime's worker threads. Schedulers are
    /// started on `runtime`. The first model that fails stops the start.
    pub fn start(
        root: &Path,
        runtime: &tokio::runtime::Handle,
        control: &ModelControl,
    ) -> Result<Self, RepositoryError> {
        let registry = ModelRegistry {
            root: root.to_path_buf(),
            runtime: runtime.clone(),
            control: control.clone(),
            models: RwLock::new(Arc::new(BTreeMap::new())),
            status: Mutex::new(BTreeMap::new()),
            loads: Mutex::new(()),
        };
        let all = repository::model_names(root)?;
        let names = match control.mode {
            ControlMode::None | ControlMode::Poll => {
                if all.is_empty() {
                    return Err(RepositoryError::Empty(root.to_path_buf()));
                }
                all
            }
            ControlMode::Explicit if control.load_models.iter().any(|m| m == "*") => all,
            ControlMode::Explicit => control.load_models.clone(),
        };
        for name in &names {
            registry.load_model(name, None)?;
        }
        Ok(registry)
    }

    /// Loads (or reloads) model `name` from its folder, or with the given
    /// config (Triton's JSON model configuration, a load request's
    /// override), and swaps it in once every served version is warm.
    /// Blocking. On failure what was served stays, and the index reports
    /// the reason.
    pub fn load_model(&self, name: &str, config: Option<&str>) -> Result<(), RepositoryError> {
        // Loading and warm-up are long CPU work: never with the request
        // path's real-time priority or short slice
        // (tickserve_scheduler::os_thread).
        os_thread::leave_request_path();
        let _one_load_at_a_time = lock(&self.loads);
        let dir = self.root.join(name);
        if !dir.is_dir() {
            // Nothing to report in the index: no such model.
            return Err(RepositoryError::Config {
                path: dir,
                reason: "no such model folder in the repository".into(),
            });
        }
        let fingerprint = fingerprint(&dir);
        lock(&self.status)
            .entry(name.to_owned())
            .or_default()
            .loading = true;
        let result = self.build(name, config);
        let mut status = lock(&self.status);
        let entry = status.entry(name.to_owned()).or_default();
        entry.loading = false;
        match result {
            Ok(model) => {
                let versions = model.version_names();
                self.swap(|models| {
                    models.insert(name.to_owned(), Arc::new(model));
                });
                entry.unloaded = false;
                entry.failure = None;
                entry.loaded_from = Some(fingerprint);
                tracing::info!(model = %name, ?versions, "model ready");
                Ok(())
            }
            Err(error) => {
                let version = match &error {
                    RepositoryError::Engine { version, .. }
                    | RepositoryError::Mismatch { version, .. } => Some(*version),
                    _ => None,
                };
                tracing::warn!(model = %name, error = %error, "model load failed; what was served stays");
                entry.failure = Some((version, error.to_string(), fingerprint));
                Err(error)
            }
        }
    }

    /// Stops serving model `name`. Requests it is answering finish first.
    pub fn unload_model(&self, name: &str) -> Result<(), ServeError> {
        os_thread::leave_request_path();
        let _one_load_at_a_time = lock(&self.loads);
        let known = self.root.join(name).is_dir() || self.snapshot().contains_key(name);
        if !known {
            return Err(ServeError::ModelNotFound(name.to_owned()));
        }
        self.swap(|models| {
            models.remove(name);
        });
        let mut status = lock(&self.status);
        let entry = status.entry(name.to_owned()).or_default();
        entry.unloaded = true;
        entry.failure = None;
        entry.loaded_from = None;
        tracing::info!(model = %name, "model unloaded");
        Ok(())
    }

    /// Poll mode's step: loads models whose folder changed or appeared and
    /// unloads those whose folder is gone. Blocking. Returns the models it
    /// loaded anew.
    pub fn poll(&self) -> Vec<String> {
        os_thread::leave_request_path();
        let mut loaded = Vec::new();
        let names = match repository::model_names(&self.root) {
            Ok(names) => names,
            Err(error) => {
                tracing::warn!(error = %error, "cannot read the model repository; nothing changes");
                return loaded;
            }
        };
        for name in &names {
            let now = fingerprint(&self.root.join(name));
            let changed = {
                let status = lock(&self.status);
                match status.get(name) {
                    None => true,
                    Some(s) => {
                        let failed_on = s.failure.as_ref().map(|(_, _, f)| f);
                        s.loaded_from.as_ref() != Some(&now) && failed_on != Some(&now)
                    }
                }
            };
            if changed {
                tracing::info!(model = %name, "model folder changed; loading");
                if self.load_model(name, None).is_ok() {
                    loaded.push(name.clone());
                }
            }
        }
        let gone: Vec<String> = self
            .snapshot()
            .keys()
            .filter(|name| !names.contains(name))
            .cloned()
            .collect();
        for name in gone {
            let _ = self.unload_model(&name);
        }
        loaded
    }

    pub fn control(&self) -> &ModelControl {
        &self.control
    }

    pub fn get(&self, name: &str) -> Result<Arc<Model>, ServeError> {
        self.snapshot()
            .get(name)
            .cloned()
            .ok_or_else(|| ServeError::ModelNotFound(name.to_owned()))
    }

    /// The served models now, by name.
    pub fn models(&self) -> Vec<Arc<Model>> {
        self.snapshot().values().cloned().collect()
    }

    /// Drops every served version's idle streams (the server's upkeep
    /// calls it each second, so the gauges fall without traffic).
    pub(crate) fn sweep_streams(&self) {
        for model in self.snapshot().values() {
            for version in model.versions.values() {
                if let Some(store) = version.streams() {
                    store.sweep();
                }
            }
        }
    }

    /// Triton's repository index: every served version (READY), every
    /// model being loaded (LOADING), and every model folder that serves
    /// nothing or whose last load failed (UNAVAILABLE, with the reason).
    pub fn index(&self) -> Vec<IndexEntry> {
        let served = self.snapshot();
        let status = lock(&self.status);
        let mut names: Vec<String> = repository::model_names(&self.root).unwrap_or_default();
        names.extend(served.keys().cloned());
        names.extend(status.keys().cloned());
        names.sort();
        names.dedup();
        let mut index = Vec::new();
        for name in names {
            let row = |version: String, state, reason: String| IndexEntry {
                name: name.clone(),
                version,
                state,
                reason,
            };
            let model_status = status.get(&name);
            if let Some(model) = served.get(&name) {
                index.extend(
                    model
                        .versions
                        .keys()
                        .map(|v| row(v.to_string(), "READY", String::new())),
                );
            }
            if model_status.is_some_and(|s| s.loading) {
                index.push(row(String::new(), "LOADING", String::new()));
            }
            if let Some((version, reason, _)) = model_status.and_then(|s| s.failure.as_ref()) {
                let version = version.map(|v| v.to_string()).unwrap_or_default();
                index.push(row(version, "UNAVAILABLE", reason.clone()));
            } else if !served.contains_key(&name) && !model_status.is_some_and(|s| s.loading) {
                let reason = if model_status.is_some_and(|s| s.unloaded) {
                    "unloaded"
                } else {
                    "not loaded"
                };
                index.push(row(String::new(), "UNAVAILABLE", reason.into()));
            }
        }
        index
    }

    fn snapshot(&self) -> Arc<BTreeMap<String, Arc<Model>>> {
        Arc::clone(&self.models.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces the map with a changed copy; readers keep the old one
    /// until they drop it.
    fn swap(&self, change: impl FnOnce(&mut BTreeMap<String, Arc<Model>>)) {
        let mut guard = self.models.write().unwrap_or_else(PoisonError::into_inner);
        let mut next = BTreeMap::clone(&guard);
        change(&mut next);
        *guard = Arc::new(next);
    }

    /// Scans the folder (or applies `config`), then loads and warms up
    /// every version the version policy serves.
    fn build(&self, name: &str, config: Option<&str>) -> Result<Model, RepositoryError> {
        let entry = match config {
            None => repository::scan_model(&self.root, name)?,
            Some(json) => {
                let config = repository::parse_json_config(json).map_err(|reason| {
                    RepositoryError::Config {
                        path: self.root.join(name).join("(load request config)"),
                        reason,
                    }
                })?;
                repository::scan_model_with(&self.root, name, Some(config))?
            }
        };
        let mut versions = BTreeMap::new();
        for &version in &entry.served {
            versions.insert(version, Arc::new(self.start_version(&entry, version)?));
        }
        Ok(Model {
            name: entry.name,
            versions,
        })
    }

    fn start_version(
        &self,
        entry: &ModelEntry,
        version: u64,
    ) -> Result<ModelVersion, RepositoryError> {
        let loaded = entry.load_version(version)?;
        warm_up(entry, version, &*loaded.engine)?;
        let mut scheduler_config = crate::scheduling::scheduler_config(entry);
        scheduler_config.version = version.to_string();
        // What Triton's model configuration reports: the delay of the
        // model's default class.
        let max_queue_delay =
            Priority::new(i64::from(entry.config.dynamic_batching.default_priority))
                .map(|p| scheduler_config.class(p).max_queue_delay)
                .unwrap_or_default();
        let scheduler = {
            let _guard = self.runtime.enter();
            Scheduler::spawn(Arc::clone(&loaded.engine), scheduler_config)
        };
        let streams = crate::streams::store_for(entry, version, &loaded.signature);
        Ok(ModelVersion {
            name: entry.name.clone(),
            version,
            engine_kind: loaded.engine.kind(),
            engine_variant: loaded.engine.variant(),
            signature: loaded.signature,
            max_batch_size: entry.config.max_batch_size,
            max_queue_delay,
            instances: entry.config.engine_instances(),
            cache: entry.config.cache.clone(),
            scheduler,
            cache_stats: CacheStats::default(),
            streams,
        })
    }
}

/// Every file under `dir` with its size and modification time, sorted; an
/// unreadable folder has an empty fingerprint.
fn fingerprint(dir: &Path) -> Fingerprint {
    fn walk(base: &Path, dir: &Path, depth: usize, out: &mut Fingerprint) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_dir() && depth < 4 {
                walk(base, &path, depth + 1, out);
            } else if meta.is_file() {
                let relative = path.strip_prefix(base).unwrap_or(&path).to_path_buf();
                out.push((relative, meta.len(), meta.modified().ok()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, 0, &mut out);
    out.sort();
    out
}

/// Runs every batch size from 1 to `max_batch_size` once, so allocations,
/// page faults and code paths of each size are paid before the version
/// takes traffic (Triton #7776 in serving-systems.md).
fn warm_up(entry: &ModelEntry, version: u64, engine: &dyn Engine) -> Result<(), RepositoryError> {
    let started = std::time::Instant::now();
    for rows in 1..=entry.config.max_batch_size {
        let inputs = engine
            .signature()
            .inputs
            .iter()
            .map(|spec| vec![0.0f32; rows * spec.row_len()])
            .collect();
        engine
            .infer(&Batch { rows, inputs })
            .map_err(|source| RepositoryError::Engine {
                model: entry.name.clone(),
                version,
                file: entry
                    .dir
                    .join(version.to_string())
                    .join(repository::MODEL_FILE),
                source,
            })?;
    }
    tracing::info!(
        model = %entry.name,
        version,
        batch_sizes = entry.config.max_batch_size,
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "warmed up"
    );
    Ok(())
}
