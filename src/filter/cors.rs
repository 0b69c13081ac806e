//! CORS (the Fetch standard's CORS protocol) for a route: a preflight (`OPTIONS` with `Origin`
//! and `Access-Control-Request-Method`) is answered by the gateway and never reaches the
//! upstream; every other response head of the route (proxied, cached, the gateway's own errors)
//! gets the allow headers when the request's `Origin` is allowed, and `Vary: Origin` whenever
//! the answer depends on it. A disallowed origin gets no CORS headers at all.

use super::{Reply, RequestInfo};
use crate::config::CorsPolicy;
use crate::http::{HeaderEdits, Method};

pub struct Cors {
    /// Allowed origins, as sent in `Origin` (lower-case scheme and host); empty: any (`*`).
    origins: Box<[Box<[u8]>]>,
    any_origin: bool,
    credentials: bool,
    /// `access-control-expose-headers: ...\r\n`, or empty.
    expose_line: Box<[u8]>,
    /// The preflight's fixed lines: allowed methods and headers, max age.
    preflight_lines: Box<[u8]>,
    methods: Box<[Box<[u8]>]>,
    /// Allowed request headers, lower-case.
    headers: Box<[Box<[u8]>]>,
}

impl Cors {
    pub fn new(p: &CorsPolicy) -> Cors {
        let mut preflight = Vec::new();
        line(
            &mut preflight,
            "access-control-allow-methods",
            &p.methods.join(", "),
        );
        if !p.headers.is_empty() {
            line(
                &mut preflight,
                "access-control-allow-headers",
                &p.headers.join(", "),
            );
        }
        line(
            &mut preflight,
            "access-control-max-age",
            &p.max_age_s.to_string(),
        );
        let mut expose = Vec::new();
        if !p.expose.is_empty() {
            line(
                &mut expose,
                "access-control-expose-headers",
                &p.expose.join(", "),
            );
        }
        let bytes = |v: &[String]| v.iter().map(|s| s.as_bytes().into()).collect();
        Cors {
            any_origin: p.origins.iter().any(|o| o == "*"),
            origins: bytes(&p.origins),
            credentials: p.credentials,
            expose_line: expose.into(),
            preflight_lines: preflight.into(),
            methods: bytes(&p.methods),
            headers: bytes(&p.headers),
        }
    }

    fn allowed_origin<'r>(&self, req: &RequestInfo<'r>) -> Option<&'r [u8]> {
        let origin = req.view.header(b"origin")?;
        (self.any_origin
            || self
                .origins
                .iter()
                .any(|o| o[..].eq_ignore_ascii_case(origin)))
        .then_some(origin)
    }

    /// The allow headers on every response head of the route.
    pub fn on_response(&self, req: &RequestInfo<'_>, edits: &mut HeaderEdits) {
        if !self.any_origin || self.credentials {
            // Which origin is named depends on the request's: caches must key on it.
            edits.append_lines(b"vary: Origin\r\n");
        }
        let Some(origin) = self.allowed_origin(req) else {
            return;
        };
        edits.append_lines(b"access-control-allow-origin: ");
        edits.append_lines(if self.any_origin && !self.credentials {
            b"*"
        } else {
            origin
        });
        edits.append_lines(b"\r\n");
        if self.credentials {
            edits.append_lines(b"access-control-allow-credentials: true\r\n");
        }
        if req.view.head.method != Method::Options {
            edits.append_lines(&self.expose_line);
        }
    }

    /// A preflight gets its answer here (204, with the preflight headers when everything it
    /// asks for is allowed, without them when not); anything else goes on.
    pub fn on_request(&self, req: &RequestInfo<'_>, lines: &mut Vec<u8>) -> Option<Reply> {
        if req.view.head.method != Method::Options {
            return None;
        }
        let method = req.view.header(b"access-control-request-method")?;
        req.view.header(b"origin")?;
        lines.extend_from_slice(
            b"vary: Access-Control-Request-Method, Access-Control-Request-Headers\r\n",
        );
        let method_ok = self.methods.iter().any(|m| &m[..] == method);
        let headers_ok = req
            .view
            .header(b"access-control-request-headers")
            .unwrap_or_default()
            .split(|&b| b == b',')
            .map(|h| h.trim_ascii())
            .filter(|h| !h.is_empty())
            .all(|h| self.headers.iter().any(|a| a[..].eq_ignore_ascii_case(h)));
        if self.allowed_origin(req).is_some() && method_ok && headers_ok {
            lines.extend_from_slice(&self.preflight_lines);
        }
        Some(Reply::status(204))
    }
}

fn line(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}
