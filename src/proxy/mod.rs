//! The request path. `session::serve` runs one task per client connection; each request on it
//! goes through `pipeline::run`, which reads top to bottom:
//!
//! 1. route: the router on the request's generation (404 / 405); the declared body size (413).
//! 2. `on_response` filters: the route's edits for every head the client will get.
//! 3. `on_request` filters: may refuse (429), answer (`Flow::Reply`: a cache hit, a CORS
//!    preflight, written by `reply`), or add the gateway's response lines.
//! 4. the terminal: `Respond`/`Redirect` (`reply`), or `Proxy` (`forward`: pick a target through
//!    the pools, `on_upstream_request` edits, write the head and body; `response`: read the
//!    final head, which the `on_upstream_response` filters see first (and may replace), and
//!    stream the body back through the `on_body` filters; a 101 becomes a `tunnel`).
//! 5. `on_done` filters, however the request ended (the cache lands its flight or stands in
//!    for a failed upstream), then `session` decides whether the connection goes on, answers a
//!    failure through the one error funnel (`reply::error`), and records metrics and the
//!    access log.
//!
//! A failure before the response head went out becomes an error response (`ProxyError` says
//! which); after it, the client connection is closed, so a truncated response never looks
//! whole. Every head the client gets is written by `http::write`, with the route's edits.

mod duplex;
mod exchange;
mod forward;
mod pipeline;
mod reply;
mod response;
mod retry;
mod revalidate;
mod session;
mod tunnel;

use monoio::io::{
    AsyncReadRent, AsyncWriteRent, CancelableAsyncReadRent, OwnedReadHalf, OwnedWriteHalf, Split,
    Splitable,
};

use crate::body::BodyError;
use crate::error::ProxyError;
use crate::metrics::UpstreamOutcome;
use crate::tls::{TlsInfo, TlsReader, TlsStream, TlsWriter};

pub(crate) use session::serve_admitted;
pub use session::{serve, serve_accepted};

/// A client stream the pipeline can serve (TCP, TLS, in-memory in tests), as two halves that
/// a request can read and write at once. Monomorphised, never boxed.
pub trait Io: 'static {
    type Read: CancelableAsyncReadRent + 'static;
    type Write: AsyncWriteRent + 'static;
    /// Whether the stream says goodbye before it closes (TLS's close_notify).
    const CLOSE_NOTIFY: bool = false;
    fn into_halves(self) -> (Self::Read, Self::Write);
    /// What TLS negotiated, on a TLS stream.
    fn tls(&self) -> Option<TlsInfo> {
        None
    }
}

/// Plain streams split the way monoio splits them.
impl<T: AsyncReadRent + AsyncWriteRent + CancelableAsyncReadRent + Split + 'static> Io for T {
    type Read = OwnedReadHalf<T>;
    type Write = OwnedWriteHalf<T>;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl Io for TlsStream {
    type Read = TlsReader;
    type Write = TlsWriter;
    const CLOSE_NOTIFY: bool = true;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        TlsStream::into_halves(self)
    }
    fn tls(&self) -> Option<TlsInfo> {
        Some(self.info().clone())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

/// How a failed request leaves the client connection.
#[derive(Debug)]
enum Failure {
    /// Nothing past the head was read: reply; the connection survives if there is no body.
    BeforeBody(ProxyError),
    /// The whole request was read: reply; the connection survives.
    AfterBody(ProxyError),
    /// Request bytes remain unread or the framing broke: reply, then close.
    MidBody(ProxyError),
    /// The response had begun, or the client is gone: close without a reply.
    Abort,
}

impl Failure {
    /// The error, unless the client aborted.
    fn error(&self) -> Option<&ProxyError> {
        match self {
            Failure::BeforeBody(e) | Failure::AfterBody(e) | Failure::MidBody(e) => Some(e),
            Failure::Abort => None,
        }
    }

    /// How the upstream exchange ended, if the failure was the upstream's.
    fn upstream_outcome(&self) -> Option<UpstreamOutcome> {
        let e = match self {
            Failure::BeforeBody(e) | Failure::AfterBody(e) | Failure::MidBody(e) => e,
            Failure::Abort => return None,
        };
        match e {
            ProxyError::UpstreamTimeout => Some(UpstreamOutcome::Timeout),
            ProxyError::UpstreamInvalid(_) => Some(UpstreamOutcome::InvalidResponse),
            ProxyError::UpstreamUnreachable(_) => Some(UpstreamOutcome::Failed),
            _ => None,
        }
    }

    /// The upstream could not give an answer (unreachable, every target down, reset, invalid,
    /// timed out) and the client has had nothing yet: a stale entry may answer instead.
    fn origin_failed(&self) -> bool {
        let e = match self {
            Failure::BeforeBody(e) | Failure::AfterBody(e) | Failure::MidBody(e) => e,
            Failure::Abort => return false,
        };
        self.upstream_outcome().is_some() || matches!(e, ProxyError::NoHealthyTarget)
    }
}

fn body_failure(e: BodyError) -> Failure {
    match e {
        BodyError::Framing(e) => Failure::MidBody(e.into()),
        BodyError::TooLarge => Failure::MidBody(ProxyError::PayloadTooLarge),
        BodyError::ReadTimeout => Failure::MidBody(ProxyError::BodyTimeout),
        BodyError::Truncated | BodyError::Read(_) => Failure::Abort,
        BodyError::Write(_) => Failure::MidBody(ProxyError::UpstreamUnreachable("write failed")),
    }
}
