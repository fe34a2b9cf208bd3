//! Replays the kept fuzz corpora (`proxy/fuzz/corpus/upgrade_request/` and
//! `proxy/fuzz/corpus/signed_url/`) through the same checks as the fuzz targets, so they run
//! under `cargo test` without cargo-fuzz or a nightly toolchain.

#[path = "../fuzz/fuzz_targets/checks.rs"]
mod checks;

use std::{
    fs,
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
};

use checks::{Form, SignedOutcome, UpgradeOutcome, check_signed_input, check_upgrade_input};

/// Below this a corpus directory is taken to be missing or emptied by mistake.
const MIN_CORPUS_FILES: usize = 10;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read corpus directory {}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(
        files.len() >= MIN_CORPUS_FILES,
        "{} holds {} files, expected at least {MIN_CORPUS_FILES}",
        dir.display(),
        files.len()
    );
    files
        .into_iter()
        .map(|path| {
            let data = fs::read(&path).expect("read corpus file");
            (path, data)
        })
        .collect()
}

/// Runs `check` on every file of `target`'s corpus, naming the file that breaks it.
fn replay<T>(target: &str, check: fn(&[u8]) -> T) -> Vec<T> {
    corpus(target)
        .into_iter()
        .map(|(path, data)| {
            panic::catch_unwind(AssertUnwindSafe(|| check(&data))).unwrap_or_else(|_| {
                panic!(
                    "corpus file {} breaks an invariant: {:?}",
                    path.display(),
                    String::from_utf8_lossy(&data)
                )
            })
        })
        .collect()
}

#[test]
fn every_upgrade_request_corpus_file_passes_the_fuzz_checks_and_the_corpus_reaches_each_outcome() {
    let outcomes = replay("upgrade_request", check_upgrade_input);
    // Without these the invariants on accepted upgrades, and on each way a head can fail,
    // would not have been exercised at all.
    for wanted in [
        UpgradeOutcome::Accepted,
        UpgradeOutcome::Refused(400),
        UpgradeOutcome::Refused(403),
        UpgradeOutcome::Refused(426),
        UpgradeOutcome::TooLarge,
        UpgradeOutcome::Closed,
    ] {
        assert!(
            outcomes.contains(&wanted),
            "no corpus file comes to {wanted:?}: {outcomes:?}"
        );
    }
}

#[test]
fn every_signed_url_corpus_file_passes_the_fuzz_checks_and_the_corpus_signs_both_forms() {
    let outcomes = replay("signed_url", check_signed_input);
    for form in [Form::Header, Form::Url] {
        assert!(
            outcomes.iter().any(|o| o.form == Some(form)),
            "no corpus file signs a request in the {form:?} form: {outcomes:?}"
        );
    }
    let tails: Vec<_> = outcomes
        .iter()
        .filter_map(|o: &SignedOutcome| o.tail)
        .collect();
    for refusal in ["missing_auth", "bad_signature"] {
        assert!(
            tails.contains(&Err(refusal)),
            "no corpus file's tail is refused with {refusal}: {outcomes:?}"
        );
    }
}
