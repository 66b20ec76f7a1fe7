//! The socketmap server against real clients: Postfix's `postmap -q KEY
//! socketmap:unix:PATH:NAME`, and sendmail 8.17's `Ksocket` map queried with `sendmail -bt`
//! (`/map`). Malformed and hostile clients never take the daemon down.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

const SENDMAIL: &str = "/var/cache/dovegate-test/sendmail/usr/libexec/sendmail/sendmail";

/// The socket lives under /run: sendmail refuses a socket in a world-writable directory.
struct RunDir(PathBuf);
impl RunDir {
    fn new() -> RunDir {
        let p = PathBuf::from(format!(
            "/run/dovegate-test-{}-{:x}",
            std::process::id(),
            rand_u64() & 0xffff
        ));
        std::fs::create_dir_all(&p).unwrap();
        set_mode(&p, 0o755);
        RunDir(p)
    }
}
impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(d: &Path, sock: &Path, log: &Path) -> Daemon {
    let conf = d.join("dovegate.toml");
    std::fs::write(
        &conf,
        format!(
            "[source]\nlogs = [{:?}]\n[map]\npath = {:?}\n[state]\ndir = {:?}\n\
             [serve]\nsocketmap = \"unix:{}\"\nsocketmap_values = {{ access = \"RELAY\" }}\nsocketmap_max_connections = 4\nsocketmap_idle_timeout = \"2s\"\n",
            log.display().to_string(),
            d.join("relay").display().to_string(),
            d.join("state").display().to_string(),
            sock.display()
        ),
    )
    .unwrap();
    std::fs::write(log, "").unwrap();
    let daemon = Daemon::start(d, &["--config", &conf.display().to_string()]);
    wait_for("socketmap socket", PATIENCE, || sock.exists());
    daemon
}

fn postmap_socketmap(sock: &Path, name: &str, key: &str) -> Option<String> {
    postmap_table(&format!("socketmap:unix:{}:{name}", sock.display()), key)
}

/// One request on a fresh connection; "" when the server closed it (e.g. all connection
/// slots busy for a moment).
fn query(sock: &Path, payload: &str) -> String {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return String::new();
    };
    if s.write_all(format!("{}:{payload},", payload.len()).as_bytes())
        .is_err()
    {
        return String::new();
    }
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Waits for the reply: clients that just closed may still hold a slot for a moment.
fn expect_reply(sock: &Path, payload: &str, want: &str) {
    wait_for(&format!("{payload} -> {want}"), PATIENCE, || {
        query(sock, payload) == want
    });
}

#[test]
fn postfix_and_sendmail_query_the_live_grants() {
    let d = tempdir();
    let run = RunDir::new();
    let sock = run.0.join("socketmap");
    let log = d.path().join("mail.log");
    let mut daemon = start(d.path(), &sock, &log);
    append(&log, &login_line("203.0.113.7", "a"));
    append(&log, &login_line("2001:db8::7", "b"));
    wait_for("grants", PATIENCE, || {
        postmap_socketmap(&sock, "relay", "2001:db8::7").is_some()
    });

    // Postfix: check_client_access socketmap:unix:PATH:relay
    assert_eq!(
        postmap_socketmap(&sock, "relay", "203.0.113.7").as_deref(),
        Some("OK")
    );
    assert_eq!(postmap_socketmap(&sock, "relay", "192.0.2.99"), None);
    assert_eq!(
        postmap_socketmap(&sock, "access", "203.0.113.7").as_deref(),
        Some("RELAY")
    );

    // sendmail: Kaccess socket unix:PATH, access-map keys, /map in address test mode.
    assert!(
        Path::new(SENDMAIL).exists(),
        "sendmail not unpacked: run scripts/deps test"
    );
    let cf = d.path().join("sendmail.cf");
    std::fs::write(
        &cf,
        format!(
            "V10/Berkeley\nDjmail.dovegate.test\nO QueueDirectory={q}\nO HelpFile=/dev/null\n\
             Mlocal, P=/bin/true, F=lsDFM, A=true\nKaccess socket -T<TMPF> unix:{sock}\n",
            q = d.path().display(),
            sock = sock.display()
        ),
    )
    .unwrap();
    let keys = [
        "connect:203.0.113.7",
        "connect:ipv6:2001:db8:0:0:0:0:0:7",
        "connect:192.0.2.99",
    ];
    let input: String = keys.iter().map(|k| format!("/map access {k}\n")).collect();
    // sendmail insists on a qualified host name: give it one in a private UTS namespace.
    let mut child = Command::new("unshare")
        .args([
            "--uts",
            "sh",
            "-c",
            &format!(
                "hostname mail.dovegate.test && exec {SENDMAIL} -bt -C {}",
                cf.display()
            ),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("map_lookup: access (connect:203.0.113.7) returns RELAY"),
        "{text}"
    );
    assert!(
        text.contains("map_lookup: access (connect:ipv6:2001:db8:0:0:0:0:0:7) returns RELAY"),
        "{text}"
    );
    assert!(
        text.contains("map_lookup: access (connect:192.0.2.99) no match"),
        "{text}"
    );
    assert!(!text.contains("unsafe"), "{text}");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn hostile_clients_never_take_it_down() {
    let d = tempdir();
    let run = RunDir::new();
    let sock = run.0.join("socketmap");
    let log = d.path().join("mail.log");
    let mut daemon = start(d.path(), &sock, &log);
    append(&log, &login_line("203.0.113.8", "a"));
    expect_reply(&sock, "relay 203.0.113.8", "5:OK OK,");
    // Malformed netstrings close the connection; the server keeps answering others.
    let mut rng = rand_u64() | 1;
    for i in 0..300 {
        let mut s = UnixStream::connect(&sock).unwrap();
        let garbage: Vec<u8> = (0..(i % 64 + 1))
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                b"0123456789:, xrelay\xff\x00"[(rng % 20) as usize]
            })
            .collect();
        let _ = s.write_all(&garbage);
    }
    for payload in ["99999999999:x,", "5:abc", "1025:"] {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(payload.as_bytes()).unwrap();
        let mut buf = [0u8; 16];
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert_eq!(
            s.read(&mut buf).unwrap_or(0),
            0,
            "{payload}: connection closed without a reply"
        );
    }
    // Requests without a key get a PERM reply, unknown keys NOTFOUND.
    expect_reply(&sock, "relay", "30:PERM expected: <mapname> <key>,");
    expect_reply(&sock, "relay unknown", "9:NOTFOUND ,");
    // Connection limit: idle connections beyond the limit are closed at once.
    let idle: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut extra = UnixStream::connect(&sock).unwrap();
    extra
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        extra.read(&mut buf).unwrap_or(0),
        0,
        "over the limit: closed"
    );
    drop(idle);
    expect_reply(&sock, "relay 203.0.113.8", "5:OK OK,");
    assert_eq!(daemon.stop(), Some(0));
}
