//! The database URL file (`store.postgres_url_file`, `store.mysql_url_file`): one URL with
//! the password in it, so refused when every user may read it, and read with a bound.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The most a URL file may hold.
pub const MAX_URL_FILE: u64 = 4096;

/// The file's text, trimmed; the error is one line naming the file and the fix.
pub fn read(path: &Path) -> Result<String, String> {
    let at = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("{at}: cannot read: {e}"))?;
    let mode = meta.permissions().mode();
    if mode & 0o004 != 0 {
        return Err(format!(
            "{at}: is readable by every user (mode {:o}) but holds the database password; chmod 0600 (or 0640 with the service's group)",
            mode & 0o777
        ));
    }
    if meta.len() > MAX_URL_FILE {
        return Err(format!(
            "{at}: larger than {MAX_URL_FILE} bytes; it must hold one URL"
        ));
    }
    // Bounded again on the read itself: the file may change after the stat above.
    let text = crate::fsread::read_text(path, MAX_URL_FILE, crate::fsread::Links::Follow)
        .map_err(|e| e.to_string())?;
    Ok(text.trim().to_string())
}
