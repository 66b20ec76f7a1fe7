//! PostgreSQL as the shared store of grants between hosts (issue 13).
//!
//! Writers (`dovegate run` with `[store] postgres_url_file`) upsert grants into
//! `SCHEMA.dovegate_grants`; replicas (`dovegate replica`) LISTEN, snapshot and copy them
//! into their local LMDB map. This module holds what both share: the URL file, connecting
//! (TLS through rustls when the URL says `sslmode=require`), the versioned schema and the
//! SQL. Every value goes in as a parameter; the only name put into SQL text is the schema,
//! validated as a plain identifier by the configuration.

pub mod spill;
pub mod worker;

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

use crate::grant::key_text;

/// The NOTIFY channel; payloads are JSON `{"a": address, "e": expiry|null, "u": updated_at}`.
/// Any role that can connect may NOTIFY (no table privilege is needed), so a payload is only
/// a hint naming an address: replicas read the row itself (`reread`) before applying it.
pub const CHANNEL: &str = "dovegate_grants";

/// The URL file must not hold more than this (it is one line).
const MAX_URL_FILE: u64 = 4096;

/// How long connecting (TCP, TLS, authentication) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how to connect; never printed (it holds the password).
#[derive(Clone)]
pub struct Target {
    config: Config,
    tls: bool,
    /// CA certificates from `sslrootcert=FILE` in the URL; None: the system store.
    roots: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
    schema: String,
}

/// Takes `sslrootcert=FILE` out of the URL (tokio-postgres does not know the option):
/// (URL without it, FILE).
fn take_sslrootcert(url: &str) -> (String, Option<String>) {
    let is_root = |kv: &str| kv.starts_with("sslrootcert=");
    let value = |kv: &str| kv["sslrootcert=".len()..].to_string();
    if let Some((base, query)) = url.split_once('?') {
        let (roots, rest): (Vec<&str>, Vec<&str>) = query.split('&').partition(|kv| is_root(kv));
        let url = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        (url, roots.last().map(|kv| value(kv)))
    } else if !url.contains("://") {
        let (roots, rest): (Vec<&str>, Vec<&str>) =
            url.split_whitespace().partition(|kv| is_root(kv));
        (rest.join(" "), roots.last().map(|kv| value(kv)))
    } else {
        (url.to_string(), None)
    }
}

fn load_roots(file: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("sslrootcert {file}: cannot read PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("sslrootcert {file}: no certificate in the file"));
    }
    Ok(certs)
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl Target {
    /// Reads the URL file. Refuses a file other users may read: it holds the password.
    pub fn load(path: &Path, schema: &str) -> Result<Target, String> {
        let at = path.display();
        let meta = std::fs::metadata(path).map_err(|e| format!("{at}: cannot read: {e}"))?;
        let mode = meta.permissions().mode();
        if mode & 0o004 != 0 {
            return Err(format!(
                "{at}: is readable by every user (mode {:o}) but holds the database password; chmod 0600 (or 0640 with the service's group)",
                mode & 0o777
            ));
        }
        if meta.len() > MAX_URL_FILE {
            return Err(format!(
                "{at}: larger than {MAX_URL_FILE} bytes; it must hold one URL"
            ));
        }
        // Bounded again on the read itself: the file may change after the stat above.
        let text = crate::fsread::read_text(path, MAX_URL_FILE, crate::fsread::Links::Follow)
            .map_err(|e| e.to_string())?;
        let (url, rootcert) = take_sslrootcert(text.trim());
        let url = url.as_str();
        if url.is_empty() {
            return Err(format!(
                "{at}: is empty; write one URL like postgresql://user:password@host:5432/db"
            ));
        }
        // The parser's message never contains the URL; keep it that way (password).
        let config = Config::from_str(url).map_err(|e| {
            format!("{at}: not a PostgreSQL URL like postgresql://user:password@host:5432/db ({e})")
        })?;
        if config.get_hosts().is_empty() {
            return Err(format!("{at}: the URL names no host"));
        }
        let roots = match rootcert {
            Some(f) => Some(load_roots(&f).map_err(|e| format!("{at}: {e}"))?),
            None => None,
        };
        Ok(Target {
            tls: config.get_ssl_mode() == SslMode::Require,
            roots,
            config,
            schema: schema.to_string(),
        })
    }

    /// host:port/db for logs, without credentials.
    pub fn describe(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "?".into(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let db = self.config.get_dbname().unwrap_or("");
        let tls = if self.tls { " (TLS)" } else { "" };
        format!("postgresql://{host}:{port}/{db}{tls}")
    }

    /// The table, schema-qualified (the schema is a validated identifier).
    pub fn table(&self) -> String {
        format!("\"{}\".dovegate_grants", self.schema)
    }

    /// Connects and runs the migrations. Messages the server sends on its own
    /// (notifications) go to `notices`; the connection task ends when the connection does.
    pub async fn connect(
        &self,
        notices: Option<tokio::sync::mpsc::Sender<Notice>>,
    ) -> Result<Client, String> {
        let fut = self.open(notices);
        let client = tokio::time::timeout(CONNECT_TIMEOUT, fut)
            .await
            .map_err(|_| format!("{}: connection timed out", self.describe()))??;
        tokio::time::timeout(CONNECT_TIMEOUT * 2, migrate(&client, &self.schema))
            .await
            .map_err(|_| format!("{}: schema migration timed out", self.describe()))?
            .map_err(|e| format!("{}: schema migration failed: {e}", self.describe()))?;
        Ok(client)
    }

    async fn open(
        &self,
        notices: Option<tokio::sync::mpsc::Sender<Notice>>,
    ) -> Result<Client, String> {
        let fail = |e: tokio_postgres::Error| {
            format!("{}: cannot connect: {}", self.describe(), error_text(&e))
        };
        if self.tls {
            let (client, conn) = self
                .config
                .connect(tls_connector(self.roots.as_deref())?)
                .await
                .map_err(fail)?;
            tokio::spawn(drive(conn, notices));
            Ok(client)
        } else {
            let (client, conn) = self.config.connect(NoTls).await.map_err(fail)?;
            tokio::spawn(drive(conn, notices));
            Ok(client)
        }
    }
}

/// The error with its cause (tokio-postgres puts the server's message in the source).
pub fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => match std::error::Error::source(e) {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        },
    }
}

fn tls_connector(
    own: Option<&[rustls::pki_types::CertificateDer<'static>]>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = match own {
        Some(c) => c.to_vec(),
        None => rustls_native_certs::load_native_certs().certs,
    };
    for cert in certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err("sslmode=require: no CA certificate found in the system store (/etc/ssl/certs); install ca-certificates or the database's CA".into());
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// One change announced by the trigger, or the end of the connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// The row of this address may have changed: read it (the payload's expiry is not
    /// trusted, anyone may send one).
    Changed(IpAddr),
    /// A payload that is not ours; the replica resyncs rather than guess.
    Unreadable,
    /// Notifications were dropped (the channel was full): resync.
    Overflow,
    Closed(String),
}

/// Polls the connection, forwarding notifications; reports how it ended.
async fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    notices: Option<tokio::sync::mpsc::Sender<Notice>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio_postgres::tls::TlsStream + Unpin,
{
    let mut overflowed = false;
    let why = loop {
        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            None => break "closed by the server".to_string(),
            Some(Err(e)) => break error_text(&e),
            Some(Ok(AsyncMessage::Notification(n))) => {
                let Some(tx) = &notices else { continue };
                if n.channel() != CHANNEL {
                    continue;
                }
                let notice = parse_payload(n.payload());
                match tx.try_send(notice) {
                    Ok(()) => overflowed = false,
                    Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                        if !overflowed {
                            overflowed = true;
                            // Best effort: the receiver resyncs when it sees this.
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                let _ = tx.send(Notice::Overflow).await;
                            });
                        }
                    }
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
            Some(Ok(AsyncMessage::Notice(n))) => {
                tracing::debug!(message = n.message(), "PostgreSQL notice");
            }
            Some(Ok(_)) => {}
        }
    };
    if let Some(tx) = notices {
        let _ = tx.send(Notice::Closed(why)).await;
    }
}

/// Parses a trigger payload into the address it names; anything else is `Unreadable`.
/// Never a grant by itself: the replica re-reads the row.
pub fn parse_payload(payload: &str) -> Notice {
    #[derive(serde::Deserialize)]
    struct P {
        a: String,
    }
    let Ok(p) = serde_json::from_str::<P>(payload) else {
        return Notice::Unreadable;
    };
    match parse_address(&p.a) {
        Some(ip) => Notice::Changed(ip),
        None => Notice::Unreadable,
    }
}

/// An address exactly as dovegate writes it (canonical, lower case); anything else a
/// hostile or mistaken row may hold (`1.2.3`, `unknown`, a hostname) is refused.
pub fn parse_address(text: &str) -> Option<IpAddr> {
    let ip: IpAddr = text.parse().ok()?;
    (key_text(ip) == text).then_some(ip)
}

/// Schema versions, applied in order inside one transaction under an advisory lock. Never
/// edit a released step: add one.
const MIGRATIONS: &[&str] = &[
    // 1: the table, its expiry index and the NOTIFY trigger.
    r#"
CREATE TABLE dovegate_grants (
    address text PRIMARY KEY CHECK (length(address) BETWEEN 1 AND 64),
    expires timestamptz NOT NULL,
    granted_by text NOT NULL,
    source text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dovegate_grants_expires ON dovegate_grants (expires);
CREATE FUNCTION dovegate_grants_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('dovegate_grants', json_build_object('a', OLD.address, 'e', NULL)::text);
        RETURN OLD;
    END IF;
    PERFORM pg_notify('dovegate_grants', json_build_object(
        'a', NEW.address,
        'e', extract(epoch FROM NEW.expires),
        'u', extract(epoch FROM NEW.updated_at))::text);
    RETURN NEW;
END
$$;
CREATE TRIGGER dovegate_grants_notify AFTER INSERT OR UPDATE OR DELETE ON dovegate_grants
    FOR EACH ROW EXECUTE FUNCTION dovegate_grants_notify();
"#,
    // 2: no infinite times (`infinity` cannot become unix seconds: one such row stopped
    // every replica's snapshot and every writer's commit). Such rows are no login's: deleted.
    r#"
DELETE FROM dovegate_grants WHERE NOT (isfinite(expires) AND isfinite(updated_at));
ALTER TABLE dovegate_grants ADD CONSTRAINT dovegate_grants_finite
    CHECK (isfinite(expires) AND isfinite(updated_at));
"#,
];

/// Advisory lock key for migrations: two writers starting at once must not race.
const MIGRATION_LOCK: i64 = 0x646f_7665_6761_7465; // "dovegate"

/// Creates or migrates the schema. Returns the version now in place. A current schema is
/// only read (no DDL, no lock), so replicas and Postfix may use a role that can only SELECT.
pub async fn migrate(client: &Client, schema: &str) -> Result<i32, String> {
    let e = |e: tokio_postgres::Error| error_text(&e);
    let latest = MIGRATIONS.len() as i32;
    let versions = format!("\"{schema}\".dovegate_schema");
    let exists: Option<String> = client
        .query_one("SELECT to_regclass($1)::text", &[&versions])
        .await
        .map_err(e)?
        .get(0);
    if exists.is_some() {
        let row = client
            .query_one(
                &format!("SELECT coalesce(max(version), 0) FROM {versions}"),
                &[],
            )
            .await
            .map_err(e)?;
        if row.get::<_, i32>(0) == latest {
            return Ok(latest);
        }
    }
    client.batch_execute("BEGIN").await.map_err(e)?;
    let result = async {
        client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(e)?;
        let has_schema = client
            .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
            .await
            .map_err(e)?
            .is_some();
        if !has_schema {
            client
                .batch_execute(&format!("CREATE SCHEMA \"{schema}\""))
                .await
                .map_err(e)?;
        }
        client
            .batch_execute(&format!(
                "SET LOCAL search_path TO \"{schema}\";
                 CREATE TABLE IF NOT EXISTS dovegate_schema (version integer NOT NULL);"
            ))
            .await
            .map_err(e)?;
        let row = client
            .query_one("SELECT coalesce(max(version), 0) FROM dovegate_schema", &[])
            .await
            .map_err(e)?;
        let current: i32 = row.get(0);
        if current > latest {
            return Err(format!(
                "schema version {current} is newer than this dovegate knows ({latest}); upgrade dovegate"
            ));
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            client.batch_execute(step).await.map_err(e)?;
            tracing::info!(schema, version = i + 1, "database schema migrated");
        }
        if current < latest {
            client
                .execute("DELETE FROM dovegate_schema", &[])
                .await
                .map_err(e)?;
            client
                .execute("INSERT INTO dovegate_schema (version) VALUES ($1)", &[&latest])
                .await
                .map_err(e)?;
        }
        Ok(latest)
    }
    .await;
    match result {
        Ok(v) => {
            client.batch_execute("COMMIT").await.map_err(e)?;
            Ok(v)
        }
        Err(m) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(m)
        }
    }
}

/// Who wrote a grant, for audit.
#[derive(Debug, Clone)]
pub struct Origin {
    pub host: String,
    pub source: String,
}

impl Origin {
    pub fn this_host(source: &str) -> Origin {
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        let host = if rc == 0 {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        } else {
            "unknown".into()
        };
        Origin {
            host,
            source: source.to_string(),
        }
    }
}

/// The expiry a row may grant, as SQL (`$N` the ttl in seconds): no later than its own
/// `updated_at` + ttl (a far-future row is not re-extended at every resync) nor the
/// database's now() + ttl (a row claiming a future `updated_at`).
fn effective_sql(ttl: &str) -> String {
    format!(
        "LEAST(expires, updated_at + make_interval(secs => {ttl}::float8), now() + make_interval(secs => {ttl}::float8))"
    )
}

/// Rows that may grant at all: finite times, `updated_at` not in the future (beyond a
/// minute of clock step), and an effective expiry still ahead.
fn grantable_sql(ttl: &str) -> String {
    format!(
        "isfinite(expires) AND isfinite(updated_at) AND updated_at <= now() + interval '60 seconds' AND {} > now()",
        effective_sql(ttl)
    )
}

/// True when the database refused the data (SQLSTATE class 22 data exception, 23
/// integrity constraint): retrying the same rows fails the same way, unlike an outage.
pub fn is_data_error(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23"))
}

/// Upserts grants in one statement; the later expiry wins, and no expiry lies further
/// than `max_ttl` after the database's clock (a writer with a clock fault cannot open a
/// relay for a year), nor is an existing row's expiry kept beyond its own `updated_at` +
/// `max_ttl`. Returns the effective expiries.
pub async fn upsert(
    client: &Client,
    table: &str,
    grants: &[(IpAddr, i64)],
    max_ttl: i64,
    origin: &Origin,
) -> Result<Vec<(IpAddr, i64)>, tokio_postgres::Error> {
    // ON CONFLICT cannot touch one row twice in a statement: one entry per address.
    let mut unique: std::collections::HashMap<IpAddr, i64> = std::collections::HashMap::new();
    for &(ip, e) in grants {
        let v = unique.entry(ip).or_insert(e);
        *v = (*v).max(e);
    }
    let addresses: Vec<String> = unique.keys().map(|&ip| key_text(ip)).collect();
    let expiries: Vec<i64> = unique.values().copied().collect();
    let sql = format!(
        "INSERT INTO {table} AS g (address, expires, granted_by, source, updated_at)
         SELECT a, to_timestamp(LEAST(GREATEST(e::float8, 0), extract(epoch FROM now())::float8 + $3::float8)), $4, $5, now()
         FROM unnest($1::text[], $2::int8[]) AS u(a, e)
         ON CONFLICT (address) DO UPDATE SET
             expires = GREATEST(
                 LEAST(g.expires, g.updated_at + make_interval(secs => $3::float8), now() + make_interval(secs => $3::float8)),
                 EXCLUDED.expires),
             granted_by = EXCLUDED.granted_by,
             source = EXCLUDED.source,
             updated_at = now()
         RETURNING address, floor(extract(epoch FROM LEAST(expires, now() + make_interval(secs => $3::float8))))::int8"
    );
    let rows = client
        .query(
            &sql,
            &[
                &addresses,
                &expiries,
                &(max_ttl as f64),
                &origin.host,
                &origin.source,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| Some((parse_address(r.get::<_, &str>(0))?, r.get::<_, i64>(1))))
        .collect())
}

/// The database's clock, in unix seconds.
pub async fn db_now(client: &Client) -> Result<f64, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT extract(epoch FROM now())::float8", &[])
        .await?
        .get(0))
}

/// Every grantable row with its effective expiry (see `effective_sql`, `ttl` in seconds)
/// and the database's clock: (grants, db_now).
pub async fn snapshot(
    client: &Client,
    table: &str,
    ttl: i64,
) -> Result<(Vec<(String, i64)>, f64), tokio_postgres::Error> {
    let now = db_now(client).await?;
    let rows = client
        .query(
            &format!(
                "SELECT address, floor(extract(epoch FROM {}))::int8 FROM {table} WHERE {}",
                effective_sql("$1"),
                grantable_sql("$1")
            ),
            &[&(ttl as f64)],
        )
        .await?;
    Ok((
        rows.iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
            .collect(),
        now,
    ))
}

/// The rows of `addresses` as `snapshot` reads them, with `updated_at` (unix seconds, for
/// lag): (address, expiry, updated). An address not returned grants nothing (deleted,
/// expired, or never there).
pub async fn reread(
    client: &Client,
    table: &str,
    addresses: &[String],
    ttl: i64,
) -> Result<Vec<(String, i64, f64)>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT address, floor(extract(epoch FROM {}))::int8, extract(epoch FROM updated_at)::float8
                 FROM {table} WHERE address = ANY($2::text[]) AND {}",
                effective_sql("$1"),
                grantable_sql("$1")
            ),
            &[&(ttl as f64), &addresses],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Removes rows expired for longer than `keep_secs` (they only serve audit meanwhile).
pub async fn clean(
    client: &Client,
    table: &str,
    keep_secs: i64,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "DELETE FROM {table} WHERE expires < now() - make_interval(secs => $1::float8)"
            ),
            &[&(keep_secs as f64)],
        )
        .await
}

/// Deletes one grant (revoke).
pub async fn delete(
    client: &Client,
    table: &str,
    ip: IpAddr,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .execute(
            &format!("DELETE FROM {table} WHERE address = $1"),
            &[&key_text(ip)],
        )
        .await?
        > 0)
}

/// Sets one grant's expiry, even shorter than the stored one (manual grant).
pub async fn set(
    client: &Client,
    table: &str,
    ip: IpAddr,
    expires: i64,
    origin: &Origin,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "INSERT INTO {table} AS g (address, expires, granted_by, source, updated_at)
                 VALUES ($1, to_timestamp($2::float8), $3, $4, now())
                 ON CONFLICT (address) DO UPDATE SET expires = EXCLUDED.expires,
                     granted_by = EXCLUDED.granted_by, source = EXCLUDED.source, updated_at = now()"
            ),
            &[
                &key_text(ip),
                &(expires as f64),
                &origin.host,
                &origin.source,
            ],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_and_addresses() {
        assert_eq!(
            parse_payload(r#"{"a":"192.0.2.7","e":1700000000.5,"u":1699999000.25}"#),
            Notice::Changed("192.0.2.7".parse().unwrap())
        );
        assert_eq!(
            parse_payload(r#"{"a":"2001:db8::7","e":null}"#),
            Notice::Changed("2001:db8::7".parse().unwrap())
        );
        for bad in [
            r#"{"a":"1.2.3","e":1}"#,
            r#"{"a":"unknown","e":1}"#,
            r#"{"a":"2001:DB8::7","e":1}"#,
            r#"{"a":"::ffff:192.0.2.7","e":1}"#,
            "192.0.2.7",
            "",
        ] {
            assert_eq!(parse_payload(bad), Notice::Unreadable, "{bad}");
        }
    }

    #[test]
    fn url_file_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pg.url");
        std::fs::write(&f, "postgresql://u:secret@127.0.0.1:5433/db\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Target::load(&f, "public").unwrap_err();
        assert!(e.contains("readable by every user"), "{e}");
        assert!(!e.contains("secret"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = Target::load(&f, "public").unwrap();
        assert_eq!(t.describe(), "postgresql://127.0.0.1:5433/db");
        assert!(!format!("{t:?}").contains("secret"));
        std::fs::write(
            &f,
            "postgresql://u:secret@127.0.0.1:5433/db?sslmode=require",
        )
        .unwrap();
        assert!(Target::load(&f, "public").unwrap().tls);
        assert_eq!(
            take_sslrootcert("postgresql://h/db?sslrootcert=/ca.pem&sslmode=require"),
            (
                "postgresql://h/db?sslmode=require".into(),
                Some("/ca.pem".into())
            )
        );
        assert_eq!(
            take_sslrootcert("host=h sslrootcert=/ca.pem sslmode=require"),
            ("host=h sslmode=require".into(), Some("/ca.pem".into()))
        );
        std::fs::write(
            &f,
            "postgresql://h/db?sslmode=require&sslrootcert=/nonexistent",
        )
        .unwrap();
        let e = Target::load(&f, "public").unwrap_err();
        assert!(e.contains("sslrootcert /nonexistent"), "{e}");
        std::fs::write(&f, "mysql://nope").unwrap();
        let e = Target::load(&f, "public").unwrap_err();
        assert!(!e.contains("nope"), "{e}");
    }
}
