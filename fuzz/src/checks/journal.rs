//! journalctl's JSON export (one entry per line) through the journal adapter and the
//! Scanner: provenance checks, MESSAGE as text or byte array, cursors.

use std::sync::{Arc, OnceLock};

use super::super::{patterns, scanner, visit_of, Checked};
use dovegate::pattern::PatternSet;
use dovegate::source::journal::{scan_entries, Provenance};

static PATTERNS: OnceLock<Arc<PatternSet>> = OnceLock::new();

pub fn check(data: &[u8]) {
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
}
