//! Replays every fuzz target's corpus (fuzz/corpus/<target>/) and crash
//! files (fuzz/artifacts/<target>/) through the same entry points the
//! fuzz targets call (tickserve_server::fuzzing), so that CI, on the stable
//! toolchain and without libFuzzer, keeps every input the fuzzer found
//! from crashing again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_and_crash_file_decodes_without_panicking() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    for (target, run) in tickserve_server::fuzzing::TARGETS {
        let corpus = files(&fuzz.join("corpus").join(target));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{target} is empty: run scripts/fuzz.sh --seed"
        );
        for file in corpus
            .iter()
            .chain(&files(&fuzz.join("artifacts").join(target)))
        {
            let bytes = std::fs::read(file).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&bytes));
            assert!(outcome.is_ok(), "{target} panicked on {}", file.display());
        }
    }
}
