//! What Dovecot's own configuration says (`doveconf`), asked by `check-config` and by the
//! daemon at start.

use std::path::{Path, PathBuf};

/// The value of Dovecot's global setting KEY, from `doveconf KEY` (`KEY = VALUE`); None when
/// doveconf is missing, fails or takes over 5 s (a start-up must not hang on it).
/// Not `doveconf -h KEY`: Dovecot 2.4.1 refuses it at times for log_path ("Multiple
/// settings matched with -h parameter"; the same configuration answers in other runs);
/// the plain form answers on 2.3 and 2.4 (tests/dovecot_config.rs).
pub fn doveconf(key: &str) -> Option<String> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new("doveconf")
        .arg(key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    let mut text = String::new();
    child
        .stdout
        .take()?
        .take(4096)
        .read_to_string(&mut text)
        .ok()?;
    if !status.success() {
        return None;
    }
    doveconf_value(&text, key)
}

/// `VALUE` from the `KEY = VALUE` line of doveconf's output.
fn doveconf_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

/// In journal mode: the warning when Dovecot writes its login lines to a file of its own
/// (`info_log_path`, else `log_path`, is a path) that `logs` does not follow, for then no
/// Dovecot entry ever reaches the journal and nothing is granted. None when doveconf
/// cannot say.
pub fn journal_misses_dovecot_log(logs: &[PathBuf]) -> Option<String> {
    let (key, path) = match doveconf("info_log_path").filter(|p| !p.is_empty()) {
        Some(p) => ("info_log_path", p),
        None => ("log_path", doveconf("log_path")?),
    };
    // /dev/stderr under systemd is the journal; anything else starting with / is a file.
    let own_file = path.starts_with('/')
        && !path.starts_with("/dev/std")
        && !path.starts_with("/proc/self/fd/");
    if !own_file || logs.iter().any(|l| l == Path::new(&path)) {
        return None;
    }
    Some(format!(
        "source.journal: Dovecot logs to {path}, not the journal (doveconf {key}), so journal mode sees no login and grants nothing: set source.logs = [\"{path}\"] (and source.journal = false), or set {key} = syslog in Dovecot's configuration"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `doveconf KEY` as 2.3 and 2.4 answer it.
    #[test]
    fn doveconf_answers() {
        assert_eq!(
            doveconf_value("log_path = /var/log/dovecot.log\n", "log_path").as_deref(),
            Some("/var/log/dovecot.log")
        );
        assert_eq!(
            doveconf_value("info_log_path = \n", "info_log_path").as_deref(),
            Some("")
        );
        assert_eq!(doveconf_value("log_path = syslog\n", "info_log_path"), None);
    }
}
