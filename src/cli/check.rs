//! `dovegate check-config`: every check `run` makes at start, and those that only show once
//! the daemon runs as its service user, each problem as one line with its fix.
//!
//! Errors (exit 2) are what `run` would refuse; warnings are what would leave the daemon
//! running and granting nothing (a log its user cannot read, Postfix unable to read the map).

use std::ffi::CString;

use nix::unistd::{self, Gid, Group, Uid, User};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{load_patterns, load_settings, ConfigArgs, Failure};
use crate::config::Settings;
use crate::setup::dovecot::{doveconf, journal_misses_dovecot_log};

/// The user the service runs as, with its groups (for "can it read this file?").
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    /// Every group (primary included): id and name.
    pub groups: Vec<(u32, String)>,
}

fn group_name(gid: u32) -> String {
    match Group::from_gid(Gid::from_raw(gid)) {
        Ok(Some(g)) => g.name,
        _ => gid.to_string(),
    }
}

impl Account {
    /// Looks a user up by name (None: no such user).
    pub fn lookup(name: &str) -> Option<Account> {
        let user = User::from_name(name).ok()??;
        let gid = user.gid;
        let cname = CString::new(name).ok()?;
        let mut gids: Vec<u32> = unistd::getgrouplist(&cname, gid)
            .map(|g| g.into_iter().map(Gid::as_raw).collect())
            .unwrap_or_default();
        if !gids.contains(&gid.as_raw()) {
            gids.insert(0, gid.as_raw());
        }
        let groups = gids.into_iter().map(|g| (g, group_name(g))).collect();
        Some(Account {
            name: name.to_string(),
            uid: user.uid.as_raw(),
            groups,
        })
    }

    /// The service's user: `dovegate` when it exists (the package creates it), else the
    /// user running the check.
    pub fn service_user(explicit: Option<&str>) -> Option<Account> {
        if let Some(n) = explicit {
            return Account::lookup(n);
        }
        Account::lookup("dovegate").or_else(|| {
            let me = User::from_uid(unistd::geteuid()).ok()??;
            Account::lookup(&me.name)
        })
    }

    fn in_group(&self, gid: u32) -> bool {
        self.groups.iter().any(|(g, _)| *g == gid)
    }

    fn group_list(&self) -> String {
        self.groups
            .iter()
            .map(|(_, n)| n.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether permission bits let this user do `want` (4 read, 1 search) on `meta`.
    fn allowed(&self, meta: &std::fs::Metadata, want: u32) -> bool {
        if self.uid == 0 {
            return true;
        }
        let mode = meta.permissions().mode();
        let bits = if meta.uid() == self.uid {
            mode >> 6
        } else if self.in_group(meta.gid()) {
            mode >> 3
        } else {
            mode
        };
        bits & want == want
    }

    /// None when the user can read `path` (every directory above it searchable); else why
    /// not and what to do.
    pub fn read_problem(&self, path: &Path) -> Option<String> {
        let who = format!(
            "user {} (uid {}, groups {})",
            self.name,
            self.uid,
            self.group_list()
        );
        let mut dir = PathBuf::new();
        for part in path.parent().into_iter().flat_map(|p| p.components()) {
            dir.push(part);
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            if !self.allowed(&meta, 1) {
                return Some(format!(
                    "{} cannot be reached by {who}: directory {} is {} mode {:04o}; allow search (x) for that user or its group",
                    path.display(),
                    dir.display(),
                    owner_text(&meta),
                    meta.permissions().mode() & 0o7777
                ));
            }
        }
        let meta = std::fs::metadata(path).ok()?;
        if self.allowed(&meta, 4) {
            return None;
        }
        Some(format!(
            "{} is not readable by {who}: owner {} mode {:04o}; {}",
            path.display(),
            owner_text(&meta),
            meta.permissions().mode() & 0o7777,
            self.read_fix(
                path,
                meta.uid(),
                meta.gid(),
                &group_name(meta.gid()),
                meta.permissions().mode()
            ),
        ))
    }

    /// How to let this user read a file it cannot (owner `owner`, group `gid` named
    /// `group`, `mode`), for any owner and mode: never by joining a privileged group (a
    /// root-group log is regrouped to adm, as Debian's syslog files are).
    fn read_fix(&self, path: &Path, owner: u32, gid: u32, group: &str, mode: u32) -> String {
        let p = path.display();
        let user = &self.name;
        let owner_name = Account::name_of(owner);
        let journal = "or use journal mode (source.journal = true), which needs no file permission";
        if owner == self.uid {
            return format!(
                "the file is {user}'s own but not readable by its owner: chmod u+r {p}; {journal}"
            );
        }
        if self.in_group(gid) {
            return format!(
                "{user} is in the file's group {group} but the mode does not let the group read: chmod g+r {p} (and for rotation, logrotate `create 0640 {owner_name} {group}`); {journal}"
            );
        }
        // Groups that grant much more than a log file: never advise joining them.
        const PRIVILEGED: &[&str] = &["root", "shadow", "sudo", "wheel", "disk", "staff", "kmem"];
        if gid != 0 && !PRIVILEGED.contains(&group) {
            let chmod = if mode & 0o040 == 0 {
                format!("chmod g+r {p}; ")
            } else {
                String::new()
            };
            return format!(
                "{chmod}adduser {user} {group} (the file's group; for rotation, logrotate `create 0640 {owner_name} {group}`), then restart dovegate; {journal}"
            );
        }
        let chmod = if mode & 0o040 == 0 {
            format!("; chmod g+r {p}")
        } else {
            String::new()
        };
        let join = if self.groups.iter().any(|(_, n)| n == "adm") {
            format!("{user} is in adm already")
        } else {
            format!("then adduser {user} adm and restart dovegate")
        };
        format!(
            "the file's group {group} is not one to add a service to: make the file group-readable by a group {user} is in, as Debian's log files are: chgrp adm {p}{chmod} (for rotation: logrotate `create 0640 {owner_name} adm`, rsyslog `$FileGroup adm`); {join}; {journal}"
        )
    }
}

fn owner_text(meta: &std::fs::Metadata) -> String {
    let user = Account::name_of(meta.uid());
    format!("{user}:{}", group_name(meta.gid()))
}

impl Account {
    fn name_of(uid: u32) -> String {
        match User::from_uid(Uid::from_raw(uid)) {
            Ok(Some(u)) => u.name,
            _ => uid.to_string(),
        }
    }
}

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// `run` would refuse to start, or would run and never grant: exit 2.
    Error(String),
    Warning(String),
}

/// Where Dovecot says it logs (`doveconf log_path`), for the "missing log" hint.
fn dovecot_log_path() -> Option<String> {
    doveconf("log_path")
}

/// One followed log file, as the service user would meet it. `others`: another source
/// (journal, push, events, another readable log) can deliver logins, so a file the user
/// cannot read is a warning; without one it is an error (the daemon would grant nothing).
pub fn check_log(path: &Path, user: Option<&Account>, others: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let hint = match dovecot_log_path() {
                Some(p) if p.starts_with('/') => format!("Dovecot logs to {p} (doveconf log_path)"),
                Some(p) => format!("Dovecot logs through {} (doveconf log_path is {p:?}), so its lines are in the journal or syslog", if p == "syslog" || p.is_empty() { "syslog" } else { "its log_path" }),
                None => "doveconf is not available to ask where Dovecot logs".to_string(),
            };
            out.push(Finding::Warning(format!(
                "source.logs: {} does not exist (dovegate waits for it and grants nothing meanwhile); {hint}; on Debian 12 without rsyslog use journal mode (source.journal = true)",
                path.display()
            )));
        }
        Err(e) => out.push(Finding::Warning(format!(
            "source.logs: {}: {e}",
            path.display()
        ))),
        Ok(meta) if !meta.is_file() => out.push(Finding::Error(format!(
            "source.logs: {} is not a regular file (a {}); name the log file itself",
            path.display(),
            kind_of(&meta)
        ))),
        Ok(_) => {
            if let Some(problem) = user.and_then(|u| u.read_problem(path)) {
                let own = if super::dovecot_log_files().iter().any(|f| f == path) {
                    // Issue 26: `doveadm log reopen` recreates it 0600 root, undoing a chmod.
                    " (this is Dovecot's own log_path, which `doveadm log reopen` and a Dovecot restart recreate 0600 root: a chmod does not last, so use journal mode with Dovecot logging to syslog, its default)"
                } else {
                    ""
                };
                out.push(if others {
                    Finding::Warning(format!("source.logs: {problem}{own}"))
                } else {
                    Finding::Error(format!(
                        "source.logs: {problem}{own}; no other source (journal, push, events, a readable log) delivers logins, so dovegate would grant nothing"
                    ))
                });
            }
        }
    }
    out
}

fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    crate::fsread::kind_of(meta.file_type())
}

/// Every check of the settings beyond what `validate` already refused.
pub fn findings(settings: &Settings, user: Option<&Account>) -> Vec<Finding> {
    let mut out = Vec::new();
    let readable = |l: &PathBuf| {
        std::fs::metadata(l).is_ok_and(|m| m.is_file())
            && user.is_none_or(|u| u.read_problem(l).is_none())
    };
    for log in &settings.logs {
        let others = settings.journal
            || settings.push.enabled()
            || settings.events.enabled()
            || settings.drac.enabled()
            || settings.logs.iter().any(|l| l != log && readable(l));
        out.extend(check_log(log, user, others));
    }
    if settings.journal {
        out.extend(journal_misses_dovecot_log(&settings.logs).map(Finding::Warning));
        if let Some(u) = user.filter(|u| u.uid != 0) {
            if !u
                .groups
                .iter()
                .any(|(_, n)| n == "systemd-journal" || n == "adm")
            {
                out.push(Finding::Warning(format!(
                    "source.journal: user {} is in neither group systemd-journal nor adm, so journalctl shows it no Dovecot entries: adduser {} systemd-journal",
                    u.name, u.name
                )));
            }
        }
    }
    let postfix = settings.postfix_config_dir.as_deref();
    match crate::postfix::postconf(postfix, &["-m"]) {
        Ok(types) => {
            if let Some(p) = crate::postfix::lmdb_problem(&types) {
                out.push(Finding::Error(format!("map.path: {p}")));
            }
        }
        Err(e) if settings.socketmap.is_none() => {
            out.push(Finding::Warning(format!(
                "map.path: cannot ask Postfix whether it reads lmdb maps: {e}; the map is for Postfix (check_client_access lmdb:{}), sendmail needs serve.socketmap",
                settings.map_path.display()
            )));
        }
        Err(_) => {}
    }
    if settings.exclude_mynetworks {
        if let Err(e) = crate::postfix::mynetworks(postfix) {
            out.push(Finding::Error(format!("grant.exclude_mynetworks: {e}")));
        }
    }
    if let Some(crate::serve::socketmap::Listen::Unix(p)) =
        settings.socketmap.as_ref().map(|s| &s.listen)
    {
        if let Some(dir) = p.parent().filter(|d| !d.exists()) {
            out.push(Finding::Warning(format!(
                "serve.socketmap: directory {} does not exist; the unit's RuntimeDirectory=dovegate creates /run/dovegate, elsewhere create it (install -d -o dovegate {})",
                dir.display(),
                dir.display()
            )));
        }
    }
    let map_file = crate::store::lmdb::file_path(&settings.map_path);
    if let Ok(meta) = std::fs::metadata(&map_file) {
        if meta.mode() & 0o004 != 0 {
            out.push(Finding::Warning(format!(
                "map.path: {} is readable by every local user (mode {:04o}): any of them can hold a read lock on it and stall its writes (expired grants stay); chmod 0640 {f}; chgrp postfix {f} (the daemon does it at its next start)",
                map_file.display(),
                meta.mode() & 0o7777,
                f = map_file.display()
            )));
        }
    }
    if let Some(dir) = settings.map_path.parent().filter(|d| !d.exists()) {
        out.push(Finding::Warning(format!(
            "map.path: directory {} does not exist; `dovegate init` creates it and the empty map",
            dir.display()
        )));
    }
    let rpcbind = Path::new(crate::drac::rpcbind::SOCKET);
    if settings.drac.enabled() && !rpcbind.exists() {
        out.push(Finding::Warning(format!(
            "drac.allow: rpcbind is not running here (no {}): DRAC clients find dovegate through it; apt install rpcbind",
            rpcbind.display()
        )));
    }
    out
}

/// `quiet`: the findings only, and one line saying the configuration is fine when there
/// is no error (the unit runs it at every start and reload: the effective configuration
/// there would fill the journal and `systemctl status`).
pub fn run(cfg: &ConfigArgs, user: Option<&str>, quiet: bool) -> Result<(), Failure> {
    let (file, settings) = load_settings(cfg, |_| {})?;
    load_patterns(&settings, None)?;
    if let Some(url_file) = &settings.store.url_file {
        crate::store::postgres::Target::load(url_file, &settings.store.schema)
            .map_err(|e| Failure::config(e.to_string()))?;
    }
    if let Some(url_file) = &settings.store.mysql_url_file {
        crate::store::mysql::Target::load(url_file).map_err(|e| Failure::config(e.to_string()))?;
    }
    let which = format!("configuration {}", file.describe());
    if !quiet {
        eprintln!("dovegate: {which}");
    }
    let account = Account::service_user(user);
    if let (Some(name), None) = (user, &account) {
        return Err(Failure::config(format!("--user: no user `{name}`")));
    }
    let mut all = findings(&settings, account.as_ref());
    all.extend(
        super::file_mode_warnings(&settings)
            .into_iter()
            .map(Finding::Warning),
    );
    let (mut errors, mut warnings) = (0, 0);
    for f in &all {
        match f {
            Finding::Error(m) => {
                errors += 1;
                eprintln!("dovegate: error: {m}");
            }
            Finding::Warning(m) => {
                warnings += 1;
                eprintln!("dovegate: warning: {m}");
            }
        }
    }
    if quiet {
        if errors > 0 {
            return Err(Failure::config(format!("{which}: {errors} error(s)")));
        }
        let warned = match warnings {
            0 => String::new(),
            n => format!(" ({n} warning(s) above)"),
        };
        eprintln!("dovegate: {which}: ok{warned}");
        return Ok(());
    }
    eprintln!(
        "dovegate: note: only `dovegate grant` and `dovegate revoke` may write {}: `postmap -i` or `-d` on the live map is unsupported and damages it (the daemon then moves it aside)",
        crate::store::lmdb::file_path(&settings.map_path).display()
    );
    print!("{}", file.to_toml());
    if errors > 0 {
        return Err(Failure::config(String::new()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nobody() -> Account {
        Account {
            name: "nobody".into(),
            uid: 65534,
            groups: vec![(65534, "nogroup".into())],
        }
    }

    #[test]
    fn readability_by_mode_and_groups() {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = d.path().join("mail.log");
        std::fs::write(&f, "x\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let p = nobody()
            .read_problem(&f)
            .expect("0600 root file unreadable by nobody");
        assert!(p.contains("mode 0600") && p.contains("user nobody"), "{p}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(nobody().read_problem(&f), None);
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let p = nobody().read_problem(&f).expect("unsearchable dir");
        assert!(p.contains("cannot be reached"), "{p}");
    }

    /// Issue 26: the advice for every owner and mode; never `adduser ... root`.
    #[test]
    fn read_advice_for_every_owner_and_mode() {
        let service = Account {
            name: "dovegate".into(),
            uid: 990,
            groups: vec![(990, "dovegate".into()), (4, "adm".into())],
        };
        let p = Path::new("/var/log/dovecot.log");
        // (user, file owner, file gid, its group's name, mode, what the advice must say)
        type Case<'a> = (&'a Account, u32, u32, &'a str, u32, &'a [&'a str]);
        let cases: &[Case] = &[
            // root:root 0600: regrouped to adm, never "adduser dovegate root".
            (
                &service,
                0,
                0,
                "root",
                0o600,
                &[
                    "chgrp adm /var/log/dovecot.log",
                    "chmod g+r",
                    "dovegate is in adm already",
                ],
            ),
            (
                &nobody(),
                0,
                0,
                "root",
                0o600,
                &["chgrp adm", "adduser nobody adm"],
            ),
            // A privileged group is not joined either.
            (
                &nobody(),
                0,
                42,
                "shadow",
                0o640,
                &["chgrp adm", "adduser nobody adm"],
            ),
            // In the file's group, which may not read: chmod only.
            (
                &service,
                0,
                4,
                "adm",
                0o600,
                &[
                    "is in the file's group adm",
                    "chmod g+r /var/log/dovecot.log",
                    "create 0640 root adm",
                ],
            ),
            // The file's group may read, the user is not in it: join it.
            (&nobody(), 104, 4, "adm", 0o640, &["adduser nobody adm"]),
            // An ordinary group that may not read: chmod and join.
            (
                &nobody(),
                0,
                1234,
                "maillog",
                0o600,
                &["chmod g+r /var/log/dovecot.log; adduser nobody maillog"],
            ),
            // The user's own file without u+r.
            (&service, 990, 990, "dovegate", 0o200, &["chmod u+r"]),
        ];
        for (user, owner, gid, group, mode, want) in cases {
            let fix = user.read_fix(p, *owner, *gid, group, *mode);
            for w in *want {
                assert!(fix.contains(w), "{group} {mode:o}: want {w:?} in {fix}");
            }
            assert!(fix.contains("journal mode"), "{fix}");
            for bad in [
                "adduser dovegate root",
                "adduser nobody root",
                "adduser nobody shadow",
            ] {
                assert!(!fix.contains(bad), "{fix}");
            }
            if *mode & 0o040 != 0 {
                assert!(!fix.contains("chmod"), "group-readable already: {fix}");
            }
        }
    }

    #[test]
    fn logs_that_are_not_files() {
        let d = tempfile::tempdir().unwrap();
        let found = check_log(d.path(), None, false);
        assert!(
            matches!(&found[..], [Finding::Error(m)] if m.contains("directory")),
            "{found:?}"
        );
        let found = check_log(&d.path().join("missing.log"), None, false);
        assert!(
            matches!(&found[..], [Finding::Warning(m)] if m.contains("does not exist") && m.contains("journal")),
            "{found:?}"
        );
    }
}
