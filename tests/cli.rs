//! The administrator's commands: lookup, list, grant, revoke, check-config, config.

mod common;

use common::*;

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = dovegate(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn grant_lookup_list_revoke() {
    let d = tempdir();
    let map = d.path().join("relay").display().to_string();
    // No map yet: a clear error, exit 2.
    let (code, _, err) = run(&["lookup", "--map", &map, "192.0.2.1"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("relay.lmdb"), "{err}");
    // The daemon creates the map; here a short run does it.
    let mut daemon = Daemon::start(
        d.path(),
        &[
            "--map",
            &map,
            "--log",
            &d.path().join("none.log").display().to_string(),
            "--state-dir",
            &d.path().join("s").display().to_string(),
        ],
    );
    wait_for("map created", PATIENCE, || {
        d.path().join("relay.lmdb").exists()
    });
    assert_eq!(daemon.stop(), Some(0));

    let (code, out, _) = run(&["grant", "--map", &map, "--ttl", "10m", "::FFFF:192.0.2.1"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("192.0.2.1\t20"), "{out}");
    let (code, _, _) = run(&["grant", "--map", &map, "2001:DB8:0:0:0:0:0:9"]);
    assert_eq!(code, Some(0));
    // Postfix finds both under their canonical keys.
    assert!(postmap_q(std::path::Path::new(&map), "192.0.2.1")
        .unwrap()
        .starts_with("OK expires="));
    assert!(postmap_q(std::path::Path::new(&map), "2001:db8::9").is_some());

    let (code, out, _) = run(&["lookup", "--map", &map, "[2001:db8::9]"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("OK expires="), "{out}");
    let (code, out, _) = run(&["lookup", "--map", &map, "192.0.2.2"]);
    assert_eq!((code, out.as_str()), (Some(1), ""));
    let (code, _, err) = run(&["lookup", "--map", &map, "not-an-ip"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not an IP address"));

    let (code, out, _) = run(&["list", "--map", &map, "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ips: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ip"].as_str().unwrap())
        .collect();
    assert_eq!(ips, vec!["192.0.2.1", "2001:db8::9"]);
    let (code, out, _) = run(&["list", "--map", &map]);
    assert_eq!(code, Some(0));
    assert!(
        out.lines().count() == 2 && out.contains("2001:db8::9\t20"),
        "{out}"
    );

    // Never loopback or link-local, even by hand.
    let (code, _, err) = run(&["grant", "--map", &map, "127.0.0.1"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("loopback"), "{err}");

    let (code, out, _) = run(&["revoke", "--map", &map, "192.0.2.1"]);
    assert_eq!((code, out.trim()), (Some(0), "revoked 192.0.2.1"));
    let (code, _, _) = run(&["revoke", "--map", &map, "192.0.2.1"]);
    assert_eq!(code, Some(1));
    assert_eq!(postmap_q(std::path::Path::new(&map), "192.0.2.1"), None);
}

#[test]
fn config_default_and_check_config() {
    let (code, default, _) = run(&["config", "--default"]);
    assert_eq!(code, Some(0));
    assert!(default.contains("[grant]") && default.contains("ttl = \"30m\""));
    let d = tempdir();
    let path = d.path().join("dovegate.toml");
    std::fs::write(&path, &default).unwrap();
    let (code, out, err) = run(&["check-config", "--config", &path.display().to_string()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("path = \"/var/lib/dovegate/relay\""), "{out}");
    // Flags override the file.
    let (code, out, _) = run(&[
        "check-config",
        "--config",
        &path.display().to_string(),
        "--map",
        "/srv/relay",
    ]);
    assert_eq!(code, Some(0));
    assert!(out.contains("path = \"/srv/relay\""));
}
