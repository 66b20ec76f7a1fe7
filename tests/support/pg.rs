//! A private PostgreSQL 15 server for tests: an `initdb` cluster in a temp dir, run as the
//! `postgres` user on a free loopback port with password (SCRAM) authentication, stopped
//! on drop.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = "/usr/lib/postgresql/15/bin";
pub const USER: &str = "dovegate";
pub const PASSWORD: &str = "s3cret-test";

pub struct Pg {
    pub dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
    uid: u32,
    gid: u32,
    /// Extra `-c name=value` settings (TLS).
    settings: Vec<String>,
}

fn postgres_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("user postgres (apt-get install postgresql)");
    let f: Vec<&str> = line.split(':').collect();
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port()
}

impl Pg {
    /// initdb a cluster under `dir` and start it.
    pub fn start(dir: &Path) -> Pg {
        let mut pg = Pg::init(dir);
        pg.up();
        pg
    }

    /// Like `start`, with TLS on (`ssl=on`), the server certificate (for IP 127.0.0.1)
    /// signed by a test CA; returns the CA certificate file too.
    pub fn start_tls(dir: &Path) -> (Pg, PathBuf) {
        let mut pg = Pg::init(dir);
        let d = pg.dir.clone();
        crate::tls::make_test_ca(&d);
        for f in ["server.pem", "server.key"] {
            std::os::unix::fs::chown(d.join(f), Some(pg.uid), Some(pg.gid)).expect("chown");
        }
        std::fs::set_permissions(
            d.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod");
        pg.settings = vec![
            "ssl=on".into(),
            format!("ssl_cert_file={}", d.join("server.pem").display()),
            format!("ssl_key_file={}", d.join("server.key").display()),
        ];
        pg.up();
        (pg, d.join("ca.pem"))
    }

    fn init(dir: &Path) -> Pg {
        let (uid, gid) = postgres_ids();
        let dir = dir.join("pg");
        std::fs::create_dir_all(&dir).expect("mkdir pg");
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown");
        let pw = dir.join("pw");
        std::fs::write(&pw, PASSWORD).expect("pwfile");
        std::os::unix::fs::chown(&pw, Some(uid), Some(gid)).expect("chown");
        let out = Command::new(format!("{BIN}/initdb"))
            .args([
                "-D",
                "data",
                "-U",
                USER,
                "--pwfile=pw",
                "--auth=scram-sha-256",
            ])
            .args(["-E", "UTF8", "--no-sync", "--locale=C"])
            .current_dir(&dir)
            .uid(uid)
            .gid(gid)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Pg {
            dir,
            port: free_port(),
            child: None,
            uid,
            gid,
            settings: Vec::new(),
        }
    }

    /// Starts the server (again) on the same port and waits until it answers.
    pub fn up(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .expect("log");
        std::os::unix::fs::chown(self.dir.join("log"), Some(self.uid), Some(self.gid))
            .expect("chown log");
        let child = Command::new(format!("{BIN}/postgres"))
            .args(["-D", "data", "-p", &self.port.to_string()])
            .args(["-k", &self.dir.display().to_string()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .current_dir(&self.dir)
            .uid(self.uid)
            .gid(self.gid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn postgres");
        self.child = Some(child);
        let start = Instant::now();
        while !self.ready() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "postgres did not start: {}",
                std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ready(&self) -> bool {
        Command::new("pg_isready")
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Fast shutdown (SIGINT): sessions are cut, as in a restart or failover.
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGINT);
            }
            let _ = c.wait();
        }
    }

    /// SIGSTOP (or SIGCONT) the server and all its processes: a hung database, whose
    /// kernel still accepts TCP connections.
    pub fn signal_all(&self, sig: i32) {
        let Some(c) = &self.child else { return };
        let root = c.id() as i32;
        let mut pids = vec![root];
        for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // pid (comm) state ppid ...: comm may hold spaces, so split after the ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(root) {
                pids.push(pid);
            }
        }
        for pid in pids {
            // SAFETY: signalling our own server's processes.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    pub fn url(&self) -> String {
        format!(
            "postgresql://{USER}:{PASSWORD}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    /// Writes the URL into `path`, mode 0600.
    pub fn url_file(&self, path: &Path) -> PathBuf {
        std::fs::write(path, format!("{}\n", self.url())).expect("url file");
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        path.to_path_buf()
    }

    /// `psql -Atc SQL`: the output, trimmed. Panics when psql fails.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql)
            .unwrap_or_else(|e| panic!("psql {sql}: {e}"))
    }

    /// `psql -Atc SQL`: the output, trimmed, or psql's error (server down, no table yet).
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        self.psql_as(USER, PASSWORD, sql)
    }

    /// `psql -Atc SQL` as another role: the output, trimmed, or psql's error.
    pub fn psql_as(&self, user: &str, password: &str, sql: &str) -> Result<String, String> {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", user])
            .args([
                "-d",
                "postgres",
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .env("PGPASSWORD", password)
            .output()
            .expect("run psql");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.signal_all(libc::SIGCONT);
        self.down();
    }
}
