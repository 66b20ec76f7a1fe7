//! Relay stays open while a mail client's IMAP session stays open (IDLE), with a real
//! Dovecot 2.3 (the Debian 12 packages) and 2.4 (a Debian 13 root), but only while
//! something shows the session open: its imap process (whose title names the user and
//! address with `verbose_proctitle = yes`), or `doveadm who`. Renewed past three times the
//! ttl, a real smtpd relaying for the client near the end, held across a kill -9 of
//! dovegate, lost ttl after LOGOUT; after a kill -9 of the imap process (no end line),
//! lost within ttl + the re-check interval. ANONYMOUS logins grant nothing. Short ttl;
//! nothing asserts timing tighter than a second.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::dovecot::{expiry, harness, now, support, Down, Idle};
use common::*;

/// `dovecot.sh` with DG_EXTRA_CONF (settings appended to dovecot.conf).
fn harness_with(args: &[&str], extra_conf: &str) -> String {
    harness(args, &[("DG_EXTRA_CONF", extra_conf)])
}

/// dovegate's configuration: re-checks every second; `who`: grant.session_who.
fn config(dir: &Path, ttl: &str, hold: &str, who: &[String]) -> String {
    let conf = dir.join("dovegate.toml");
    std::fs::write(
        &conf,
        format!(
            "[grant]\nttl = \"{ttl}\"\nsession_hold = \"{hold}\"\nsession_recheck = \"1s\"\nsession_who = {}\n",
            toml_list(who)
        ),
    )
    .unwrap();
    conf.display().to_string()
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// `doveadm who -1` of the harness's Dovecot 2.3.
fn who_23(dv: &Path) -> Vec<String> {
    vec![
        "doveadm".into(),
        "-c".into(),
        dv.join("dovecot.conf").display().to_string(),
        "who".into(),
        "-1".into(),
    ]
}

/// `doveadm who -1` of the harness's Dovecot 2.4 (up24), run by the daemon without a shell
/// of its own: 2.4's doveadm from `root` (mounted privately, the root stays as cached) asks
/// the rig's anvil socket. Its output has 2.4's DEST_IP column.
fn who_24(dv: &Path, root: &str) -> Vec<String> {
    [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        r#"mount --bind "$1" "$2/mnt" && exec chroot "$2" doveadm -O who -1 -a /mnt/run/anvil"#,
        "sh",
        &dv.display().to_string(),
        root,
    ]
    .map(String::from)
    .to_vec()
}

const VERBOSE: &str = "verbose_proctitle = yes";

/// What the daemon's last check found for the session of `addr` (sessions.json).
fn evidence(d: &Path, addr: &str) -> Option<String> {
    let text = std::fs::read_to_string(d.join("state/checkpoints/sessions.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.as_array()?
        .iter()
        .find(|s| s["ip"] == addr)
        .and_then(|s| s["evidence"].as_str().map(str::to_string))
}

/// The mpid of `addr`'s login line in `log`.
fn mpid(log: &Path, addr: &str) -> u32 {
    let text = std::fs::read_to_string(log).unwrap();
    text.lines()
        .find(|l| l.contains("user=<alice>") && l.contains(addr) && l.contains("mpid="))
        .and_then(|l| l.split("mpid=").nth(1))
        .and_then(|r| r.split(',').next())
        .and_then(|p| p.parse().ok())
        .expect("mpid of the login")
}

/// How the IDLE session ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Logout,
    /// kill -9 of the imap process: Dovecot writes no end line.
    Kill9,
}

/// A short traversable directory (Dovecot's socket paths are limited) and its `dv`.
fn rig() -> (tempfile::TempDir, PathBuf, String) {
    let d = tempfile::Builder::new()
        .prefix("dgs")
        .tempdir_in("/tmp")
        .unwrap();
    set_mode(d.path(), 0o755);
    let dv = d.path().join("dv");
    std::fs::create_dir_all(&dv).unwrap();
    let dvs = dv.display().to_string();
    (d, dv, dvs)
}

/// The IDLE scenario against a Dovecot already listening on `port` and logging to `log`.
#[allow(clippy::too_many_arguments)]
fn idle_keeps_relay(
    d: &Path,
    log: &Path,
    port: u16,
    addr: &str,
    restart: bool,
    who: &[String],
    shown_by: &str,
    end: End,
) {
    let map = d.join("relay");
    let conf = config(d, "4s", "2m", who);
    let mut daemon = Daemon::follow(d, log, &["--config", &conf]);
    let postfix = Postfix::start(d, &map);
    let idle = Idle::start(port, addr);
    let login = now();
    wait_for("grant after the login", PATIENCE, || {
        expiry(&map, addr).is_some()
    });
    let sessions = d.join("state/checkpoints/sessions.json");
    wait_for("the open session saved", PATIENCE, || {
        std::fs::read_to_string(&sessions).is_ok_and(|t| t.contains(addr))
    });
    if restart {
        // kill -9: the login line is behind the checkpoint; only the saved session keeps
        // the relay open.
        daemon.kill9();
        daemon = Daemon::follow(d, log, &["--config", &conf]);
    }
    // Three times the ttl in IDLE: the grant never lapses.
    while now() < login + 13 {
        let e = expiry(&map, addr);
        assert!(
            e.is_some_and(|e| e > now()),
            "relay lapsed while the session is open: {e:?}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        evidence(d, addr).as_deref(),
        Some(shown_by),
        "what shows the session open"
    );
    let mut smtp = Smtp::connect(postfix.port);
    let r = smtp.relay_as(addr);
    assert!(
        r.starts_with("250"),
        "a real smtpd relays near the end: {r}"
    );
    if end == End::Kill9 {
        signal(mpid(log, addr), libc::SIGKILL);
        let killed = now();
        let mut last = 0;
        wait_for("grant gone after the kill", PATIENCE, || {
            match expiry(&map, addr) {
                Some(e) => {
                    last = last.max(e);
                    false
                }
                None => true,
            }
        });
        // The last check that saw the process was before the kill: ttl after it at most
        // (a second of rounding).
        assert!(
            last <= killed + 4 + 1,
            "held until {last}, past the kill {killed} + ttl 4 s\n{}",
            daemon.log()
        );
        // The session itself is released at its next check (the grant may go first).
        wait_for("the session released", PATIENCE, || {
            daemon.log().contains("nothing shows it is open")
        });
        drop(idle);
        assert_eq!(daemon.stop(), Some(0));
        return;
    }
    idle.logout();
    let out = now();
    // ttl after the end: the grant is extended to LOGOUT + ttl, then removed.
    wait_for("grant extended past the logout", PATIENCE, || {
        expiry(&map, addr).is_some_and(|e| e >= out + 3)
    });
    wait_for("grant gone ttl after the logout", PATIENCE, || {
        expiry(&map, addr).is_none()
    });
    assert!(now() >= out + 3, "removed before ttl after the logout");
    // XCLIENT once per connection: a new one.
    let r = Smtp::connect(postfix.port).relay_as(addr);
    assert!(r.starts_with("554"), "relay refused after expiry: {r}");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn dovecot_23_idle_session_keeps_relay_across_kill9_then_expires() {
    let (d, dv, dvs) = rig();
    let _down = Down::dovecot(&dvs);
    harness_with(
        &["up", &dvs, "file", &dovecot_ports(13143).to_string()],
        VERBOSE,
    );
    idle_keeps_relay(
        d.path(),
        &dv.join("dovecot.log"),
        dovecot_ports(13143),
        "198.51.100.41",
        true,
        &[],
        "process",
        End::Logout,
    );
}

#[test]
fn dovecot_24_idle_session_keeps_relay_then_expires() {
    let (d, dv, dvs) = rig();
    let root = harness(&["trixie-root", &dvs], &[]);
    let _down = Down::dovecot24(&dvs);
    harness_with(
        &["up24", &dvs, &root, &dovecot_ports(13243).to_string()],
        VERBOSE,
    );
    idle_keeps_relay(
        d.path(),
        &dv.join("dovecot.log"),
        dovecot_ports(13243),
        "198.51.100.42",
        false,
        &[],
        "process",
        End::Logout,
    );
}

/// Without verbose_proctitle the process title (`dovecot/imap`) names no session:
/// `doveadm who` shows it open. kill -9 of the imap process writes no end line; the grant
/// is lost within ttl + the re-check interval.
#[test]
fn dovecot_23_idle_shown_by_doveadm_who_lost_after_kill9_of_the_imap_process() {
    let (d, dv, dvs) = rig();
    let _down = Down::dovecot(&dvs);
    harness(
        &["up", &dvs, "file", &dovecot_ports(13643).to_string()],
        &[],
    );
    idle_keeps_relay(
        d.path(),
        &dv.join("dovecot.log"),
        dovecot_ports(13643),
        "198.51.100.43",
        false,
        &who_23(&dv),
        "doveadm-who",
        End::Kill9,
    );
}

/// The same with Dovecot 2.4.1, whose `doveadm who -1` adds the DEST_IP column.
#[test]
fn dovecot_24_idle_shown_by_doveadm_who_lost_after_kill9_of_the_imap_process() {
    let (d, dv, dvs) = rig();
    let root = harness(&["trixie-root", &dvs], &[]);
    let _down = Down::dovecot24(&dvs);
    harness(
        &["up24", &dvs, &root, &dovecot_ports(13943).to_string()],
        &[],
    );
    idle_keeps_relay(
        d.path(),
        &dv.join("dovecot.log"),
        dovecot_ports(13943),
        "198.51.100.45",
        false,
        &who_24(&dv, &root),
        "doveadm-who",
        End::Kill9,
    );
}

#[test]
fn dovecot_24_idle_lost_after_kill9_of_the_imap_process() {
    let (d, dv, dvs) = rig();
    let root = harness(&["trixie-root", &dvs], &[]);
    let _down = Down::dovecot24(&dvs);
    harness_with(
        &["up24", &dvs, &root, &dovecot_ports(13743).to_string()],
        VERBOSE,
    );
    idle_keeps_relay(
        d.path(),
        &dv.join("dovecot.log"),
        dovecot_ports(13743),
        "198.51.100.44",
        false,
        &[],
        "process",
        End::Kill9,
    );
}

/// A site that allows anonymous IMAP (public folders): Dovecot logs the login with
/// `method=ANONYMOUS`, which grants nothing (grant.never_mechanisms); a password login
/// from another address after it does grant.
#[test]
fn dovecot_23_anonymous_login_grants_nothing() {
    let (d, dv, dvs) = rig();
    let _down = Down::dovecot(&dvs);
    harness_with(
        &["up", &dvs, "file", &dovecot_ports(13843).to_string()],
        "auth_mechanisms = plain login anonymous\nauth_anonymous_username = anonymous",
    );
    let log = dv.join("dovecot.log");
    let map = d.path().join("relay");
    let conf = config(d.path(), "1h", "2m", &[]);
    let mut daemon = Daemon::follow(d.path(), &log, &["--config", &conf]);
    let anon = "198.51.100.45";
    let st = Command::new("python3")
        .arg(support("anonymous.py"))
        .args([dovecot_ports(13843).to_string().as_str(), anon])
        .status()
        .expect("anonymous.py");
    assert!(st.success(), "anonymous login");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("method=ANONYMOUS") && text.contains(anon),
        "{text}"
    );
    // A password login after it: once granted, the anonymous line was read before it.
    let idle = Idle::start(dovecot_ports(13843), "198.51.100.46");
    wait_for("the password login granted", PATIENCE, || {
        expiry(&map, "198.51.100.46").is_some()
    });
    assert_eq!(expiry(&map, anon), None, "anonymous login granted");
    drop(idle);
    assert_eq!(daemon.stop(), Some(0));
}
