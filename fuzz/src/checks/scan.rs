//! A log buffer (any framing, any pattern, session ends included) through the daemon's
//! Scanner. The first byte picks how much the scanner visits; the rest is the buffer.

use std::sync::{Arc, OnceLock};

use super::super::{patterns, scanner, visit_of, Checked};
use dovegate::pattern::PatternSet;

static PATTERNS: OnceLock<Arc<PatternSet>> = OnceLock::new();

pub fn check(data: &[u8]) {
    let Some((&mode, buf)) = data.split_first() else {
        return;
    };
    let patterns = PATTERNS.get_or_init(patterns);
    let mut sc = scanner(patterns, visit_of(mode));
    let mut sink = Checked::default();
    let scanned = sc.scan(buf, sink.now, &mut sink);
    assert_eq!(scanned.bytes, buf.len() as u64);
    // A buffer of N newlines holds at most N+1 lines.
    assert!(scanned.lines <= buf.iter().filter(|&&b| b == b'\n').count() as u64 + 1);
    sink.renew_all();
}
