//! Postfix readers against a live writer: `postmap -q` loops (each lookup takes Postfix's
//! fcntl read lock) while dovegate grants and expires thousands of addresses. Zero errors,
//! zero misses of the stable keys.

mod common;

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const CHURN: usize = 4000;
const STABLE: usize = 8;

fn churn_ip(i: usize) -> String {
    if i % 2 == 0 {
        format!("198.18.{}.{}", (i / 250) % 250, i % 250 + 1)
    } else {
        format!("2001:db8:77::{:x}", i + 1)
    }
}

#[test]
fn postmap_readers_never_error_or_miss_while_grants_churn() {
    let d = tempdir();
    let log = d.path().join("mail.log");
    let map = d.path().join("relay");
    File::create(&log).unwrap();
    let mut daemon = Daemon::follow(d.path(), &log, &["--ttl", "2s"]);
    // Stable keys without an expiry, written by Postfix's postmap while the daemon runs
    // (a second writer); the daemon leaves entries without an expiry alone.
    let stable: Vec<String> = (0..STABLE)
        .map(|i| format!("203.0.113.{}", i + 1))
        .collect();
    let text: String = stable.iter().map(|ip| format!("{ip} OK\n")).collect();
    let mut child = std::process::Command::new("postmap")
        .args([
            "-c",
            postmap_conf(),
            "-i",
            &format!("lmdb:{}", map.display()),
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    let stop = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for r in 0..4 {
        let (stop, lookups, map, stable) =
            (stop.clone(), lookups.clone(), map.clone(), stable.clone());
        readers.push(std::thread::spawn(move || {
            let mut errors = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = &stable[(n + r) % stable.len()];
                let out = postmap_query(&format!("lmdb:{}", map.display()), key);
                if out.status.code() != Some(0) || !out.stderr.is_empty() {
                    errors.push(format!(
                        "{key}: exit {:?}: {}",
                        out.status.code(),
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                n += 1;
                lookups.fetch_add(1, Ordering::Relaxed);
            }
            errors
        }));
    }
    // Churn: thousands of grants arrive in bursts and expire two seconds later.
    for burst in 0..8 {
        let mut text = String::new();
        for i in burst * CHURN / 8..(burst + 1) * CHURN / 8 {
            // No mail session: the grant runs out ttl after the login.
            text.push_str(
                &login_line(&churn_ip(i), "c")
                    .replace(", mpid=4242, TLS, session=<abcdEFGH1234>", ", TLS"),
            );
        }
        append(&log, &text);
        std::thread::sleep(Duration::from_millis(400));
    }
    // Everything churned expires; only the stable keys stay.
    wait_for_scan("churn expired", &map, |keys| keys.len() == STABLE);
    stop.store(true, Ordering::Relaxed);
    let errors: Vec<String> = readers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(lookups.load(Ordering::Relaxed) > 50, "readers ran");
    assert!(
        errors.is_empty(),
        "{} reader errors or misses, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(daemon.summary("logins"), Some(CHURN as u64));
    assert_eq!(
        daemon.summary("removed"),
        Some(CHURN as u64),
        "{}",
        daemon.log()
    );
}
