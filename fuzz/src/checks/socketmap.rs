//! The socketmap server (Postfix's lookups): one connection's bytes through the daemon's
//! own connection loop (netstring framing, request handling), over an in-memory pipe.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dovegate::engine::GrantsView;
use dovegate::serve::netstring;
use dovegate::serve::socketmap::{serve_connection, Closed, Listen, SocketmapConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

fn granted() -> IpAddr {
    "192.0.2.1".parse().unwrap()
}

/// The address a key names, read independently of the server: `connect:` and `ipv6:`
/// prefixes in any case, then an address.
fn key_names(key: &str) -> Option<IpAddr> {
    let k = key.trim().to_ascii_lowercase();
    let k = k.strip_prefix("connect:").unwrap_or(&k);
    let k = k.strip_prefix("ipv6:").unwrap_or(k);
    k.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

pub fn check(data: &[u8]) {
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    });
    let cfg = Arc::new(SocketmapConfig {
        listen: Listen::Inet("127.0.0.1:0".parse().unwrap()),
        values: [("access".to_string(), "RELAY".to_string())].into(),
        default_value: "OK".into(),
        max_connections: 4,
        idle_timeout: Duration::from_secs(5),
    });
    let view = GrantsView::default();
    let now = dovegate::timefmt::now();
    view.insert(granted(), now + 3600);
    // Expired: never found.
    view.insert("2001:db8::7".parse().unwrap(), now - 1);
    let (replies, closed) = rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(serve_connection(server, view, cfg));
        let input = data.to_vec();
        let (mut rd, mut wr) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
            wr
        });
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        let wr = writer.await.unwrap();
        client = rd.unsplit(wr);
        drop(client);
        (out, task.await.unwrap())
    });
    // Every reply is a netstring answering one request, in order.
    let mut requests = Vec::new();
    let mut rest = data;
    while let Ok(Some((payload, used))) = netstring::decode(rest, 1024) {
        requests.push(payload);
        rest = &rest[used..];
    }
    let mut rest = &replies[..];
    let mut n = 0;
    while !rest.is_empty() {
        let (reply, used) = netstring::decode(rest, 1 << 16)
            .expect("a reply is a netstring")
            .expect("a whole reply");
        let request = requests.get(n).expect("more replies than requests");
        if reply.starts_with(b"OK") {
            let text = std::str::from_utf8(request).unwrap();
            let (_, key) = text.split_once(' ').unwrap();
            assert_eq!(key_names(key), Some(granted()), "OK for {text:?}");
        }
        n += 1;
        rest = &rest[used..];
    }
    assert!(n <= requests.len());
    if closed == Closed::Malformed {
        assert_eq!(
            n,
            requests.len(),
            "a malformed request ended the connection early"
        );
    }
}
