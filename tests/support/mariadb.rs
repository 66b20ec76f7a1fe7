//! A private MariaDB server for tests: `mariadb-install-db` in a temp dir, `mariadbd` on a
//! free loopback port (and a socket in the dir), stopped on drop. Nothing of the system's
//! (no `/etc/mysql`, no system instance, no new machine user): `--no-defaults` everywhere
//! and the server runs as the test's own user (root: `--user=root`).
//!
//! The tests' user `dovegate` (password `PASSWORD`) has every right on database `DB`; root
//! connects through the socket only (administration, forged rows by another user).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const USER: &str = "dovegate";
pub const PASSWORD: &str = "s3cret-test";
pub const DB: &str = "mail";

pub struct Maria {
    pub dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
    /// Extra server options (binary log, server id for replication).
    options: Vec<String>,
    /// Once up, the port is known to clients (URL files) and never changes.
    started: bool,
}

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port()
}

impl Maria {
    /// Installs a data directory under `dir`, starts the server, creates `USER` and `DB`.
    pub fn start(dir: &Path) -> Maria {
        Maria::start_with(&dir.join("mariadb"), &[])
    }

    /// Like `start`, in `dir` itself, with extra server options (e.g. `--log-bin`,
    /// `--server-id=N` for a replication primary or replica).
    pub fn start_with(dir: &Path, options: &[&str]) -> Maria {
        let dir = dir.to_path_buf();
        // Its own temporary directory: servers bootstrapping together in the shared /tmp
        // collided on temporary table files ("Error on delete of '/tmp/#sql-temptable-...").
        std::fs::create_dir_all(dir.join("tmp")).expect("mkdir mariadb");
        let out = Command::new("mariadb-install-db")
            .args(["--no-defaults", "--user=root", "--skip-test-db"])
            .arg("--auth-root-authentication-method=socket")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--tmpdir={}", dir.join("tmp").display()))
            .stdin(Stdio::null())
            .output()
            .expect("run mariadb-install-db (apt-get install mariadb-server)");
        assert!(
            out.status.success(),
            "mariadb-install-db: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut m = Maria {
            dir,
            port: free_port(),
            child: None,
            options: options.iter().map(|o| o.to_string()).collect(),
            started: false,
        };
        m.up();
        m.root(&format!(
            "CREATE DATABASE {DB};
             CREATE USER '{USER}'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}';
             GRANT ALL ON {DB}.* TO '{USER}'@'127.0.0.1';"
        ));
        m
    }

    /// Like `start`, with TLS: a server certificate for IP 127.0.0.1 signed by a test CA,
    /// and the user `dovegate` required to use TLS; returns the CA certificate file too.
    pub fn start_tls(dir: &Path) -> (Maria, PathBuf) {
        let d = dir.join("mariadb-tls");
        std::fs::create_dir_all(&d).expect("mkdir");
        crate::tls::make_test_ca(&d);
        let opt = |k: &str, f: &str| format!("--{k}={}", d.join(f).display());
        let (cert, key, ca) = (
            opt("ssl-cert", "server.pem"),
            opt("ssl-key", "server.key"),
            opt("ssl-ca", "ca.pem"),
        );
        let m = Maria::start_with(&d.join("server"), &[&cert, &key, &ca]);
        m.root(&format!("ALTER USER '{USER}'@'127.0.0.1' REQUIRE SSL"));
        (m, d.join("ca.pem"))
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("sock")
    }

    /// Starts the server (again) on the same port and waits until it answers.
    pub fn up(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .expect("log");
        let log_from = log.metadata().map_or(0, |m| m.len() as usize);
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.dir.join("data").display()))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!("--pid-file={}", self.dir.join("pid").display()))
            .arg(format!("--tmpdir={}", self.dir.join("tmp").display()))
            .arg(format!("--port={}", self.port))
            .args(["--bind-address=127.0.0.1", "--user=root"])
            // Tests, not durability of the server's own files: a crash is a restart here.
            .arg("--innodb-flush-log-at-trx-commit=2")
            .args(
                (!self.options.iter().any(|o| o.starts_with("--log-bin")))
                    .then_some("--skip-log-bin"),
            )
            .args(&self.options)
            .args(["--innodb-buffer-pool-size=32M", "--max-connections=200"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mariadbd");
        self.child = Some(child);
        let start = Instant::now();
        while self.try_root("SELECT 1").is_err() || !self.tcp_ready() {
            if let Some(c) = &mut self.child {
                if let Ok(Some(st)) = c.try_wait() {
                    let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
                    let this_run = log.get(log_from..).unwrap_or("");
                    // The free port was taken meanwhile (tests run in parallel): another,
                    // unless clients already know this one (a restart).
                    if this_run.contains("Address already in use") && !self.started {
                        self.child = None;
                        self.port = free_port();
                        return self.up();
                    }
                    panic!("mariadbd exited ({st}): {log}");
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "mariadbd did not start: {}",
                std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.started = true;
    }

    fn tcp_ready(&self) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }

    /// Normal shutdown (SIGTERM), waited for: sessions are cut, as in a restart.
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP or SIGCONT the server (one process): a hung database whose kernel still
    /// accepts TCP connections.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    pub fn url(&self) -> String {
        format!("mysql://{USER}:{PASSWORD}@127.0.0.1:{}/{DB}", self.port)
    }

    /// Writes the URL into `path`, mode 0600.
    pub fn url_file(&self, path: &Path) -> PathBuf {
        std::fs::write(path, format!("{}\n", self.url())).expect("url file");
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        path.to_path_buf()
    }

    /// SQL as root through the socket (batch mode, tab-separated, no headers): the output,
    /// trimmed. Panics on failure.
    pub fn root(&self, sql: &str) -> String {
        self.try_root(sql)
            .unwrap_or_else(|e| panic!("mariadb {sql}: {e}"))
    }

    pub fn try_root(&self, sql: &str) -> Result<String, String> {
        self.client(
            &[
                "-uroot".to_string(),
                format!("--socket={}", self.socket().display()),
            ],
            sql,
        )
    }

    /// SQL as `user` over TCP, in database `DB`.
    pub fn sql_as(&self, user: &str, password: &str, sql: &str) -> Result<String, String> {
        self.client(
            &[
                "-h127.0.0.1".to_string(),
                format!("-P{}", self.port),
                format!("-u{user}"),
                format!("-p{password}"),
                DB.to_string(),
            ],
            sql,
        )
    }

    /// SQL as `USER` in `DB`. Panics on failure.
    pub fn sql(&self, sql: &str) -> String {
        self.sql_as(USER, PASSWORD, sql)
            .unwrap_or_else(|e| panic!("mariadb {sql}: {e}"))
    }

    fn client(&self, args: &[String], sql: &str) -> Result<String, String> {
        let out = Command::new("mariadb")
            .arg("--no-defaults")
            .args(["-N", "-B", "--connect-timeout=5"])
            .args(args)
            .args(["-e", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run mariadb: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Maria {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.down();
    }
}
