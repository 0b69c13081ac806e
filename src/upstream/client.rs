//! Requests the gateway makes on its own behalf, and the connection step every request shares.
//!
//! `acquire` takes a pooled connection to a target or connects a new one, marking a target that
//! refuses or times out as down and trying another: the proxy terminal and `fetch` both use it.
//! `fetch` sends a buffered request through the same pools, balancer and timeouts and returns
//! the status, head and body (up to a size limit): the cache's background revalidation uses it,
//! and health probes, JWKS fetching and aggregation will.

use std::time::Instant;

use tracing::{debug, info, warn};

use super::{ConnectError, TargetId, UpstreamConn, UpstreamCtx, UpstreamState};
use crate::body::{BodyError, BodyReader, Plain, Reframe};
use crate::buffer::write_out;
use crate::deadline::Deadline;
use crate::error::ProxyError;
use crate::http::write::field;
use crate::http::{parse_response, BodyLength, ResponseError, ResponseHead};
use crate::metrics::UpstreamOutcome;

/// Connect attempts per request, each to a target not yet found down.
const MAX_CONNECT_ATTEMPTS: usize = 3;

/// A request in flight to one target, counted for least-request balancing.
pub struct TargetLease<'a> {
    pub up: &'a UpstreamState,
    pub target: TargetId,
}

impl Drop for TargetLease<'_> {
    fn drop(&mut self) {
        self.up.end_request(self.target);
    }
}

/// A pooled connection to a target, or a new one; a target that refuses or times out is
/// marked down and another tried. `key` places the request for consistent hashing.
pub async fn acquire<'a>(
    up: &'a UpstreamState,
    w: &UpstreamCtx<'_>,
    key: u64,
    deadline: &Deadline<'_>,
) -> Result<(TargetLease<'a>, UpstreamConn), ProxyError> {
    match pick(up, w, key, |_| false)? {
        Pick::Pooled(lease, conn) => Ok((lease, conn)),
        Pick::Connect(t) => connect_untried(up, w, key, deadline, |_| false, t).await,
    }
}

/// The balancer's choice for a request: a pooled connection to the picked target, or the
/// target to connect to (`connect_untried`).
///
/// Taken without an `await` so that the common case never builds the connecting future: it
/// holds the TLS handshake's state, and moving it into the caller's state copied the whole
/// future twice per proxied request (callgrind: ~400 instructions of `memcpy`).
pub enum Pick<'a> {
    Pooled(TargetLease<'a>, UpstreamConn),
    Connect(TargetId),
}

/// Picks a target not in `tried` (a retry avoids those while another is up) and takes a
/// pooled connection to it if there is one.
pub fn pick<'a>(
    up: &'a UpstreamState,
    w: &UpstreamCtx<'_>,
    key: u64,
    tried: impl Fn(TargetId) -> bool,
) -> Result<Pick<'a>, ProxyError> {
    let t = up
        .pick_untried(w.rng, key, &tried)
        .ok_or(ProxyError::NoHealthyTarget)?;
    Ok(match up.checkout(t, w.now()) {
        Some(conn) => {
            up.begin_request(t);
            Pick::Pooled(TargetLease { up, target: t }, conn)
        }
        None => Pick::Connect(t),
    })
}

/// A connection for a request whose pick (`first`) had none pooled: one freed at the
/// upstream's limit, or a new one; a target that refuses or times out is marked down and
/// another picked.
pub async fn connect_untried<'a>(
    up: &'a UpstreamState,
    w: &UpstreamCtx<'_>,
    key: u64,
    deadline: &Deadline<'_>,
    tried: impl Fn(TargetId) -> bool,
    first: TargetId,
) -> Result<(TargetLease<'a>, UpstreamConn), ProxyError> {
    let mut last = ProxyError::NoHealthyTarget;
    let mut next = Some(first);
    for _ in 0..MAX_CONNECT_ATTEMPTS {
        let t = match next.take() {
            Some(t) => t,
            None => match pick(up, w, key, &tried) {
                Ok(Pick::Pooled(lease, conn)) => return Ok((lease, conn)),
                Ok(Pick::Connect(t)) => t,
                Err(_) => return Err(last),
            },
        };
        let conn = match connection_slot(up, w).await? {
            Some((other, conn)) => {
                up.begin_request(other);
                return Ok((TargetLease { up, target: other }, conn));
            }
            None => match up.connect(t, deadline).await {
                Ok(conn) => {
                    if up.mark_up(t) {
                        info!(worker = w.worker, upstream = %up.name, target = %up.target(t).name, "target up again");
                    }
                    conn
                }
                Err(e) => {
                    record(up, t, e.outcome(), None, 0);
                    mark_down(w, up, t, &e);
                    last = e.proxy_error();
                    continue;
                }
            },
        };
        up.begin_request(t);
        return Ok((TargetLease { up, target: t }, conn));
    }
    Err(last)
}

/// At the upstream's connection limit (`[limits]`): an idle connection to any target, or a
/// wait for one to come free; `None` when a new connection may be opened.
async fn connection_slot(
    up: &UpstreamState,
    w: &UpstreamCtx<'_>,
) -> Result<Option<(TargetId, UpstreamConn)>, ProxyError> {
    let Some(b) = &up.breaker else {
        return Ok(None);
    };
    while !b.may_connect() {
        if let Some(idle) = up.checkout_any(w.now()) {
            return Ok(Some(idle));
        }
        if let Err(limit) = b.wait(up.connect_timeout).await {
            up.stats.borrow_mut().record_breaker(limit);
            return Err(ProxyError::Overloaded(limit.reason()));
        }
    }
    Ok(None)
}

/// Records how an exchange with target `t` ended (`status`: the response's, 0 without one):
/// its metrics, a failure for the worker's periodic summary (`summarize_failures`), and the
/// target's run of failures for outlier ejection (a 5xx counts as one).
pub fn record(
    up: &UpstreamState,
    t: TargetId,
    outcome: UpstreamOutcome,
    latency_us: Option<u64>,
    status: u16,
) {
    if outcome != UpstreamOutcome::Response {
        up.count_failure();
    }
    up.observe(t, outcome != UpstreamOutcome::Response || status >= 500);
    up.stats.borrow_mut().record(t, outcome, latency_us);
}

/// Marks `t` down after a failed connect, with a warning when that changes its state.
pub fn mark_down(w: &UpstreamCtx<'_>, up: &UpstreamState, t: TargetId, e: &ConnectError) {
    if up.mark_down(t) {
        warn!(worker = w.worker, upstream = %up.name, target = %up.target(t).name, error = %e,
            "target down; skipped for fail_timeout_ms");
    }
}

/// Logs, at most every 10 s per upstream, how many exchanges failed on this worker since the
/// last summary: a 502 storm is visible at the default level without a line per request.
pub fn summarize_failures(w: &UpstreamCtx<'_>, upstreams: &[std::rc::Rc<UpstreamState>]) {
    let now = w.now();
    for up in upstreams {
        if let Some(failed) = up.failures_to_report(now) {
            warn!(worker = w.worker, upstream = %up.name, failed, "upstream exchanges failed (connect, reset, timeout or invalid response) since the last summary");
        }
    }
}

/// A request without a body, written by the gateway.
pub struct Request<'a> {
    pub method: &'a [u8],
    /// Origin-form target, as it goes on the request line.
    pub target: &'a [u8],
    pub host: &'a [u8],
    /// Further header lines, each ending in CRLF.
    pub headers: &'a [u8],
}

/// A complete response.
pub struct Response {
    /// The final head as received; `head`'s spans are over it.
    pub raw_head: Vec<u8>,
    pub head: ResponseHead,
    /// The body, decoded; `None` when it was larger than the caller's limit (then it was not
    /// read, and the connection was not kept).
    pub body: Option<Vec<u8>>,
}

/// Sends `req` to a target of `up` and reads the whole response within the upstream's
/// `request_timeout`. Interim (1xx) responses are skipped. A pooled connection that turns out
/// to be closed before a response byte arrived (the upstream closed it while it was idle) is
/// replaced by a new one to the same target, once, for a GET or HEAD, as the proxy does. The
/// connection goes back to the pool when the exchange ended cleanly.
pub async fn fetch(
    w: &UpstreamCtx<'_>,
    up: &UpstreamState,
    key: u64,
    req: &Request<'_>,
    max_body: usize,
) -> Result<Response, ProxyError> {
    let deadline = w.deadlines.slot();
    let (lease, mut conn) = acquire(up, w, key, &deadline).await?;
    let started = Instant::now();
    let repeatable = matches!(req.method, b"GET" | b"HEAD");
    let attempts = async {
        loop {
            match exchange(w, &mut conn, req, max_body).await {
                Err(Failed::Unanswered(_)) if conn.reused && repeatable => {
                    debug!(upstream = %up.name, "pooled connection was closed; fetching on a new one");
                    conn = up.connect(lease.target, &deadline).await.map_err(|e| {
                        if !matches!(e, ConnectError::TimedOut) {
                            mark_down(w, up, lease.target, &e);
                        }
                        e.proxy_error()
                    })?;
                }
                r => return r.map_err(Failed::error),
            }
        }
    };
    let result = match deadline.within(up.request_timeout, attempts).await {
        Ok(r) => r,
        Err(_) => Err(ProxyError::UpstreamTimeout),
    };
    let outcome = match &result {
        Ok(_) => UpstreamOutcome::Response,
        Err(ProxyError::UpstreamTimeout) => UpstreamOutcome::Timeout,
        Err(ProxyError::UpstreamInvalid(_)) => UpstreamOutcome::InvalidResponse,
        Err(_) => UpstreamOutcome::Failed,
    };
    let latency = started.elapsed().as_micros() as u64;
    let status = result.as_ref().map_or(0, |(r, _)| r.head.status);
    record(up, lease.target, outcome, Some(latency), status);
    let (response, reusable) = result?;
    if reusable {
        up.checkin(lease.target, conn, w.now());
    }
    Ok(response)
}

/// Connects to target `t` itself (a health probe) and, given a request, sends it and reads
/// the response; the connection is new and closed after, so that every probe also proves the
/// target accepts connections. Bounded by `limit` as a
/// whole; nothing is recorded in the request metrics or the passive health state.
pub async fn probe(
    w: &UpstreamCtx<'_>,
    up: &UpstreamState,
    t: TargetId,
    req: Option<&Request<'_>>,
    limit: std::time::Duration,
) -> Result<Option<Response>, String> {
    let attempt = async {
        let deadline = w.deadlines.slot();
        let mut conn = up.connect(t, &deadline).await.map_err(|e| e.to_string())?;
        let Some(req) = req else { return Ok(None) };
        exchange(w, &mut conn, req, 64 * 1024)
            .await
            .map(|(resp, _)| Some(resp))
            .map_err(|e| e.error().message().into_owned())
    };
    match monoio::time::timeout(limit, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {} ms", limit.as_millis())),
    }
}

/// How an exchange on one connection failed.
enum Failed {
    /// Not a byte of the response arrived: the connection was closed (or reset) before the
    /// request could be answered. On a pooled connection, the upstream closed it while idle.
    Unanswered(ProxyError),
    Other(ProxyError),
}

impl Failed {
    fn error(self) -> ProxyError {
        match self {
            Failed::Unanswered(e) | Failed::Other(e) => e,
        }
    }
}

impl From<ProxyError> for Failed {
    fn from(e: ProxyError) -> Failed {
        Failed::Other(e)
    }
}

/// The exchange on one connection; also says whether the connection may be reused.
async fn exchange(
    w: &UpstreamCtx<'_>,
    conn: &mut UpstreamConn,
    req: &Request<'_>,
    max_body: usize,
) -> Result<(Response, bool), Failed> {
    let mut out = Vec::with_capacity(256 + req.headers.len());
    out.extend_from_slice(req.method);
    out.push(b' ');
    out.extend_from_slice(req.target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    field(&mut out, b"host", req.host);
    out.extend_from_slice(req.headers);
    out.extend_from_slice(b"\r\n");
    write_out(&mut conn.w, &mut out)
        .await
        .map_err(|_| Failed::Unanswered(ProxyError::UpstreamUnreachable("write failed")))?;

    let limits = w.parse_limits;
    let max_head = limits.max_response_head();
    let to_head = req.method == b"HEAD";
    let mut head = ResponseHead::default();
    loop {
        if !conn.rbuf.is_empty() {
            match parse_response(
                conn.rbuf.data(),
                to_head,
                max_head,
                limits.max_headers,
                &mut head,
            ) {
                Ok(true) if head.status == 101 => {
                    return Err(
                        ProxyError::UpstreamInvalid("101 without an upgrade request").into(),
                    )
                }
                Ok(true) if head.status < 200 => {
                    conn.rbuf.consume(head.len);
                    continue;
                }
                Ok(true) => break,
                Ok(false) => {}
                Err(ResponseError::TooLarge) => {
                    return Err(ProxyError::UpstreamInvalid("response head too large").into())
                }
                Err(ResponseError::Malformed(why)) => {
                    return Err(ProxyError::UpstreamInvalid(why).into())
                }
            }
        }
        let unanswered = conn.rbuf.is_empty() && head.len == 0;
        let failed = |e| match unanswered {
            true => Failed::Unanswered(e),
            false => Failed::Other(e),
        };
        match conn.rbuf.fill(&mut conn.r, max_head + 1).await {
            Ok(n) if n > 0 => {}
            Ok(_) => {
                return Err(failed(ProxyError::UpstreamUnreachable(
                    "closed before responding",
                )))
            }
            Err(_) => return Err(failed(ProxyError::UpstreamUnreachable("connection reset"))),
        }
    }
    let raw_head = conn.rbuf.data()[..head.len].to_vec();
    conn.rbuf.consume(head.len);
    let (body, complete) = read_body(w, conn, &head, max_body).await?;
    let reusable = head.keep_alive && complete;
    Ok((
        Response {
            raw_head,
            head,
            body,
        },
        reusable,
    ))
}

/// The response body, decoded, if it fits in `max_body` (`None` otherwise: not read whole);
/// and whether it was read to its end.
async fn read_body(
    w: &UpstreamCtx<'_>,
    conn: &mut UpstreamConn,
    head: &ResponseHead,
    max_body: usize,
) -> Result<(Option<Vec<u8>>, bool), ProxyError> {
    if matches!(head.body, BodyLength::Length(n) if n > max_body as u64) {
        return Ok((None, false));
    }
    let mut reader = BodyReader::new(head.body, w.parse_limits);
    let mut body = Vec::new();
    let mut seen = 0u64;
    let max = Some(max_body as u64);
    loop {
        match reader.take_buffered(
            &mut conn.rbuf,
            &mut body,
            Reframe::AsIs,
            &mut seen,
            max,
            &mut Plain,
        ) {
            Ok(()) if body.len() <= max_body => {}
            Ok(()) | Err(BodyError::TooLarge) => return Ok((None, false)),
            Err(_) => return Err(ProxyError::UpstreamInvalid("malformed response body")),
        }
        if reader.is_done() {
            return Ok((Some(body), true));
        }
        match conn.rbuf.fill(&mut conn.r, 64 * 1024).await {
            Ok(0) if matches!(reader, BodyReader::UntilClose) => return Ok((Some(body), false)),
            Ok(n) if n > 0 => {}
            _ => {
                return Err(ProxyError::UpstreamUnreachable(
                    "closed inside the response body",
                ))
            }
        }
    }
}
