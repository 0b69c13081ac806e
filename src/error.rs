//! Every way a request can fail, and the one place each maps to a status code. The client sees
//! the status and a small JSON body `{"error": "...", "request_id": "..."}`.

use std::borrow::Cow;
use std::rc::Rc;

use crate::http::chunked::ChunkError;
use crate::http::path::PathError;
use crate::http::RequestError;
use crate::ratelimit::Refusal;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// The request head is malformed (syntax, framing headers, Host, request-target).
    BadRequest(&'static str),
    /// The request body breaks its chunked coding.
    BadChunk(&'static str),
    /// The request's path cannot be normalized (see `http::path`).
    BadPath(PathError),
    /// The client was too slow sending its head.
    HeadTimeout,
    /// The client was too slow sending its body.
    BodyTimeout,
    NoRoute,
    /// The path matched but not the method; holds the `Allow` value.
    MethodNotAllowed(String),
    PayloadTooLarge,
    UriTooLong,
    HeadersTooLarge,
    ExpectationFailed,
    NotImplemented(&'static str),
    VersionNotSupported,
    /// Connect refused or failed, connection reset, or the upstream closed before answering.
    UpstreamUnreachable(&'static str),
    /// The upstream answered with something that is not an unambiguous HTTP/1.1 response.
    UpstreamInvalid(&'static str),
    /// Every target of the upstream is marked down.
    NoHealthyTarget,
    /// Connect or response head took longer than the upstream's timeout.
    UpstreamTimeout,
    /// A rate limit of the route refused the request.
    RateLimited(Refusal),
    /// The request said `only-if-cached` and the cache had nothing fresh for it.
    NotCached,
    /// No valid credentials: 401 with the route's `www-authenticate` challenge lines.
    Unauthorized {
        challenges: Rc<[u8]>,
        /// Credentials were present but not valid (else absent).
        invalid: bool,
    },
    /// Authenticated, but not allowed here.
    Forbidden(&'static str),
    /// The gateway cannot take this request now (503 with `Retry-After`).
    Overloaded(&'static str),
}

impl ProxyError {
    pub fn status(&self) -> u16 {
        match self {
            ProxyError::BadRequest(_) | ProxyError::BadChunk(_) | ProxyError::BadPath(_) => 400,
            ProxyError::NoRoute => 404,
            ProxyError::MethodNotAllowed(_) => 405,
            ProxyError::HeadTimeout | ProxyError::BodyTimeout => 408,
            ProxyError::PayloadTooLarge => 413,
            ProxyError::UriTooLong => 414,
            ProxyError::ExpectationFailed => 417,
            ProxyError::HeadersTooLarge => 431,
            ProxyError::NotImplemented(_) => 501,
            ProxyError::UpstreamUnreachable(_) | ProxyError::UpstreamInvalid(_) => 502,
            ProxyError::NoHealthyTarget => 503,
            ProxyError::UpstreamTimeout | ProxyError::NotCached => 504,
            ProxyError::VersionNotSupported => 505,
            ProxyError::RateLimited(_) => 429,
            ProxyError::Unauthorized { .. } => 401,
            ProxyError::Forbidden(_) => 403,
            ProxyError::Overloaded(_) => 503,
        }
    }

    pub fn message(&self) -> Cow<'static, str> {
        match self {
            ProxyError::BadRequest(why) | ProxyError::BadChunk(why) => {
                Cow::Owned(format!("bad request: {why}"))
            }
            ProxyError::BadPath(e) => Cow::Owned(format!("bad request: {}", e.reason())),
            ProxyError::HeadTimeout | ProxyError::BodyTimeout => "request timed out".into(),
            ProxyError::NoRoute => "no route".into(),
            ProxyError::MethodNotAllowed(_) => "method not allowed".into(),
            ProxyError::PayloadTooLarge => "request body too large".into(),
            ProxyError::UriTooLong => "request line too long".into(),
            ProxyError::HeadersTooLarge => "request headers too large".into(),
            ProxyError::ExpectationFailed => "unsupported expectation".into(),
            ProxyError::NotImplemented(why) => (*why).into(),
            ProxyError::VersionNotSupported => "HTTP version not supported".into(),
            ProxyError::UpstreamUnreachable(why) => {
                Cow::Owned(format!("upstream unreachable: {why}"))
            }
            ProxyError::UpstreamInvalid(why) => {
                Cow::Owned(format!("invalid upstream response: {why}"))
            }
            ProxyError::NoHealthyTarget => "no healthy upstream target".into(),
            ProxyError::UpstreamTimeout => "upstream timed out".into(),
            ProxyError::RateLimited(_) => "rate limited".into(),
            ProxyError::NotCached => "not in the cache (only-if-cached)".into(),
            ProxyError::Unauthorized { invalid: false, .. } => "authentication required".into(),
            ProxyError::Unauthorized { invalid: true, .. } => "invalid credentials".into(),
            ProxyError::Forbidden(why) => Cow::Owned(format!("forbidden: {why}")),
            ProxyError::Overloaded(why) => Cow::Owned(format!("overloaded: {why}")),
        }
    }
}

impl From<RequestError> for ProxyError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Malformed(why) => ProxyError::BadRequest(why),
            RequestError::UriTooLong => ProxyError::UriTooLong,
            RequestError::HeadersTooLarge => ProxyError::HeadersTooLarge,
            RequestError::ExpectationFailed => ProxyError::ExpectationFailed,
            RequestError::NotImplemented(why) => ProxyError::NotImplemented(why),
            RequestError::VersionNotSupported => ProxyError::VersionNotSupported,
        }
    }
}

impl From<ChunkError> for ProxyError {
    fn from(e: ChunkError) -> Self {
        ProxyError::BadChunk(e.reason())
    }
}

impl ProxyError {
    /// The rejection this error counts as, if the client's input was refused (routing misses
    /// and upstream failures are not rejections).
    pub fn rejection(&self) -> Option<Reject> {
        Some(match self {
            ProxyError::BadRequest(_) => Reject::MalformedHead,
            ProxyError::BadChunk(_) => Reject::MalformedBody,
            ProxyError::BadPath(PathError::Traversal) => Reject::PathTraversal,
            ProxyError::BadPath(PathError::EncodedSlash) => Reject::EncodedSlash,
            ProxyError::BadPath(PathError::Invalid(_)) => Reject::InvalidPath,
            ProxyError::HeadTimeout => Reject::HeadTimeout,
            ProxyError::BodyTimeout => Reject::BodyTimeout,
            ProxyError::PayloadTooLarge => Reject::BodyTooLarge,
            ProxyError::UriTooLong => Reject::RequestLineTooLong,
            ProxyError::HeadersTooLarge => Reject::HeadersTooLarge,
            ProxyError::ExpectationFailed => Reject::UnsupportedExpect,
            ProxyError::NotImplemented(_) => Reject::UnsupportedMethod,
            ProxyError::VersionNotSupported => Reject::UnsupportedVersion,
            _ => return None,
        })
    }
}

/// Why hostile or malformed input was refused; each is counted per worker and exported as
/// `ringway_rejected_requests_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    MalformedHead,
    MalformedBody,
    /// A path whose dot segments climb above the root.
    PathTraversal,
    /// `%2F` or `%5C` in a path while `encoded_slashes = "reject"`.
    EncodedSlash,
    /// A bad percent-encoding, `%00`, a backslash or `#` in a path.
    InvalidPath,
    HeadTimeout,
    BodyTimeout,
    BodyTooLarge,
    RequestLineTooLong,
    HeadersTooLarge,
    UnsupportedExpect,
    UnsupportedMethod,
    UnsupportedVersion,
    /// A connection closed at accept: the worker was at `max_connections`.
    ConnectionLimit,
    /// A TLS listener's handshake did not finish within `handshake_timeout_ms`.
    TlsHandshakeTimeout,
    /// A plain HTTP request on a TLS listener (answered 400).
    TlsPlainHttp,
    /// Bytes that are neither TLS nor HTTP on a TLS listener.
    TlsNotTls,
    /// A handshake rustls refused: no common version or cipher suite, a bad message.
    TlsHandshakeFailed,
    /// A missing or untrusted client certificate where one is required.
    TlsClientCertificate,
}

impl Reject {
    pub const ALL: [Reject; 19] = [
        Reject::MalformedHead,
        Reject::MalformedBody,
        Reject::PathTraversal,
        Reject::EncodedSlash,
        Reject::InvalidPath,
        Reject::HeadTimeout,
        Reject::BodyTimeout,
        Reject::BodyTooLarge,
        Reject::RequestLineTooLong,
        Reject::HeadersTooLarge,
        Reject::UnsupportedExpect,
        Reject::UnsupportedMethod,
        Reject::UnsupportedVersion,
        Reject::ConnectionLimit,
        Reject::TlsHandshakeTimeout,
        Reject::TlsPlainHttp,
        Reject::TlsNotTls,
        Reject::TlsHandshakeFailed,
        Reject::TlsClientCertificate,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reject::MalformedHead => "malformed_head",
            Reject::MalformedBody => "malformed_body",
            Reject::PathTraversal => "path_traversal",
            Reject::EncodedSlash => "encoded_slash",
            Reject::InvalidPath => "invalid_path",
            Reject::HeadTimeout => "head_timeout",
            Reject::BodyTimeout => "body_timeout",
            Reject::BodyTooLarge => "body_too_large",
            Reject::RequestLineTooLong => "request_line_too_long",
            Reject::HeadersTooLarge => "headers_too_large",
            Reject::UnsupportedExpect => "unsupported_expect",
            Reject::UnsupportedMethod => "unsupported_method",
            Reject::UnsupportedVersion => "unsupported_version",
            Reject::ConnectionLimit => "connection_limit",
            Reject::TlsHandshakeTimeout => "tls_handshake_timeout",
            Reject::TlsPlainHttp => "tls_plain_http",
            Reject::TlsNotTls => "tls_not_tls",
            Reject::TlsHandshakeFailed => "tls_handshake_failed",
            Reject::TlsClientCertificate => "tls_client_certificate",
        }
    }
}
