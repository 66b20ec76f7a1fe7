//! The policy server's Prometheus metrics (written into the daemon's `/metrics`).

use std::fmt;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::PolicyStats;

/// `dovegate_policy_answers_total{action}`, `dovegate_policy_caps_tripped_total{cap}`,
/// `dovegate_policy_malformed_total`, `dovegate_policy_peers_refused_total`,
/// `dovegate_policy_receipts_total`, `dovegate_policy_users_blocked_total`,
/// `dovegate_policy_shared_addresses`.
pub fn encode(enc: &mut DescriptorEncoder, s: &PolicyStats) -> fmt::Result {
    let mut m = enc.encode_descriptor(
        "dovegate_policy_answers",
        "Policy server answers by action (ok: relay under a grant; dunno: no opinion, \
         Postfix goes on; defer_recent: grant ended within policy.recent; defer_cap: a cap \
         reached; defer_unsure: grants could not be checked; prepend: receipt header).",
        None,
        MetricType::Counter,
    )?;
    for (action, a) in [
        ("ok", &s.ok),
        ("dunno", &s.dunno),
        ("defer_recent", &s.defer_recent),
        ("defer_cap", &s.defer_cap),
        ("defer_unsure", &s.defer_unsure),
        ("prepend", &s.prepend),
    ] {
        let labels = [("action", action)];
        ConstCounter::new(a.load(Ordering::Relaxed))
            .encode(m.encode_family(&labels.as_slice())?)?;
    }
    let mut m = enc.encode_descriptor(
        "dovegate_policy_caps_tripped",
        "Requests deferred by a cap, by cap.",
        None,
        MetricType::Counter,
    )?;
    for (cap, n) in s.tripped() {
        let labels = [("cap", cap)];
        ConstCounter::new(n).encode(m.encode_family(&labels.as_slice())?)?;
    }
    for (name, help, v) in [
        (
            "dovegate_policy_malformed",
            "Policy connections closed for a malformed or oversized request.",
            &s.malformed,
        ),
        (
            "dovegate_policy_peers_refused",
            "Unix socket peers whose uid is not in policy.users, refused.",
            &s.peers_refused,
        ),
        (
            "dovegate_policy_receipts",
            "Messages relayed under a grant (receipts written).",
            &s.receipts,
        ),
        (
            "dovegate_policy_users_blocked",
            "Users blocked for tripping a cap (policy.block_on_cap).",
            &s.users_blocked,
        ),
    ] {
        let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        ConstCounter::new(v.load(Ordering::Relaxed)).encode(m)?;
    }
    let m = enc.encode_descriptor(
        "dovegate_policy_shared_addresses",
        "Granted addresses with several users behind them (NAT): their grant_ caps count them together.",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(i64::try_from(s.shared_addresses.load(Ordering::Relaxed)).unwrap_or(i64::MAX))
        .encode(m)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::metrics::{render, MetricsSource};
    use std::sync::Arc;

    fn source(dir: &std::path::Path, stats: &Arc<PolicyStats>) -> Arc<MetricsSource> {
        Arc::new(MetricsSource {
            stats: Arc::default(),
            engine: Arc::default(),
            view: Default::default(),
            checkpoints: crate::state::CheckpointDir::read_only(dir),
            state_dir: dir.to_path_buf(),
            policy: Arc::clone(stats),
        })
    }

    /// Through the daemon's own scrape: shown while the server runs, in the same text
    /// format as every other metric.
    #[test]
    fn answers_and_caps_are_exposed_while_serving() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(PolicyStats::default());
        stats.ok.fetch_add(3, Ordering::Relaxed);
        stats.peers_refused.fetch_add(1, Ordering::Relaxed);
        stats.trip("user_messages_per_hour");
        let src = source(dir.path(), &stats);
        assert!(!render(&src).contains("dovegate_policy"), "off: not shown");
        stats.serving.store(true, Ordering::Relaxed);
        let text = render(&src);
        for want in [
            "# TYPE dovegate_policy_answers_total counter",
            "dovegate_policy_answers_total{action=\"ok\"} 3",
            "dovegate_policy_answers_total{action=\"defer_cap\"} 0",
            "dovegate_policy_caps_tripped_total{cap=\"user_messages_per_hour\"} 1",
            "dovegate_policy_peers_refused_total 1",
            "dovegate_policy_malformed_total 0",
            "dovegate_policy_receipts_total 0",
            "dovegate_policy_users_blocked_total 0",
            "# TYPE dovegate_policy_shared_addresses gauge",
            "dovegate_policy_shared_addresses 0",
        ] {
            assert!(text.contains(want), "missing {want}:\n{text}");
        }
    }
}
