//! Loading one version: building its engine and checking the model file
//! against what config.toml declares.

use super::*;

/// A loaded model version, ready to hand to a scheduler.
#[derive(Debug, Clone)]
pub struct LoadedVersion {
    pub version: u64,
    pub engine: Arc<dyn Engine>,
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
        let mut engine = NativeEngine::load(path)?
            .with_threads(self.config.threads, self.config.instances)?
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
            self.config.instances,
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
            precision.native()
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
            EngineChoice::Auto => match self.load_native(version, &path, precision) {
                Ok(native) => Arc::new(native),
                Err(EngineError::Unsupported(native_reason)) => {
                    match self.load_onnxruntime(&path, precision) {
                        Ok(engine) => {
                            tracing::info!(model = %self.name, version, reason = %native_reason, "the native engine does not run this graph; using ONNX Runtime");
                            engine
                        }
                        Err(ort_error) => {
                            return Err(engine_error(EngineError::Unsupported(format!(
                                "no engine can serve it: native engine: {native_reason}; ONNX Runtime: {ort_error}"
                            ))));
                        }
                    }
                }
                Err(other) => return Err(engine_error(other)),
            },
        };
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
