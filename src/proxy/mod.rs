//! The request path, top to bottom. One task per client connection runs `serve`, which loops
//! over requests (keep-alive and pipelining: strictly one at a time, in order):
//!
//! 1. `read_request_head`: read until a complete head parses, under the header/keep-alive timeouts.
//! 2. `handle`: route it (404/405), check the declared body size (413).
//! 3. `respond` for fixed-response routes, or `proxy`: pick a target, take a pooled connection
//!    or connect, write the rewritten head and the body, then `read_final_head` and
//!    `send_response` back, streaming; a request body that is not already buffered streams up
//!    while the response streams down (`full_duplex`). A 101 turns the pair into a `tunnel`.
//! 4. Decide whether the client connection and the upstream connection can be reused.
//!
//! A failure before the response head went out becomes an error response (`ProxyError` says
//! which); after it, the client connection is closed, so a truncated response never looks whole.

use std::cell::Cell;
use std::future::Future;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use monoio::io::{
    AsyncWriteRent, CancelableAsyncReadRent, OwnedReadHalf, OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;
use tracing::debug;

use crate::access_log::Entry;
use crate::body::{copy_body, BodyError, BodyReader, Reframe, Transfer};
use crate::buffer::{send, write_out, ReadBuf, STREAMING_CAPACITY};
use crate::config::{HashKey, ListenerId, RateLimitKey, RouteId, UpstreamId};
use crate::deadline::{Deadline, TimedOut};
use crate::error::ProxyError;
use crate::http::write::{self, ClientFraming, ClientHead, Forwarding, Generated};
use crate::http::{
    parse_request, parse_response, BodyLength, Method, RequestHead, ResponseError, ResponseHead,
    Version,
};
use crate::metrics::{RequestRecord, UpstreamOutcome};
use crate::ratelimit::{Limiter, Refusal, MAX_LIMITS_PER_ROUTE};
use crate::router::RouteMatch;
use crate::trace::Trace;
use crate::upstream::{stable_hash, ConnectError, TargetId, UpstreamConn, UpstreamState};
use crate::worker::{Action, RouteEntry, Worker};

/// Connect attempts per request, each to a target not yet found down.
const MAX_CONNECT_ATTEMPTS: usize = 3;
/// After an error reply with request bytes still unread, how long to keep reading and
/// discarding them so that closing does not reset the connection under the reply.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// One client connection's state, reused by every request on it.
struct Client<'w> {
    /// Times this connection's pending operation.
    deadline: Deadline<'w>,
    r: OwnedReadHalf<TcpStream>,
    w: OwnedWriteHalf<TcpStream>,
    rbuf: ReadBuf,
    /// Bytes to the client.
    out: Vec<u8>,
    /// Bytes to the upstream.
    up_out: Vec<u8>,
    head: RequestHead,
    resp: ResponseHead,
    client_ip: IpText,
    request_id: Vec<u8>,
    served: u32,
    /// What the current request did, for metrics and the access log.
    log: RequestLog,
    /// Header lines the gateway adds to this request's response (`RateLimit-*`).
    extra: Vec<u8>,
    /// The request's method, target, Referer and User-Agent, copied for the access log (only
    /// when it is on) before the head's buffer is reused.
    log_text: LogText,
}

#[derive(Default)]
struct LogText {
    bytes: Vec<u8>,
    /// Ends of method, target, referer and user-agent within `bytes`.
    ends: [usize; 4],
}

impl LogText {
    fn capture(&mut self, buf: &[u8], head: &RequestHead) {
        self.bytes.clear();
        let header = |name: &str| {
            head.headers
                .iter()
                .find(|h| h.name.get(buf).eq_ignore_ascii_case(name.as_bytes()))
                .map_or(&b""[..], |h| h.value.get(buf))
        };
        for (i, part) in [
            head.method_span.get(buf),
            head.target.get(buf),
            header("referer"),
            header("user-agent"),
        ]
        .into_iter()
        .enumerate()
        {
            self.bytes.extend_from_slice(part);
            self.ends[i] = self.bytes.len();
        }
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ends = [0; 4];
    }

    fn part(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }
}

/// The facts about one request that metrics and the access log record when it ends.
struct RequestLog {
    start: Instant,
    route: Option<RouteId>,
    /// The status sent; 0 while none has been.
    status: u16,
    upstream: Option<(UpstreamId, TargetId)>,
    upstream_us: Option<u64>,
    bytes_in: u64,
    bytes_out: Cell<u64>,
    /// Set when the request was forwarded (or logged).
    trace: Option<Trace>,
}

impl RequestLog {
    fn new() -> RequestLog {
        RequestLog {
            start: Instant::now(),
            route: None,
            status: 0,
            upstream: None,
            upstream_us: None,
            bytes_in: 0,
            bytes_out: Cell::new(0),
            trace: None,
        }
    }
}

/// The client's address, formatted once per connection.
struct IpText {
    buf: [u8; 45],
    len: usize,
}

impl IpText {
    fn new(addr: SocketAddr) -> IpText {
        let mut buf = [0u8; 45];
        let mut cursor = io::Cursor::new(&mut buf[..]);
        // 45 bytes hold the longest IPv6 text form.
        let _ = write!(cursor, "{}", addr.ip());
        let len = cursor.position() as usize;
        IpText { buf, len }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
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
}

/// What the response side needs to know about the request.
struct ResponseCtx<'a> {
    to_head: bool,
    client_version: Version,
    client_keep_alive: bool,
    upgrade_requested: bool,
    request_id: &'a [u8],
    request_timeout: Duration,
    write_timeout: Duration,
    /// Bytes of response sent to the client so far.
    sent: &'a Cell<u64>,
    /// When the final response head arrived.
    head_at: &'a Cell<Option<Instant>>,
    /// Header lines to add to the response.
    extra: &'a [u8],
    /// What caching asks of this exchange, if the route caches.
    cache: Option<&'a CacheExchange>,
    /// Times the response side's operations.
    deadline: &'a Deadline<'a>,
    worker: &'a Worker,
}

struct ResponseDone {
    client_keep_alive: bool,
    upstream_reusable: bool,
    upgrade: bool,
}

#[derive(Debug)]
struct ResponseFailure {
    error: ProxyError,
    /// The upstream closed or reset before sending a byte: a stale pooled connection.
    closed_early: bool,
}

impl ResponseFailure {
    fn new(error: ProxyError) -> Self {
        ResponseFailure {
            error,
            closed_early: false,
        }
    }
}

mod cached;

pub use cached::CacheExchange;

pub async fn serve(stream: TcpStream, peer: SocketAddr, listener: ListenerId, w: Rc<Worker>) {
    let Some(_active) = w.admit_connection() else {
        debug!(worker = w.id, reason = "connection_limit", %peer, "connection rejected at accept");
        return;
    };
    let _ = stream.set_nodelay(true);
    let (r, wr) = stream.into_split();
    let mut c = Client {
        deadline: w.deadlines.slot(),
        r,
        w: wr,
        rbuf: ReadBuf::new(),
        out: Vec::with_capacity(1024),
        up_out: Vec::with_capacity(1024),
        head: RequestHead::default(),
        resp: ResponseHead::default(),
        client_ip: IpText::new(peer),
        request_id: Vec::with_capacity(64),
        served: 0,
        log: RequestLog::new(),
        log_text: LogText::default(),
        extra: Vec::new(),
    };
    while serve_request(&mut c, &w, listener).await == Next::KeepAlive {
        c.served += 1;
    }
}

async fn serve_request(c: &mut Client<'_>, w: &Rc<Worker>, listener: ListenerId) -> Next {
    if w.draining.get() && c.rbuf.is_empty() {
        return Next::Close;
    }
    let ready = read_request_head(c, w).await;
    c.log = RequestLog::new();
    c.extra.clear();
    let next = match ready {
        HeadRead::Ready => {
            let _inflight = w.begin_request();
            if w.access_log.is_some() {
                let buf = c.rbuf.data();
                c.log_text.capture(buf, &c.head);
                let incoming = c.head.traceparent.map(|t| t.get(buf));
                c.log.trace = Some(Trace::new(incoming, &w.rng));
            }
            c.request_id.clear();
            match c.head.request_id {
                Some(id) => c.request_id.extend_from_slice(id.get(c.rbuf.data())),
                None => w.rng.hex_id(&mut c.request_id),
            }
            let result = handle(c, w, listener).await;
            conclude(c, w, result).await
        }
        HeadRead::Closed => return Next::Close,
        HeadRead::Failed(e) => {
            c.log_text.clear();
            c.request_id.clear();
            w.rng.hex_id(&mut c.request_id);
            c.head.version = Version::Http11;
            c.head.method = Method::Other;
            reply_error(c, w, &e, false).await;
            linger(c).await;
            Next::Close
        }
    };
    finish(c, w);
    next
}

/// Turns a request's result into what happens to the connection, answering failures.
async fn conclude(c: &mut Client<'_>, w: &Worker, result: Result<Next, Failure>) -> Next {
    let failure = match result {
        Ok(next) => return next,
        Err(f) => f,
    };
    let keep = !w.draining.get() && c.head.keep_alive;
    match failure {
        Failure::Abort => Next::Close,
        Failure::BeforeBody(e) => {
            let no_body = c.head.body == BodyLength::None;
            if reply_error(c, w, &e, keep && no_body).await && keep && no_body {
                c.rbuf.consume(c.head.len);
                Next::KeepAlive
            } else {
                linger(c).await;
                Next::Close
            }
        }
        Failure::AfterBody(e) => {
            if reply_error(c, w, &e, keep).await && keep {
                Next::KeepAlive
            } else {
                Next::Close
            }
        }
        Failure::MidBody(e) => {
            reply_error(c, w, &e, false).await;
            linger(c).await;
            Next::Close
        }
    }
}

/// Records the finished request: metrics, and the access log line.
fn finish(c: &mut Client<'_>, w: &Worker) {
    let total_us = c.log.start.elapsed().as_micros() as u64;
    // A request abandoned before any response: the client went away (nginx's 499).
    let status = if c.log.status == 0 { 499 } else { c.log.status };
    w.metrics.borrow_mut().record_request(&RequestRecord {
        route: c.log.route,
        method: c.head.method,
        status,
        total_us,
    });
    let Some(log) = &w.access_log else { return };
    let trace = c.log.trace.unwrap_or_else(|| Trace::new(None, &w.rng));
    let dropped = log.write(&Entry {
        worker: w.id,
        client_ip: c.client_ip.as_bytes(),
        method: c.log_text.part(0),
        target: c.log_text.part(1),
        http10: c.head.version == Version::Http10,
        status,
        bytes_in: c.log.bytes_in,
        bytes_out: c.log.bytes_out.get(),
        route: c.log.route.map_or("", |id| w.route(id).name.as_str()),
        upstream: c
            .log
            .upstream
            .map_or("", |(u, t)| w.upstream(u).target(t).name.as_str()),
        upstream_us: c.log.upstream_us,
        total_us,
        request_id: &c.request_id,
        trace_id: trace.trace_id(),
        referer: c.log_text.part(2),
        user_agent: c.log_text.part(3),
    });
    if dropped > 0 {
        w.metrics.borrow_mut().record_access_log_dropped(dropped);
    }
}

enum HeadRead {
    Ready,
    /// The client closed, went idle, or failed at the socket: nothing to answer.
    Closed,
    Failed(ProxyError),
}

async fn read_request_head(c: &mut Client<'_>, w: &Worker) -> HeadRead {
    let limits = &w.limits;
    let max_buf = limits.max_request_line_bytes + limits.max_header_bytes + 4096;
    let mut deadline: Option<Instant> = None;
    loop {
        if !c.rbuf.is_empty() {
            match parse_request(c.rbuf.data(), limits, &mut c.head) {
                Ok(true) => return HeadRead::Ready,
                Ok(false) => {}
                Err(e) => {
                    debug!(reason = ?e, "request head rejected");
                    return HeadRead::Failed(e.into());
                }
            }
            deadline.get_or_insert_with(|| Instant::now() + limits.header_read_timeout);
        }
        let wait = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None if c.served == 0 => limits.header_read_timeout,
            None => limits.keepalive_timeout,
        };
        match c
            .deadline
            .within(wait, c.rbuf.fill(&mut c.r, max_buf))
            .await
        {
            Err(_) if deadline.is_some() => {
                debug!("request head timed out");
                return HeadRead::Failed(ProxyError::HeadTimeout);
            }
            Err(_) | Ok(Ok(0)) | Ok(Err(_)) => return HeadRead::Closed,
            Ok(Ok(_)) => {}
        }
    }
}

async fn handle(c: &mut Client<'_>, w: &Rc<Worker>, listener: ListenerId) -> Result<Next, Failure> {
    let buf = c.rbuf.data();
    let head = &c.head;
    let found = w.router.route(
        listener,
        head.host.map(|h| h.get(buf)),
        head.path.get(buf),
        head.method_span.get(buf),
    );
    let route = match found {
        RouteMatch::Found(id) => {
            c.log.route = Some(id);
            w.route(id)
        }
        RouteMatch::MethodNotAllowed(allow) => {
            return Err(Failure::BeforeBody(ProxyError::MethodNotAllowed(allow)))
        }
        RouteMatch::NotFound => return Err(Failure::BeforeBody(ProxyError::NoRoute)),
    };
    if let (Some(max), BodyLength::Length(n)) = (route.max_body_bytes, head.body) {
        if n > max {
            return Err(Failure::BeforeBody(ProxyError::PayloadTooLarge));
        }
    }
    if !route.rate_limits.is_empty() {
        rate_limit(c, w, route)?;
    }
    match &route.action {
        Action::Respond {
            status,
            headers,
            body,
        } => respond(c, w, route, *status, headers, body).await,
        Action::Proxy {
            upstream,
            strip_prefix,
        } => {
            let up = w.upstream(*upstream);
            let strip = strip_prefix.as_deref();
            match (&route.cache, w.cache.as_ref()) {
                (Some(policy), Some(cache)) => {
                    cached::proxy_cached(c, w, cache, route, up, strip, policy).await
                }
                (_, Some(cache)) if !c.head.method.is_safe() => {
                    // Read the URL now: the head's buffer is reused while proxying.
                    let urls = cached::urls_of(c);
                    let exchange = CacheExchange::invalidating();
                    let result = proxy(c, w, route, up, strip, Some(&exchange)).await;
                    cached::invalidate_after(c, cache, urls, &exchange, &result);
                    result
                }
                _ => proxy(c, w, route, up, strip, None).await,
            }
        }
    }
}

/// Admits the request under every limit of its route, or refuses it (429). Admitted
/// responses carry the `RateLimit-*` headers of the first limit that asks for them.
fn rate_limit(c: &mut Client<'_>, w: &Worker, route: &RouteEntry) -> Result<(), Failure> {
    let buf = c.rbuf.data();
    let route_id = c.log.route.map_or(0, |r| r.0);
    let key = |k: &RateLimitKey| match k {
        RateLimitKey::ClientIp => Limiter::hash_key(c.client_ip.as_bytes()),
        RateLimitKey::Route => Limiter::hash_key(&route_id.to_le_bytes()),
        RateLimitKey::Header(name) => Limiter::hash_key(
            c.head
                .headers
                .iter()
                .find(|h| h.name.get(buf).eq_ignore_ascii_case(name.as_bytes()))
                .map_or(&b""[..], |h| h.value.get(buf)),
        ),
    };
    let mut limiters = w.limiters.borrow_mut();
    let mut admitted: [(usize, u64, usize); MAX_LIMITS_PER_ROUTE] =
        [(0, 0, 0); MAX_LIMITS_PER_ROUTE];
    for (n, id) in route
        .rate_limits
        .iter()
        .enumerate()
        .take(MAX_LIMITS_PER_ROUTE)
    {
        let limiter = &mut limiters[usize::from(id.0)];
        let k = key(&limiter.key);
        match limiter.check(k) {
            Ok(slot) => admitted[n] = (usize::from(id.0), k, slot),
            Err(info) => {
                drop(limiters);
                if let Some(route) = c.log.route {
                    w.metrics.borrow_mut().record_ratelimited(route, *id);
                }
                return Err(Failure::BeforeBody(ProxyError::RateLimited(Refusal {
                    limit: *id,
                    info,
                })));
            }
        }
    }
    let mut headers_done = false;
    for &(limit, _, slot) in &admitted[..route.rate_limits.len().min(MAX_LIMITS_PER_ROUTE)] {
        let l = &mut limiters[limit];
        let info = l.charge(slot);
        if l.headers && !headers_done {
            write::rate_limit_headers(&mut c.extra, &info, false);
            headers_done = true;
        }
    }
    Ok(())
}

/// A `respond` route: the fixed response, after reading and discarding any request body.
async fn respond(
    c: &mut Client<'_>,
    w: &Worker,
    route: &RouteEntry,
    status: u16,
    headers: &[u8],
    body: &[u8],
) -> Result<Next, Failure> {
    let head = &c.head;
    let (version, to_head, mut keep) = (head.version, head.method == Method::Head, head.keep_alive);
    let mut reader = BodyReader::new(head.body, &w.limits);
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
    c.out.clear();
    write::generated_response(
        &mut c.out,
        &Generated {
            status,
            headers,
            extra: &c.extra,
            body,
            head_only: to_head,
            keep_alive: keep,
            client_version: version,
            request_id: &c.request_id,
        },
    );
    c.log.status = status;
    c.log.bytes_in = c.head.len as u64 + seen;
    c.log.bytes_out.set(c.out.len() as u64);
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

fn body_failure(e: BodyError) -> Failure {
    match e {
        BodyError::Framing(e) => Failure::MidBody(e.into()),
        BodyError::TooLarge => Failure::MidBody(ProxyError::PayloadTooLarge),
        BodyError::ReadTimeout => Failure::MidBody(ProxyError::BodyTimeout),
        BodyError::Truncated | BodyError::Read(_) => Failure::Abort,
        BodyError::Write(_) => Failure::MidBody(ProxyError::UpstreamUnreachable("write failed")),
    }
}

/// The hash consistent hashing places this request by.
fn balance_key(up: &UpstreamState, c: &Client<'_>) -> u64 {
    if !up.needs_key() {
        return 0;
    }
    let buf = c.rbuf.data();
    let value = match &up.hash_key {
        HashKey::ClientIp => None,
        HashKey::Header(name) => c
            .head
            .headers
            .iter()
            .find(|h| h.name.get(buf).eq_ignore_ascii_case(name.as_bytes()))
            .map(|h| h.value.get(buf)),
    };
    stable_hash(value.unwrap_or(c.client_ip.as_bytes()))
}

/// A request in flight to one target, counted for least-request balancing.
struct TargetLease<'a> {
    up: &'a UpstreamState,
    target: TargetId,
}

impl Drop for TargetLease<'_> {
    fn drop(&mut self) {
        self.up.end_request(self.target);
    }
}

/// A pooled connection to a target, or a new one; a target that refuses or times out is
/// marked down and another tried.
async fn acquire<'a>(
    up: &'a UpstreamState,
    w: &Worker,
    key: u64,
    deadline: &Deadline<'_>,
) -> Result<(TargetLease<'a>, UpstreamConn), ProxyError> {
    let mut last = ProxyError::NoHealthyTarget;
    for _ in 0..MAX_CONNECT_ATTEMPTS {
        let Some(t) = up.pick(&w.rng, key) else {
            return Err(last);
        };
        let conn = match up.checkout(t, w.now()) {
            Some(conn) => conn,
            None => match up.connect(t, deadline).await {
                Ok(conn) => {
                    up.mark_up(t);
                    conn
                }
                Err(e) => {
                    debug!(upstream = %up.name, target = %up.target(t).name, error = ?e, "connect failed; target marked down");
                    w.metrics.borrow_mut().record_upstream(
                        up.id,
                        t,
                        UpstreamOutcome::ConnectFailed,
                        None,
                    );
                    up.mark_down(t);
                    last = match e {
                        ConnectError::Refused(_) => {
                            ProxyError::UpstreamUnreachable("connect failed")
                        }
                        ConnectError::TimedOut => ProxyError::UpstreamTimeout,
                    };
                    continue;
                }
            },
        };
        up.begin_request(t);
        return Ok((TargetLease { up, target: t }, conn));
    }
    Err(last)
}

async fn proxy(
    c: &mut Client<'_>,
    w: &Worker,
    route: &RouteEntry,
    up: &UpstreamState,
    strip_prefix: Option<&[u8]>,
    cache: Option<&CacheExchange>,
) -> Result<Next, Failure> {
    let key = balance_key(up, c);
    let (lease, conn) = acquire(up, w, key, &c.deadline)
        .await
        .map_err(Failure::BeforeBody)?;
    let started = Instant::now();
    let head_at = Cell::new(None);
    let result = forward(c, w, route, up, strip_prefix, &lease, conn, &head_at, cache).await;
    let latency_us = head_at
        .get()
        .map(|at: Instant| at.saturating_duration_since(started).as_micros() as u64);
    let outcome = match (&result, latency_us) {
        (_, Some(_)) => Some(UpstreamOutcome::Response),
        (Err(f), None) => f.upstream_outcome(),
        (Ok(_), None) => None,
    };
    if let Some(outcome) = outcome {
        w.metrics
            .borrow_mut()
            .record_upstream(up.id, lease.target, outcome, latency_us);
    }
    c.log.upstream = Some((up.id, lease.target));
    c.log.upstream_us = latency_us;
    result
}

/// Sends the request on `conn` and the response back: the body of `proxy`.
#[allow(clippy::too_many_arguments)]
async fn forward(
    c: &mut Client<'_>,
    w: &Worker,
    route: &RouteEntry,
    up: &UpstreamState,
    strip_prefix: Option<&[u8]>,
    lease: &TargetLease<'_>,
    mut conn: UpstreamConn,
    head_at: &Cell<Option<Instant>>,
    cache: Option<&CacheExchange>,
) -> Result<Next, Failure> {
    let head = &c.head;
    let buf = c.rbuf.data();
    let trace = *c
        .log
        .trace
        .get_or_insert_with(|| Trace::new(head.traceparent.map(|t| t.get(buf)), &w.rng));
    c.up_out.clear();
    write::upstream_request(
        &mut c.up_out,
        buf,
        head,
        &Forwarding {
            client_ip: c.client_ip.as_bytes(),
            proto: b"http",
            request_id: &c.request_id,
            fallback_host: up.target(lease.target).name.as_bytes(),
            strip_prefix,
            traceparent: &trace.header,
            extra: cache.map_or(&b""[..], |x| &x.conditional),
        },
    );
    let method = head.method;
    let expect_continue = head.expect_continue && head.version == Version::Http11;
    let reframe = match head.body {
        BodyLength::Chunked => Reframe::Chunked,
        _ => Reframe::AsIs,
    };
    let mut body = BodyReader::new(head.body, &w.limits);
    let head_len = head.len as u64;
    c.rbuf.consume(head.len);
    let mut seen = 0u64;
    body.take_buffered(
        &mut c.rbuf,
        &mut c.up_out,
        reframe,
        &mut seen,
        route.max_body_bytes,
        None,
    )
    .map_err(body_failure)?;

    let ctx = ResponseCtx {
        to_head: method == Method::Head,
        client_version: c.head.version,
        client_keep_alive: c.head.keep_alive,
        upgrade_requested: c.head.upgrade,
        request_id: &c.request_id,
        request_timeout: up.request_timeout,
        write_timeout: w.limits.write_timeout,
        sent: &c.log.bytes_out,
        head_at,
        extra: &c.extra,
        cache,
        deadline: &c.deadline,
        worker: w,
    };

    let (done, body_complete) = if body.is_done() {
        let done = exchange(
            &mut conn,
            up,
            lease.target,
            &mut c.up_out,
            &mut c.w,
            &mut c.out,
            &mut c.resp,
            &ctx,
            method.is_idempotent(),
        )
        .await
        .map_err(|f| response_failure(f, &ctx, true))?;
        (done, true)
    } else {
        if expect_continue {
            c.out.clear();
            c.out.extend_from_slice(write::CONTINUE);
            send(&mut c.w, &mut c.out, &c.deadline, w.limits.write_timeout)
                .await
                .map_err(|_| Failure::Abort)?;
        }
        if send(
            &mut conn.w,
            &mut c.up_out,
            &c.deadline,
            w.limits.write_timeout,
        )
        .await
        .is_err()
        {
            return Err(Failure::MidBody(ProxyError::UpstreamUnreachable(
                "write failed",
            )));
        }
        c.up_out.clear();
        let pump_deadline = w.deadlines.slot();
        let pump_sent = Cell::new(0);
        let transfer = Transfer {
            read_timeout: w.limits.body_read_timeout,
            write_timeout: w.limits.write_timeout,
            max: route.max_body_bytes,
            deadline: &pump_deadline,
            sent: &pump_sent,
            tee: None,
        };
        // Async blocks capture whole variables: hand each side its own fields.
        let (cr, cw, crbuf, out, up_out, resp) = (
            &mut c.r,
            &mut c.w,
            &mut c.rbuf,
            &mut c.out,
            &mut c.up_out,
            &mut c.resp,
        );
        let UpstreamConn {
            r: ur,
            w: uw,
            rbuf: urbuf,
            ..
        } = &mut conn;
        let pump = async {
            let r = copy_body(
                cr, crbuf, uw, up_out, &mut body, reframe, &mut seen, &transfer,
            )
            .await;
            if r.is_ok() {
                // The request is complete: the wait for the response head starts now.
                ctx.deadline.arm(ctx.request_timeout);
            }
            r
        };
        let response = async {
            read_final_head(ur, urbuf, cw, out, resp, &ctx, HeadWait::AfterBody).await?;
            send_response(ur, urbuf, cw, out, resp, &ctx).await
        };
        match full_duplex(pump, response).await {
            (pumped, Some(Ok(done))) => (done, matches!(pumped, Some(Ok(())))),
            (_, Some(Err(f))) => return Err(response_failure(f, &ctx, false)),
            (Some(Err(e)), None) if ctx.sent.get() > 0 => {
                debug!(error = ?e, "request body failed after the response began");
                return Err(Failure::Abort);
            }
            (Some(Err(e)), None) => return Err(body_failure(e)),
            (_, None) => return Err(Failure::Abort),
        }
    };

    c.log.status = c.resp.status;
    c.log.bytes_in = head_len + seen;
    if done.upgrade {
        tunnel(c, w, &mut conn, w.limits.tunnel_idle_timeout).await;
        return Ok(Next::Close);
    }
    if done.upstream_reusable && body_complete {
        up.checkin(lease.target, conn, w.now());
    }
    Ok(if done.client_keep_alive && body_complete {
        Next::KeepAlive
    } else {
        Next::Close
    })
}

fn response_failure(f: ResponseFailure, ctx: &ResponseCtx<'_>, body_complete: bool) -> Failure {
    debug!(error = ?f.error, "upstream exchange failed");
    if ctx.sent.get() > 0 {
        Failure::Abort
    } else if body_complete {
        Failure::AfterBody(f.error)
    } else {
        Failure::MidBody(f.error)
    }
}

/// Runs the request-body pump and the response side together until the response is done, or
/// the pump fails on the client's side (the client broke the body or went away). A pump that
/// fails writing upstream does not stop the response: the upstream may still answer.
async fn full_duplex<P, R>(
    pump: P,
    response: R,
) -> (
    Option<Result<(), BodyError>>,
    Option<Result<ResponseDone, ResponseFailure>>,
)
where
    P: Future<Output = Result<(), BodyError>>,
    R: Future<Output = Result<ResponseDone, ResponseFailure>>,
{
    let mut pump = pin!(pump);
    let mut response = pin!(response);
    let mut pumped = None;
    let mut responded = None;
    std::future::poll_fn(|cx| {
        if pumped.is_none() {
            if let Poll::Ready(r) = pump.as_mut().poll(cx) {
                pumped = Some(r);
            }
        }
        if responded.is_none() {
            if let Poll::Ready(r) = response.as_mut().poll(cx) {
                responded = Some(r);
            }
        }
        let client_broke = matches!(pumped, Some(Err(ref e)) if !matches!(e, BodyError::Write(_)));
        if responded.is_some() || client_broke {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    (pumped, responded)
}

/// Sends a fully buffered request and forwards the response. A pooled connection that turns
/// out to be closed before a response byte arrives is replaced by a fresh one, once, for an
/// idempotent request.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    conn: &mut UpstreamConn,
    up: &UpstreamState,
    target: TargetId,
    up_out: &mut Vec<u8>,
    cw: &mut OwnedWriteHalf<TcpStream>,
    out: &mut Vec<u8>,
    resp: &mut ResponseHead,
    ctx: &ResponseCtx<'_>,
    idempotent: bool,
) -> Result<ResponseDone, ResponseFailure> {
    let mut retried = false;
    loop {
        // One timer covers sending the request and waiting for the response head.
        let attempt = ctx
            .deadline
            .within(ctx.request_timeout, async {
                if write_out(&mut conn.w, up_out).await.is_err() {
                    return Err(ResponseFailure {
                        error: ProxyError::UpstreamUnreachable("write failed"),
                        closed_early: true,
                    });
                }
                read_final_head(
                    &mut conn.r,
                    &mut conn.rbuf,
                    cw,
                    out,
                    resp,
                    ctx,
                    HeadWait::Caller,
                )
                .await
            })
            .await;
        let result = attempt.unwrap_or(Err(ResponseFailure::new(ProxyError::UpstreamTimeout)));
        match result {
            Err(f) if f.closed_early && conn.reused && idempotent && !retried => {
                debug!(upstream = %up.name, "pooled connection was closed; retrying on a new one");
                retried = true;
                *conn = match up.connect(target, ctx.deadline).await {
                    Ok(fresh) => fresh,
                    Err(ConnectError::TimedOut) => {
                        return Err(ResponseFailure::new(ProxyError::UpstreamTimeout))
                    }
                    Err(ConnectError::Refused(_)) => {
                        up.mark_down(target);
                        return Err(ResponseFailure::new(ProxyError::UpstreamUnreachable(
                            "connect failed",
                        )));
                    }
                };
            }
            Err(f) => return Err(f),
            Ok(()) => return send_response(&mut conn.r, &mut conn.rbuf, cw, out, resp, ctx).await,
        }
    }
}

/// Who bounds the wait for a response head.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HeadWait {
    /// The caller's deadline covers the whole exchange.
    Caller,
    /// The request body is streaming up concurrently: no limit until it is complete, when the
    /// pump arms `ctx.deadline` with `request_timeout`.
    AfterBody,
}

/// Reads the upstream's final response head into `resp`. Interim responses are passed to an
/// HTTP/1.1 client, except `100 Continue`, which the gateway already answered itself.
async fn read_final_head(
    ur: &mut OwnedReadHalf<TcpStream>,
    urbuf: &mut ReadBuf,
    cw: &mut OwnedWriteHalf<TcpStream>,
    out: &mut Vec<u8>,
    resp: &mut ResponseHead,
    ctx: &ResponseCtx<'_>,
    wait: HeadWait,
) -> Result<(), ResponseFailure> {
    let limits = &ctx.worker.limits;
    let max_head = limits.max_request_line_bytes + limits.max_header_bytes;
    let mut received = false;
    loop {
        if !urbuf.is_empty() {
            received = true;
            match parse_response(
                urbuf.data(),
                ctx.to_head,
                max_head,
                limits.max_headers,
                resp,
            ) {
                Ok(false) => {}
                Ok(true) if resp.status == 101 && !ctx.upgrade_requested => {
                    return Err(ResponseFailure::new(ProxyError::UpstreamInvalid(
                        "101 without an upgrade request",
                    )))
                }
                Ok(true) if resp.status < 200 && resp.status != 101 => {
                    if resp.status != 100 && ctx.client_version == Version::Http11 {
                        out.clear();
                        write::interim_response(out, urbuf.data(), resp);
                        ctx.sent.set(ctx.sent.get() + out.len() as u64);
                        // Bounded by the caller's deadline, or (streaming) by the one the
                        // request body arms when it is done; re-arming here would lose it.
                        let sent = match wait {
                            HeadWait::Caller => write_out(cw, out).await,
                            HeadWait::AfterBody => ctx
                                .deadline
                                .until_fired(write_out(cw, out))
                                .await
                                .unwrap_or(Err(io::ErrorKind::TimedOut.into())),
                        };
                        sent.map_err(|_| {
                            ResponseFailure::new(ProxyError::UpstreamUnreachable("client gone"))
                        })?;
                    }
                    urbuf.consume(resp.len);
                    continue;
                }
                Ok(true) => {
                    ctx.head_at.set(Some(Instant::now()));
                    return Ok(());
                }
                Err(ResponseError::TooLarge) => {
                    return Err(ResponseFailure::new(ProxyError::UpstreamInvalid(
                        "response head too large",
                    )))
                }
                Err(ResponseError::Malformed(why)) => {
                    return Err(ResponseFailure::new(ProxyError::UpstreamInvalid(why)))
                }
            }
        }
        let read = match wait {
            HeadWait::Caller => urbuf.fill(ur, max_head + 1).await,
            HeadWait::AfterBody => {
                match ctx.deadline.until_fired(urbuf.fill(ur, max_head + 1)).await {
                    Ok(r) => r,
                    Err(TimedOut) => return Err(ResponseFailure::new(ProxyError::UpstreamTimeout)),
                }
            }
        };
        match read {
            Ok(0) if !received => {
                return Err(ResponseFailure {
                    error: ProxyError::UpstreamUnreachable("closed before responding"),
                    closed_early: true,
                })
            }
            Ok(0) => {
                return Err(ResponseFailure::new(ProxyError::UpstreamInvalid(
                    "closed inside the response head",
                )))
            }
            Ok(_) => {}
            Err(e) => {
                return Err(ResponseFailure {
                    error: ProxyError::UpstreamUnreachable("connection reset"),
                    closed_early: !received && is_reset(&e),
                })
            }
        }
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// Writes the response head for the client and streams the body after it.
async fn send_response(
    ur: &mut OwnedReadHalf<TcpStream>,
    urbuf: &mut ReadBuf,
    cw: &mut OwnedWriteHalf<TcpStream>,
    out: &mut Vec<u8>,
    resp: &ResponseHead,
    ctx: &ResponseCtx<'_>,
) -> Result<ResponseDone, ResponseFailure> {
    let http11 = ctx.client_version == Version::Http11;
    let (framing, reframe) = match resp.body {
        BodyLength::None => (ClientFraming::Bodiless, Reframe::AsIs),
        BodyLength::Length(n) => (ClientFraming::Length(n), Reframe::AsIs),
        BodyLength::Chunked if http11 => (ClientFraming::Chunked, Reframe::Chunked),
        // An HTTP/1.0 client cannot read chunked: decode and delimit by closing.
        BodyLength::Chunked | BodyLength::UntilClose => (ClientFraming::Close, Reframe::AsIs),
    };
    let upgrade = resp.status == 101;
    let keep = ctx.client_keep_alive
        && framing != ClientFraming::Close
        && !upgrade
        && !ctx.worker.draining.get();
    out.clear();
    write::client_response(
        out,
        urbuf.data(),
        resp,
        &ClientHead {
            framing,
            client_version: ctx.client_version,
            keep_alive: keep,
            request_id: ctx.request_id,
            extra: ctx.extra,
        },
    );
    if let Some(cx) = ctx.cache {
        if cx.revalidating && resp.status == 304 {
            // The stale entry is still good: the caller answers from it.
            cx.record(urbuf.data(), resp);
            cx.not_modified.set(true);
            urbuf.consume(resp.len);
            return Ok(ResponseDone {
                client_keep_alive: keep,
                upstream_reusable: resp.keep_alive,
                upgrade: false,
            });
        }
        cx.start_capture(urbuf.data(), resp);
    }
    let mut body = BodyReader::new(resp.body, &ctx.worker.limits);
    urbuf.consume(resp.len);
    if upgrade {
        ctx.sent.set(ctx.sent.get() + out.len() as u64);
        send(cw, out, ctx.deadline, ctx.write_timeout)
            .await
            .map_err(|_| ResponseFailure::new(ProxyError::UpstreamUnreachable("client gone")))?;
        return Ok(ResponseDone {
            client_keep_alive: false,
            upstream_reusable: false,
            upgrade: true,
        });
    }
    // The head goes out with the first write of the body (or with all of a small one): until
    // then a failure can still become a clean 502.
    let transfer = Transfer {
        read_timeout: ctx.request_timeout,
        write_timeout: ctx.write_timeout,
        max: None,
        deadline: ctx.deadline,
        sent: ctx.sent,
        tee: ctx.cache.and_then(CacheExchange::tee),
    };
    let mut seen = 0;
    if let Err(e) = copy_body(ur, urbuf, cw, out, &mut body, reframe, &mut seen, &transfer).await {
        debug!(error = ?e, "response body failed");
        return Err(ResponseFailure::new(ProxyError::UpstreamUnreachable(
            "closed inside the response body",
        )));
    }
    Ok(ResponseDone {
        client_keep_alive: keep,
        upstream_reusable: resp.keep_alive,
        upgrade: false,
    })
}

/// After a 101: bytes flow both ways untouched until both sides close or the pair goes idle.
async fn tunnel(c: &mut Client<'_>, w: &Worker, conn: &mut UpstreamConn, idle: Duration) {
    let last = Cell::new(Instant::now());
    let (up_deadline, down_deadline) = (w.deadlines.slot(), w.deadlines.slot());
    let up = relay(
        &mut c.r,
        &mut c.rbuf,
        &mut conn.w,
        &last,
        idle,
        &up_deadline,
    );
    let down = relay(
        &mut conn.r,
        &mut conn.rbuf,
        &mut c.w,
        &last,
        idle,
        &down_deadline,
    );
    monoio::join!(up, down);
}

async fn relay<R, W>(
    r: &mut R,
    rbuf: &mut ReadBuf,
    w: &mut W,
    last: &Cell<Instant>,
    idle: Duration,
    deadline: &Deadline<'_>,
) where
    R: CancelableAsyncReadRent,
    W: AsyncWriteRent,
{
    loop {
        if !rbuf.is_empty() {
            if !matches!(
                deadline.within(idle, rbuf.write_all_to(w)).await,
                Ok(Ok(()))
            ) {
                break;
            }
            last.set(Instant::now());
        }
        deadline.arm(idle);
        let read = rbuf.fill_until(r, STREAMING_CAPACITY, deadline).await;
        deadline.disarm();
        match read {
            Ok(Some(0)) | Err(_) => break,
            Ok(Some(_)) => last.set(Instant::now()),
            // Idle this way; the pair is idle only if the other way is too.
            Ok(None) if last.get().elapsed() >= idle => break,
            Ok(None) => {}
        }
    }
    let _ = w.shutdown().await;
}

/// Writes a gateway-generated error response. Returns whether it was written.
async fn reply_error(c: &mut Client<'_>, w: &Worker, e: &ProxyError, keep_alive: bool) -> bool {
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
            headers.extend_from_slice(b"allow: ");
            headers.extend_from_slice(allow.as_bytes());
            headers.extend_from_slice(b"\r\n");
        }
        ProxyError::RateLimited(refusal) => {
            c.extra.clear();
            write::rate_limit_headers(&mut headers, &refusal.info, true);
        }
        _ => {}
    }
    let body = serde_json::to_vec(&serde_json::json!({
        "error": e.message(),
        "request_id": String::from_utf8_lossy(&c.request_id),
    }))
    .unwrap_or_default();
    c.log.status = status;
    c.out.clear();
    write::generated_response(
        &mut c.out,
        &Generated {
            status,
            headers: &headers,
            extra: &c.extra,
            body: &body,
            head_only: c.head.method == Method::Head,
            keep_alive,
            client_version: c.head.version,
            request_id: &c.request_id,
        },
    );
    c.log
        .bytes_out
        .set(c.log.bytes_out.get() + c.out.len() as u64);
    send(&mut c.w, &mut c.out, &c.deadline, w.limits.write_timeout)
        .await
        .is_ok()
}

/// Half-closes and drains what the client still sends, briefly, before the connection is
/// dropped: closing a socket with unread data resets it, and the reset can overtake the reply.
async fn linger(c: &mut Client<'_>) {
    let _ = c.w.shutdown().await;
    c.deadline.arm(LINGER);
    let mut discarded = 0;
    while discarded < LINGER_BYTES {
        let n = c.rbuf.len();
        c.rbuf.consume(n);
        discarded += n;
        match c
            .deadline
            .until_fired(c.rbuf.fill(&mut c.r, STREAMING_CAPACITY))
            .await
        {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    c.deadline.disarm();
}
