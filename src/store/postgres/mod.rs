//! PostgreSQL as the shared store of grants between hosts (issue 13).
//!
//! Writers (`dovegate run` with `[store] postgres_url_file`) upsert grants into
//! `SCHEMA.dovegate_grants`; replicas (`dovegate replica`) LISTEN, snapshot and copy them
//! into their local LMDB map. This module holds what both share: the URL file, connecting
//! (TLS through rustls when the URL says `sslmode=require`, `verify-ca` or `verify-full`),
//! the versioned schema and the
//! SQL. Every value goes in as a parameter; the only name put into SQL text is the schema,
//! validated as a plain identifier by the configuration.

pub mod error;
pub mod replica;
pub mod shared_policy;
pub mod worker;

pub use crate::store::shared::{
    parse_address, NewerSchema, Origin, Report, Reread, Upserted, ADMIN_SOURCE, REVOKE_RACE_SECS,
};
pub use error::PgError;

use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

use crate::grant::key_text;
use crate::store::url_file::UrlError;

/// The NOTIFY channel. Since schema 3 a notification carries no payload (any role that can
/// connect may LISTEN, and must not learn client addresses; any role may NOTIFY too): it
/// only says "something changed", and listeners read what changed since their last read
/// (`changes_since`) with their own privileges, at most once per interval however many
/// notifications arrive.
pub const CHANNEL: &str = "dovegate_grants";

/// How long connecting (TCP, TLS, authentication) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how to connect; never printed (it holds the password).
#[derive(Clone)]
pub struct Target {
    config: Config,
    /// None: no TLS (`sslmode` disable, prefer or absent).
    tls: Option<Verify>,
    /// CA certificates from `sslrootcert=FILE` in the URL; None: the system store.
    roots: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
    schema: String,
}

/// What the TLS connection checks of the server's certificate. rustls always checks the
/// chain; libpq's `require` checks nothing, but a relay's grants are worth more than
/// that, so `require` checks the chain and the host name as `verify-full` does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verify {
    /// `require`, `verify-full`: signed by a trusted CA and issued for the URL's host.
    ChainAndName,
    /// `verify-ca`: signed by a trusted CA, for any host name (libpq's meaning).
    Chain,
}

/// Takes every `NAME=VALUE` out of the URL (tokio-postgres does not know `sslrootcert`
/// nor the `verify-*` modes of `sslmode`): (URL without them, the last VALUE).
fn take_param(url: &str, name: &str) -> (String, Option<String>) {
    let prefix = format!("{name}=");
    let is_it = |kv: &str| kv.starts_with(&prefix);
    let value = |kv: &str| kv[prefix.len()..].to_string();
    if let Some((base, query)) = url.split_once('?') {
        let (found, rest): (Vec<&str>, Vec<&str>) = query.split('&').partition(|kv| is_it(kv));
        let url = if rest.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        (url, found.last().map(|kv| value(kv)))
    } else if !url.contains("://") {
        let (found, rest): (Vec<&str>, Vec<&str>) =
            url.split_whitespace().partition(|kv| is_it(kv));
        (rest.join(" "), found.last().map(|kv| value(kv)))
    } else {
        (url.to_string(), None)
    }
}

/// `sslmode`'s value: (tokio-postgres's mode, what TLS verifies).
/// An unknown mode is the error.
fn ssl_mode(value: Option<&str>) -> Result<(SslMode, Option<Verify>), &str> {
    Ok(match value {
        None | Some("prefer") => (SslMode::Prefer, None),
        Some("disable") => (SslMode::Disable, None),
        Some("require") | Some("verify-full") => (SslMode::Require, Some(Verify::ChainAndName)),
        Some("verify-ca") => (SslMode::Require, Some(Verify::Chain)),
        Some(other) => return Err(other),
    })
}

/// The CA certificates in `cert` (`sslrootcert=` of the URL file `file`).
fn load_roots(
    file: &Path,
    cert: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, UrlError> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| UrlError::RootCertNotPem {
            file: file.to_path_buf(),
            cert: cert.to_string(),
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(UrlError::RootCertEmpty {
            file: file.to_path_buf(),
            cert: cert.to_string(),
        });
    }
    Ok(certs)
}

/// An example of the URL the file holds, for the errors.
const EXAMPLE: &str = "postgresql://user:password@host:5432/db";

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl Target {
    /// Reads the URL file. Refuses a file other users may read: it holds the password.
    pub fn load(path: &Path, schema: &str) -> Result<Target, PgError> {
        let file = || path.to_path_buf();
        let text = super::url_file::read(path).map_err(UrlError::from)?;
        let (url, rootcert) = take_param(&text, "sslrootcert");
        let (url, mode) = take_param(&url, "sslmode");
        let url = url.as_str();
        if url.is_empty() {
            return Err(UrlError::Empty {
                file: file(),
                example: EXAMPLE,
            }
            .into());
        }
        // The parser's message never contains the URL; keep it that way (password).
        let mut config = Config::from_str(url).map_err(|e| UrlError::NotAUrl {
            file: file(),
            kind: "PostgreSQL",
            example: EXAMPLE,
            why: Some(e.to_string()),
        })?;
        let (mode, tls) = ssl_mode(mode.as_deref()).map_err(|m| UrlError::SslMode {
            file: file(),
            mode: m.to_string(),
        })?;
        config.ssl_mode(mode);
        if config.get_hosts().is_empty() {
            return Err(UrlError::NoHost { file: file() }.into());
        }
        let roots = match rootcert {
            Some(cert) => Some(load_roots(path, &cert)?),
            None => None,
        };
        Ok(Target {
            tls,
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
        let tls = match self.tls {
            Some(Verify::ChainAndName) => " (TLS)",
            Some(Verify::Chain) => " (TLS, verify-ca)",
            None => "",
        };
        format!("postgresql://{host}:{port}/{db}{tls}")
    }

    /// The schema the tables are in (a validated identifier).
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The table, schema-qualified (the schema is a validated identifier).
    pub fn table(&self) -> String {
        format!("\"{}\".dovegate_grants", self.schema)
    }

    /// The tombstones of revoked addresses, schema-qualified.
    pub fn revocations(&self) -> String {
        format!("\"{}\".dovegate_revocations", self.schema)
    }

    /// The users blocked by a cap, schema-qualified.
    pub fn blocked_users(&self) -> String {
        format!("\"{}\".dovegate_blocked_users", self.schema)
    }

    /// What each host counted for the users' caps, schema-qualified.
    pub fn policy_counts(&self) -> String {
        format!("\"{}\".dovegate_policy_counts", self.schema)
    }

    /// Both tables, for the statements that need them.
    pub fn tables(&self) -> Tables {
        Tables {
            grants: self.table(),
            revocations: self.revocations(),
            blocked_users: self.blocked_users(),
        }
    }

    /// Connects and runs the migrations. Messages the server sends on its own
    /// (notifications) go to `notices`; the connection task ends when the connection does.
    pub async fn connect(
        &self,
        notices: Option<tokio::sync::mpsc::Sender<Notice>>,
    ) -> Result<Client, PgError> {
        let fut = self.open(notices);
        let client = tokio::time::timeout(CONNECT_TIMEOUT, fut)
            .await
            .map_err(|_| PgError::Timeout {
                what: format!("{}: connecting", self.describe()),
                secs: CONNECT_TIMEOUT.as_secs(),
            })??;
        tokio::time::timeout(CONNECT_TIMEOUT * 2, migrate(&client, &self.schema))
            .await
            .map_err(|_| PgError::Timeout {
                what: format!("{}: schema migration", self.describe()),
                secs: CONNECT_TIMEOUT.as_secs() * 2,
            })??;
        Ok(client)
    }

    async fn open(
        &self,
        notices: Option<tokio::sync::mpsc::Sender<Notice>>,
    ) -> Result<Client, PgError> {
        let fail = |e: tokio_postgres::Error| {
            PgError::db(format!("{}: cannot connect", self.describe()), e)
        };
        if let Some(verify) = self.tls {
            let (client, conn) = self
                .config
                .connect(tls_connector(self.roots.as_deref(), verify)?)
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

/// The tables of one schema, schema-qualified.
#[derive(Debug, Clone)]
pub struct Tables {
    pub grants: String,
    pub revocations: String,
    pub blocked_users: String,
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
    verify: Verify,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, PgError> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = match own {
        Some(c) => c.to_vec(),
        None => rustls_native_certs::load_native_certs().certs,
    };
    for cert in certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(PgError::NoCa);
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let setup = |e: rustls::Error| PgError::Tls(e.to_string());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(setup)?;
    let config = match verify {
        Verify::ChainAndName => builder.with_root_certificates(roots),
        Verify::Chain => {
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                std::sync::Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| PgError::Tls(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(std::sync::Arc::new(ChainOnly(webpki)))
        }
    }
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// `sslmode=verify-ca`: rustls's own verifier, except that a certificate for another host
/// name is accepted. It checks the chain (and validity dates) before the name, so a name
/// error means the chain was trusted; every other error stands.
#[derive(Debug)]
struct ChainOnly(std::sync::Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A connection that LISTENs on `CHANNEL`, and where its notifications arrive (one
/// waiting stands for any number: see `drive`). Writers and replicas both use one.
pub struct Listening {
    pub client: Client,
    pub notices: tokio::sync::mpsc::Receiver<Notice>,
}

impl Listening {
    /// Connects (migrating the schema) and LISTENs, each bounded.
    pub async fn connect(target: &Target) -> Result<Listening, PgError> {
        let (tx, notices) = tokio::sync::mpsc::channel(1);
        let client = target.connect(Some(tx)).await?;
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            client.batch_execute(&format!("LISTEN {CHANNEL}")),
        )
        .await
        .map_err(|_| PgError::Timeout {
            what: "LISTEN".into(),
            secs: CONNECT_TIMEOUT.as_secs(),
        })?
        .map_err(|e| PgError::db("LISTEN", e))?;
        Ok(Listening { client, notices })
    }

    /// The next notification: Ok when something may have changed, an error when the
    /// connection ended. Cancel-safe.
    pub async fn changed(&mut self) -> Result<(), PgError> {
        match self.notices.recv().await {
            Some(Notice::Changed) => Ok(()),
            Some(Notice::Closed(why)) => Err(PgError::Lost(why)),
            None => Err(PgError::Lost("the connection task ended".into())),
        }
    }

    /// Some when the connection is known to be closed.
    pub fn closed(&self) -> Option<PgError> {
        self.client
            .is_closed()
            .then(|| PgError::Lost("the connection was closed".into()))
    }
}

/// What the connection tells a listener.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// Something changed (or someone sent a notification: anyone may): read what changed.
    Changed,
    Closed(String),
}

/// Polls the connection, forwarding notifications; reports how it ended. Notifications are
/// coalesced: one waiting in the channel stands for any number (a flood costs one read).
async fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    notices: Option<tokio::sync::mpsc::Sender<Notice>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio_postgres::tls::TlsStream + Unpin,
{
    let why = loop {
        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            None => break "closed by the server".to_string(),
            Some(Err(e)) => break error_text(&e),
            Some(Ok(AsyncMessage::Notification(n))) => {
                if let (Some(tx), true) = (&notices, n.channel() == CHANNEL) {
                    // Full: a notice is already waiting, which says the same.
                    let _ = tx.try_send(Notice::Changed);
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
    // 3: (a) only canonical addresses (what dovegate writes: Postfix's `pgsql:` map tries
    // shortened keys such as `1.2.3`, and `unknown` for clients without reverse DNS), no
    // expiry beyond updated_at + 31 days (the longest grant.ttl), no future updated_at;
    // rows that break these are no login's: deleted. (b) Revocations that hold: a revoke
    // (dovegate revoke, DELETE or TRUNCATE by hand) leaves a tombstone with its time, and a
    // grant from a login before it is refused. (c) Notifications without addresses, one
    // per statement; listeners read what changed since their last read by transaction id
    // (`tx`, compared with the oldest transaction still running then).
    r#"
CREATE FUNCTION dovegate_canonical_address(a text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    i inet;
BEGIN
    IF a IS NULL OR a !~ '^[0-9a-f.:]{2,39}$' THEN
        RETURN false;
    END IF;
    i := a::inet;
    RETURN host(i) = a
        AND masklen(i) = CASE family(i) WHEN 4 THEN 32 ELSE 128 END
        AND NOT (family(i) = 6 AND i << '::ffff:0:0/96'::inet);
EXCEPTION WHEN others THEN
    RETURN false;
END
$$;
DELETE FROM dovegate_grants WHERE NOT dovegate_canonical_address(address)
    OR updated_at > now() + interval '60 seconds'
    OR expires > updated_at + interval '31 days';
DROP TRIGGER dovegate_grants_notify ON dovegate_grants;
DROP FUNCTION dovegate_grants_notify();
ALTER TABLE dovegate_grants
    ADD CONSTRAINT dovegate_grants_canonical CHECK (dovegate_canonical_address(address)),
    ADD CONSTRAINT dovegate_grants_bounded CHECK (expires <= updated_at + interval '31 days'),
    ADD CONSTRAINT dovegate_grants_not_future CHECK (updated_at <= now() + interval '60 seconds'),
    ADD COLUMN tx xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX dovegate_grants_tx ON dovegate_grants (tx);
CREATE TABLE dovegate_revocations (
    address text PRIMARY KEY CHECK (dovegate_canonical_address(address)),
    revoked_at timestamptz NOT NULL DEFAULT now() CHECK (isfinite(revoked_at)),
    revoked_by text NOT NULL DEFAULT current_user,
    tx xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX dovegate_revocations_tx ON dovegate_revocations (tx);
CREATE INDEX dovegate_revocations_at ON dovegate_revocations (revoked_at);
CREATE FUNCTION dovegate_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.tx := pg_current_xact_id();
    RETURN NEW;
END
$$;
CREATE TRIGGER dovegate_grants_stamp BEFORE INSERT OR UPDATE ON dovegate_grants
    FOR EACH ROW EXECUTE FUNCTION dovegate_stamp();
CREATE TRIGGER dovegate_revocations_stamp BEFORE INSERT OR UPDATE ON dovegate_revocations
    FOR EACH ROW EXECUTE FUNCTION dovegate_stamp();
-- Deleting a grant that still grants is a revoke (expired rows are only cleaned up).
-- SECURITY DEFINER: an administrator allowed to DELETE need not be allowed to INSERT here.
CREATE FUNCTION dovegate_grants_deleted() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO dovegate_revocations (address)
        SELECT DISTINCT address FROM old_rows WHERE expires > now()
        ON CONFLICT (address) DO UPDATE SET revoked_at = now(), revoked_by = session_user;
    RETURN NULL;
END
$$;
CREATE TRIGGER dovegate_grants_deleted AFTER DELETE ON dovegate_grants
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION dovegate_grants_deleted();
CREATE FUNCTION dovegate_grants_truncated() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO dovegate_revocations (address)
        SELECT address FROM dovegate_grants WHERE expires > now()
        ON CONFLICT (address) DO UPDATE SET revoked_at = now(), revoked_by = session_user;
    RETURN NULL;
END
$$;
CREATE TRIGGER dovegate_grants_truncated BEFORE TRUNCATE ON dovegate_grants
    FOR EACH STATEMENT EXECUTE FUNCTION dovegate_grants_truncated();
CREATE FUNCTION dovegate_grants_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dovegate_grants', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER dovegate_grants_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON dovegate_grants FOR EACH STATEMENT EXECUTE FUNCTION dovegate_grants_notify();
CREATE TRIGGER dovegate_revocations_notify AFTER INSERT OR UPDATE
    ON dovegate_revocations FOR EACH STATEMENT EXECUTE FUNCTION dovegate_grants_notify();
"#,
    // 4: the policy server's state shared between hosts: users blocked by a cap
    // (policy.block_on_cap) and what each host counted for each user's caps, in five-minute
    // buckets (no address here: only user names and counts).
    r#"
CREATE TABLE dovegate_blocked_users (
    user_name text PRIMARY KEY CHECK (length(user_name) BETWEEN 1 AND 256),
    cap text NOT NULL CHECK (length(cap) BETWEEN 1 AND 64),
    blocked_at timestamptz NOT NULL DEFAULT now() CHECK (isfinite(blocked_at)),
    blocked_by text NOT NULL CHECK (length(blocked_by) <= 256)
);
CREATE TABLE dovegate_policy_counts (
    user_name text NOT NULL CHECK (length(user_name) BETWEEN 1 AND 256),
    kind text NOT NULL CHECK (kind IN ('messages', 'recipients')),
    bucket bigint NOT NULL,
    host text NOT NULL CHECK (length(host) BETWEEN 1 AND 256),
    count bigint NOT NULL CHECK (count >= 0),
    PRIMARY KEY (user_name, kind, bucket, host)
);
CREATE INDEX dovegate_policy_counts_bucket ON dovegate_policy_counts (bucket);
"#,
    // 5: the fleet as the database sees it (`dovegate status --fleet`): every writer and
    // replica reports itself every few seconds through `dovegate_report`, SECURITY DEFINER
    // so that a replica whose role may only SELECT reports too; the database stamps the
    // time and measures the host's clock against its own. Anyone who can connect may
    // report (status only, never grants): rows are bounded (1000, and forgotten after 7
    // days of silence) and their texts clipped.
    r#"
CREATE TABLE dovegate_hosts (
    host text NOT NULL CHECK (length(host) BETWEEN 1 AND 255),
    role text NOT NULL CHECK (role IN ('writer', 'replica')),
    instance text NOT NULL CHECK (length(instance) <= 255),
    seen_at timestamptz NOT NULL DEFAULT now(),
    clock_skew_secs float8,
    connected_since timestamptz,
    spill_queue bigint,
    spill_dropped bigint,
    lag_secs float8,
    grants bigint,
    PRIMARY KEY (host, role, instance)
);
CREATE FUNCTION dovegate_report(p_host text, p_role text, p_instance text,
    p_host_time float8, p_spill bigint, p_dropped bigint, p_lag float8, p_grants bigint)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    h text := left(p_host, 255);
    i text := left(p_instance, 255);
BEGIN
    DELETE FROM dovegate_hosts WHERE seen_at < now() - interval '7 days';
    IF NOT EXISTS (SELECT 1 FROM dovegate_hosts WHERE host = h AND role = p_role AND instance = i)
        AND (SELECT count(*) FROM dovegate_hosts) >= 1000 THEN
        RETURN;
    END IF;
    INSERT INTO dovegate_hosts AS d (host, role, instance, seen_at, clock_skew_secs,
        connected_since, spill_queue, spill_dropped, lag_secs, grants)
    VALUES (h, p_role, i, now(), p_host_time - extract(epoch FROM clock_timestamp()),
        now(), p_spill, p_dropped, p_lag, p_grants)
    ON CONFLICT (host, role, instance) DO UPDATE SET seen_at = EXCLUDED.seen_at,
        clock_skew_secs = EXCLUDED.clock_skew_secs,
        -- A report more than a minute after the last one starts a new connection.
        connected_since = CASE WHEN d.seen_at < now() - interval '60 seconds'
            THEN EXCLUDED.connected_since ELSE d.connected_since END,
        spill_queue = EXCLUDED.spill_queue, spill_dropped = EXCLUDED.spill_dropped,
        lag_secs = EXCLUDED.lag_secs, grants = EXCLUDED.grants;
END
$$;
"#,
];

/// Advisory lock key for migrations: two writers starting at once must not race.
const MIGRATION_LOCK: i64 = 0x646f_7665_6761_7465; // "dovegate"

/// Creates or migrates the schema. Returns the version now in place. A current schema is
/// only read (no DDL, no lock), so replicas and Postfix may use a role that can only SELECT.
pub async fn migrate(client: &Client, schema: &str) -> Result<i32, PgError> {
    let e = |e: tokio_postgres::Error| PgError::db("schema migration", e);
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
        let current: i32 = row.get(0);
        if current == latest {
            return Ok(latest);
        }
        // Said before anything that needs more than SELECT (replicas' roles).
        if current > latest {
            return Err(PgError::NewerSchema(NewerSchema {
                found: current,
                known: latest,
            }));
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
            return Err(PgError::NewerSchema(NewerSchema {
                found: current,
                known: latest,
            }));
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
                .execute(
                    "INSERT INTO dovegate_schema (version) VALUES ($1)",
                    &[&latest],
                )
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

/// Reports this host to the database (its clock is measured there).
pub async fn report(
    client: &Client,
    schema: &str,
    host: &str,
    r: &Report,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!("SELECT \"{schema}\".dovegate_report($1, $2, $3, $4, $5, $6, $7, $8)"),
            &[
                &host,
                &r.role,
                &r.instance,
                &crate::timefmt::now_f64(),
                &r.spill_queue,
                &r.spill_dropped,
                &r.lag_secs,
                &r.grants,
            ],
        )
        .await?;
    Ok(())
}

/// One writer or replica as the database last saw it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SeenHost {
    pub host: String,
    pub role: String,
    pub instance: String,
    /// Unix seconds (the database's clock) of its last report, and how long ago that is.
    pub seen: f64,
    pub seen_secs_ago: f64,
    /// Its clock minus the database's at its last report.
    pub clock_skew_secs: Option<f64>,
    /// Since when it reports without a gap of a minute (unix seconds).
    pub connected_since: Option<f64>,
    pub spill_queue: Option<i64>,
    pub spill_dropped: Option<i64>,
    pub lag_secs: Option<f64>,
    pub grants: Option<i64>,
}

/// Every writer and replica that reported in the last 7 days.
pub async fn fleet(client: &Client, schema: &str) -> Result<Vec<SeenHost>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT host, role, instance, extract(epoch FROM seen_at)::float8,
                        extract(epoch FROM clock_timestamp() - seen_at)::float8, clock_skew_secs,
                        extract(epoch FROM connected_since)::float8, spill_queue, spill_dropped,
                        lag_secs, grants
                 FROM \"{schema}\".dovegate_hosts ORDER BY role DESC, host, instance LIMIT 1000"
            ),
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| SeenHost {
            host: r.get(0),
            role: r.get(1),
            instance: r.get(2),
            seen: r.get(3),
            seen_secs_ago: r.get(4),
            clock_skew_secs: r.get(5),
            connected_since: r.get(6),
            spill_queue: r.get(7),
            spill_dropped: r.get(8),
            lag_secs: r.get(9),
            grants: r.get(10),
        })
        .collect())
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
/// `max_ttl`. `skew` (this host's clock minus the database's, seconds) is taken off each
/// expiry, so a writer whose clock is slow still writes a grant that lasts. A grant whose
/// login (expiry - `max_ttl`) is not after its address's revocation (+ `REVOKE_RACE_SECS`)
/// is refused.
pub async fn upsert(
    client: &Client,
    t: &Tables,
    grants: &[(IpAddr, i64)],
    max_ttl: i64,
    skew: f64,
    origin: &Origin,
) -> Result<Upserted, tokio_postgres::Error> {
    // ON CONFLICT cannot touch one row twice in a statement: one entry per address.
    let mut unique: std::collections::HashMap<IpAddr, i64> = std::collections::HashMap::new();
    for &(ip, e) in grants {
        let v = unique.entry(ip).or_insert(e);
        *v = (*v).max(e);
    }
    let addresses: Vec<String> = unique.keys().map(|&ip| key_text(ip)).collect();
    let expiries: Vec<i64> = unique.values().copied().collect();
    let (grants_t, revocations_t) = (&t.grants, &t.revocations);
    let sql = format!(
        "WITH input AS (
             SELECT a, LEAST(GREATEST(e::float8 - $6::float8, 0), extract(epoch FROM now())::float8 + $3::float8) AS e
             FROM unnest($1::text[], $2::int8[]) AS u(a, e)),
         blocked AS (
             SELECT i.a FROM input i JOIN {revocations_t} r ON r.address = i.a
             WHERE r.revoked_at + make_interval(secs => {REVOKE_RACE_SECS}) >= to_timestamp(i.e - $3::float8)),
         written AS (
             INSERT INTO {grants_t} AS g (address, expires, granted_by, source, updated_at)
             SELECT a, to_timestamp(e), $4, $5, now() FROM input
             WHERE a NOT IN (SELECT a FROM blocked)
             ON CONFLICT (address) DO UPDATE SET
                 expires = GREATEST(
                     LEAST(g.expires, g.updated_at + make_interval(secs => $3::float8), now() + make_interval(secs => $3::float8)),
                     EXCLUDED.expires),
                 granted_by = EXCLUDED.granted_by,
                 source = EXCLUDED.source,
                 updated_at = now()
             RETURNING address, floor(extract(epoch FROM LEAST(expires, now() + make_interval(secs => $3::float8))))::int8 AS e)
         SELECT address, e, false FROM written
         UNION ALL SELECT a, 0::int8, true FROM blocked"
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
                &skew,
            ],
        )
        .await?;
    let mut out = Upserted::default();
    for r in &rows {
        let Some(ip) = parse_address(r.get::<_, &str>(0)) else {
            continue;
        };
        if r.get::<_, bool>(2) {
            out.revoked.push(ip);
        } else {
            out.written.push((ip, r.get::<_, i64>(1)));
        }
    }
    Ok(out)
}

/// The database's clock, in unix seconds.
pub async fn db_now(client: &Client) -> Result<f64, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await?
        .get(0))
}

/// Where the next `changes_since` starts: a snapshot's horizon, the first transaction id
/// not yet started and those still running then. Every other transaction had ended, so its
/// changes are visible to any statement after this one; the next read looks at the rows of
/// these (`tx >= next OR tx = ANY(running)`), however long one of them runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Horizon {
    next: String,
    running: Vec<String>,
}

/// The horizon now (taken before a read, so that the read misses nothing after it).
pub async fn horizon(client: &Client) -> Result<Horizon, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_snapshot_xmax(s)::text, ARRAY(SELECT pg_snapshot_xip(s)::text)
             FROM pg_current_snapshot() AS s",
            &[],
        )
        .await?;
    Ok(Horizon {
        next: row.get(0),
        running: row.get(1),
    })
}

/// The rows of `t` written after `h`, as SQL (`$1` the next id, `$2` the running ones).
fn after_sql(table: &str) -> String {
    format!(
        "SELECT address FROM {table} WHERE tx >= $1::text::xid8 OR tx = ANY($2::text[]::xid8[])"
    )
}

/// The addresses whose grant or revocation changed since `since`, at most `limit` (more:
/// the caller resyncs).
pub async fn changes_since(
    client: &Client,
    t: &Tables,
    since: &Horizon,
    limit: i64,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "{} UNION {} LIMIT $3",
                after_sql(&t.grants),
                after_sql(&t.revocations)
            ),
            &[&since.next, &since.running, &limit],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Revocations recorded since `since`, or, with None, those younger than `ttl` (older ones
/// cancel only grants that have expired): (address, revoked_at in unix seconds of the
/// database's clock).
pub async fn revocations_since(
    client: &Client,
    t: &Tables,
    since: Option<&Horizon>,
    ttl: i64,
) -> Result<Vec<(String, f64)>, tokio_postgres::Error> {
    let rows = match since {
        Some(h) => {
            client
                .query(
                    &format!(
                        "SELECT address, extract(epoch FROM revoked_at)::float8 FROM {}
                         WHERE tx >= $1::text::xid8 OR tx = ANY($2::text[]::xid8[])",
                        t.revocations
                    ),
                    &[&h.next, &h.running],
                )
                .await?
        }
        None => {
            client
                .query(
                    &format!(
                        "SELECT address, extract(epoch FROM revoked_at)::float8 FROM {}
                         WHERE revoked_at > now() - make_interval(secs => $1::float8)",
                        t.revocations
                    ),
                    &[&(ttl as f64)],
                )
                .await?
        }
    };
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
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

/// The rows of `addresses` as `snapshot` reads them, with `updated_at` and who wrote them.
/// An address not returned grants nothing (deleted, expired, or never there).
pub async fn reread(
    client: &Client,
    table: &str,
    addresses: &[String],
    ttl: i64,
) -> Result<Vec<Reread>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT address, floor(extract(epoch FROM {}))::int8, extract(epoch FROM updated_at)::float8,
                        left(granted_by, 255), left(source, 64)
                 FROM {table} WHERE address = ANY($2::text[]) AND {}",
                effective_sql("$1"),
                grantable_sql("$1")
            ),
            &[&(ttl as f64), &addresses],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Reread {
            address: r.get(0),
            expires: r.get(1),
            updated: r.get(2),
            host: r.get(3),
            source: r.get(4),
        })
        .collect())
}

/// Removes rows expired for longer than `keep_secs` (they only serve audit meanwhile), and
/// revocations older than the longest grant they could cancel (31 days) plus `keep_secs`.
pub async fn clean(
    client: &Client,
    t: &Tables,
    keep_secs: i64,
) -> Result<u64, tokio_postgres::Error> {
    let grants = client
        .execute(
            &format!(
                "DELETE FROM {} WHERE expires < now() - make_interval(secs => $1::float8)",
                t.grants
            ),
            &[&(keep_secs as f64)],
        )
        .await?;
    let revocations = client
        .execute(
            &format!(
                "DELETE FROM {} WHERE revoked_at < now() - interval '31 days' - make_interval(secs => $1::float8)",
                t.revocations
            ),
            &[&(keep_secs as f64)],
        )
        .await?;
    Ok(grants + revocations)
}

/// Revokes one address everywhere: a tombstone (refusing grants from logins before now)
/// and the grant deleted, in one transaction. True when a grant was there.
pub async fn revoke(
    client: &Client,
    t: &Tables,
    ip: IpAddr,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "WITH tomb AS (
                     INSERT INTO {} (address) VALUES ($1)
                     ON CONFLICT (address) DO UPDATE SET revoked_at = now(), revoked_by = session_user),
                 gone AS (DELETE FROM {} WHERE address = $1 AND expires > now() RETURNING 1)
                 SELECT count(*) FROM gone",
                t.revocations, t.grants
            ),
            &[&key_text(ip)],
        )
        .await?;
    Ok(row.get::<_, i64>(0) > 0)
}

/// Sets one grant's expiry, even shorter than the stored one (manual grant), no later than
/// the database's now + `max_ttl`.
pub async fn set(
    client: &Client,
    table: &str,
    ip: IpAddr,
    expires: i64,
    max_ttl: i64,
    origin: &Origin,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "INSERT INTO {table} AS g (address, expires, granted_by, source, updated_at)
                 VALUES ($1, LEAST(to_timestamp($2::float8), now() + make_interval(secs => $5::float8)), $3, $4, now())
                 ON CONFLICT (address) DO UPDATE SET expires = EXCLUDED.expires,
                     granted_by = EXCLUDED.granted_by, source = EXCLUDED.source, updated_at = now()"
            ),
            &[
                &key_text(ip),
                &(expires as f64),
                &origin.host,
                &origin.source,
                &(max_ttl as f64),
            ],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn addresses_must_be_canonical() {
        assert!(parse_address("192.0.2.7").is_some());
        assert!(parse_address("2001:db8::7").is_some());
        for bad in ["1.2.3", "unknown", "2001:DB8::7", "::ffff:192.0.2.7", ""] {
            assert_eq!(parse_address(bad), None, "{bad}");
        }
    }

    #[test]
    fn url_file_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pg.url");
        std::fs::write(&f, "postgresql://u:secret@127.0.0.1:5433/db\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Target::load(&f, "public").unwrap_err().to_string();
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
        assert_eq!(
            Target::load(&f, "public").unwrap().tls,
            Some(Verify::ChainAndName)
        );
        assert_eq!(
            take_param(
                "postgresql://h/db?sslrootcert=/ca.pem&sslmode=require",
                "sslrootcert"
            ),
            (
                "postgresql://h/db?sslmode=require".into(),
                Some("/ca.pem".into())
            )
        );
        assert_eq!(
            take_param("host=h sslrootcert=/ca.pem sslmode=require", "sslrootcert"),
            ("host=h sslmode=require".into(), Some("/ca.pem".into()))
        );
        std::fs::write(
            &f,
            "postgresql://h/db?sslmode=require&sslrootcert=/nonexistent",
        )
        .unwrap();
        let e = Target::load(&f, "public").unwrap_err().to_string();
        assert!(e.contains("sslrootcert /nonexistent"), "{e}");
        std::fs::write(&f, "mysql://nope").unwrap();
        let e = Target::load(&f, "public").unwrap_err().to_string();
        assert!(!e.contains("nope"), "{e}");
    }

    /// libpq's recommended modes are accepted (issue 26); an unknown one is named.
    #[test]
    fn sslmode_verify_modes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pg.url");
        let load = |url: &str| {
            std::fs::write(&f, url).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
            Target::load(&f, "public")
        };
        for (url, want) in [
            (
                "postgresql://u:pw@h/db?sslmode=verify-full",
                Verify::ChainAndName,
            ),
            ("postgresql://u:pw@h/db?sslmode=verify-ca", Verify::Chain),
            ("host=h user=u sslmode=verify-ca", Verify::Chain),
            ("host=h user=u sslmode=verify-full", Verify::ChainAndName),
        ] {
            let t = load(url).unwrap();
            assert_eq!(t.tls, Some(want), "{url}");
            assert_eq!(t.config.get_ssl_mode(), SslMode::Require, "{url}");
        }
        for url in [
            "postgresql://u:pw@h/db?sslmode=disable",
            "postgresql://u:pw@h/db",
        ] {
            assert_eq!(load(url).unwrap().tls, None, "{url}");
        }
        let e = load("postgresql://u:nope@h/db?sslmode=verify-everything")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sslmode=verify-everything is not one of"), "{e}");
        assert!(!e.contains("nope"), "{e}");
        std::fs::write(&f, "mysql://nope").unwrap();
        let e = Target::load(&f, "public").unwrap_err().to_string();
        assert!(!e.contains("nope"), "{e}");
    }
}
