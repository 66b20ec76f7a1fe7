//! `dovegate run --dry-run`: follows a real file, prints what it would grant and expire,
//! and writes neither the map nor checkpoints, nor takes the real daemon's lock.

mod common;

use std::process::{Command, Stdio};

use common::*;

fn start_dry(
    dir: &std::path::Path,
    log: &std::path::Path,
    ttl: &str,
) -> (Daemon, std::path::PathBuf) {
    let log = log.display().to_string();
    start_dry_with(dir, &["--ttl", ttl, "--log", &log])
}

/// `dovegate run --dry-run ARGS` with the map `DIR/relay` and state `DIR/state`; its
/// stdout (returned) and stderr go to files.
fn start_dry_with(dir: &std::path::Path, args: &[&str]) -> (Daemon, std::path::PathBuf) {
    let out = dir.join(format!("stdout-{:x}", rand_u64()));
    let err = out.with_extension("stderr");
    let child = Command::new(bin())
        .args(["run", "--dry-run"])
        .args(args)
        .arg("--map")
        .arg(dir.join("relay"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("DOVEGATE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn dovegate run --dry-run");
    let d = Daemon { child, stderr: err };
    wait_for("dry run started", PATIENCE, || {
        d.log().contains("dovegate started")
    });
    (d, out)
}

fn read(p: &std::path::Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn prints_grants_writes_nothing() {
    let dir = tempdir();
    let log = dir.path().join("mail.log");
    append(&log, "");
    let (mut d, out) = start_dry(dir.path(), &log, "30m");
    append(&log, &login_line("192.0.2.51", "alice"));
    append(&log, &login_line("127.0.0.1", "local"));
    wait_for("would grant", PATIENCE, || {
        read(&out).contains("would grant 192.0.2.51 until ")
    });
    let text = read(&out);
    assert!(
        text.contains("(user alice, protocol imap, pattern dovecot-2.2, source "),
        "{text}"
    );
    assert!(
        !text.contains("127.0.0.1"),
        "excluded address printed: {text}"
    );
    assert_eq!(d.stop(), Some(0), "{}", d.log());
    assert!(!dir.path().join("relay.lmdb").exists(), "map created");
    assert!(
        !dir.path().join("relay.dovegate-lock").exists(),
        "map lock created"
    );
    assert!(
        !dir.path().join("state").join("checkpoints").exists(),
        "checkpoints written"
    );
}

#[test]
fn short_ttl_prints_expiry() {
    let dir = tempdir();
    let log = dir.path().join("mail.log");
    append(&log, "");
    let (mut d, out) = start_dry(dir.path(), &log, "2s");
    // No session: nothing holds the grant past the ttl.
    append(&log, &sessionless_login_line("198.51.100.23", "bob"));
    wait_for("would expire", PATIENCE, || {
        read(&out).contains("would expire 198.51.100.23")
    });
    let text = read(&out);
    let grant = text
        .find("would grant 198.51.100.23")
        .expect("grant printed first");
    assert!(grant < text.find("would expire").unwrap(), "{text}");
    assert_eq!(d.stop(), Some(0), "{}", d.log());
    assert!(!dir.path().join("relay.lmdb").exists(), "map created");
}

#[test]
fn runs_beside_a_daemon_on_the_same_map() {
    let dir = tempdir();
    let log = dir.path().join("mail.log");
    append(&log, "");
    let _real = Daemon::follow(dir.path(), &log, &[]);
    let (mut d, out) = start_dry(dir.path(), &log, "30m");
    append(&log, &login_line("203.0.113.9", "carol"));
    wait_for("would grant", PATIENCE, || {
        read(&out).contains("would grant 203.0.113.9 until ")
    });
    assert_eq!(d.stop(), Some(0), "{}", d.log());
}

fn push(socket: &std::path::Path, ip: &str) {
    let st = Command::new(bin())
        .args(["postlogin", "--socket"])
        .arg(socket)
        .arg("/bin/true")
        .env_clear()
        .env("IP", ip)
        .env("USER", "erin")
        .status()
        .unwrap();
    assert!(st.success());
}

/// Pushed logins are reported too; but beside a running daemon the dry run leaves the
/// daemon's push socket alone (binding it would take the daemon's logins away).
#[test]
fn push_reported_alone_and_left_to_a_daemon() {
    let dir = tempdir();
    let log = dir.path().join("mail.log");
    append(&log, "");
    let socket = dir.path().join("push");
    let conf = dir.path().join("dovegate.toml");
    std::fs::write(
        &conf,
        format!(
            "[source]\nlogs = [{:?}]\n[push]\nsocket = {:?}\nusers = [0]\n",
            log.display().to_string(),
            socket.display().to_string()
        ),
    )
    .unwrap();
    let conf = conf.display().to_string();
    let (mut dry, out) = start_dry_with(dir.path(), &["--config", &conf]);
    wait_for("push socket", PATIENCE, || socket.exists());
    push(&socket, "192.0.2.81");
    wait_for("would grant (push)", PATIENCE, || {
        read(&out).contains("would grant 192.0.2.81 until ")
    });
    assert!(
        read(&out).contains("(user -, protocol -, pattern -, source push)"),
        "{}",
        read(&out)
    );
    assert_eq!(dry.stop(), Some(0), "{}", dry.log());

    let _real = Daemon::with_map(dir.path(), &["--config", &conf]);
    wait_for("push socket", PATIENCE, || socket.exists());
    let (mut dry, _) = start_dry_with(dir.path(), &["--config", &conf]);
    assert!(
        dry.log().contains("leaves its push sockets alone"),
        "{}",
        dry.log()
    );
    push(&socket, "192.0.2.82");
    wait_for("the daemon's grant", PATIENCE, || {
        postmap_q(&dir.path().join("relay"), "192.0.2.82").is_some()
    });
    assert_eq!(dry.stop(), Some(0), "{}", dry.log());
}

/// `[drac]` is never served by a dry run: it would answer DRAC clients and take
/// rpcbind's registration from the rpc.dracd it runs beside.
#[test]
fn drac_left_to_the_server_in_place() {
    let dir = tempdir();
    let log = dir.path().join("mail.log");
    append(&log, "");
    let conf = dir.path().join("dovegate.toml");
    std::fs::write(
        &conf,
        format!(
            "[source]\nlogs = [{:?}]\n[drac]\nallow = [\"192.0.2.0/24\"]\n",
            log.display().to_string()
        ),
    )
    .unwrap();
    let conf = conf.display().to_string();
    let (mut dry, _) = start_dry_with(dir.path(), &["--config", &conf]);
    let text = dry.log();
    assert!(
        text.contains("--dry-run does not serve DRAC clients"),
        "{text}"
    );
    assert!(!text.contains("serving DRAC clients"), "{text}");
    assert_eq!(dry.stop(), Some(0), "{}", dry.log());
}
