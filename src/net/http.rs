//! HTTP/1 connections served by hyper, with the bounds every listener of the daemon keeps:
//! headers within a time, a bounded buffer, writes that must make progress, bodies bounded
//! in size and time.

use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Bytes, Incoming};
use hyper::service::HttpService;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};

use super::bounds::{Bounded, WRITE_TIMEOUT};
use super::{Conn, Stream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves HTTP/1 requests on `stream` until the peer closes, stays silent for
/// `header_timeout` between requests, or does not take a reply.
pub async fn serve<S, Svc>(
    stream: S,
    header_timeout: Duration,
    max_buf: usize,
    service: Svc,
) -> Result<(), hyper::Error>
where
    S: Stream,
    Svc: HttpService<Incoming>,
    Svc::Error: Into<BoxError>,
    Svc::ResBody: 'static,
    <Svc::ResBody as Body>::Error: Into<BoxError>,
{
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(max_buf)
        .serve_connection(TokioIo::new(Bounded::new(stream, WRITE_TIMEOUT)), service)
        .await
}

/// As `serve`, for an endpoint that anyone who can connect may reach: a connection whose
/// requests have not proven the peer (`Conn::trust`, a secret) within `first_request` is
/// closed, so strangers cannot sit on slots; Dovecot sends its first request at once.
pub async fn serve_proven<S, Svc>(
    stream: S,
    conn: &Conn,
    first_request: Duration,
    header_timeout: Duration,
    max_buf: usize,
    service: Svc,
) where
    S: Stream,
    Svc: HttpService<Incoming>,
    Svc::Error: Into<BoxError>,
    Svc::ResBody: 'static,
    <Svc::ResBody as Body>::Error: Into<BoxError>,
{
    let untrusted_deadline = async {
        tokio::time::sleep(first_request).await;
        if conn.trusted() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = serve(stream, header_timeout, max_buf, service) => {}
        _ = untrusted_deadline => {}
    }
}

/// Why a request body was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("request body too large or broken")]
    TooLarge,
    #[error("request body not sent in time")]
    TooSlow,
}

/// A request's whole body, at most `max` bytes, sent within `within`.
pub async fn body(
    req: Request<Incoming>,
    max: usize,
    within: Duration,
) -> Result<Bytes, BodyError> {
    match tokio::time::timeout(within, Limited::new(req.into_body(), max).collect()).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(_)) => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::TooSlow),
    }
}
