//! Time bounds on a connection's writes. A peer that never reads would otherwise hold its
//! connection (and its slot) forever once the socket buffer is full: a write that makes no
//! progress within the bound fails with `TimedOut`, which ends the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long one write (or flush) may wait for the peer to take bytes.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A stream whose writes fail once stalled for `limit`.
pub struct Bounded<S> {
    inner: S,
    limit: Duration,
    /// Running while a write waits for the peer; reset by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> Bounded<S> {
    pub fn new(inner: S, limit: Duration) -> Bounded<S> {
        Bounded {
            inner,
            limit,
            stalled: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Pending from the inner stream: starts (or checks) the stall clock.
    fn wait<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer took no data within the write time bound",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn done<T>(&mut self, r: io::Result<T>) -> Poll<io::Result<T>> {
        self.stalled = None;
        Poll::Ready(r)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Bounded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Bounded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(r) => self.done(r),
            Poll::Pending => self.wait(cx),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(r) => self.done(r),
            Poll::Pending => self.wait(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_shutdown(cx) {
            Poll::Ready(r) => self.done(r),
            Poll::Pending => self.wait(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_peer_that_never_reads_fails_the_write() {
        let (_deaf, server) = tokio::io::duplex(64);
        let mut s = Bounded::new(server, Duration::from_millis(100));
        let e = tokio::time::timeout(Duration::from_secs(5), s.write_all(&[0u8; 4096]))
            .await
            .expect("bounded")
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_reading_peer_is_never_cut_off() {
        use tokio::io::AsyncReadExt;
        let (mut peer, server) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            let mut chunk = [0u8; 16];
            loop {
                // Slower than the bound over the whole write, faster than it per chunk.
                tokio::time::sleep(Duration::from_millis(10)).await;
                match peer.read(&mut chunk).await {
                    Ok(0) | Err(_) => return all.len(),
                    Ok(n) => all.extend_from_slice(&chunk[..n]),
                }
            }
        });
        let mut s = Bounded::new(server, Duration::from_millis(200));
        s.write_all(&[1u8; 1024]).await.unwrap();
        drop(s);
        assert_eq!(reader.await.unwrap(), 1024);
    }
}
