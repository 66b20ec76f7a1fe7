use super::*;
use crate::engine::{GrantsView, LoginsView};
use crate::net::Listen;
use crate::policy::PolicySettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn state(view: GrantsView) -> Arc<State> {
    let mut cfg = PolicySettings::for_listen(Listen::Inet("127.0.0.1:0".parse().unwrap()));
    cfg.idle_timeout = Duration::from_secs(1);
    Arc::new(State::new(cfg, context(view)))
}

fn context(view: GrantsView) -> Context {
    Context::new(view, LoginsView::default(), None, None)
}

fn rcpt(ip: &str) -> Vec<u8> {
    format!("request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={ip}\ninstance=1\nunknown_attr=x\n\n").into_bytes()
}

async fn read_reply<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\n\n") {
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "closed: {got:?}");
        got.push(b[0]);
    }
    String::from_utf8(got).unwrap()
}

#[tokio::test]
async fn answers_ok_dunno_and_recent_on_one_connection() {
    let view = GrantsView::default();
    view.insert("192.0.2.1".parse().unwrap(), i64::MAX);
    let st = state(view);
    st.ctx.logins.set_recent(3600);
    // An ended grant, as the engine reports it.
    st.ctx
        .logins
        .expired("192.0.2.3".parse().unwrap(), timefmt::now());
    let (mut client, server) = tokio::io::duplex(4096);
    let task = tokio::spawn(handle_connection(server, Arc::clone(&st)));
    let mut req = rcpt("192.0.2.1");
    req.extend(rcpt("192.0.2.2"));
    req.extend(rcpt("192.0.2.3"));
    // Split anywhere.
    client.write_all(&req[..10]).await.unwrap();
    client.write_all(&req[10..]).await.unwrap();
    assert_eq!(read_reply(&mut client).await, "action=OK\n\n");
    assert_eq!(read_reply(&mut client).await, "action=DUNNO\n\n");
    assert_eq!(
        read_reply(&mut client).await,
        format!("action={RECENT_TEXT}\n\n")
    );
    client.write_all(b"no equals sign\n\n").await.unwrap();
    assert_eq!(task.await.unwrap(), Closed::Malformed);
    assert_eq!(st.ctx.stats.ok.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn oversized_and_slow_requests_are_cut_off() {
    let st = state(GrantsView::default());
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let task = tokio::spawn(handle_connection(server, Arc::clone(&st)));
    client
        .write_all(&vec![b'a'; MAX_REQUEST + 10])
        .await
        .unwrap();
    assert_eq!(task.await.unwrap(), Closed::Malformed);

    let (mut client, server) = tokio::io::duplex(4096);
    let task = tokio::spawn(handle_connection(server, Arc::clone(&st)));
    client.write_all(b"request=smtpd_").await.unwrap();
    while !task.is_finished() {
        if client.write_all(b"x").await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(task.await.unwrap(), Closed::SlowRequest);

    let (_client, server) = tokio::io::duplex(64);
    assert_eq!(handle_connection(server, st).await, Closed::Idle);
}

/// A client that never finishes its request holds a slot but never stalls the others.
#[tokio::test]
async fn a_stuck_client_does_not_stall_others() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy");
    let view = GrantsView::default();
    view.insert("192.0.2.1".parse().unwrap(), i64::MAX);
    let mut cfg = PolicySettings::for_listen(Listen::Unix(path.clone()));
    cfg.max_connections = 4;
    let st = Arc::new(State::new(cfg, context(view)));
    let server = start(st).await.unwrap();
    let mut stuck = Vec::new();
    for _ in 0..6 {
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(b"request=smtpd_access_policy\n").await.unwrap();
        stuck.push(s);
    }
    for _ in 0..3 {
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        s.write_all(&rcpt("192.0.2.1")).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), read_reply(&mut s))
            .await
            .expect("answered while others are stuck");
        assert_eq!(reply, "action=OK\n\n");
    }
    server.shutdown().await;
    assert!(!path.exists());
}

/// Only the configured users may ask (a forged request could spend or trip a user's caps).
#[tokio::test]
async fn unix_peers_not_in_users_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy");
    let view = GrantsView::default();
    view.insert("192.0.2.1".parse().unwrap(), i64::MAX);
    let me = unsafe { libc::geteuid() };
    let mut cfg = PolicySettings::for_listen(Listen::Unix(path.clone()));
    cfg.peers = Some(vec![me.wrapping_add(1)]);
    let st = Arc::new(State::new(cfg, context(view.clone())));
    let server = start(st).await.unwrap();
    let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
    let _ = s.write_all(&rcpt("192.0.2.1")).await;
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got).await;
    assert!(got.is_empty(), "answered a stranger: {got:?}");
    server.shutdown().await;

    let mut cfg = PolicySettings::for_listen(Listen::Unix(path.clone()));
    cfg.peers = Some(vec![me]);
    let st = Arc::new(State::new(cfg, context(view)));
    let server = start(st).await.unwrap();
    let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
    s.write_all(&rcpt("192.0.2.1")).await.unwrap();
    assert_eq!(read_reply(&mut s).await, "action=OK\n\n");
    server.shutdown().await;
}
