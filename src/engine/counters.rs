//! What the engine did, for logs, status and metrics.

/// Upper bounds (seconds) of the commit latency histogram buckets.
pub const COMMIT_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Map commit latency: counts per bucket (not cumulative), sum and count.
#[derive(Debug, Default, Clone)]
pub struct CommitLatency {
    pub buckets: [u64; COMMIT_BUCKETS.len()],
    pub sum_secs: f64,
    pub count: u64,
}

impl CommitLatency {
    pub(super) fn record(&mut self, secs: f64) {
        if let Some(i) = COMMIT_BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i] += 1;
        }
        self.sum_secs += secs;
        self.count += 1;
    }
}

/// What the engine did, for logs, status and metrics.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub commit_latency: CommitLatency,
    pub commits: u64,
    pub granted: u64,
    pub excluded: u64,
    pub expired_logins: u64,
    pub removed: u64,
    /// Mail sessions open now (each holds its address's grant).
    pub sessions_open: u64,
    /// Grants written again because their session is still open.
    pub session_renewals: u64,
    /// Open sessions by what their last check found (`session::Evidence` names).
    pub sessions_by_evidence: std::collections::BTreeMap<&'static str, u64>,
    /// Sessions that stopped holding because nothing showed them open.
    pub sessions_released_no_evidence: u64,
    /// Sessions that stopped holding at grant.session_hold.
    pub sessions_released_hold: u64,
    /// Sessions ended by a revoke or `dovegate sessions drop`.
    pub sessions_dropped: u64,
}
