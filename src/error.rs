//! Every way a request can fail, and the one place each maps to a status code. The client sees
//! the status and a small JSON body `{"error": "...", "request_id": "..."}`.

use std::borrow::Cow;

use crate::http::chunked::ChunkError;
use crate::http::RequestError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// The request is malformed (framing, syntax, a body that breaks its framing).
    BadRequest(&'static str),
    /// The client was too slow sending its head or body.
    RequestTimeout,
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
}

impl ProxyError {
    pub fn status(&self) -> u16 {
        match self {
            ProxyError::BadRequest(_) => 400,
            ProxyError::NoRoute => 404,
            ProxyError::MethodNotAllowed(_) => 405,
            ProxyError::RequestTimeout => 408,
            ProxyError::PayloadTooLarge => 413,
            ProxyError::UriTooLong => 414,
            ProxyError::ExpectationFailed => 417,
            ProxyError::HeadersTooLarge => 431,
            ProxyError::NotImplemented(_) => 501,
            ProxyError::UpstreamUnreachable(_) | ProxyError::UpstreamInvalid(_) => 502,
            ProxyError::NoHealthyTarget => 503,
            ProxyError::UpstreamTimeout => 504,
            ProxyError::VersionNotSupported => 505,
        }
    }

    pub fn message(&self) -> Cow<'static, str> {
        match self {
            ProxyError::BadRequest(why) => Cow::Owned(format!("bad request: {why}")),
            ProxyError::RequestTimeout => "request timed out".into(),
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
        ProxyError::BadRequest(e.reason())
    }
}
