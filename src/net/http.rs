//! HTTP/1 connections served by hyper, with the bounds every listener of the daemon keeps:
//! headers within a time, a bounded buffer, writes that must make progress.

use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::HttpService;
use hyper_util::rt::{TokioIo, TokioTimer};

use super::bounds::{Bounded, WRITE_TIMEOUT};
use super::Stream;

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
