//! Model repositories for tests, each in a fresh temp folder: the bundled
//! model under any name, with the config.toml the test needs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::root;

/// A new empty folder under the system's temp folder, unique to this
/// process and call.
pub fn fresh_dir(prefix: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// A repository in a fresh temp folder holding the bundled model under
/// `name` (version 1) with the given config.toml.
pub fn repository_with(name: &str, config_toml: &str) -> PathBuf {
    let dir = fresh_dir("tickserve-test");
    std::fs::create_dir_all(dir.join(name)).unwrap();
    std::fs::write(dir.join(name).join("config.toml"), config_toml).unwrap();
    with_version(&dir, name, 1);
    dir
}

/// A repository like [`repository_with`]`(name, cnn_lstm_config(extra))`
/// that holds versions 1 and 2 and serves both (`version_policy = "all"`;
/// the default serves the latest only).
pub fn repository_with_two_versions(name: &str, extra: &str) -> PathBuf {
    let config_toml = cnn_lstm_config(extra).replace(
        "max_batch_size = 32",
        "max_batch_size = 32\nversion_policy = \"all\"",
    );
    let dir = repository_with(name, &config_toml);
    with_version(&dir, name, 2);
    dir
}

/// Adds the bundled model as `version` of `name` in `repository`.
pub fn with_version(repository: &Path, name: &str, version: u64) {
    let folder = repository.join(name).join(version.to_string());
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(
        root().join("models/cnn_lstm/1/model.onnx"),
        folder.join("model.onnx"),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", folder.display()));
}

/// The `[[input]]` and `[[output]]` tables of a config.toml: one FP32
/// input `input` and one FP32 output `output` with the given dims (TOML
/// arrays as string literals, e.g. `"[50, 60]"`). A macro, so that a
/// test's config can be a `const`.
#[macro_export]
macro_rules! signature_tables {
    ($input_dims:literal, $output_dims:literal) => {
        concat!(
            "[[input]]\nname = \"input\"\ndatatype = \"FP32\"\ndims = ",
            $input_dims,
            "\n[[output]]\nname = \"output\"\ndatatype = \"FP32\"\ndims = ",
            $output_dims,
            "\n",
        )
    };
}

/// The signature tables of the bundled model.
pub const CNN_LSTM_SIGNATURE: &str = signature_tables!("[50, 60]", "[3]");

/// config.toml of the bundled model with `extra` appended (batching,
/// cache and other sections).
pub fn cnn_lstm_config(extra: &str) -> String {
    format!("engine = \"native\"\nmax_batch_size = 32\n{CNN_LSTM_SIGNATURE}{extra}\n")
}

/// Waiting mode (`work_conserving = false`) with a 1 s queue delay and a
/// 10 s default timeout: a request alone in its queue waits there, so
/// others meet it. `queue` adds lines to `[dynamic_batching]` (a
/// `max_queue_size`). A section for [`cnn_lstm_config`].
pub fn waiting_batches(queue: &str) -> String {
    format!(
        "[dynamic_batching]\nmax_queue_delay = \"1s\"\nwork_conserving = false\n{queue}[dynamic_batching.priority.3]\ndefault_timeout = \"10s\"\n"
    )
}
