//! Repository scanning and the config-versus-model checks, on the bundled
//! model and the fixture variants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use tickserve_repository::{RepositoryError, scan};

use tickserve_test_support::{CNN_LSTM_SIGNATURE, root, signature_tables};

/// A repository with one model `name` whose version 1 is `model` and whose
/// config.toml is `config`.
fn repo(name: &str, model: &Path, config: &str) -> PathBuf {
    let dir = tickserve_test_support::fresh_dir("tickserve-repo");
    std::fs::create_dir_all(dir.join(name).join("1")).unwrap();
    std::fs::write(dir.join(name).join("config.toml"), config).unwrap();
    std::fs::copy(model, dir.join(name).join("1/model.onnx")).unwrap();
    dir
}

const VARIANT_A: &str = concat!("max_batch_size = 16\n", signature_tables!("[20, 8]", "[5]"));

#[test]
fn the_bundled_repository_loads_with_its_defaults() {
    let models = scan(&root().join("models")).unwrap();
    assert_eq!(models.len(), 1);
    let model = &models[0];
    assert_eq!(model.name, "cnn_lstm");
    assert_eq!(model.versions, vec![1]);
    assert_eq!(model.config.max_batch_size, 32);
    let batching = &model.config.dynamic_batching;
    // The bundled config spells out the seed's per-priority policy.
    assert_eq!(batching.max_queue_delay, None);
    assert_eq!(batching.max_queue_size, 1000);
    assert_eq!(batching.default_priority, 3);
    assert_eq!(
        batching.priority["1"].max_queue_delay,
        Some(std::time::Duration::from_millis(2))
    );
    assert_eq!(
        batching.priority["5"].default_timeout,
        Some(std::time::Duration::from_secs(10))
    );
    assert!(model.config.adaptive_batching.enabled);
    let loaded = model.load_version(1).unwrap();
    assert_eq!(loaded.engine.kind(), "native");
}

#[test]
fn a_variant_loads_with_a_matching_config_and_default_batching() {
    let dir = repo(
        "variant_a",
        &root().join("fixtures/models/variant_a/model.onnx"),
        VARIANT_A,
    );
    let models = scan(&dir).unwrap();
    assert_eq!(
        models[0].config.dynamic_batching,
        tickserve_repository::BatchingConfig::default()
    );
    let loaded = models[0].load_version(1).unwrap();
    assert_eq!(loaded.engine.signature().outputs[0].dims, vec![5]);
}

fn load_error(config: &str, model: &str) -> String {
    let dir = repo("m", &root().join(model), config);
    match scan(&dir) {
        Err(e) => e.to_string(),
        Ok(models) => models[0].load_version(1).unwrap_err().to_string(),
    }
}

#[test]
fn mismatches_between_config_and_model_are_named() {
    let a = "fixtures/models/variant_a/model.onnx";
    let err = load_error(&VARIANT_A.replace("dims = [20, 8]", "dims = [20, 9]"), a);
    assert!(
        err.contains("input 'input' has dims [20, 9] in config.toml but [20, 8] in the model"),
        "{err}"
    );
    let err = load_error(
        &VARIANT_A.replace("name = \"output\"", "name = \"signal\""),
        a,
    );
    assert!(err.contains("output 'signal' is not in the model"), "{err}");
    let err = load_error(
        &VARIANT_A.replacen("datatype = \"FP32\"", "datatype = \"FP64\"", 1),
        a,
    );
    assert!(
        err.contains("input 'input' is FP64 in config.toml but FP32 in the model"),
        "{err}"
    );
}

#[test]
fn invalid_configs_are_refused_with_the_reason() {
    let a = "fixtures/models/variant_a/model.onnx";
    let err = load_error(&VARIANT_A.replacen("FP32", "FLOAT", 1), a);
    assert!(err.contains("datatype 'FLOAT'"), "{err}");
    let err = load_error(&format!("max_queue_delay = \"5ms\"\n{VARIANT_A}"), a);
    assert!(err.contains("unknown field `max_queue_delay`"), "{err}");
    let err = load_error(
        &VARIANT_A.replace("max_batch_size = 16", "max_batch_size = 0"),
        a,
    );
    assert!(err.contains("max_batch_size must be at least 1"), "{err}");
    let err = load_error(&format!("name = \"other\"\n{VARIANT_A}"), a);
    assert!(
        err.contains("name 'other' differs from its folder 'm'"),
        "{err}"
    );
    let err = load_error(
        &format!("{VARIANT_A}[dynamic_batching]\ndefault_priority = 6\n"),
        a,
    );
    assert!(
        err.contains("default_priority is 6; expected 1 (highest) to 5"),
        "{err}"
    );
    let err = load_error(
        &format!("{VARIANT_A}[dynamic_batching.priority.0]\nmax_queue_size = 5\n"),
        a,
    );
    assert!(
        err.contains("[dynamic_batching.priority.0]: expected a priority level 1 to 5"),
        "{err}"
    );
    let err = load_error(
        &format!("{VARIANT_A}[dynamic_batching.priority.2]\ntimeout = \"1s\"\n"),
        a,
    );
    assert!(err.contains("unknown field `timeout`"), "{err}");
    let err = load_error(
        &format!("{VARIANT_A}[adaptive_batching]\nmin_batch_size = 17\n"),
        a,
    );
    assert!(
        err.contains("min_batch_size is 17; expected 1 to max_batch_size (16)"),
        "{err}"
    );
    let err = load_error(&format!("helper_spin = \"2s\"\n{VARIANT_A}"), a);
    assert!(err.contains("helper_spin is 2s; at most 1s"), "{err}");
    let err = load_error(&format!("{VARIANT_A}[[instance_group]]\nnice = 20\n"), a);
    assert!(
        err.contains("instance_group 1: nice 20; expected -20 (most favoured) to 19"),
        "{err}"
    );
}

#[test]
fn helper_spin_is_read_with_its_default_and_a_model_with_it_loads() {
    let a = root().join("fixtures/models/variant_a/model.onnx");
    let models = scan(&repo("variant_a", &a, VARIANT_A)).unwrap();
    assert_eq!(
        models[0].config.helper_spin,
        tickserve_engine_native::DEFAULT_HELPER_SPIN
    );
    let config = format!("engine = \"native\"\nthreads = 2\nhelper_spin = \"250us\"\n{VARIANT_A}");
    let models = scan(&repo("variant_a", &a, &config)).unwrap();
    assert_eq!(
        models[0].config.helper_spin,
        std::time::Duration::from_micros(250)
    );
    let loaded = models[0].load_version(1).unwrap();
    assert!(loaded.engine.variant().starts_with("native/"));
}

#[test]
fn the_native_engine_refuses_a_model_outside_the_family() {
    let err = load_error(
        &format!("engine = \"native\"\n{VARIANT_A}"),
        "fixtures/models/unsupported/model.onnx",
    );
    assert!(err.contains("GRU"), "{err}");
}

/// `engine = "auto"` falls back to ONNX Runtime for a graph the native
/// engine refuses, or names both reasons when ONNX Runtime is missing.
#[test]
fn auto_picks_onnxruntime_for_other_graphs_or_names_both_reasons() {
    let dir = repo(
        "m",
        &root().join("fixtures/models/unsupported/model.onnx"),
        VARIANT_A,
    );
    let result = scan(&dir).unwrap()[0].load_version(1);
    match tickserve_engine_ort::is_available() {
        Ok(()) => assert_eq!(result.unwrap().engine.kind(), "onnxruntime"),
        Err(ort_reason) => {
            assert!(
                std::env::var_os("TICKSERVE_REQUIRE_ORT").is_none(),
                "{ort_reason}"
            );
            let err = result.unwrap_err().to_string();
            assert!(
                err.contains("native engine:") && err.contains("GRU"),
                "{err}"
            );
            assert!(
                err.contains("ONNX Runtime:") && err.contains("ORT_DYLIB_PATH"),
                "{err}"
            );
        }
    }
}

#[test]
fn engine_onnxruntime_runs_the_reference_model_or_says_why_not() {
    let dir = repo(
        "m",
        &root().join("models/cnn_lstm/1/model.onnx"),
        &format!(
            "engine = \"onnxruntime\"\n{}",
            VARIANT_A
                .replace("[20, 8]", "[50, 60]")
                .replace("[5]", "[3]")
        ),
    );
    let result = scan(&dir).unwrap()[0].load_version(1);
    match tickserve_engine_ort::is_available() {
        Ok(()) => assert_eq!(result.unwrap().engine.kind(), "onnxruntime"),
        Err(_) => {
            assert!(std::env::var_os("TICKSERVE_REQUIRE_ORT").is_none());
            let err = result.unwrap_err().to_string();
            assert!(err.contains("ORT_DYLIB_PATH"), "{err}");
        }
    }
}

#[test]
fn empty_repositories_and_models_without_versions_are_refused() {
    let dir = tickserve_test_support::fresh_dir("tickserve-empty");
    assert!(matches!(scan(&dir), Err(RepositoryError::Empty(_))));
    std::fs::create_dir_all(dir.join("m")).unwrap();
    std::fs::write(dir.join("m/config.toml"), VARIANT_A).unwrap();
    let err = scan(&dir).unwrap_err().to_string();
    assert!(err.contains("no version folders"), "{err}");
}

#[test]
fn precision_is_applied_by_the_native_engine_and_refused_for_onnxruntime() {
    let a = root().join("fixtures/models/variant_a/model.onnx");
    for (precision, variant) in [
        ("fp32", "native/fp32"),
        ("bf16", "native/bf16"),
        ("int8", "native/int8"),
    ] {
        let dir = repo(
            "m",
            &a,
            &format!("engine = \"native\"\nprecision = \"{precision}\"\n{VARIANT_A}"),
        );
        let loaded = scan(&dir).unwrap()[0].load_version(1).unwrap();
        assert_eq!(loaded.engine.variant(), variant);
    }
    let dir = repo("m", &a, &format!("engine = \"native\"\n{VARIANT_A}"));
    let loaded = scan(&dir).unwrap()[0].load_version(1).unwrap();
    assert_eq!(
        loaded.engine.variant(),
        "native/fp32",
        "fp32 is the default"
    );
    let err = load_error(
        &format!("engine = \"onnxruntime\"\nprecision = \"int8\"\n{VARIANT_A}"),
        "fixtures/models/variant_a/model.onnx",
    );
    assert!(err.contains("native engine only"), "{err}");
    let err = load_error(
        &format!("precision = \"fp16\"\n{VARIANT_A}"),
        "fixtures/models/variant_a/model.onnx",
    );
    assert!(err.contains("fp16"), "{err}");
}

#[test]
fn static_int8_calibrates_on_the_configured_file() {
    let config = format!(
        "precision = \"int8\"\n{CNN_LSTM_SIGNATURE}\n[quantization]\nactivations = \"static\"\ncalibration = \"calibration.npy\"\nmethod = \"percentile\"\npercentile = 99.999\n"
    );
    let dir = repo("m", &root().join("models/cnn_lstm/1/model.onnx"), &config);
    std::fs::copy(
        root().join("models/cnn_lstm/calibration.npy"),
        dir.join("m/calibration.npy"),
    )
    .unwrap();
    let models = scan(&dir).unwrap();
    let loaded = models[0].load_version(1).unwrap();
    assert_eq!(loaded.engine.variant(), "native/int8-static");
    // Relative to the model folder: without the file there, loading says
    // which file it could not read.
    std::fs::remove_file(dir.join("m/calibration.npy")).unwrap();
    let err = models[0].load_version(1).unwrap_err().to_string();
    assert!(
        err.contains("cannot read calibration file") && err.contains("m/calibration.npy"),
        "{err}"
    );
}

#[test]
fn static_int8_options_are_checked_when_the_config_is_read() {
    let model = "models/cnn_lstm/1/model.onnx";
    let err = load_error(
        &format!(
            "{CNN_LSTM_SIGNATURE}\n[quantization]\nactivations = \"static\"\ncalibration = \"c.npy\"\n"
        ),
        model,
    );
    assert!(err.contains("needs precision = \"int8\""), "{err}");
    let err = load_error(
        &format!(
            "precision = \"int8\"\n{CNN_LSTM_SIGNATURE}\n[quantization]\nactivations = \"static\"\n"
        ),
        model,
    );
    assert!(err.contains("needs calibration"), "{err}");
    let err = load_error(
        &format!("precision = \"int8\"\n{CNN_LSTM_SIGNATURE}\n[quantization]\npercentile = 120\n"),
        model,
    );
    assert!(err.contains("outside [50, 100]"), "{err}");
    let err = load_error(
        &format!(
            "precision = \"int8\"\n{CNN_LSTM_SIGNATURE}\n[quantization]\nmethod = \"entropy\"\n"
        ),
        model,
    );
    assert!(err.contains("entropy"), "{err}");
}

#[test]
fn a_qdq_model_runs_with_its_own_quantisation() {
    let model = root().join("fixtures/models/cnn_lstm_qdq/model.onnx");
    for precision in ["fp32", "int8"] {
        let dir = repo(
            "m",
            &model,
            &format!("precision = \"{precision}\"\n{CNN_LSTM_SIGNATURE}"),
        );
        let loaded = scan(&dir).unwrap()[0].load_version(1).unwrap();
        assert_eq!(loaded.engine.variant(), "native/int8-qdq");
    }
    let err = load_error(
        &format!("precision = \"bf16\"\n{CNN_LSTM_SIGNATURE}"),
        "fixtures/models/cnn_lstm_qdq/model.onnx",
    );
    assert!(err.contains("its own int8 quantisation"), "{err}");
}

#[test]
fn a_version_toml_overrides_the_precision_of_its_version_only() {
    let a = root().join("fixtures/models/variant_a/model.onnx");
    // The native engine's precisions (engine "auto" would take a GPU).
    let dir = repo("m", &a, &format!("engine = \"native\"\n{VARIANT_A}"));
    std::fs::create_dir_all(dir.join("m/2")).unwrap();
    std::fs::copy(&a, dir.join("m/2/model.onnx")).unwrap();
    std::fs::write(dir.join("m/2/version.toml"), "precision = \"int8\"\n").unwrap();
    let model = &scan(&dir).unwrap()[0];
    assert_eq!(model.versions, vec![1, 2]);
    assert_eq!(
        model.precision_of(1),
        tickserve_repository::PrecisionChoice::Fp32
    );
    assert_eq!(
        model.precision_of(2),
        tickserve_repository::PrecisionChoice::Int8
    );
    assert_eq!(
        model.load_version(1).unwrap().engine.variant(),
        "native/fp32"
    );
    assert_eq!(
        model.load_version(2).unwrap().engine.variant(),
        "native/int8"
    );

    // An empty version.toml changes nothing.
    std::fs::write(dir.join("m/2/version.toml"), "").unwrap();
    let model = &scan(&dir).unwrap()[0];
    assert_eq!(
        model.load_version(2).unwrap().engine.variant(),
        "native/fp32"
    );

    // A version.toml that cannot apply fails the scan, naming the file.
    std::fs::write(dir.join("m/2/version.toml"), "threads = 4\n").unwrap();
    let err = scan(&dir).unwrap_err().to_string();
    assert!(
        err.contains("2/version.toml") && err.contains("threads"),
        "{err}"
    );
    std::fs::write(dir.join("m/2/version.toml"), "precision = \"fp8\"\n").unwrap();
    let err = scan(&dir).unwrap_err().to_string();
    assert!(err.contains("fp8"), "{err}");

    // ONNX Runtime refuses a reduced precision given per version too.
    let dir = repo("m", &a, &format!("engine = \"onnxruntime\"\n{VARIANT_A}"));
    std::fs::write(dir.join("m/1/version.toml"), "precision = \"bf16\"\n").unwrap();
    let err = scan(&dir).unwrap()[0]
        .load_version(1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("native engine only"), "{err}");
}

#[test]
fn a_version_toml_may_carry_static_quantisation_with_its_own_calibration() {
    let model = root().join("models/cnn_lstm/1/model.onnx");
    // The model itself runs fp32 with dynamic int8 options.
    let dir = repo(
        "m",
        &model,
        &format!("engine = \"native\"\n{CNN_LSTM_SIGNATURE}"),
    );
    std::fs::create_dir_all(dir.join("m/2")).unwrap();
    std::fs::copy(&model, dir.join("m/2/model.onnx")).unwrap();
    let version_toml = dir.join("m/2/version.toml");
    std::fs::write(
        &version_toml,
        "precision = \"int8\"\n[quantization]\nactivations = \"static\"\ncalibration = \"calibration.npy\"\nmethod = \"percentile\"\npercentile = 99.99\n",
    )
    .unwrap();
    // Relative to the version folder: absent there, loading names the file.
    let models = scan(&dir).unwrap();
    let err = models[0].load_version(2).unwrap_err().to_string();
    assert!(
        err.contains("cannot read calibration file") && err.contains("m/2/calibration.npy"),
        "{err}"
    );
    std::fs::copy(
        root().join("models/cnn_lstm/calibration.npy"),
        dir.join("m/2/calibration.npy"),
    )
    .unwrap();
    let models = scan(&dir).unwrap();
    let (quantization, base) = models[0].quantization_of(2);
    assert_eq!(base, dir.join("m/2"));
    assert_eq!(quantization.percentile, 99.99);
    assert_eq!(
        models[0].load_version(2).unwrap().engine.variant(),
        "native/int8-static"
    );
    // Version 1 keeps the model's settings.
    assert_eq!(
        models[0].load_version(1).unwrap().engine.variant(),
        "native/fp32"
    );

    // config.toml's rules, with the version's precision; errors name the
    // version.toml.
    for (text, reason) in [
        (
            "[quantization]\nactivations = \"static\"\ncalibration = \"calibration.npy\"\n",
            "needs precision = \"int8\"",
        ),
        (
            "precision = \"int8\"\n[quantization]\nactivations = \"static\"\n",
            "relative to the version folder",
        ),
        (
            "precision = \"int8\"\n[quantization]\npercentile = 20\n",
            "outside [50, 100]",
        ),
        (
            "precision = \"int8\"\n[quantization]\nmethod = \"entropy\"\n",
            "entropy",
        ),
    ] {
        std::fs::write(&version_toml, text).unwrap();
        let err = scan(&dir).unwrap_err().to_string();
        assert!(
            err.contains("m/2/version.toml") && err.contains(reason),
            "{text}: {err}"
        );
    }
    // The model's precision counts when the version sets none.
    let dir = repo(
        "m",
        &model,
        &format!("precision = \"int8\"\n{CNN_LSTM_SIGNATURE}"),
    );
    std::fs::write(
        dir.join("m/1/version.toml"),
        "[quantization]\nactivations = \"static\"\ncalibration = \"c.npy\"\n",
    )
    .unwrap();
    std::fs::copy(
        root().join("models/cnn_lstm/calibration.npy"),
        dir.join("m/1/c.npy"),
    )
    .unwrap();
    assert_eq!(
        scan(&dir).unwrap()[0]
            .load_version(1)
            .unwrap()
            .engine
            .variant(),
        "native/int8-static"
    );
}

#[test]
fn engine_cuda_runs_the_variant_or_names_what_is_missing() {
    let dir = repo(
        "m",
        &root().join("fixtures/models/variant_a/model.onnx"),
        &format!("engine = \"cuda\"\ndevice = 0\ngpu_memory_fraction = 0.5\n{VARIANT_A}"),
    );
    let result = scan(&dir).unwrap()[0].load_version(1);
    match tickserve_engine_cuda::probe(0) {
        Ok(()) => assert_eq!(result.unwrap().engine.kind(), "cuda"),
        Err(missing) => {
            assert!(
                !tickserve_engine_cuda::cuda_required(),
                "TICKSERVE_REQUIRE_CUDA=1 but {missing}"
            );
            println!("SKIPPED the CUDA half of this test: {missing}");
            let err = result.unwrap_err().to_string();
            assert!(err.contains("CUDA engine"), "{err}");
            assert!(err.contains(&missing.to_string()), "{err}");
        }
    }
}

#[test]
fn engine_auto_without_a_gpu_uses_the_cpu_engines() {
    if tickserve_engine_cuda::probe(0).is_ok() {
        println!("SKIPPED engine_auto_without_a_gpu_uses_the_cpu_engines: this machine has a GPU");
        return;
    }
    let dir = repo(
        "m",
        &root().join("fixtures/models/variant_a/model.onnx"),
        &format!("engine = \"auto\"\n{VARIANT_A}"),
    );
    let loaded = scan(&dir).unwrap()[0].load_version(1).unwrap();
    assert_eq!(loaded.engine.kind(), "native");
}

#[test]
fn gpu_options_are_checked_and_tf32_is_refused_on_the_cpu() {
    let err = load_error(
        &format!("gpu_memory_fraction = 1.5\n{VARIANT_A}"),
        "fixtures/models/variant_a/model.onnx",
    );
    assert!(err.contains("gpu_memory_fraction"), "{err}");
    let err = load_error(
        &format!("engine = \"native\"\nprecision = \"tf32\"\n{VARIANT_A}"),
        "fixtures/models/variant_a/model.onnx",
    );
    assert!(err.contains("tf32"), "{err}");
}
