//! `[limits]` as loaded: what the codec and the connection loop enforce.

use std::time::Duration;

use super::{file, ms};
use crate::http::path::EncodedSlashes;
use crate::http::ParseLimits;

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_request_line_bytes: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_chunk_extension_bytes: usize,
    pub max_trailer_bytes: usize,
    /// Per worker; connections past it are closed at accept.
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub write_timeout: Duration,
    pub tunnel_idle_timeout: Duration,
    /// What `%2F` and `%5C` in a request path do (see `http::path`).
    pub encoded_slashes: EncodedSlashes,
}

impl Limits {
    /// The part of the limits the HTTP codec enforces.
    pub fn codec(&self) -> ParseLimits {
        ParseLimits {
            max_request_line_bytes: self.max_request_line_bytes,
            max_header_bytes: self.max_header_bytes,
            max_headers: self.max_headers,
            max_chunk_extension_bytes: self.max_chunk_extension_bytes,
            max_trailer_bytes: self.max_trailer_bytes,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        let f = file::LimitsFile::default();
        Limits {
            max_request_line_bytes: *f.max_request_line_bytes.get_ref(),
            max_header_bytes: *f.max_header_bytes.get_ref(),
            max_headers: *f.max_headers.get_ref(),
            max_chunk_extension_bytes: *f.max_chunk_extension_bytes.get_ref(),
            max_trailer_bytes: *f.max_trailer_bytes.get_ref(),
            max_connections: *f.max_connections.get_ref(),
            header_read_timeout: ms(*f.header_read_timeout_ms.get_ref()),
            body_read_timeout: ms(*f.body_read_timeout_ms.get_ref()),
            keepalive_timeout: ms(*f.keepalive_timeout_ms.get_ref()),
            write_timeout: ms(*f.write_timeout_ms.get_ref()),
            tunnel_idle_timeout: ms(*f.tunnel_idle_timeout_ms.get_ref()),
            encoded_slashes: EncodedSlashes::Reject,
        }
    }
}
