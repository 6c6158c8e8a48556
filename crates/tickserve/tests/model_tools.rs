//! `tickserve model prune` and `tickserve model optimize` as a user runs
//! them: the real binary on a temporary copy of the bundled repository,
//! and the versions it writes loaded back through the repository, as
//! `tickserve serve` loads them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tickserve_test_support::root;

/// A copy of the bundled repository (config.toml and version 1).
fn repository() -> PathBuf {
    let dir = tickserve_test_support::fresh_dir("tickserve-model-tools");
    let model = dir.join("cnn_lstm");
    std::fs::create_dir_all(model.join("1")).unwrap();
    let source = root().join("models/cnn_lstm");
    std::fs::copy(source.join("config.toml"), model.join("config.toml")).unwrap();
    std::fs::copy(source.join("1/model.onnx"), model.join("1/model.onnx")).unwrap();
    dir
}

fn tickserve(repo: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tickserve"))
        .current_dir(root())
        .arg("model")
        .args(args)
        .args(["cnn_lstm", "--model-repository", repo.to_str().unwrap()])
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// The cells of a table line: columns are separated by two or more spaces.
fn cells(line: &str) -> Vec<String> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect()
}

/// The table row whose first cell is `first`.
fn row(text: &str, first: &str) -> Vec<String> {
    text.lines()
        .map(cells)
        .find(|c| c.first().map(String::as_str) == Some(first))
        .unwrap_or_else(|| panic!("no row '{first}' in\n{text}"))
}

/// `tickserve optimize` on `repo`, measuring `variants` for `seconds` each,
/// with `extra` arguments.
fn optimize(repo: &Path, variants: &str, seconds: &str, extra: &[&str]) -> Output {
    let args = [
        &["optimize", "--variants", variants, "--seconds", seconds][..],
        extra,
    ]
    .concat();
    tickserve(repo, &args)
}

/// The standard error of a command that must have failed.
fn failure(output: &Output) -> String {
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts that the version.toml of `version` holds each of `lines`.
fn assert_version_toml(repo: &Path, version: u64, lines: &[&str]) {
    let path = repo.join(format!("cnn_lstm/{version}/version.toml"));
    let version_toml = std::fs::read_to_string(path).unwrap();
    for line in lines {
        assert!(version_toml.contains(line), "{line}:\n{version_toml}");
    }
}

fn variant_of(repo: &Path, version: u64) -> String {
    let models = tickserve_repository::scan(repo).unwrap();
    models[0].load_version(version).unwrap().engine.variant()
}

#[test]
fn prune_writes_a_narrower_version_and_leaves_the_source_alone() {
    let repo = repository();
    let source = std::fs::read(repo.join("cnn_lstm/1/model.onnx")).unwrap();
    let text = stdout(&tickserve(&repo, &["prune", "--channels", "0.25"]));
    assert!(text.contains("into version 2"), "{text}");
    assert!(text.contains("l1=0.30,channels=0.25"), "{text}");
    // conv.0 loses 16 of its 64 output channels; conv.2 its inputs and 16
    // outputs; the LSTM's input weights their 16 columns.
    let conv0 = row(&text, "Conv node '/conv/conv.0/Conv'");
    assert_eq!(
        conv0[1..5],
        ["conv.0.weight", "[64, 60, 3]", "[48, 60, 3]", "16"]
    );
    // 30 % of the 48·60·3 weights left.
    assert_eq!(conv0[5], "2592/8640");
    let conv2 = row(&text, "Conv node '/conv/conv.2/Conv'");
    assert_eq!(conv2[2..5], ["[64, 64, 3]", "[48, 48, 3]", "16"]);
    let lstm = row(&text, "LSTM node '/rnn/LSTM'");
    assert_eq!(lstm[2..5], ["[1, 512, 64]", "[1, 512, 48]", "0"]);
    assert_eq!(
        std::fs::read(repo.join("cnn_lstm/1/model.onnx")).unwrap(),
        source
    );
    assert!(!repo.join("cnn_lstm/2/version.toml").exists());
    assert_eq!(
        variant_of(&repo, 2),
        "native/fp32+pruned(l1=0.30,channels=0.25)"
    );
    assert_eq!(variant_of(&repo, 1), "native/fp32");

    // An explicit version number; an existing one is refused.
    let json = stdout(&tickserve(
        &repo,
        &[
            "prune",
            "--sparsity",
            "0",
            "--model-version",
            "1",
            "--output-version",
            "7",
            "--json",
        ],
    ));
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["written"]["version"], 7);
    assert_eq!(json["record"], "l1=0.00,channels=0.00");
    let again = tickserve(&repo, &["prune", "--output-version", "7"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{again:?}"
    );
    std::fs::remove_dir_all(&repo).unwrap();
}

#[test]
fn optimize_prints_a_table_and_writes_a_loadable_version() {
    let repo = repository();
    let text = stdout(&optimize(
        &repo,
        "fp32,bf16,int8,pruned",
        "0.05",
        &[
            "--channels",
            "0.25",
            "--write",
            "int8",
            "--max-abs-error",
            "0.05",
        ],
    ));
    let lines: Vec<&str> = text.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.starts_with("variant  "))
        .unwrap_or_else(|| panic!("no table header in\n{text}"));
    for column in [
        "samples/s b=1",
        "samples/s b=32",
        "max abs vs fp32",
        "mean abs vs fp32",
        "argmax vs fp32",
        "pearson vs fp32",
    ] {
        assert!(lines[header].contains(column), "{column} missing:\n{text}");
    }
    let columns = cells(lines[header]);
    assert_eq!(columns.len(), 9, "{columns:?}");
    // fp32 against itself: no error, full agreement, r = 1.
    let fp32 = row(&text, "fp32");
    assert_eq!(fp32.len(), 9, "{fp32:?}");
    assert_eq!(fp32[1], "native/fp32");
    assert_eq!(fp32[5..8], ["0.00e0", "0.00e0", "100.0 %"]);
    assert_eq!(fp32[8], "1.00000 1.00000 1.00000");
    for (name, variant) in [
        ("bf16", "native/bf16"),
        ("int8", "native/int8"),
        ("pruned", "native/fp32+pruned(l1=0.30,channels=0.25)"),
    ] {
        let cells = row(&text, name);
        assert_eq!(cells[1], variant);
        let samples_per_second: f64 = cells[3].parse().unwrap();
        assert!(samples_per_second > 0.0, "{cells:?}");
        let max_abs: f64 = cells[5].parse().unwrap();
        assert!(max_abs > 0.0, "{cells:?}");
    }
    // Channel pruning lowers the FLOPs per sample.
    let flops = |name: &str| row(&text, name)[2].parse::<f64>().unwrap();
    assert!(flops("pruned") < flops("fp32"));
    // The golden outputs are the reference by default.
    assert!(text.contains("against the reference outputs"), "{text}");
    assert!(text.contains("wrote cnn_lstm version 2"), "{text}");
    assert_version_toml(&repo, 2, &["precision = \"int8\""]);
    assert_eq!(variant_of(&repo, 2), "native/int8");
    assert_eq!(variant_of(&repo, 1), "native/fp32");
    std::fs::remove_dir_all(&repo).unwrap();
}

#[test]
fn optimize_refuses_to_write_a_variant_above_the_error_bound() {
    let repo = repository();
    let output = optimize(
        &repo,
        "fp32",
        "0.02",
        &["--write", "int8", "--max-abs-error", "1e-6"],
    );
    let stderr = failure(&output);
    assert!(
        stderr.contains("refusing to write variant 'int8'")
            && stderr.contains("above --max-abs-error 1e-6"),
        "{stderr}"
    );
    // The table that explains the refusal is printed, int8 included.
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("native/int8"), "{text}");
    assert!(!repo.join("cnn_lstm/2").exists());

    // --write without a bound is a usage error.
    let output = tickserve(&repo, &["optimize", "--write", "int8"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--max-abs-error"));
    std::fs::remove_dir_all(&repo).unwrap();
}

#[test]
fn optimize_reports_json_with_regression_outputs_on_a_custom_validation_set() {
    let repo = repository();
    let inputs = root().join("fixtures/golden/cnn_lstm/input.npy");
    let json = stdout(&optimize(
        &repo,
        "fp32,bf16",
        "0.02",
        &[
            "--inputs",
            inputs.to_str().unwrap(),
            "--task",
            "regression",
            "--batch-sizes",
            "1,4",
            "--json",
        ],
    ));
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["rows"], 64);
    assert_eq!(report["task"], "regression");
    assert!(report["reference"].is_null());
    let variants = report["variants"].as_array().unwrap();
    assert_eq!(variants.len(), 2);
    let bf16 = &variants[1];
    assert_eq!(bf16["engine_variant"], "native/bf16");
    assert!(bf16["vs_fp32"]["argmax_agreement"].is_null());
    let pearson = bf16["vs_fp32"]["pearson"].as_array().unwrap();
    assert_eq!(pearson.len(), 3);
    assert!(pearson.iter().all(|r| r.as_f64().unwrap() > 0.99));
    let max = bf16["vs_fp32"]["max_abs_error"].as_f64().unwrap();
    assert!(max > 0.0 && max < 0.05, "{max}");
    let throughput = bf16["throughput"].as_array().unwrap();
    assert_eq!(throughput[1]["batch"], 4);
    assert!(throughput[1]["samples_per_second"].as_f64().unwrap() > 0.0);
    assert!(report["written"].is_null());
    std::fs::remove_dir_all(&repo).unwrap();
}

#[test]
fn optimize_writes_int8_static_calibrated_as_measured() {
    let repo = repository();
    // The model's configured calibration file is the default.
    std::fs::copy(
        root().join("models/cnn_lstm/calibration.npy"),
        repo.join("cnn_lstm/calibration.npy"),
    )
    .unwrap();
    let text = stdout(&optimize(
        &repo,
        "fp32,int8-static",
        "0.05",
        &["--write", "int8-static", "--max-abs-error", "2e-2"],
    ));
    assert!(
        text.contains("int8-static calibrated on")
            && text.contains("cnn_lstm/calibration.npy (")
            && text.contains("minmax)"),
        "{text}"
    );
    let cells = row(&text, "int8-static");
    assert_eq!(cells[1], "native/int8-static");
    let max_abs: f64 = cells[5].parse().unwrap();
    assert!(max_abs > 0.0 && max_abs <= 2e-2, "{cells:?}");
    assert!(
        text.contains("wrote cnn_lstm version 2") && text.contains("loads as native/int8-static"),
        "{text}"
    );
    assert_version_toml(
        &repo,
        2,
        &[
            "precision = \"int8\"",
            "[quantization]",
            "activations = \"static\"",
            "calibration = \"calibration.npy\"",
            "method = \"minmax\"",
        ],
    );
    // The calibration set travels with the version.
    assert_eq!(
        std::fs::read(repo.join("cnn_lstm/2/calibration.npy")).unwrap(),
        std::fs::read(root().join("models/cnn_lstm/calibration.npy")).unwrap()
    );
    assert_eq!(variant_of(&repo, 2), "native/int8-static");
    // Served as measured: the written version's error against version 1
    // on the validation set is the one the table printed.
    let models = tickserve_repository::scan(&repo).unwrap();
    let inputs =
        tickserve_model_tools::npy::read(&root().join("fixtures/golden/cnn_lstm/input.npy"))
            .unwrap();
    let out = |version| {
        let loaded = models[0].load_version(version).unwrap();
        tickserve_model_tools::optimize::outputs(loaded.engine.as_ref(), &inputs).unwrap()
    };
    let accuracy = tickserve_model_tools::optimize::accuracy(&out(2), &out(1), 3, true);
    assert_eq!(format!("{:.2e}", accuracy.max_abs_error), cells[5]);
    assert_eq!(format!("{:.2e}", accuracy.mean_abs_error), cells[6]);
    // A version pruned from it keeps its calibration.
    let text = stdout(&tickserve(&repo, &["prune", "--model-version", "2"]));
    assert!(text.contains("into version 3"), "{text}");
    assert!(repo.join("cnn_lstm/3/calibration.npy").is_file());
    assert_eq!(
        variant_of(&repo, 3),
        "native/int8-static+pruned(l1=0.30,channels=0.00)"
    );

    // With the model itself configured static, a dynamic int8 version says
    // so in its version.toml and loads as dynamic int8.
    let config_path = repo.join("cnn_lstm/config.toml");
    let config = std::fs::read_to_string(&config_path)
        .unwrap()
        .replace("precision = \"fp32\"", "precision = \"int8\"")
        .replace("activations = \"dynamic\"", "activations = \"static\"");
    std::fs::write(&config_path, config).unwrap();
    assert_eq!(variant_of(&repo, 1), "native/int8-static");
    let text = stdout(&optimize(
        &repo,
        "int8",
        "0.02",
        &[
            "--model-version",
            "1",
            "--write",
            "int8",
            "--max-abs-error",
            "2e-2",
        ],
    ));
    assert!(text.contains("loads as native/int8\n"), "{text}");
    assert_version_toml(&repo, 4, &["activations = \"dynamic\""]);
    std::fs::remove_dir_all(&repo).unwrap();
}

#[test]
fn optimize_refuses_int8_static_without_calibration_inputs() {
    // The copy has config.toml's `calibration = "calibration.npy"` but not
    // the file: int8-static is refused before anything is measured.
    let repo = repository();
    let output = optimize(&repo, "fp32,int8-static", "0.02", &[]);
    let stderr = failure(&output);
    assert!(
        stderr.contains("give --calibration <NPY>")
            && stderr.contains("not the validation set")
            && stderr.contains("cnn_lstm/calibration.npy does not exist"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "{output:?}");

    // --calibration names the file; the method and percentile flags
    // override the model's.
    let calibration = root().join("models/cnn_lstm/calibration.npy");
    let json = stdout(&optimize(
        &repo,
        "int8-static,pruned+int8-static",
        "0.02",
        &[
            "--calibration",
            calibration.to_str().unwrap(),
            "--calibration-method",
            "percentile",
            "--percentile",
            "99.9",
            "--json",
        ],
    ));
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    let record = report["calibration"].as_str().unwrap();
    assert!(record.ends_with("samples, percentile 99.9)"), "{record}");
    assert_eq!(
        report["variants"][0]["engine_variant"],
        "native/int8-static"
    );
    assert_eq!(report["variants"][1]["name"], "pruned+int8-static");
    std::fs::remove_dir_all(&repo).unwrap();
}
