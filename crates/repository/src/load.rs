//! Loading one version: the engine the config chooses (or `auto`'s
//! choice), its precision and int8 options, then a check that what the
//! model file declares matches what the config promises, so clients are
//! never told one shape and served another.

use std::path::Path;
use std::sync::Arc;

use tickserve_engine::{Engine, EngineError, Signature, TensorSpec};
use tickserve_engine_native::{Calibration, NativeEngine};

use crate::config::{ActivationsChoice, EngineChoice, PrecisionChoice, TensorConfig};
use crate::{MODEL_FILE, ModelEntry, RepositoryError};

/// A loaded model version, ready to hand to a scheduler.
#[derive(Debug, Clone)]
pub struct LoadedVersion {
    pub version: u64,
    pub engine: Arc<dyn Engine>,
    /// What clients send and receive: the engine's inputs and outputs, in
    /// the engine's order, with the configured `dims` where a `reshape`
    /// makes them differ from the model file's. A configuration without
    /// inputs or outputs (config.pbtxt or none) takes the model's.
    pub signature: Signature,
}

impl ModelEntry {
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
            file: path.clone(),
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
            EngineChoice::Auto => match (!self.config.cpu_only)
                .then(|| self.try_auto_cuda(version, &path, precision))
                .flatten()
            {
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
        let file = self.source.as_str();
        let check = |kind: &str, config: &[TensorConfig], actual: &[TensorSpec]| {
            complete_tensors(kind, file, config, actual).map_err(|reason| {
                RepositoryError::Mismatch {
                    model: self.name.clone(),
                    version,
                    file,
                    reason,
                }
            })
        };
        let signature = Signature {
            inputs: check("input", &self.config.inputs, &signature.inputs)?,
            outputs: check("output", &self.config.outputs, &signature.outputs)?,
        };
        Ok(LoadedVersion {
            version,
            engine,
            signature,
        })
    }
}

/// The tensors clients see: the model's when the configuration declares
/// none, else the declared ones after checking them against the model.
fn complete_tensors(
    kind: &str,
    file: &str,
    config: &[TensorConfig],
    actual: &[TensorSpec],
) -> Result<Vec<TensorSpec>, String> {
    if config.is_empty() {
        return Ok(actual.to_vec());
    }
    check_tensors(kind, file, config, actual)?;
    Ok(actual
        .iter()
        .map(|spec| {
            let declared = config.iter().find(|c| c.name == spec.name);
            TensorSpec {
                dims: declared.map_or_else(|| spec.dims.clone(), |c| c.dims.clone()),
                ..spec.clone()
            }
        })
        .collect())
}

fn check_tensors(
    kind: &str,
    file: &str,
    config: &[TensorConfig],
    actual: &[TensorSpec],
) -> Result<(), String> {
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
                "{kind} '{}' is {} in {file} but {} in the model",
                declared.name, declared.datatype, found.datatype
            ));
        }
        if found.dims != declared.model_dims() {
            return Err(format!(
                "{kind} '{}' has {} {:?} in {file} but {:?} in the model",
                declared.name,
                if declared.reshape.is_some() {
                    "reshape"
                } else {
                    "dims"
                },
                declared.model_dims(),
                found.dims
            ));
        }
    }
    if let Some(missing) = actual
        .iter()
        .find(|a| !config.iter().any(|c| c.name == a.name))
    {
        return Err(format!(
            "the model's {kind} '{}' is not declared in {file}",
            missing.name
        ));
    }
    Ok(())
}
