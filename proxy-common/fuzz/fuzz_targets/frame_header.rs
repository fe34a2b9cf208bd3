//! Walks the input as a WebSocket byte stream, frame by frame, the way the proxy does, and
//! checks every `parse_header` result and `MessageTracker` step. Byte 0 of the input picks the
//! chunk sizes; the rest is the stream. The walk itself lives in `walk.rs`, shared with
//! `proxy-common/tests/fuzz_corpus.rs`, which replays `corpus/frame_header/` under `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod walk;

fuzz_target!(|data: &[u8]| {
    walk::check_input(data);
});
