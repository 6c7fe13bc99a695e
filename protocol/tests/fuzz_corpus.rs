//! Replays the fuzzers' saved inputs on stable, as part of `cargo test`:
//! every file of `protocol/fuzz/corpus/<target>/` (the minimized corpus
//! `cargo fuzz cmin` left) and of `protocol/fuzz/regressions/<target>/`
//! (inputs that once failed), through the same `fuzzing::<target>` checks
//! the cargo-fuzz targets run. A missing or empty corpus fails, so a lost
//! corpus is noticed.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use odissey_protocol::fuzzing::{Target, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted; none if it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every file through the target; a failure names the file.
fn replay(target: &Target, files: &[PathBuf]) {
    for path in files {
        let data = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| (target.run)(&data))).is_err() {
            panic!(
                "{} failed on {} (reproduce: cargo +nightly fuzz run {} {})",
                target.name,
                path.display(),
                target.name,
                path.display()
            );
        }
    }
}

#[test]
fn corpora_replay_clean() {
    for target in TARGETS {
        let dir = fuzz_dir().join("corpus").join(target.name);
        let corpus = files(&dir);
        assert!(
            !corpus.is_empty(),
            "no corpus for fuzz target {} in {}",
            target.name,
            dir.display()
        );
        replay(target, &corpus);
    }
}

#[test]
fn regressions_replay_clean() {
    for target in TARGETS {
        replay(
            target,
            &files(&fuzz_dir().join("regressions").join(target.name)),
        );
    }
}

#[test]
fn every_target_has_a_fuzz_binary() {
    // The fuzz crate and TARGETS must name the same targets, or one of them
    // is fuzzed without being replayed (or the other way round).
    let mut binaries: Vec<String> = files(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_owned()))
        .collect();
    binaries.sort();
    let mut names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
    names.sort_unstable();
    assert_eq!(binaries, names);
}

/// Writes each target's seeds into its corpus directory (`cargo test -p
/// odissey-protocol --test fuzz_corpus -- --ignored`), to start or restart
/// a corpus before fuzzing.
#[test]
#[ignore = "writes into protocol/fuzz/corpus"]
fn write_seeds() {
    for target in TARGETS {
        let dir = fuzz_dir().join("corpus").join(target.name);
        fs::create_dir_all(&dir).expect("corpus directory");
        for (i, seed) in (target.seeds)().iter().enumerate() {
            fs::write(dir.join(format!("seed-{i:02}")), seed).expect("seed file");
        }
    }
}
