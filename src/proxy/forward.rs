//! The proxy terminal: pick a target through the worker's pools, send the request head (with
//! the route's `on_upstream_request` edits) and body, read the upstream's final head, and
//! stream the response back; a request body that is not already buffered streams up while the
//! response streams down (`full_duplex`). A 101 turns the pair into a `tunnel`. Generic over the
//! client's stream; upstream connections come from `upstream::client`.

use std::cell::Cell;
use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Instant;

use monoio::io::AsyncWriteRent;
use tracing::debug;

use super::pipeline::{request_info, Who};
use super::response::{
    read_final_head, send_response, HeadWait, ResponseCtx, ResponseDone, ResponseFailure,
};
use super::session::Session;
use super::{body_failure, tunnel, Failure, Io, Next};
use crate::body::{copy_body, BodyError, BodyReader, Reframe, Transfer};
use crate::buffer::{send, write_out, ReadBuf};
use crate::config::HashKey;
use crate::error::ProxyError;
use crate::generation::RouteEntry;
use crate::hash::stable_hash;
use crate::http::write::{self, Forwarding};
use crate::http::{BodyLength, Method, ResponseHead, Version};
use crate::metrics::UpstreamOutcome;
use crate::trace::Trace;
use crate::upstream::client::{self, acquire, TargetLease};
use crate::upstream::{ConnectError, TargetId, UpstreamConn, UpstreamState};
use crate::worker::Worker;

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
) -> Result<Next, Failure> {
    let key = balance_key(up, c);
    let (lease, conn) = acquire(up, w, key, &c.deadline)
        .await
        .map_err(Failure::BeforeBody)?;
    let started = Instant::now();
    let head_at = Cell::new(None);
    let result = forward(c, w, route, up, strip_prefix, &lease, conn, &head_at).await;
    let latency_us = head_at
        .get()
        .map(|at: Instant| at.saturating_duration_since(started).as_micros() as u64);
    let outcome = match (&result, latency_us) {
        (_, Some(_)) => Some(UpstreamOutcome::Response),
        (Err(f), None) => f.upstream_outcome(),
        (Ok(_), None) => None,
    };
    if let Some(outcome) = outcome {
        client::record(w, up, lease.target, outcome, latency_us, c.resp.status);
    }
    c.ex.log.upstream = Some((up.id, lease.target));
    c.ex.log.upstream_us = latency_us;
    result
}

/// The `on_upstream_request` phase and the head going upstream, written into `up_out`.
fn write_upstream_head<S: Io>(
    c: &mut Session<'_, S>,
    w: &Worker,
    route: &RouteEntry,
    target_name: &[u8],
    strip_prefix: Option<&[u8]>,
) {
    let head = &c.head;
    let buf = c.rbuf.data();
    let trace = *c
        .ex
        .log
        .trace
        .get_or_insert_with(|| Trace::new(head.traceparent.map(|t| t.get(buf)), &w.rng));
    if let Some(id) =
        c.ex.route
            .filter(|_| route.chain.runs_on_upstream_request())
    {
        let who = Who {
            client: c.ex.client,
            client_ip: &c.ex.client_ip,
            tls: c.ex.tls.as_ref(),
            request_id: &c.ex.request_id,
            consumer: c.ex.identity.as_ref().map(|i| i.name(&c.ex.gen.consumers)),
            identity: c.ex.identity.as_ref(),
        };
        let info = request_info(buf, head, who, id, route);
        let slot = c.ex.cache.as_ref();
        route
            .chain
            .on_upstream_request(&info, slot, &mut c.ex.up_edits);
    }
    c.up_out.clear();
    write::upstream_request(
        &mut c.up_out,
        buf,
        head,
        &Forwarding {
            client_ip: c.ex.peer_ip.as_bytes(),
            proto: if c.ex.tls.is_some() {
                b"https"
            } else {
                b"http"
            },
            request_id: &c.ex.request_id,
            fallback_host: target_name,
            strip_prefix,
            traceparent: &trace.header,
            edits: &c.ex.up_edits,
        },
    );
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
) -> Result<Next, Failure> {
    write_upstream_head(
        c,
        w,
        route,
        up.target(lease.target).name.as_bytes(),
        strip_prefix,
    );
    let head = &c.head;
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
        cache: c.ex.cache.as_ref().map(|s| &s.exchange),
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
        let client = ClientSide::<S> {
            r: &mut c.r,
            w: &mut c.w,
            rbuf: &mut c.rbuf,
            out: &mut c.out,
            up_out: &mut c.up_out,
            resp: &mut c.resp,
        };
        let body = Streaming {
            reader: &mut body,
            reframe,
            seen: &mut seen,
            max: route.max_body_bytes,
        };
        stream_both_ways(client, &mut conn, body, &ctx, w).await?
    };

    c.ex.log.status = c.resp.status;
    c.ex.log.bytes_in = head_len + seen;
    if done.upgrade {
        tunnel::run(c, w, &mut conn, w.limits.tunnel_idle_timeout).await;
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

/// The client connection's parts a streaming exchange borrows, each on its own, so that the
/// request pump and the response side can hold theirs at once.
struct ClientSide<'a, S: Io> {
    r: &'a mut S::Read,
    w: &'a mut S::Write,
    rbuf: &'a mut ReadBuf,
    out: &'a mut Vec<u8>,
    up_out: &'a mut Vec<u8>,
    resp: &'a mut ResponseHead,
}

/// A request body still arriving.
struct Streaming<'a> {
    reader: &'a mut BodyReader,
    reframe: Reframe,
    /// Body bytes seen so far, for the route's `max_body_bytes` and the access log.
    seen: &'a mut u64,
    max: Option<u64>,
}

/// Sends the head (in `up_out`), then pumps the rest of the request body up while the response
/// comes down. Returns how the response ended and whether the request body was complete.
async fn stream_both_ways<S: Io>(
    c: ClientSide<'_, S>,
    conn: &mut UpstreamConn,
    body: Streaming<'_>,
    ctx: &ResponseCtx<'_>,
    w: &Worker,
) -> Result<(ResponseDone, bool), Failure> {
    if send(&mut conn.w, c.up_out, ctx.deadline, w.limits.write_timeout)
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
        max: body.max,
        deadline: &pump_deadline,
        sent: &pump_sent,
        tee: None,
        keep_last: false,
    };
    let UpstreamConn {
        r: ur,
        w: uw,
        rbuf: urbuf,
        ..
    } = conn;
    let ClientSide {
        r: cr,
        w: cw,
        rbuf: crbuf,
        out,
        up_out,
        resp,
    } = c;
    let Streaming {
        reader,
        reframe,
        seen,
        ..
    } = body;
    let pump = async {
        let r = copy_body(cr, crbuf, uw, up_out, reader, reframe, seen, &transfer).await;
        if r.is_ok() {
            // The request is complete: the wait for the response head starts now.
            ctx.deadline.arm(ctx.request_timeout);
        }
        r
    };
    let response = async {
        read_final_head(ur, urbuf, cw, out, resp, ctx, HeadWait::AfterBody).await?;
        send_response(ur, urbuf, cw, out, resp, ctx).await
    };
    match full_duplex(pump, response).await {
        (pumped, Some(Ok(done))) => Ok((done, matches!(pumped, Some(Ok(()))))),
        (_, Some(Err(f))) => Err(response_failure(f, ctx, false)),
        (Some(Err(e)), None) if ctx.sent.get() > 0 => {
            debug!(error = ?e, "request body failed after the response began");
            Err(Failure::Abort)
        }
        (Some(Err(e)), None) => Err(body_failure(e)),
        (_, None) => Err(Failure::Abort),
    }
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
                    Err(e) => {
                        if !matches!(e, ConnectError::TimedOut) {
                            client::mark_down(ctx.worker, up, target, &e);
                        }
                        return Err(ResponseFailure::new(e.proxy_error()));
                    }
                };
            }
            Err(f) => return Err(f),
            Ok(()) => return send_response(&mut conn.r, &mut conn.rbuf, cw, out, resp, ctx).await,
        }
    }
}
