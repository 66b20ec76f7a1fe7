//! Optional Prometheus metrics at `http://ADDRESS/metrics` (off by default).
//!
//! The exposition is written by the `prometheus-client` crate (Prometheus text format
//! 0.0.4), from snapshots taken at each scrape: the sources' counters
//! (`telemetry::StatsRegistry`), the engine's counters as of its last heartbeat, the live
//! grants, the checkpoints, the policy server's counters while `[policy]` is on, and the
//! fleet status files (`STATE/fleet.json`, `STATE/replica.json`) when present. The HTTP
//! side (hyper, through `net`) answers `GET /metrics` and nothing else, with bounded
//! headers, time and connections (a scraper finding every slot held by idle connections
//! closes the stalest, see `net`).

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tokio_util::sync::CancellationToken;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::engine::{Counters, GrantsView, COMMIT_BUCKETS};
use crate::net::{self, Conn, Handler, Listen, Server, Spec, Stream};
use crate::replica::ReplicaStatus;
use crate::state::CheckpointDir;
use crate::store::writer::WriterStatus;
use crate::telemetry::{ServerReporter, ServerStats, SourceStats, StatsRegistry};

/// What the metrics are read from.
pub struct MetricsSource {
    pub stats: Arc<StatsRegistry>,
    /// The engine's counters as of its last heartbeat.
    pub engine: Arc<Mutex<Counters>>,
    pub view: GrantsView,
    pub checkpoints: CheckpointDir,
    /// Where the PostgreSQL writer and the replica leave their status files.
    pub state_dir: std::path::PathBuf,
    /// The policy server's counters (shown while `[policy]` is on).
    pub policy: Arc<crate::policy::PolicyStats>,
}

/// The registry's one collector: reads a snapshot at every scrape.
struct Snapshot(Arc<MetricsSource>);

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dovegate metrics snapshot")
    }
}

/// A per-source counter: name (without `_total`, which the encoder adds), help, reader.
type PerSource = (&'static str, &'static str, fn(&SourceStats) -> u64);

const PER_SOURCE: [PerSource; 8] = [
    (
        "dovegate_lines_read",
        "Log lines (or journal entries) read.",
        |s| get(&s.lines),
    ),
    ("dovegate_bytes_read", "Bytes read.", |s| get(&s.bytes)),
    (
        "dovegate_forged",
        "Login entries refused by the journal provenance check.",
        |s| get(&s.forged),
    ),
    (
        "dovegate_invalid_ip",
        "Login lines whose client address is invalid.",
        |s| get(&s.invalid_ip),
    ),
    (
        "dovegate_ambiguous_ip",
        "Login lines with conflicting rip= elements.",
        |s| get(&s.ambiguous_ip),
    ),
    (
        "dovegate_source_logins",
        "Login lines with a valid client address.",
        |s| get(&s.logins),
    ),
    (
        "dovegate_untimed_logins",
        "Login lines without a timestamp, not granted (source.untimed_lines_grant).",
        |s| get(&s.untimed),
    ),
    (
        "dovegate_lines_too_long",
        "Lines longer than source.max_line_bytes, skipped.",
        |s| get(&s.too_long),
    ),
];

type PerServer = (&'static str, &'static str, fn(&ServerStats) -> u64);

const PER_SERVER: [PerServer; 3] = [
    (
        "dovegate_connections_refused",
        "Connections closed at once: every slot busy and as many newcomers waiting.",
        |s| get(&s.refused),
    ),
    (
        "dovegate_connections_evicted",
        "Connections closed to make room for a newcomer (the stalest first).",
        |s| get(&s.evicted),
    ),
    (
        "dovegate_accept_failures",
        "Accepts that failed (out of file descriptors, say); the server backs off.",
        |s| get(&s.accept_failures),
    ),
];

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(v).encode(m)
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let src = &self.0;
        let sources = src.stats.sources();
        for (name, help, read) in PER_SOURCE {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (source, s) in &sources {
                let labels = [("source", source.as_str())];
                ConstCounter::new(read(s)).encode(m.encode_family(&labels.as_slice())?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "dovegate_source_reading",
            "1 while the source delivers new logins, 0 while it cannot (the log says why).",
            None,
            MetricType::Gauge,
        )?;
        for (source, s) in &sources {
            let labels = [("source", source.as_str())];
            let reading = i64::from(!s.has_problem());
            ConstGauge::new(reading).encode(m.encode_family(&labels.as_slice())?)?;
        }
        let mut m = enc.encode_descriptor(
            "dovegate_logins_matched",
            "Logins matched, by source and pattern.",
            None,
            MetricType::Counter,
        )?;
        for (source, s) in &sources {
            let per = s.per_pattern.lock().map(|m| m.clone()).unwrap_or_default();
            for (pattern, n) in per {
                let labels = [("source", source.as_str()), ("pattern", pattern.as_str())];
                ConstCounter::new(n).encode(m.encode_family(&labels.as_slice())?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "dovegate_near_misses",
            "Lines that look like logins but grant nothing, by source and reason.",
            None,
            MetricType::Counter,
        )?;
        for (source, s) in &sources {
            let per = s.near_misses.lock().map(|m| m.clone()).unwrap_or_default();
            for (reason, n) in per {
                let labels = [("source", source.as_str()), ("reason", reason)];
                ConstCounter::new(n).encode(m.encode_family(&labels.as_slice())?)?;
            }
        }
        let servers = src.stats.servers();
        for (name, help, read) in PER_SERVER {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (server, s) in &servers {
                let labels = [("server", *server)];
                ConstCounter::new(read(s)).encode(m.encode_family(&labels.as_slice())?)?;
            }
        }
        let c = src.engine.lock().map(|c| c.clone()).unwrap_or_default();
        let m = enc.encode_descriptor(
            "dovegate_grants_active",
            "Grants in the map.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(src.view.len()).unwrap_or(i64::MAX)).encode(m)?;
        for (name, help, v) in [
            (
                "dovegate_logins_granted",
                "Logins that granted or extended relay.",
                c.granted,
            ),
            (
                "dovegate_logins_excluded",
                "Logins from excluded addresses.",
                c.excluded,
            ),
            (
                "dovegate_logins_too_old",
                "Logins older than the ttl (replayed).",
                c.expired_logins,
            ),
            (
                "dovegate_grants_expired",
                "Grants removed at expiry.",
                c.removed,
            ),
            (
                "dovegate_map_commits",
                "Write transactions committed to the map.",
                c.commits,
            ),
            (
                "dovegate_session_renewals",
                "Grants written again because their IMAP session is still open.",
                c.session_renewals,
            ),
            (
                "dovegate_sessions_released_no_evidence",
                "Sessions that stopped holding their grant because nothing showed them open (imap process gone or unseen, no tied end lines).",
                c.sessions_released_no_evidence,
            ),
            (
                "dovegate_sessions_released_hold",
                "Sessions that stopped holding their grant at grant.session_hold.",
                c.sessions_released_hold,
            ),
            (
                "dovegate_sessions_dropped",
                "Sessions ended by a revoke or dovegate sessions drop.",
                c.sessions_dropped,
            ),
        ] {
            counter(&mut enc, name, help, v)?;
        }
        gauge(
            &mut enc,
            "dovegate_sessions_open",
            "Open IMAP sessions holding their address's grant.",
            i64::try_from(c.sessions_open).unwrap_or(i64::MAX),
        )?;
        let mut m = enc.encode_descriptor(
            "dovegate_sessions_open_by_evidence",
            "Open IMAP sessions by what their last check found (none: held only ttl).",
            None,
            MetricType::Gauge,
        )?;
        for (evidence, n) in &c.sessions_by_evidence {
            let labels = [("evidence", *evidence)];
            ConstGauge::new(i64::try_from(*n).unwrap_or(i64::MAX))
                .encode(m.encode_family(&labels.as_slice())?)?;
        }
        let mut m = enc.encode_descriptor(
            "dovegate_map_commit_seconds",
            "Time to commit a batch of grants.",
            None,
            MetricType::Histogram,
        )?;
        let buckets: Vec<(f64, u64)> = COMMIT_BUCKETS
            .iter()
            .copied()
            .zip(c.commit_latency.buckets)
            .collect();
        m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            c.commit_latency.sum_secs,
            c.commit_latency.count,
            &buckets,
            None,
        )?;
        let mut m = enc.encode_descriptor(
            "dovegate_checkpoint_lag_bytes",
            "Bytes written to a followed file after its committed checkpoint.",
            None,
            MetricType::Gauge,
        )?;
        for cp in src.checkpoints.all() {
            if let Some(lag) = cp.lag() {
                let path = cp.path.display().to_string();
                let labels = [("path", path.as_str())];
                ConstGauge::new(i64::try_from(lag).unwrap_or(i64::MAX))
                    .encode(m.encode_family(&labels.as_slice())?)?;
            }
        }
        if src.policy.serving.load(Ordering::Relaxed) {
            crate::policy::metrics::encode(&mut enc, &src.policy)?;
        }
        fleet_gauges(&mut enc, &src.state_dir)
    }
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(m)
}

/// From the status files the PostgreSQL writer and the replica rewrite every few seconds;
/// nothing when the host shares no grants.
fn fleet_gauges(enc: &mut DescriptorEncoder, state_dir: &std::path::Path) -> fmt::Result {
    writer_gauges(enc, state_dir)?;
    replica_gauges(enc, state_dir)
}

fn writer_gauges(enc: &mut DescriptorEncoder, state_dir: &std::path::Path) -> fmt::Result {
    if let Some(w) = WriterStatus::load(state_dir) {
        gauge(
            enc,
            "dovegate_fleet_connected",
            "1 when the PostgreSQL database shared by the fleet is reachable.",
            i64::from(w.connected),
        )?;
        gauge(
            enc,
            "dovegate_fleet_spill_queue_grants",
            "Grants waiting in the spill queue for the database to return.",
            i64::try_from(w.queue_len).unwrap_or(i64::MAX),
        )?;
        gauge(
            enc,
            "dovegate_fleet_database_behind",
            "1 when grants dropped from a full spill queue never reached the database.",
            i64::from(w.behind),
        )?;
        gauge(
            enc,
            "dovegate_fleet_spill_dropped_grants",
            "Grants dropped from the full spill queue since start (the database copy lacks them).",
            i64::try_from(w.dropped_total).unwrap_or(i64::MAX),
        )?;
        if let Some(skew) = w.clock_skew_secs {
            let m = enc.encode_descriptor(
                "dovegate_fleet_clock_skew_seconds",
                "This host's clock minus the database's (expiries written are corrected by it).",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(skew).encode(m)?;
        }
    }
    Ok(())
}

fn replica_gauges(enc: &mut DescriptorEncoder, state_dir: &std::path::Path) -> fmt::Result {
    if let Some(r) = ReplicaStatus::load(state_dir) {
        gauge(
            enc,
            "dovegate_replica_connected",
            "1 when the replica's database is reachable (its map is current).",
            i64::from(r.connected),
        )?;
        gauge(
            enc,
            "dovegate_replica_grants",
            "Grants in the replica's map.",
            i64::try_from(r.grants).unwrap_or(i64::MAX),
        )?;
        gauge(
            enc,
            "dovegate_replica_newer_schema",
            "The database's schema version when it is newer than this dovegate knows (upgrade); 0 otherwise.",
            r.newer_schema.map_or(0, |n| i64::from(n.found)),
        )?;
        gauge(
            enc,
            "dovegate_replica_status_timestamp_seconds",
            "When the replica last wrote its status (unix time): it does every 2 s while it runs.",
            r.updated,
        )?;
        if let Some(lag) = r.lag_secs {
            let m = enc.encode_descriptor(
                "dovegate_replica_lag_seconds",
                "Database commit to local map commit of the last change applied.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(lag).encode(m)?;
        }
        if let Some(t) = r.last_snapshot {
            gauge(
                enc,
                "dovegate_replica_last_snapshot_timestamp_seconds",
                "When the replica last copied every grant from the database (unix time).",
                t,
            )?;
        }
    }
    Ok(())
}

/// The exposition text.
pub fn render(src: &Arc<MetricsSource>) -> String {
    encode(Box::new(Snapshot(Arc::clone(src))))
}

fn encode(collector: Box<dyn Collector>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(collector);
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    out
}

/// A replica's metrics (`dovegate replica --metrics`): its status file's gauges.
#[derive(Debug)]
struct ReplicaSnapshot(std::path::PathBuf);

impl Collector for ReplicaSnapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        replica_gauges(&mut enc, &self.0)
    }
}

/// The exposition text of a replica whose state directory is `state_dir`.
pub fn render_replica(state_dir: &std::path::Path) -> String {
    encode(Box::new(ReplicaSnapshot(state_dir.to_path_buf())))
}

/// Connections served at once; more evict the stalest (Prometheus scrapes over one).
const MAX_CONNECTIONS: usize = 16;
/// How long a connection may take to send a request's headers, and stay idle between two.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request head.
const MAX_REQUEST: usize = 8192;

/// What a scrape renders.
type Render = dyn Fn() -> String + Send + Sync;

/// The answer to one request: the exposition for `GET /metrics`, 404 for anything else.
fn respond(req: &Request<Incoming>, render: &Render) -> Response<Full<Bytes>> {
    if req.method() == Method::GET && req.uri().path() == "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from(render())));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            ),
        );
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_FOUND;
        r
    }
}

/// The endpoint as a `net` server.
struct Metrics(Box<Render>);

impl Handler for Metrics {
    fn serve<S: Stream>(
        self: Arc<Self>,
        stream: S,
        conn: Conn,
    ) -> impl Future<Output = ()> + Send + 'static {
        let service = hyper::service::service_fn(move |req| {
            conn.progress();
            let r = respond(&req, &*self.0);
            async move { Ok::<_, Infallible>(r) }
        });
        async move {
            let _ = net::http::serve(stream, HEADER_TIMEOUT, MAX_REQUEST, service).await;
        }
    }
}

/// Serves `GET /metrics` on `listen` in the background until `shutdown` or `parent` is
/// cancelled.
pub async fn start(
    parent: &CancellationToken,
    listen: &Listen,
    src: Arc<MetricsSource>,
) -> std::io::Result<Server> {
    let reporter = src.stats.server_reporter(NAME);
    serve(
        parent,
        listen,
        "serve.metrics",
        Box::new(move || render(&src)),
        reporter,
    )
    .await
}

/// Serves a replica's `GET /metrics` (`dovegate replica --metrics`).
pub async fn start_replica(
    listen: &Listen,
    state_dir: std::path::PathBuf,
) -> std::io::Result<Server> {
    serve(
        &CancellationToken::new(),
        listen,
        "--metrics",
        Box::new(move || render_replica(&state_dir)),
        ServerReporter::standalone(NAME),
    )
    .await
}

async fn serve(
    parent: &CancellationToken,
    listen: &Listen,
    key: &'static str,
    render: Box<Render>,
    reporter: ServerReporter,
) -> std::io::Result<Server> {
    let spec = Spec {
        name: NAME,
        key,
        max_connections: MAX_CONNECTIONS,
        max_key: None,
        unix_mode: 0o666,
    };
    net::start_under(parent, listen, spec, Arc::new(Metrics(render)), reporter).await
}

/// The server's name in log lines and metrics.
const NAME: &str = "metrics";
