//! The Debian package: built with scripts/build-deb and read, never installed, on this
//! machine (lintian, `dpkg-deb -c/-I`: its files and maintainer scripts). Installing,
//! the user, the map, the configuration, the unit and purging are checked in the system
//! test's containers (tests/system/suite.sh, `installed_package_check`).

mod common;

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

#[test]
fn deb_builds_and_checks_out() {
    let root = env!("CARGO_MANIFEST_DIR");
    let (ok, out) = sh(&format!("{root}/scripts/build-deb"), &["--binary", bin()]);
    assert!(ok, "build-deb: {out}");
    let deb = out.lines().last().unwrap().trim().to_string();
    let deb = Path::new(root).join(deb).display().to_string();
    // Debian's own judge of a package: no error (warnings are printed).
    let (ok, out) = sh("lintian", &["--fail-on", "error", "--allow-root", &deb]);
    assert!(ok, "lintian: {out}");
    if !out.trim().is_empty() {
        eprintln!("lintian: {out}");
    }

    // The files it would install (`dpkg-deb -c` lists them as ./PATH).
    let (ok, listing) = sh("dpkg-deb", &["-c", &deb]);
    assert!(ok, "dpkg-deb -c: {listing}");
    let paths: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.'))
        .collect();
    for f in [
        "/usr/bin/dovegate",
        "/lib/systemd/system/dovegate.service",
        "/etc/dovegate/dovegate.toml",
        "/usr/share/man/man8/dovegate.8.gz",
        "/usr/share/man/man8/dovegate-run.8.gz",
        "/usr/share/man/man8/dovegate-help.8.gz",
        "/usr/share/man/man5/dovegate.toml.5.gz",
        "/usr/share/bash-completion/completions/dovegate",
        "/usr/share/zsh/vendor-completions/_dovegate",
        "/usr/share/fish/vendor_completions.d/dovegate.fish",
        "/usr/share/doc/dovegate/copyright",
        "/usr/share/doc/dovegate/dovegate.toml",
        "/etc/dovegate/dovegate.d/",
        "/usr/share/doc/dovegate/changelog.gz",
        "/usr/share/dovegate/patterns/dovecot-2.4.toml",
        "/usr/lib/dovegate/postlogin",
    ] {
        assert!(paths.contains(&f), "{f} not in the package:\n{listing}");
    }
    // Nothing under /var: the map and state are made by postinst, and outlive the package.
    assert!(!paths.iter().any(|p| p.starts_with("/var/")), "{listing}");

    // Its maintainer scripts and conffiles, as packaging/debian has them.
    let (ok, conffiles) = sh("dpkg-deb", &["-I", &deb, "conffiles"]);
    assert!(ok, "{conffiles}");
    assert_eq!(conffiles.trim(), "/etc/dovegate/dovegate.toml");
    for script in ["postinst", "prerm", "postrm"] {
        let (ok, text) = sh("dpkg-deb", &["-I", &deb, script]);
        assert!(ok, "dpkg-deb -I {script}: {text}");
        let want = std::fs::read_to_string(format!("{root}/packaging/debian/{script}")).unwrap();
        assert_eq!(
            text, want,
            "{script} differs from packaging/debian/{script}"
        );
    }
}
