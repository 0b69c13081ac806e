//! The proxy terminal: pick a target through the worker's pools, send the request head (with
//! the route's `on_upstream_request` edits) and body, read the upstream's final head, and
//! stream the response back; a request body that is not already buffered streams up while the
//! response streams down (`full_duplex`). A 101 turns the pair into a `tunnel`. Generic over the
//! client's stream; upstream connections come from `upstream::client`.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use monoio::io::{AsyncReadRent, AsyncWriteRent, CancelableAsyncReadRent};
use tracing::debug;

use super::cached::CacheExchange;
use super::pipeline::request_info;
use super::session::Session;
use super::{body_failure, Failure, Io, Next};
use crate::body::{copy_body, BodyError, BodyReader, Reframe, Transfer};
use crate::buffer::{send, write_out, ReadBuf, STREAMING_CAPACITY};
use crate::config::HashKey;
use crate::deadline::{Deadline, TimedOut};
use crate::error::ProxyError;
use crate::generation::RouteEntry;
use crate::hash::stable_hash;
use crate::http::write::{self, ClientFraming, ClientHead, Forwarding};
use crate::http::{
    parse_response, BodyLength, HeaderEdits, Method, ResponseError, ResponseHead, Version,
};
use crate::metrics::UpstreamOutcome;
use crate::trace::Trace;
use crate::upstream::client::{acquire, TargetLease};
use crate::upstream::{ConnectError, TargetId, UpstreamConn, UpstreamState};
use crate::worker::Worker;

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
    /// Header lines the gateway adds to the response.
    extra: &'a [u8],
    /// The route's edits to the response head.
    edits: &'a HeaderEdits,
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

/// The hash consistent hashing places this request by.
fn balance_key<S: Io>(up: &UpstreamState, c: &Session<'_, S>) -> u64 {
    if !up.needs_key() {
        return 0;
    }
    let buf = c.rbuf.data();
    let value = match &up.hash_key {
        HashKey::ClientIp => None,
        HashKey::Header(name) => c.head.header(buf, name.as_bytes()),
    };
    stable_hash(value.unwrap_or(c.ex.client_ip.as_bytes()))
}

pub(super) async fn proxy<S: Io>(
    c: &mut Session<'_, S>,
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
    c.ex.log.upstream = Some((up.id, lease.target));
    c.ex.log.upstream_us = latency_us;
    result
}

/// Sends the request on `conn` and the response back: the body of `proxy`.
#[allow(clippy::too_many_arguments)]
async fn forward<S: Io>(
    c: &mut Session<'_, S>,
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
        .ex
        .log
        .trace
        .get_or_insert_with(|| Trace::new(head.traceparent.map(|t| t.get(buf)), &w.rng));
    if let Some(id) = c.ex.route.filter(|_| !route.chain.is_empty()) {
        let info = request_info(buf, head, &c.ex.client_ip, &c.ex.request_id, id, route);
        route.chain.on_upstream_request(&info, &mut c.ex.up_edits);
    }
    c.up_out.clear();
    write::upstream_request(
        &mut c.up_out,
        buf,
        head,
        &Forwarding {
            client_ip: c.ex.client_ip.as_bytes(),
            proto: b"http",
            request_id: &c.ex.request_id,
            fallback_host: up.target(lease.target).name.as_bytes(),
            strip_prefix,
            traceparent: &trace.header,
            extra: cache.map_or(&b""[..], |x| &x.conditional),
            edits: &c.ex.up_edits,
        },
    );
    let method = head.method;
    let expect_continue = head.expect_continue && head.version == Version::Http11;
    let reframe = match head.body {
        BodyLength::Chunked => Reframe::Chunked,
        _ => Reframe::AsIs,
    };
    let mut body = BodyReader::new(head.body, &w.parse_limits);
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
        request_id: &c.ex.request_id,
        request_timeout: up.request_timeout,
        write_timeout: w.limits.write_timeout,
        sent: &c.ex.log.bytes_out,
        head_at,
        extra: &c.ex.extra,
        edits: &c.ex.resp_edits,
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

    c.ex.log.status = c.resp.status;
    c.ex.log.bytes_in = head_len + seen;
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
async fn exchange<W: AsyncWriteRent>(
    conn: &mut UpstreamConn,
    up: &UpstreamState,
    target: TargetId,
    up_out: &mut Vec<u8>,
    cw: &mut W,
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
async fn read_final_head<R: AsyncReadRent, W: AsyncWriteRent>(
    ur: &mut R,
    urbuf: &mut ReadBuf,
    cw: &mut W,
    out: &mut Vec<u8>,
    resp: &mut ResponseHead,
    ctx: &ResponseCtx<'_>,
    wait: HeadWait,
) -> Result<(), ResponseFailure> {
    let limits = &ctx.worker.parse_limits;
    let max_head = limits.max_response_head();
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
async fn send_response<R: AsyncReadRent, W: AsyncWriteRent>(
    ur: &mut R,
    urbuf: &mut ReadBuf,
    cw: &mut W,
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
            edits: ctx.edits,
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
    let mut body = BodyReader::new(resp.body, &ctx.worker.parse_limits);
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
async fn tunnel<S: Io>(
    c: &mut Session<'_, S>,
    w: &Worker,
    conn: &mut UpstreamConn,
    idle: Duration,
) {
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
