//! The socketmap server: sendmail (which has no LMDB map class) and Postfix
//! (`socketmap:unix:PATH:NAME`) ask it `<mapname> <key>` in a netstring and get `OK <value>`,
//! `NOTFOUND ` or `TEMP <reason>` back, answered from the live grants.
//!
//! Keys: sendmail's access-map form `connect:1.2.3.4` and `connect:ipv6:2001:db8:0:0:0:0:0:7`
//! (uncompressed, lower case), and plain addresses as Postfix sends them. The reply value is
//! configurable per map name (sendmail's access map wants `RELAY`). Strict limits: request
//! length, concurrent connections, idle time. A malformed request closes the connection.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

use super::netstring;
use crate::engine::GrantsView;
use crate::grant::parse_any_ip;
use crate::timefmt;

/// Requests longer than this are refused (a map name and an address fit in far less).
pub const MAX_REQUEST: usize = 1024;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Inet(std::net::SocketAddr),
}

impl Listen {
    /// `unix:/run/dovegate/socketmap` or `inet:127.0.0.1:PORT` (`inet:[::1]:PORT`).
    pub fn parse(text: &str) -> Result<Listen, String> {
        if let Some(p) = text.strip_prefix("unix:") {
            if !p.starts_with('/') {
                return Err(format!("`{text}`: the unix socket path must be absolute"));
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if let Some(a) = text.strip_prefix("inet:") {
            return a
                .parse()
                .map(Listen::Inet)
                .map_err(|_| format!("`{text}`: expected inet:127.0.0.1:PORT or inet:[::1]:PORT"));
        }
        Err(format!(
            "`{text}`: expected unix:/path or inet:ADDRESS:PORT"
        ))
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct SocketmapConfig {
    pub listen: Listen,
    /// Reply value per map name; others get `default_value`.
    pub values: BTreeMap<String, String>,
    pub default_value: String,
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

/// The address a socketmap key names, if any.
pub fn key_ip(key: &str) -> Option<IpAddr> {
    let k = key.trim().to_ascii_lowercase();
    let k = k.strip_prefix("connect:").unwrap_or(&k);
    parse_any_ip(k)
}

/// The reply to one request payload.
pub fn answer(request: &[u8], view: &GrantsView, cfg: &SocketmapConfig, now: i64) -> Vec<u8> {
    let Ok(text) = std::str::from_utf8(request) else {
        return b"PERM request is not text".to_vec();
    };
    let Some((name, key)) = text.split_once(' ') else {
        return b"PERM expected: <mapname> <key>".to_vec();
    };
    let Some(ip) = key_ip(key) else {
        return b"NOTFOUND ".to_vec();
    };
    match view.try_lookup(ip, now) {
        Ok(Some(_)) => {
            let value = cfg.values.get(name).unwrap_or(&cfg.default_value);
            format!("OK {value}").into_bytes()
        }
        Ok(None) => b"NOTFOUND ".to_vec(),
        Err(_) => b"TEMP grants unavailable".to_vec(),
    }
}

/// Serves one connection until the peer closes, goes idle, or sends something malformed.
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    view: GrantsView,
    cfg: Arc<SocketmapConfig>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        // Answer every complete request already buffered.
        loop {
            match netstring::decode(&buf, MAX_REQUEST) {
                Ok(Some((payload, used))) => {
                    let reply = netstring::encode(&answer(payload, &view, &cfg, timefmt::now()));
                    buf.drain(..used);
                    if stream.write_all(&reply).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "malformed socketmap request; closing");
                    return;
                }
            }
        }
        let n = match tokio::time::timeout(cfg.idle_timeout, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Binds and serves in the background (on the current tokio runtime).
pub async fn spawn(cfg: SocketmapConfig, view: GrantsView) -> std::io::Result<()> {
    let cfg = Arc::new(cfg);
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    match cfg.listen.clone() {
        Listen::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            // A socket left by a previous run; never remove anything that is not a socket.
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                use std::os::unix::fs::FileTypeExt;
                if meta.file_type().is_socket() {
                    std::fs::remove_file(&path)?;
                }
            }
            let listener = tokio::net::UnixListener::bind(&path)?;
            // smtpd and sendmail query as their own users; lookups reveal only grants.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
            tracing::info!(socket = %path.display(), "socketmap listening");
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    accept(stream, &slots, &view, &cfg);
                }
            });
        }
        Listen::Inet(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(address = %addr, "socketmap listening");
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    accept(stream, &slots, &view, &cfg);
                }
            });
        }
    }
    Ok(())
}

fn accept<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    slots: &Arc<Semaphore>,
    view: &GrantsView,
    cfg: &Arc<SocketmapConfig>,
) {
    let Ok(permit) = Arc::clone(slots).try_acquire_owned() else {
        tracing::warn!("socketmap connection refused: max_connections reached");
        return;
    };
    let (view, cfg) = (view.clone(), Arc::clone(cfg));
    tokio::spawn(async move {
        serve_connection(stream, view, cfg).await;
        drop(permit);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SocketmapConfig {
        SocketmapConfig {
            listen: Listen::Inet("127.0.0.1:0".parse().unwrap()),
            values: [("access".to_string(), "RELAY".to_string())].into(),
            default_value: "OK".into(),
            max_connections: 4,
            idle_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn keys() {
        assert_eq!(key_ip("connect:192.0.2.1"), "192.0.2.1".parse().ok());
        assert_eq!(
            key_ip("connect:ipv6:2001:db8:0:0:0:0:0:7"),
            "2001:db8::7".parse().ok()
        );
        assert_eq!(
            key_ip("CONNECT:IPv6:2001:DB8:0:0:0:0:0:7"),
            "2001:db8::7".parse().ok()
        );
        assert_eq!(key_ip("2001:db8::7"), "2001:db8::7".parse().ok());
        assert_eq!(key_ip("192.0.2"), None);
        assert_eq!(key_ip("from:user@example.com"), None);
        assert_eq!(key_ip("unknown"), None);
    }

    #[test]
    fn listen_forms() {
        assert!(matches!(
            Listen::parse("unix:/run/dovegate/socketmap"),
            Ok(Listen::Unix(_))
        ));
        assert!(matches!(
            Listen::parse("inet:127.0.0.1:8099"),
            Ok(Listen::Inet(_))
        ));
        assert!(matches!(
            Listen::parse("inet:[::1]:8099"),
            Ok(Listen::Inet(_))
        ));
        assert!(Listen::parse("unix:relative").is_err());
        assert!(Listen::parse("tcp:1").is_err());
    }

    #[tokio::test]
    async fn answers_and_closes_on_garbage() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let view = GrantsView::default();
        view.insert("192.0.2.1".parse().unwrap(), i64::MAX);
        let (mut client, server) = tokio::io::duplex(4096);
        let task = tokio::spawn(serve_connection(server, view, Arc::new(cfg())));
        let mut req = netstring::encode(b"access connect:192.0.2.1");
        req.extend(netstring::encode(b"relay connect:192.0.2.2"));
        req.extend(netstring::encode(b"relay 192.0.2.1"));
        // Split anywhere: requests may arrive in pieces.
        client.write_all(&req[..7]).await.unwrap();
        client.write_all(&req[7..]).await.unwrap();
        let want = b"8:OK RELAY,9:NOTFOUND ,5:OK OK,";
        let mut got = vec![0u8; 64];
        let mut n = 0;
        while n < want.len() {
            n += client.read(&mut got[n..]).await.unwrap();
        }
        assert_eq!(&got[..n], want.as_slice());
        client.write_all(b"xx:garbage").await.unwrap();
        task.await.unwrap();
        assert_eq!(
            client.read(&mut got).await.unwrap(),
            0,
            "closed after garbage"
        );
    }
}
