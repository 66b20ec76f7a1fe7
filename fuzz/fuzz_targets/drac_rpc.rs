//! See `dovegate_fuzz::checks::drac_rpc`: the invariants live there, so the committed corpus
//! is replayed by the main crate's `cargo test` too (tests/fuzz_corpus.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dovegate_fuzz::checks::drac_rpc::check(data));
