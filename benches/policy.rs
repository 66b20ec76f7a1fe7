//! Policy server latency (not a test): p50/p99/max of answers at 1,000 and 5,000 requests
//! per second spread over 50 persistent connections, like as many smtpd processes. The
//! server runs in this process on its own runtime (two threads, like the daemon's), with
//! 100k grants and caps on; the clients send on a fixed schedule (open loop: a slow
//! answer does not slow the senders) and time each request from its send to its answer.
//! `DOVEGATE_BENCH_SECS` sets each run's length (default 10).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dovegate::engine::{GrantsView, LoginsView};
use dovegate::net::Listen;
use dovegate::policy::{start, CapLimits, Context, PolicySettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNECTIONS: usize = 50;
const GRANTS: u32 = 100_000;

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a smoke test
    // (a second per rate: it must work, its figures mean nothing in a debug build).
    let measuring = std::env::args().any(|a| a == "--bench");
    let secs: u64 = std::env::var("DOVEGATE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if measuring { 10 } else { 1 });
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let view = GrantsView::default();
    for i in 0..GRANTS {
        view.insert(
            std::net::IpAddr::from((0x0a00_0000 + i).to_be_bytes()),
            i64::MAX,
        );
    }
    let mut cfg = PolicySettings::for_listen(Listen::Inet("127.0.0.1:0".parse().unwrap()));
    // Caps on but out of reach: the bench measures their cost, not their refusals.
    cfg.caps = CapLimits {
        grant_recipients_per_hour: u32::MAX,
        grant_recipients_per_day: u32::MAX,
        user_recipients_per_hour: u32::MAX,
        user_recipients_per_day: u32::MAX,
        ..Default::default()
    };
    let ctx = Context::new(view, LoginsView::default(), None, None);
    let server = server_rt.block_on(start(cfg, &ctx)).unwrap();
    let Listen::Inet(addr) = server.listen().clone() else {
        unreachable!()
    };
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "policy server: {CONNECTIONS} persistent connections, {GRANTS} grants, {secs} s per rate"
    );
    println!(
        "{:>8} {:>9} {:>10} {:>10} {:>10}",
        "req/s", "answered", "p50 us", "p99 us", "max us"
    );
    for rate in [1_000u64, 5_000] {
        let mut lat = client_rt.block_on(run(addr, rate, Duration::from_secs(secs)));
        lat.sort_unstable();
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
        println!(
            "{:>8} {:>9} {:>10} {:>10} {:>10}",
            rate,
            lat.len(),
            pct(0.50),
            pct(0.99),
            lat.last().copied().unwrap_or(0)
        );
    }
}

/// Latencies (microseconds) of every request sent at `rate` per second for `length`.
async fn run(addr: SocketAddr, rate: u64, length: Duration) -> Vec<u64> {
    let per_conn = Duration::from_secs_f64(CONNECTIONS as f64 / rate as f64);
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        tasks.push(tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            let (mut rd, mut wr) = s.into_split();
            // Sends on schedule; the reader times each answer against its send time.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
            let writer = tokio::spawn(async move {
                // Spread the connections' schedules over one period.
                tokio::time::sleep(per_conn.mul_f64(c as f64 / CONNECTIONS as f64)).await;
                let mut tick = tokio::time::interval(per_conn);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let end = Instant::now() + length;
                let mut n: u32 = 0;
                while Instant::now() < end {
                    tick.tick().await;
                    n = n.wrapping_add(1);
                    let ip = std::net::Ipv4Addr::from(0x0a00_0000 + (n * 7919 + c as u32) % GRANTS);
                    let req = format!(
                        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n\
                         client_address={ip}\nclient_name=unknown\nhelo_name=client.example\n\
                         sender=u@example.com\nrecipient=r@elsewhere.example\nrecipient_count=0\n\
                         queue_id=\ninstance={c}.{n}\nsize=0\n\n"
                    );
                    tx.send(Instant::now()).unwrap();
                    wr.write_all(req.as_bytes()).await.unwrap();
                }
                wr
            });
            let mut lat = Vec::new();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Some(sent) = rx.recv().await {
                while memchr_reply(&buf).is_none() {
                    let n = rd.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "server closed");
                    buf.extend_from_slice(&chunk[..n]);
                }
                let end = memchr_reply(&buf).unwrap();
                assert!(
                    buf.starts_with(b"action=OK"),
                    "{}",
                    String::from_utf8_lossy(&buf)
                );
                buf.drain(..end);
                lat.push(sent.elapsed().as_micros() as u64);
            }
            drop(writer.await);
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn memchr_reply(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2)
}
