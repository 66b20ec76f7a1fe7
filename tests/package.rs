//! The Debian package: built with scripts/build-deb, installed with `dpkg -i` on this
//! machine, checked (files, user, map, configuration, unit), then purged again.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

fn sh(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Purges the package whatever happens.
struct Purge;
impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "dovegate"]).output();
    }
}

#[test]
fn deb_installs_and_checks_out() {
    let root = env!("CARGO_MANIFEST_DIR");
    let (ok, out) = sh(&format!("{root}/scripts/build-deb"), &["--binary", bin()]);
    assert!(ok, "build-deb: {out}");
    let deb = out.lines().last().unwrap().trim().to_string();
    let deb = Path::new(root).join(deb);
    // Debian's own judge of a package: no error (warnings are printed).
    let (ok, out) = sh(
        "lintian",
        &[
            "--fail-on",
            "error",
            "--allow-root",
            &deb.display().to_string(),
        ],
    );
    assert!(ok, "lintian: {out}");
    if !out.trim().is_empty() {
        eprintln!("lintian: {out}");
    }
    let _purge = Purge;
    let (ok, out) = sh("dpkg", &["-i", &deb.display().to_string()]);
    assert!(ok, "dpkg -i: {out}");

    for f in [
        "/usr/bin/dovegate",
        "/lib/systemd/system/dovegate.service",
        "/etc/dovegate/dovegate.toml",
        "/usr/share/man/man8/dovegate.8.gz",
        "/usr/share/man/man8/dovegate-run.8.gz",
        "/usr/share/man/man5/dovegate.toml.5.gz",
        "/usr/share/bash-completion/completions/dovegate",
        "/usr/share/zsh/vendor-completions/_dovegate",
        "/usr/share/fish/vendor_completions.d/dovegate.fish",
        "/usr/share/doc/dovegate/copyright",
        "/usr/share/doc/dovegate/changelog.gz",
        "/usr/share/dovegate/patterns/dovecot-2.4.toml",
        "/usr/lib/dovegate/postlogin",
    ] {
        assert!(Path::new(f).exists(), "{f} installed");
    }
    let (ok, user) = sh("getent", &["passwd", "dovegate"]);
    assert!(ok, "system user created");
    let uid: u32 = user.split(':').nth(2).unwrap().parse().unwrap();
    // The map exists (empty) before Postfix ever looks, owned by dovegate, mode 0644.
    let map = std::fs::metadata("/var/lib/dovegate/relay.lmdb").expect("map created by postinst");
    assert_eq!((map.uid(), map.permissions().mode() & 0o777), (uid, 0o644));
    assert_eq!(postmap_s(Path::new("/var/lib/dovegate/relay")), vec![]);
    let (ok, out) = sh(
        "/usr/bin/dovegate",
        &["check-config", "--config", "/etc/dovegate/dovegate.toml"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("path = \"/var/lib/dovegate/relay\""), "{out}");
    let (ok, out) = sh("man", &["-w", "dovegate.toml"]);
    assert!(ok, "man page found: {out}");

    let unit = "/lib/systemd/system/dovegate.service";
    let (ok, out) = sh("systemd-analyze", &["verify", unit]);
    assert!(ok, "systemd-analyze verify: {out}");
    let (_, out) = sh("systemd-analyze", &["security", "--offline=yes", unit]);
    let score: f64 = out
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for dovegate.service:")
                .nth(1)
        })
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in: {out}"));
    eprintln!("systemd-analyze security --offline=yes: {score}");
    assert!(score <= 2.5, "exposure {score} > 2.5:\n{out}");

    let (ok, out) = sh("dpkg", &["--purge", "dovegate"]);
    assert!(ok, "purge: {out}");
    assert!(!Path::new("/usr/bin/dovegate").exists());
    assert!(
        Path::new("/var/lib/dovegate/relay.lmdb").exists(),
        "the map outlives the package: Postfix may still name it"
    );
}
