//! Triton's config.pbtxt, configuration from the model file alone, version
//! policies and the bad-input cases, on the bundled model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use tickserve_repository::{ConfigSource, EngineChoice, VersionPolicy, parse_pbtxt, scan};

use tickserve_test_support::root;

fn bundled() -> PathBuf {
    root().join("models/cnn_lstm/1/model.onnx")
}

/// An empty temporary repository.
fn empty_repo() -> PathBuf {
    tickserve_test_support::fresh_dir("tickserve-triton")
}

/// Model `name` in `repo` with the bundled model as each of `versions` and
/// the given files (name, contents) in the model folder.
fn add_model(repo: &Path, name: &str, versions: &[u64], files: &[(&str, &str)]) {
    for version in versions {
        let dir = repo.join(name).join(version.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(bundled(), dir.join("model.onnx")).unwrap();
    }
    for (file, text) in files {
        std::fs::write(repo.join(name).join(file), text).unwrap();
    }
}

const TRITON: &str = r#"
name: "cnn"
platform: "onnxruntime_onnx"
max_batch_size: 16
version_policy: { latest: { num_versions: 2 } }
input [
  {
    name: "input"
    data_type: TYPE_FP32
    dims: [ 50, 60 ]
  }
]
output [
  {
    name: "output"
    data_type: TYPE_FP32
    dims: [ 3 ]
    label_filename: "labels.txt"
  }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 500
  priority_levels: 3
  default_priority_level: 2
  default_queue_policy {
    default_timeout_microseconds: 100000
    allow_timeout_override: true
    max_queue_size: 64
  }
  priority_queue_policy {
    key: 1
    value: { timeout_action: DELAY, max_queue_size: 8 }
  }
}
instance_group [ { count: 2, kind: KIND_CPU } ]
optimization { input_pinned_memory { enable: true } }
parameters { key: "x" value: { string_value: "y" } }
response_cache { enable: true }
"#;

#[test]
fn a_triton_config_maps_onto_tickserve_and_lists_what_it_ignores() {
    let parsed = parse_pbtxt(TRITON).unwrap();
    let config = &parsed.config;
    assert_eq!(config.name.as_deref(), Some("cnn"));
    assert_eq!(config.max_batch_size, 16);
    assert_eq!(config.version_policy, VersionPolicy::Latest(2));
    assert_eq!(config.inputs[0].dims, vec![50, 60]);
    assert_eq!(config.inputs[0].datatype, "FP32");
    assert_eq!(config.outputs[0].dims, vec![3]);
    let batching = &config.dynamic_batching;
    assert_eq!(batching.max_queue_delay, Some(Duration::from_micros(500)));
    assert_eq!(batching.default_priority, 2);
    assert_eq!(batching.max_queue_size, 64);
    let level2 = &batching.priority["2"];
    assert_eq!(level2.default_timeout, Some(Duration::from_millis(100)));
    assert_eq!(level2.allow_timeout_override, Some(true));
    assert_eq!(batching.priority["1"].max_queue_size, Some(8));
    assert_eq!(config.instances, 2);
    assert!(config.cpu_only);
    assert_eq!(config.engine, EngineChoice::Auto);
    assert!(config.cache.enabled);
    assert_eq!(
        parsed.ignored,
        vec![
            "dynamic_batching.preferred_batch_size",
            "optimization",
            "output.label_filename",
            "parameters",
            "dynamic_batching.priority_queue_policy[1].timeout_action DELAY (tickserve rejects a request past its timeout)",
        ]
    );
}

#[test]
fn triton_defaults_apply_when_the_pbtxt_says_little() {
    let parsed = parse_pbtxt("platform: \"onnxruntime_onnx\"\n").unwrap();
    let config = &parsed.config;
    assert!(parsed.ignored.is_empty());
    assert_eq!(config.version_policy, VersionPolicy::Latest(1));
    assert!(config.inputs.is_empty() && config.outputs.is_empty());
    // No dynamic_batching: requests are not held back to form batches.
    assert_eq!(
        config.dynamic_batching.max_queue_delay,
        Some(Duration::ZERO)
    );
    // Triton caches a model's responses only when asked.
    assert!(!config.cache.enabled);
    let all = parse_pbtxt("backend: \"onnxruntime\"\nversion_policy: { all {} }").unwrap();
    assert_eq!(all.config.version_policy, VersionPolicy::All);
    let specific = parse_pbtxt("version_policy: { specific: { versions: [1, 3] } }").unwrap();
    assert_eq!(
        specific.config.version_policy,
        VersionPolicy::Specific(vec![1, 3])
    );
}

#[test]
fn a_triton_repository_loads_and_serves_the_model_signature() {
    let repo = empty_repo();
    add_model(&repo, "cnn", &[1, 2, 3], &[("config.pbtxt", TRITON)]);
    // Inputs and outputs left to the model.
    add_model(
        &repo,
        "plain",
        &[1],
        &[(
            "config.pbtxt",
            "backend: \"onnxruntime\"\nmax_batch_size: 4\n",
        )],
    );
    let models = scan(&repo).unwrap();
    assert_eq!(models[0].name, "cnn");
    assert_eq!(models[0].source, ConfigSource::Pbtxt);
    assert_eq!(models[0].versions, vec![1, 2, 3]);
    assert_eq!(models[0].served, vec![2, 3]);
    let loaded = models[0].load_version(3).unwrap();
    assert_eq!(loaded.signature.inputs[0].dims, vec![50, 60]);
    let plain = models[1].load_version(1).unwrap();
    assert_eq!(plain.signature.inputs[0].name, "input");
    assert_eq!(plain.signature.inputs[0].dims, vec![50, 60]);
    assert_eq!(plain.signature.outputs[0].dims, vec![3]);
    assert_eq!(models[1].config.max_batch_size, 4);
}

#[test]
fn a_folder_with_only_the_model_file_serves_with_its_signature_and_defaults() {
    let repo = empty_repo();
    add_model(&repo, "bare", &[1, 2], &[]);
    std::fs::create_dir_all(repo.join("not_a_model")).unwrap();
    let models = scan(&repo).unwrap();
    assert_eq!(models.len(), 1);
    let model = &models[0];
    assert_eq!(model.source, ConfigSource::Model);
    assert_eq!(model.served, vec![2]);
    assert_eq!(model.config.max_batch_size, 32);
    let loaded = model.load_version(2).unwrap();
    assert_eq!(loaded.signature, loaded.engine.signature().clone());
    assert_eq!(loaded.signature.inputs[0].dims, vec![50, 60]);
}

#[test]
fn reshape_serves_the_configured_dims_over_the_model_dims() {
    let repo = empty_repo();
    let pbtxt = r#"
max_batch_size: 8
input [{ name: "input" data_type: TYPE_FP32 dims: [3000] reshape: { shape: [50, 60] } }]
output [{ name: "output" data_type: TYPE_FP32 dims: [3] }]
"#;
    add_model(&repo, "flat", &[1], &[("config.pbtxt", pbtxt)]);
    let loaded = scan(&repo).unwrap()[0].load_version(1).unwrap();
    assert_eq!(loaded.signature.inputs[0].dims, vec![3000]);
    assert_eq!(loaded.engine.signature().inputs[0].dims, vec![50, 60]);
    // A reshape that is not the model's is a mismatch naming config.pbtxt.
    let repo = empty_repo();
    let wrong = pbtxt.replace("shape: [50, 60]", "shape: [60, 50]");
    add_model(&repo, "flat", &[1], &[("config.pbtxt", &wrong)]);
    let err = scan(&repo).unwrap()[0]
        .load_version(1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.pbtxt does not match") && err.contains("reshape [60, 50]"),
        "{err}"
    );
}

#[test]
fn version_policies_of_config_toml() {
    let toml = |policy: &str| {
        format!(
            "{policy}\n[[input]]\nname = \"input\"\ndatatype = \"FP32\"\ndims = [50, 60]\n[[output]]\nname = \"output\"\ndatatype = \"FP32\"\ndims = [3]\n"
        )
    };
    for (policy, served) in [
        ("", vec![3]),
        ("version_policy = \"all\"", vec![1, 2, 3]),
        ("version_policy = { latest = 2 }", vec![2, 3]),
        ("version_policy = { specific = [3, 1] }", vec![1, 3]),
    ] {
        let repo = empty_repo();
        add_model(&repo, "m", &[1, 2, 3], &[("config.toml", &toml(policy))]);
        assert_eq!(scan(&repo).unwrap()[0].served, served, "{policy}");
    }
    let repo = empty_repo();
    add_model(
        &repo,
        "m",
        &[1, 2],
        &[("config.toml", &toml("version_policy = { specific = [4] }"))],
    );
    let err = scan(&repo).unwrap_err().to_string();
    assert!(
        err.contains("config.toml") && err.contains("names version 4"),
        "{err}"
    );
    let repo = empty_repo();
    add_model(
        &repo,
        "m",
        &[1],
        &[("config.toml", &toml("version_policy = { latest = 0 }"))],
    );
    let err = scan(&repo).unwrap_err().to_string();
    assert!(err.contains("latest must be at least 1"), "{err}");
}

/// The error scanning a model whose config.pbtxt is `pbtxt`.
fn pbtxt_error(pbtxt: &str) -> String {
    let repo = empty_repo();
    add_model(&repo, "m", &[1], &[("config.pbtxt", pbtxt)]);
    let err = scan(&repo).unwrap_err().to_string();
    assert!(err.contains("m/config.pbtxt"), "names the file: {err}");
    err
}

#[test]
fn bad_triton_configs_are_refused_with_the_file_and_the_reason() {
    for (pbtxt, reason) in [
        (
            "max_batch_size: 8 input [",
            "not valid protobuf text format",
        ),
        ("max_batch_size: 8\nsome_field: 1\n", "some_field"),
        (
            "input [{ name: \"input\" data_type: TYPE_FLOAT dims: [1] }]",
            "TYPE_FLOAT",
        ),
        (
            "max_batch_size: 8\ninput [{ name: \"input\" data_type: TYPE_STRING dims: [1] }]",
            "has data_type TYPE_STRING; tickserve serves",
        ),
        (
            "max_batch_size: 8\ninput [{ name: \"input\" data_type: TYPE_FP32 dims: [-1, 60] }]",
            "variable (-1)",
        ),
        (
            "platform: \"tensorflow_savedmodel\"",
            "tickserve serves ONNX models",
        ),
        (
            "dynamic_batching { priority_levels: 9 }",
            "tickserve has 5 priority classes",
        ),
        ("name: \"other\"", "differs from its folder"),
        (
            "max_batch_size: 0\ninput [{ name: \"input\" data_type: TYPE_FP32 dims: [50, 60] }]",
            "max_batch_size 0",
        ),
    ] {
        let err = pbtxt_error(pbtxt);
        assert!(err.contains(reason), "{pbtxt:?}: {err}");
    }
}

#[test]
fn a_folder_with_both_formats_is_refused() {
    let repo = empty_repo();
    add_model(
        &repo,
        "m",
        &[1],
        &[("config.pbtxt", "max_batch_size: 4"), ("config.toml", "")],
    );
    let err = scan(&repo).unwrap_err().to_string();
    assert!(
        err.contains("holds both config.toml and config.pbtxt"),
        "{err}"
    );
}

#[test]
fn a_broken_model_file_fails_its_load_naming_the_file() {
    let repo = empty_repo();
    add_model(&repo, "m", &[1], &[]);
    std::fs::write(repo.join("m/1/model.onnx"), b"not an onnx file").unwrap();
    let err = scan(&repo).unwrap()[0]
        .load_version(1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("m/1/model.onnx"), "{err}");
}
