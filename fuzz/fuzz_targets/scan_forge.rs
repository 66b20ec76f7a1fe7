//! Login lines with hostile user names and elements (see
//! `dovegate_fuzz::checks::scan_forge`).
#![no_main]

libfuzzer_sys::fuzz_target!(|f: dovegate_fuzz::checks::scan_forge::Forge| {
    dovegate_fuzz::checks::scan_forge::check(f)
});
