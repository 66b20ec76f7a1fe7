//! The accept loop of every listener. An accept that fails for want of file
//! descriptors (EMFILE, ENFILE) or memory fails again at once while the connection waits in
//! the backlog: retrying without a pause spins a core at 100%. So failures back off, are
//! logged rate-limited, and the recovery is logged once.

use std::future::poll_fn;
use std::io;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::Label;
use crate::telemetry::{ServerReport, ServerReporter};

/// The first pause after a failed accept; doubled on each further failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// The longest pause: a recovered listener is back within this.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// No accept may fail for this long before the recovery is logged (> MAX_BACKOFF).
const RECOVERED_AFTER: Duration = Duration::from_secs(2);

/// A listener the loop can poll (tokio's unix and TCP listeners), so one loop serves both.
pub trait Listener: Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn poll_accept_stream(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Stream>>;
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    fn poll_accept_stream(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Stream>> {
        self.poll_accept(cx).map_ok(|(s, _)| s)
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    fn poll_accept_stream(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Stream>> {
        self.poll_accept(cx).map_ok(|(s, _)| s)
    }
}

/// Failures that concern one connection only (the peer gave up before we accepted it):
/// the next accept can be tried at once.
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Accepts until `stop` is cancelled (never, for a token nobody cancels: a server started
/// without a shutdown handle runs until the process ends), handing each connection to
/// `on_connection`.
pub async fn run<L: Listener>(
    listener: L,
    label: Label,
    stop: CancellationToken,
    reporter: ServerReporter,
    mut on_connection: impl FnMut(L::Stream) + Send,
) {
    let mut backoff: Option<Duration> = None;
    // Accepts failed since the last recovery, and when the last one failed. Near the limit,
    // single accepts succeed between failures as descriptors come and go: the recovery is
    // logged once no accept has failed for RECOVERED_AFTER (longer than the longest
    // backoff, so a listener still failing fails again within it).
    let mut failed: u64 = 0;
    let mut last_failure: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            _ = sleep_until(last_failure.map(|t| t + RECOVERED_AFTER)) => {
                reporter.report(ServerReport::AcceptingAgain { failed });
                failed = 0;
                last_failure = None;
                continue;
            }
            r = poll_fn(|cx| listener.poll_accept_stream(cx)) => r,
        };
        match accepted {
            Ok(stream) => {
                backoff = None;
                on_connection(stream);
            }
            Err(e) if per_connection(&e) => {
                tracing::debug!(error = %e, "{}: a client left before its connection was accepted", label.name);
            }
            Err(e) => {
                failed += 1;
                last_failure = Some(tokio::time::Instant::now());
                let pause = backoff.map_or(FIRST_BACKOFF, |d| (d * 2).min(MAX_BACKOFF));
                backoff = Some(pause);
                let fix = match (e.raw_os_error(), label.max_key) {
                    (Some(libc::EMFILE | libc::ENFILE), Some(key)) => format!(
                        ": out of file descriptors; raise LimitNOFILE (ulimit -n) or lower {key}"
                    ),
                    (Some(libc::EMFILE | libc::ENFILE), None) => {
                        ": out of file descriptors; raise LimitNOFILE (ulimit -n)".to_string()
                    }
                    _ => String::new(),
                };
                reporter.report(ServerReport::AcceptFailing {
                    error: e.to_string(),
                    fix,
                });
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// Sleeps until `at`, or forever when None.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// A listener out of file descriptors: every accept fails with EMFILE at once.
    struct OutOfFiles(Arc<AtomicU64>);

    impl Listener for OutOfFiles {
        type Stream = tokio::io::DuplexStream;
        fn poll_accept_stream(&self, _: &mut Context<'_>) -> Poll<io::Result<Self::Stream>> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Poll::Ready(Err(io::Error::from_raw_os_error(libc::EMFILE)))
        }
    }

    #[tokio::test]
    async fn failing_accepts_back_off_and_stop_promptly() {
        let attempts = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let label = Label {
            name: "test",
            max_key: None,
        };
        let reporter = ServerReporter::standalone("test");
        let task = tokio::spawn(run(
            OutOfFiles(Arc::clone(&attempts)),
            label,
            stop.clone(),
            reporter.clone(),
            |_| {},
        ));
        tokio::time::sleep(Duration::from_millis(600)).await;
        // Backing off 10, 20, 40 ... ms makes 6 attempts in 600 ms; a loop retrying at
        // once makes millions.
        let n = attempts.load(Ordering::Relaxed);
        assert!((1..=10).contains(&n), "{n} accept attempts in 600 ms");
        // Each failure reported (counted; logged at a bounded rate).
        let failures = reporter.stats().accept_failures.load(Ordering::Relaxed);
        assert_eq!(failures, n);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stopped during the backoff")
            .unwrap();
    }
}
