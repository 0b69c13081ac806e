//! Heads the gateway writes itself: error responses (the one place a `ProxyError` becomes a
//! response) and `respond` routes. Cache hits use the same writer (`cached`). All of them carry
//! the route's response edits and the gateway's lines, through `http::write::generated_response`.

use tracing::debug;

use super::session::{linger, Session};
use super::{body_failure, Failure, Io, Next};
use crate::body::{BodyReader, Reframe};
use crate::buffer::send;
use crate::error::ProxyError;
use crate::generation::RouteEntry;
use crate::http::write::{self, Generated};
use crate::http::Method;
use crate::worker::Worker;

/// Writes a gateway-generated error response. Returns whether it was written.
pub(super) async fn error<S: Io>(
    c: &mut Session<'_, S>,
    w: &Worker,
    e: &ProxyError,
    keep_alive: bool,
) -> bool {
    let status = e.status();
    match e.rejection() {
        Some(r) => {
            w.count_rejection(r);
            debug!(status, reason = r.label(), error = %e.message(), worker = w.id, "request rejected");
        }
        None => debug!(status, error = %e.message(), worker = w.id, "request failed"),
    }
    let mut headers = Vec::with_capacity(64);
    headers.extend_from_slice(b"content-type: application/json\r\n");
    match e {
        ProxyError::MethodNotAllowed(allow) => {
            write::field(&mut headers, b"allow", allow.as_bytes());
        }
        ProxyError::RateLimited(refusal) => {
            c.ex.extra.clear();
            refusal.info.write_headers(&mut headers, true);
        }
        ProxyError::Unauthorized { challenges, .. } => headers.extend_from_slice(challenges),
        ProxyError::Overloaded(_) => headers.extend_from_slice(b"retry-after: 1\r\n"),
        _ => {}
    }
    let body = serde_json::to_vec(&serde_json::json!({
        "error": e.message(),
        "request_id": String::from_utf8_lossy(&c.ex.request_id),
    }))
    .unwrap_or_default();
    c.ex.log.status = status;
    write_generated(c, status, &headers, &body, keep_alive);
    let log = &c.ex.log;
    log.bytes_out.set(log.bytes_out.get() + c.out.len() as u64);
    send(&mut c.w, &mut c.out, &c.deadline, w.limits.write_timeout)
        .await
        .is_ok()
}

/// A `respond` route: the fixed response, after reading and discarding any request body.
pub(super) async fn respond<S: Io>(
    c: &mut Session<'_, S>,
    w: &Worker,
    route: &RouteEntry,
    status: u16,
    headers: &[u8],
    body: &[u8],
) -> Result<Next, Failure> {
    let head = &c.head;
    let mut keep = head.keep_alive;
    let mut reader = BodyReader::new(head.body, &w.parse_limits);
    c.rbuf.consume(head.len);
    let mut seen = 0;
    c.up_out.clear();
    reader
        .take_buffered(
            &mut c.rbuf,
            &mut c.up_out,
            Reframe::AsIs,
            &mut seen,
            route.max_body_bytes,
            None,
        )
        .map_err(body_failure)?;
    c.up_out.clear();
    // A body still on its way is not worth waiting for: answer, then close.
    keep &= reader.is_done() && !w.draining.get();
    write_generated(c, status, headers, body, keep);
    c.ex.log.status = status;
    c.ex.log.bytes_in = c.head.len as u64 + seen;
    c.ex.log.bytes_out.set(c.out.len() as u64);
    if send(&mut c.w, &mut c.out, &c.deadline, w.limits.write_timeout)
        .await
        .is_err()
    {
        return Err(Failure::Abort);
    }
    if !reader.is_done() {
        linger(c).await;
    }
    Ok(if keep { Next::KeepAlive } else { Next::Close })
}

/// A `redirect` route: `location` is `parts` (scheme, host, port) and the request's path and
/// query; an empty host means the request's own, without its port.
pub(super) async fn redirect<S: Io>(
    c: &mut Session<'_, S>,
    w: &Worker,
    route: &RouteEntry,
    status: u16,
    [scheme, host, port]: [&[u8]; 3],
) -> Result<Next, Failure> {
    let buf = c.rbuf.data();
    let host = match host {
        b"" => {
            let authority = c.head.host.map_or(&b""[..], |h| h.get(buf));
            let host = without_port(authority);
            if !crate::http::valid_redirect_host(host) {
                return Err(Failure::BeforeBody(ProxyError::BadRequest(
                    "a redirect needs the request's Host",
                )));
            }
            host
        }
        configured => configured,
    };
    let path = match c.head.path.get(buf) {
        b"" => &b"/"[..],
        p => p,
    };
    let lines = &mut c.ex.extra;
    lines.extend_from_slice(b"location: ");
    for part in [scheme, host, port, path] {
        lines.extend_from_slice(part);
    }
    lines.extend_from_slice(b"\r\n");
    respond(c, w, route, status, b"", b"").await
}

/// A Host value's host: an IPv6 literal with its brackets, or what precedes the port.
fn without_port(authority: &[u8]) -> &[u8] {
    if authority.starts_with(b"[") {
        let end = authority
            .iter()
            .position(|&b| b == b']')
            .map_or(0, |i| i + 1);
        return &authority[..end];
    }
    match authority.iter().position(|&b| b == b':') {
        Some(i) => &authority[..i],
        None => authority,
    }
}

/// Writes a gateway-generated response with a standard reason phrase into `out`, with the
/// gateway's lines and the route's edits.
fn write_generated<S: Io>(
    c: &mut Session<'_, S>,
    status: u16,
    headers: &[u8],
    body: &[u8],
    keep_alive: bool,
) {
    c.out.clear();
    write::generated_response(
        &mut c.out,
        &Generated {
            status,
            reason: b"",
            headers,
            only: None,
            extra: &c.ex.extra,
            edits: &c.ex.resp_edits,
            body,
            // RFC 9110 §8.6: none on a 204 (or 1xx), and a gateway's own 304 describes no
            // representation whose length it could repeat.
            content_length: (!matches!(status, 100..=199 | 204 | 304)).then_some(body.len() as u64),
            head_only: c.head.method == Method::Head,
            keep_alive,
            client_version: c.head.version,
            request_id: &c.ex.request_id,
        },
    );
}
