//! Optional Prometheus metrics at `http://ADDRESS/metrics` (off by default).
//!
//! The text exposition format is written by hand: a few counters, gauges and one histogram
//! need no client library. The HTTP side answers `GET /metrics` and nothing else, with
//! bounded request size and time.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::engine::{Counters, GrantsView, COMMIT_BUCKETS};
use crate::source::checkpoint::CheckpointDir;
use crate::source::StatsRegistry;

/// What the metrics are read from.
pub struct MetricsSource {
    pub stats: Arc<StatsRegistry>,
    /// The engine's counters as of its last heartbeat.
    pub engine: Arc<Mutex<Counters>>,
    pub view: GrantsView,
    pub checkpoints: CheckpointDir,
}

/// A per-source counter: name, help, and how to read it.
type PerSource = (
    &'static str,
    &'static str,
    fn(&crate::source::SourceStats) -> u64,
);

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The exposition text.
pub fn render(src: &MetricsSource) -> String {
    let mut out = String::new();
    let sources = src.stats.sources();
    let per_source: [PerSource; 6] = [
        (
            "dovegate_lines_read_total",
            "Log lines (or journal entries) read.",
            |s| s.lines.load(Ordering::Relaxed),
        ),
        ("dovegate_bytes_read_total", "Bytes read.", |s| {
            s.bytes.load(Ordering::Relaxed)
        }),
        (
            "dovegate_forged_total",
            "Login entries refused by the journal provenance check.",
            |s| s.forged.load(Ordering::Relaxed),
        ),
        (
            "dovegate_invalid_ip_total",
            "Login lines whose client address is invalid.",
            |s| s.invalid_ip.load(Ordering::Relaxed),
        ),
        (
            "dovegate_ambiguous_ip_total",
            "Login lines with conflicting rip= elements.",
            |s| s.ambiguous_ip.load(Ordering::Relaxed),
        ),
        (
            "dovegate_source_logins_total",
            "Login lines with a valid client address.",
            |s| s.logins.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, get) in per_source {
        head(&mut out, name, "counter", help);
        for (source, s) in &sources {
            let _ = writeln!(out, "{name}{{source=\"{}\"}} {}", label(source), get(s));
        }
    }
    head(
        &mut out,
        "dovegate_logins_matched_total",
        "Logins matched, by source and pattern.",
        "counter",
    );
    for (source, s) in &sources {
        let per = s.per_pattern.lock().map(|m| m.clone()).unwrap_or_default();
        for (pattern, n) in per {
            let _ = writeln!(
                out,
                "dovegate_logins_matched_total{{source=\"{}\",pattern=\"{}\"}} {n}",
                label(source),
                label(&pattern)
            );
        }
    }
    let c = src.engine.lock().map(|c| c.clone()).unwrap_or_default();
    head(
        &mut out,
        "dovegate_grants_active",
        "Grants in the map.",
        "gauge",
    );
    let _ = writeln!(out, "dovegate_grants_active {}", src.view.len());
    for (name, help, v) in [
        (
            "dovegate_logins_granted_total",
            "Logins that granted or extended relay.",
            c.granted,
        ),
        (
            "dovegate_logins_excluded_total",
            "Logins from excluded addresses.",
            c.excluded,
        ),
        (
            "dovegate_logins_too_old_total",
            "Logins older than the ttl (replayed).",
            c.expired_logins,
        ),
        (
            "dovegate_grants_expired_total",
            "Grants removed at expiry.",
            c.removed,
        ),
        (
            "dovegate_map_commits_total",
            "Write transactions committed to the map.",
            c.commits,
        ),
    ] {
        head(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {v}");
    }
    head(
        &mut out,
        "dovegate_map_commit_seconds",
        "Time to commit a batch of grants.",
        "histogram",
    );
    let mut cumulative = 0;
    for (bound, n) in COMMIT_BUCKETS.iter().zip(c.commit_latency.buckets) {
        cumulative += n;
        let _ = writeln!(
            out,
            "dovegate_map_commit_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
        );
    }
    let _ = writeln!(
        out,
        "dovegate_map_commit_seconds_bucket{{le=\"+Inf\"}} {}",
        c.commit_latency.count
    );
    let _ = writeln!(
        out,
        "dovegate_map_commit_seconds_sum {}",
        c.commit_latency.sum_secs
    );
    let _ = writeln!(
        out,
        "dovegate_map_commit_seconds_count {}",
        c.commit_latency.count
    );
    head(
        &mut out,
        "dovegate_checkpoint_lag_bytes",
        "Bytes written to a followed file after its committed checkpoint.",
        "gauge",
    );
    for cp in src.checkpoints.all() {
        if let Some(lag) = cp.lag() {
            let _ = writeln!(
                out,
                "dovegate_checkpoint_lag_bytes{{path=\"{}\"}} {lag}",
                label(&cp.path.display().to_string())
            );
        }
    }
    out
}

/// Serves `GET /metrics` on `addr` in the background.
pub async fn spawn(addr: SocketAddr, src: Arc<MetricsSource>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(address = %addr, "metrics listening");
    let slots = Arc::new(tokio::sync::Semaphore::new(16));
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                continue;
            };
            let src = Arc::clone(&src);
            tokio::spawn(async move {
                let mut req = Vec::with_capacity(512);
                let mut buf = [0u8; 512];
                let read = async {
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    true
                };
                if !matches!(
                    tokio::time::timeout(Duration::from_secs(5), read).await,
                    Ok(true)
                ) {
                    return;
                }
                let reply = if req.starts_with(b"GET /metrics ")
                    || req.starts_with(b"GET /metrics?")
                {
                    let body = render(&src);
                    format!("HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                } else {
                    "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_string()
                };
                let _ = stream.write_all(reply.as_bytes()).await;
                drop(permit);
            });
        }
    });
    Ok(())
}
