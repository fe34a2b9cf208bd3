//! `auth::verify` on a request signed from the fuzz input (it must verify; one changed byte
//! of what is signed must not), and on an arbitrary request, key and time (it must not
//! panic). The checks live in `checks.rs`, shared with `proxy/tests/fuzz_corpus.rs`, which
//! replays `corpus/signed_url/` under `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod checks;

fuzz_target!(|data: &[u8]| {
    checks::check_signed_input(data);
});
