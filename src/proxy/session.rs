//! A client connection: `Session` owns the stream's halves, the read buffer, the output
//! buffers, the connection's deadline and its served count, and one reused `Exchange` for the
//! request in progress. `serve` loops over requests (keep-alive and pipelining: strictly one at
//! a time, in order); each runs the pipeline, and its ending decides whether the connection
//! goes on.

use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::time::Instant;

use monoio::io::AsyncWriteRent;
use tracing::debug;

use super::exchange::Exchange;
use super::{pipeline, reply, Failure, Io, Next};
use crate::access_log::Entry;
use crate::buffer::{ReadBuf, STREAMING_CAPACITY};
use crate::config::ListenerId;
use crate::deadline::Deadline;
use crate::error::ProxyError;
use crate::http::{parse_request, path, BodyLength, Method, RequestHead, ResponseHead, Version};
use crate::metrics::RequestRecord;
use crate::stamp::Stamp;
use crate::trace::Trace;
use crate::worker::{FirstRequest, Worker};

/// After an error reply with request bytes still unread, how long to keep reading and
/// discarding them so that closing does not reset the connection under the reply.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// One client connection's state, reused by every request on it.
pub(crate) struct Session<'w, S: Io> {
    /// Times this connection's pending operation.
    pub deadline: Deadline<'w>,
    pub r: S::Read,
    pub w: S::Write,
    pub rbuf: ReadBuf,
    /// Bytes to the client.
    pub out: Vec<u8>,
    /// Bytes to the upstream.
    pub up_out: Vec<u8>,
    pub head: RequestHead,
    /// The request-target as the client sent it, kept only when normalizing changed the path
    /// (for the access log); empty otherwise.
    pub sent_target: Vec<u8>,
    pub resp: ResponseHead,
    pub served: u32,
    /// The request in progress.
    pub ex: Exchange,
}

/// Serves one client connection on stream `io` until it closes. Generic over the stream, so a
/// TLS stream (or an in-memory one, in tests) runs the same pipeline, monomorphised.
pub async fn serve<S: Io>(io: S, peer: SocketAddr, listener: ListenerId, w: Rc<Worker>) {
    let first = FirstRequest::new(&w);
    serve_accepted(io, peer, listener, w, first).await;
}

/// `serve`, for a connection `first` has counted since its accept.
pub async fn serve_accepted<S: Io>(
    io: S,
    peer: SocketAddr,
    listener: ListenerId,
    w: Rc<Worker>,
    first: FirstRequest,
) {
    let Some(_active) = w.admit_connection(peer) else {
        return;
    };
    serve_admitted(io, peer, listener, &w, first).await;
}

/// `serve` for a connection already counted against the worker's limit (a TLS one, admitted
/// before its handshake).
pub(crate) async fn serve_admitted<S: Io>(
    io: S,
    peer: SocketAddr,
    listener: ListenerId,
    w: &Rc<Worker>,
    first: FirstRequest,
) {
    let tls = io.tls();
    let (r, wr) = io.into_halves();
    let mut c = Session::<S> {
        deadline: w.deadlines.slot(),
        r,
        w: wr,
        rbuf: ReadBuf::new(),
        out: Vec::with_capacity(1024),
        up_out: Vec::with_capacity(1024),
        head: RequestHead::default(),
        sent_target: Vec::new(),
        resp: ResponseHead::default(),
        served: 0,
        ex: Exchange::new(w.generation(), listener, peer, tls),
    };
    let mut next = serve_request(&mut c, w).await;
    drop(first);
    while next == Next::KeepAlive {
        c.served += 1;
        next = serve_request(&mut c, w).await;
    }
    if S::CLOSE_NOTIFY {
        // A TLS peer that sees the TCP close without close_notify may take the connection for
        // truncated and drop its session (OpenSSL does), losing resumption.
        let _ = c
            .deadline
            .within(w.limits.write_timeout, c.w.shutdown())
            .await;
    }
}

async fn serve_request<S: Io>(c: &mut Session<'_, S>, w: &Rc<Worker>) -> Next {
    // Between requests: a drain, or a reload that removed the listener, closes the connection
    // (its first request is answered whatever happens).
    let moved = || !w.is_current(&c.ex.gen) && !c.ex.listener_in(&w.generation());
    if c.rbuf.is_empty() && c.served > 0 && (w.draining.get() || moved()) {
        return Next::Close;
    }
    let ready = read_request_head(c, w).await;
    // Both generations are alive while `reset` swaps them, so their addresses differ.
    let parsed_on = Rc::as_ptr(&c.ex.gen);
    if !c.ex.reset(w.generation()) {
        // Its listener was removed while this request arrived: the last on this connection.
        c.head.keep_alive = false;
    }
    if matches!(ready, HeadRead::Ready) && !std::ptr::eq(parsed_on, Rc::as_ptr(&c.ex.gen)) {
        // Parsed with the previous config's vouched headers: classify with this one's.
        c.head.mark_vouched(c.rbuf.data(), &c.ex.gen.vouched);
    }
    let next = match ready {
        HeadRead::Ready => {
            let _inflight = w.begin_request();
            if !c.ex.gen.trusted_proxies.is_empty() {
                c.ex.resolve_client(c.rbuf.data(), &c.head);
            }
            // What was read, whatever answers: terminals add the body they read.
            c.ex.log.bytes_in = c.head.len as u64;
            if w.access_log.is_some() {
                let buf = c.rbuf.data();
                c.ex.log_text.capture(buf, &c.head, &c.sent_target, true);
                let incoming = c.head.traceparent.map(|t| t.get(buf));
                c.ex.log.trace = Some(Trace::new(incoming, &w.rng));
            }
            c.ex.request_id.clear();
            match c.head.request_id {
                Some(id) => c.ex.request_id.extend_from_slice(id.get(c.rbuf.data())),
                None => w.rng.hex_id(&mut c.ex.request_id),
            }
            let result = pipeline::run(c, w).await;
            conclude(c, w, result).await
        }
        HeadRead::Closed => return Next::Close,
        HeadRead::Failed(e) => {
            c.ex.log.bytes_in = c.rbuf.len() as u64;
            c.ex.log_text.clear();
            if matches!(e, ProxyError::BadPath(_)) && w.access_log.is_some() {
                // The head parsed: the log shows what was refused.
                c.ex.log_text
                    .capture(c.rbuf.data(), &c.head, &c.sent_target, false);
            }
            c.ex.request_id.clear();
            w.rng.hex_id(&mut c.ex.request_id);
            c.head.version = Version::Http11;
            c.head.method = Method::Other;
            reply::error(c, w, &e, false).await;
            linger(c).await;
            Next::Close
        }
    };
    finish(c, w);
    next
}

/// Turns a request's result into what happens to the connection, answering failures: the one
/// error funnel.
async fn conclude<S: Io>(
    c: &mut Session<'_, S>,
    w: &Worker,
    result: Result<Next, Failure>,
) -> Next {
    let failure = match result {
        Ok(next) => return next,
        Err(f) => f,
    };
    let keep = !w.draining.get() && c.head.keep_alive;
    match failure {
        Failure::Abort => Next::Close,
        Failure::BeforeBody(e) => {
            let no_body = c.head.body == BodyLength::None;
            if reply::error(c, w, &e, keep && no_body).await && keep && no_body {
                c.rbuf.consume(c.head.len);
                Next::KeepAlive
            } else {
                linger(c).await;
                Next::Close
            }
        }
        Failure::AfterBody(e) => {
            if reply::error(c, w, &e, keep).await && keep {
                Next::KeepAlive
            } else {
                Next::Close
            }
        }
        Failure::MidBody(e) => {
            reply::error(c, w, &e, false).await;
            linger(c).await;
            Next::Close
        }
    }
}

/// Records the finished request: metrics, and the access log line.
fn finish<S: Io>(c: &mut Session<'_, S>, w: &Worker) {
    let ex = &c.ex;
    let total_us = Stamp::now().micros_since(ex.log.start);
    // A request abandoned before any response: the client went away (nginx's 499).
    let status = if ex.log.status == 0 {
        499
    } else {
        ex.log.status
    };
    let record = RequestRecord {
        method: c.head.method,
        status,
        total_us,
    };
    let mut routes = ex.route.map(|_| ex.gen.metrics.borrow_mut());
    let id = ex.route.unwrap_or(crate::config::RouteId(0));
    w.metrics
        .borrow_mut()
        .record_request(routes.as_deref_mut(), id, &record);
    let Some(log) = &w.access_log else { return };
    let trace = ex.log.trace.unwrap_or_else(|| Trace::new(None, &w.rng));
    let dropped = log.write(&Entry {
        worker: w.id,
        client_ip: ex.client_ip.as_bytes(),
        method: ex.log_text.part(0),
        target: ex.log_text.part(1),
        http10: c.head.version == Version::Http10,
        status,
        bytes_in: ex.log.bytes_in,
        bytes_out: ex.log.bytes_out.get(),
        route: ex.route_entry().map_or("", |r| r.name.as_str()),
        upstream: ex
            .log
            .upstream
            .map_or("", |(u, t)| ex.gen.upstream(u).target(t).name.as_str()),
        upstream_us: ex.log.upstream_us,
        total_us,
        request_id: &ex.request_id,
        trace_id: trace.trace_id(),
        referer: ex.log_text.part(2),
        user_agent: ex.log_text.part(3),
        normalized_path: ex.log_text.part(4),
        tls: ex.tls.as_ref(),
        consumer: ex.identity.as_ref().map(|i| i.name(&ex.gen.consumers)),
        identity_dropped: ex.log.identity_dropped,
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

async fn read_request_head<S: Io>(c: &mut Session<'_, S>, w: &Worker) -> HeadRead {
    let limits = &w.limits;
    let max_buf = limits.max_request_line_bytes + limits.max_header_bytes + 4096;
    let mut deadline: Option<Instant> = None;
    loop {
        if !c.rbuf.is_empty() {
            let vouched = &c.ex.gen.vouched;
            match parse_request(c.rbuf.data(), &w.parse_limits, vouched, &mut c.head) {
                Ok(true) => return normalize_path(c, w),
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
        let fill = pin!(c.rbuf.fill(&mut c.r, max_buf));
        match c.deadline.within(wait, fill).await {
            Err(_) if deadline.is_some() => {
                debug!("request head timed out");
                return HeadRead::Failed(ProxyError::HeadTimeout);
            }
            Err(_) | Ok(Ok(0)) | Ok(Err(_)) => return HeadRead::Closed,
            Ok(Ok(_)) => {}
        }
    }
}

/// Normalizes the parsed head's path where it was read (`http::path`), keeping the target as
/// sent when that changes it. The common path: the parser's scan found nothing to do.
fn normalize_path<S: Io>(c: &mut Session<'_, S>, w: &Worker) -> HeadRead {
    c.sent_target.clear();
    if !c.head.unnormalized {
        return HeadRead::Ready;
    }
    c.sent_target
        .extend_from_slice(c.head.target.get(c.rbuf.data()));
    match path::normalize(c.rbuf.data_mut(), &mut c.head, w.limits.encoded_slashes) {
        Ok(true) => HeadRead::Ready,
        Ok(false) => {
            c.sent_target.clear();
            HeadRead::Ready
        }
        Err(e) => {
            debug!(reason = e.reason(), "request path rejected");
            // The log shows the target as sent.
            HeadRead::Failed(ProxyError::BadPath(e))
        }
    }
}

/// Half-closes and drains what the client still sends, briefly, before the connection is
/// dropped: closing a socket with unread data resets it, and the reset can overtake the reply.
pub(crate) async fn linger<S: Io>(c: &mut Session<'_, S>) {
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
