//! The configuration file: parsed and validated as every command does.

use dovegate::config::{FileConfig, SystemProbe};

pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = FileConfig::parse(text, "fuzz.toml") else {
        return;
    };
    for journald in [false, true] {
        if let Ok(s) = file.validate_with(SystemProbe { journald }) {
            assert!(s.ttl.as_secs() >= 1 && s.ttl.as_secs() <= 31 * 24 * 3600);
        }
    }
    // What `check-config` prints reads back.
    let again = file.to_toml();
    FileConfig::parse(&again, "again.toml").expect("printed configuration reads back");
}
