//! journalctl's JSON export (one entry per line) through the journal adapter and the
//! Scanner: provenance checks, MESSAGE as text or byte array, cursors.
#![no_main]

use std::sync::{Arc, OnceLock};

use dovegate::pattern::PatternSet;
use dovegate::source::journal::{scan_entries, Provenance};
use dovegate_fuzz::{patterns, scanner, visit_of, Checked};
use libfuzzer_sys::fuzz_target;

static PATTERNS: OnceLock<Arc<PatternSet>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Some((&mode, chunk)) = data.split_first() else {
        return;
    };
    let patterns = PATTERNS.get_or_init(patterns);
    let mut sc = scanner(patterns, visit_of(mode));
    let provenance = Provenance {
        units: vec!["dovecot.service".into()],
        comms: vec!["imap-login".into(), "pop3-login".into(), "dovecot".into()],
        ..Provenance::default()
    };
    let mut sink = Checked::default();
    let mut cursor = None;
    scan_entries(
        &mut sc,
        &provenance,
        chunk,
        sink.now,
        &mut sink,
        &mut cursor,
    );
    if let Some(c) = &cursor {
        // The cursor is saved and later passed to journalctl --after-cursor: never a
        // control character, bounded by the entry it came from.
        assert!(c.len() <= chunk.len());
    }
    sink.renew_all();
});
