//! `parse_upgrade` and `read_head` on arbitrary bytes: byte 0 picks the read sizes, the head
//! limit and the client address; the rest is what the client sent. The checks live in
//! `checks.rs`, shared with `proxy/tests/fuzz_corpus.rs`, which replays
//! `corpus/upgrade_request/` under `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod checks;

fuzz_target!(|data: &[u8]| {
    checks::check_upgrade_input(data);
});
