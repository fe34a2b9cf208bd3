//! Replays the `frame_header` fuzz corpus (`proxy-common/fuzz/corpus/frame_header/`) through the
//! same stream walk and invariants as the fuzz target, so the corpus runs in CI without
//! cargo-fuzz or a nightly toolchain.

#[path = "../fuzz/fuzz_targets/walk.rs"]
mod walk;

use std::collections::BTreeSet;
use std::fs;
use std::panic;
use std::path::{Path, PathBuf};

use proxy_common::frame::{HeaderError, OPCODE_CONTINUATION};
use proxy_common::message::FrameKind;
use walk::{HEADER_LENS, WalkEnd, Walker, check_input};

/// Below this the corpus directory is taken to be missing or emptied by mistake.
const MIN_CORPUS_FILES: usize = 10;

fn corpus_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frame_header");
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
}

fn walk_corpus() -> Vec<(PathBuf, Walker)> {
    corpus_files()
        .into_iter()
        .map(|path| {
            let data = fs::read(&path).expect("read corpus file");
            match panic::catch_unwind(|| check_input(&data)) {
                Ok(walker) => (path, walker),
                Err(_) => panic!(
                    "corpus file {} breaks an invariant: {data:02x?}",
                    path.display()
                ),
            }
        })
        .collect()
}

#[test]
fn every_corpus_file_passes_the_fuzz_invariants() {
    let walked = walk_corpus();
    assert!(walked.len() >= MIN_CORPUS_FILES);
}

/// Guards the hand-made seeds: if one is edited or deleted, this says which case went missing.
#[test]
fn seed_corpus_covers_every_header_length_error_and_stream_ending() {
    let walked = walk_corpus();
    let mut header_lens = BTreeSet::new();
    let mut errors = Vec::new();
    let mut ends = Vec::new();
    let mut kinds = Vec::new();
    let mut fragmented_message = false;
    for (_, w) in &walked {
        for f in &w.frames {
            header_lens.insert(f.header.header_len);
            kinds.push(f.kind);
        }
        // A continuation that ends a message closes a fragmented one.
        fragmented_message |= w
            .frames
            .iter()
            .any(|f| f.kind == FrameKind::MessageEnd && f.header.opcode == OPCODE_CONTINUATION);
        let end = w.end();
        if let WalkEnd::Invalid { error, .. } = end {
            errors.push(error);
        }
        ends.push(end);
    }
    assert_eq!(header_lens.into_iter().collect::<Vec<_>>(), HEADER_LENS);
    for error in [
        HeaderError::LengthOverflow,
        HeaderError::BadControlFrame,
        HeaderError::ReservedOpcode,
    ] {
        assert!(errors.contains(&error), "no corpus file ends in {error:?}");
    }
    for kind in [
        FrameKind::Control,
        FrameKind::Close,
        FrameKind::DataPartial,
        FrameKind::MessageEnd,
        FrameKind::OutOfSequence,
    ] {
        assert!(kinds.contains(&kind), "no corpus file has a {kind:?} frame");
    }
    assert!(
        fragmented_message,
        "no corpus file has a fragmented message"
    );
    assert!(ends.contains(&WalkEnd::AtBoundary));
    assert!(
        ends.iter().any(|e| matches!(e, WalkEnd::InHeader { .. })),
        "no truncated header"
    );
    assert!(
        ends.iter().any(|e| matches!(e, WalkEnd::InPayload { .. })),
        "no truncated payload"
    );
}
