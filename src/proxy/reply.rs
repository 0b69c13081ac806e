//! Heads the gateway writes itself: error responses (the one place a `ProxyError` becomes a
//! response), `respond` and `redirect` routes, and every filter's `Reply` (cache hits, CORS
//! preflights, an entry standing in for the upstream's response). All of them carry the route's
//! response edits and the gateway's lines, through `http::write::generated_response`.

use tracing::debug;

use super::session::{linger, Session};
use super::{body_failure, Failure, Io, Next};
use bytes::Bytes;
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt};

use crate::body::{BodyReader, Plain, Reframe};
use crate::buffer::send;
use crate::deadline::Deadline;
use crate::error::ProxyError;
use crate::filter::Reply;
use crate::generation::RouteEntry;
use crate::http::write::{self, Generated};
use crate::http::{HeaderEdits, Method, Version};
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
    let reply = Reply {
        status,
        headers: headers.into(),
        body: body.into(),
        ..Reply::default()
    };
    // An error body is small: all of it is rendered into `out`.
    let _ = render_reply(c, &reply, keep_alive);
    send(&mut c.w, &mut c.out, &c.deadline, w.limits.write_timeout)
        .await
        .is_ok()
}

/// Bodies up to this size are copied into the response buffer; larger ones are written from
/// the shared `Bytes` (one atomic increment instead of a copy).
const COPY_BODY_BYTES: usize = 64 * 1024;

/// A reply to a request whose head the terminal has not read: a `respond` route's, a
/// redirect, a filter's answer (a cache hit, a CORS preflight). Any request body is read and
/// discarded; one still on its way is not worth waiting for: answer, then close.
pub(super) async fn respond<S: Io>(
    c: &mut Session<'_, S>,
    w: &Worker,
    route: &RouteEntry,
    reply: &Reply,
) -> Result<Next, Failure> {
    let head = &c.head;
    let mut keep = head.keep_alive && !w.draining.get();
    c.rbuf.consume(head.len);
    let mut seen = 0;
    let mut reader = BodyReader::new(head.body, &w.parse_limits);
    if !reader.is_done() {
        c.up_out.clear();
        reader
            .take_buffered(
                &mut c.rbuf,
                &mut c.up_out,
                Reframe::AsIs,
                &mut seen,
                route.max_body_bytes,
                &mut Plain,
            )
            .map_err(body_failure)?;
        c.up_out.clear();
        keep &= reader.is_done();
    }
    c.ex.log.bytes_in = c.head.len as u64 + seen;
    let rest = render_reply(c, reply, keep);
    let limit = w.limits.write_timeout;
    send(&mut c.w, &mut c.out, &c.deadline, limit)
        .await
        .map_err(|_| Failure::Abort)?;
    if !rest.is_empty() {
        write_rest(&mut c.w, rest, &c.deadline, limit)
            .await
            .map_err(|_| Failure::Abort)?;
    }
    if !reader.is_done() {
        linger(c).await;
    }
    Ok(if keep { Next::KeepAlive } else { Next::Close })
}

/// A filter's reply once the terminal has read the request (a stale entry standing in for a
/// failed upstream).
pub(super) async fn after_terminal<S: Io>(
    c: &mut Session<'_, S>,
    w: &Worker,
    reply: &Reply,
) -> Result<Next, Failure> {
    let keep = c.head.keep_alive && !w.draining.get();
    let rest = render_reply(c, reply, keep);
    let limit = w.limits.write_timeout;
    send(&mut c.w, &mut c.out, &c.deadline, limit)
        .await
        .map_err(|_| Failure::Abort)?;
    write_rest(&mut c.w, rest, &c.deadline, limit)
        .await
        .map_err(|_| Failure::Abort)?;
    Ok(if keep { Next::KeepAlive } else { Next::Close })
}

/// Renders `reply` into the session's `out` and logs it; returns the body left to write.
fn render_reply<S: Io>(c: &mut Session<'_, S>, reply: &Reply, keep_alive: bool) -> Bytes {
    c.out.clear();
    let rest = render(
        &mut c.out,
        reply,
        &ReplyHead {
            extra: &c.ex.extra,
            edits: &c.ex.resp_edits,
            head_only: c.head.method == Method::Head,
            keep_alive,
            client_version: c.head.version,
            request_id: &c.ex.request_id,
        },
    );
    let log = &mut c.ex.log;
    log.status = reply.status;
    log.bytes_out
        .set(log.bytes_out.get() + (c.out.len() + rest.len()) as u64);
    rest
}

/// Writes the part of a reply's body `render` left out.
pub(super) async fn write_rest<W: AsyncWriteRent>(
    w: &mut W,
    rest: Bytes,
    deadline: &Deadline<'_>,
    limit: std::time::Duration,
) -> Result<(), ()> {
    if rest.is_empty() {
        return Ok(());
    }
    match deadline.within(limit, w.write_all(rest)).await {
        Ok((Ok(_), _)) => Ok(()),
        _ => Err(()),
    }
}

/// What a reply's head takes from the exchange.
pub(super) struct ReplyHead<'a> {
    pub extra: &'a [u8],
    pub edits: &'a HeaderEdits,
    /// The request was HEAD: the length is stated, no body sent.
    pub head_only: bool,
    pub keep_alive: bool,
    pub client_version: Version,
    pub request_id: &'a [u8],
}

/// Renders `reply` into `out` through the one generated-head writer: the head, and a small
/// body after it. Returns the body left to write after `out` (a large one, shared).
pub(super) fn render(out: &mut Vec<u8>, reply: &Reply, h: &ReplyHead<'_>) -> Bytes {
    let copy = reply.body.len() <= COPY_BODY_BYTES;
    write::generated_response(
        out,
        &Generated {
            status: reply.status,
            reason: &reply.reason,
            headers: &reply.headers,
            only: reply.only,
            extra: h.extra,
            edits: h.edits,
            body: if copy { &reply.body } else { b"" },
            content_length: reply.states_length().then_some(reply.body.len() as u64),
            head_only: h.head_only,
            keep_alive: h.keep_alive,
            client_version: h.client_version,
            request_id: h.request_id,
        },
    );
    if copy || h.head_only {
        Bytes::new()
    } else {
        reply.body.clone()
    }
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
    respond(c, w, route, &Reply::status(status)).await
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
