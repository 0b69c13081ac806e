//! The proxy terminal: pick a target through the worker's pools, send the request head (with
//! the route's `on_upstream_request` edits) and body, read the upstream's final head, and
//! stream the response back; a request body that is not already buffered streams up while the
//! response streams down (`full_duplex`). A 101 turns the pair into a `tunnel`. Generic over the
//! client's stream; upstream connections come from `upstream::client`.

use std::cell::Cell;
use std::pin::pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use monoio::io::AsyncWriteRent;
use tracing::debug;

use super::duplex::{stream_both_ways, ClientSide, Streaming};
use super::pipeline::{request_info, Who};
use super::response::{
    read_final_head, send_response, HeadWait, ResponseCtx, ResponseDone, ResponseFailure,
    ResponseState,
};
use super::retry::{self, Tried};
use super::session::Session;
use super::{body_failure, tunnel, Failure, Io, Next};
use crate::body::{BodyReader, Plain, Reframe};
use crate::buffer::{send, write_out};
use crate::config::HashKey;
use crate::config::RetryOn;
use crate::error::ProxyError;
use crate::generation::RouteEntry;
use crate::hash::stable_hash;
use crate::http::write::{self, Forwarding};
use crate::http::{BodyLength, Method, ResponseHead, Version};
use crate::metrics::UpstreamOutcome;
use crate::stamp::Stamp;
use crate::trace::Trace;
use crate::upstream::client::{self, connect_untried, Pick, TargetLease};
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

/// The proxy terminal, and its one retry loop: an attempt that fails in a way the upstream's
/// `retries` allow is made again on another target, within the attempts and the retry budget.
pub(super) async fn proxy<S: Io>(
    c: &mut Session<'_, S>,
    w: &Rc<Worker>,
    route: &RouteEntry,
    up: &UpstreamState,
    strip_prefix: Option<&[u8]>,
) -> Result<Next, Failure> {
    let key = balance_key(up, c);
    let up_cx = w.upstream_ctx();
    let _in_flight = up
        .admit()
        .map_err(|limit| Failure::BeforeBody(ProxyError::Overloaded(limit.reason())))?;
    up.earn_retry_budget();
    let mut tried = Tried::default();
    let mut retries = 0;
    let mut prepared: Option<Prepared> = None;
    // The route's `timeout_ms` bounds every attempt together, up to the response head.
    let give_up = route.timeout.map(|t| Instant::now() + t);
    loop {
        let left = give_up.map(|at| at.saturating_duration_since(Instant::now()));
        if left == Some(Duration::ZERO) {
            return Err(failed(prepared.is_some(), ProxyError::UpstreamTimeout));
        }
        // Retrying is possible while attempts and budget remain; `forward` says whether this
        // attempt's failure is one to retry.
        let allowed = up.retries.as_ref().filter(|r| retries < r.attempts);
        let may_retry = allowed.filter(|_| up.retry_affordable());
        // A failure a retry would follow, were the budget not spent, is counted.
        let budget_short = allowed.filter(|_| may_retry.is_none());
        let acquired = match client::pick(up, &up_cx, key, |t| tried.contains(t)) {
            Ok(Pick::Pooled(lease, conn)) => Ok((lease, conn)),
            Ok(Pick::Connect(t)) => {
                let connecting =
                    connect_untried(up, &up_cx, key, &c.deadline, |t| tried.contains(t), t);
                within(left, connecting).await
            }
            Err(e) => Err(e),
        };
        let (lease, conn) = match acquired {
            Ok(pair) => pair,
            // No target to try at all (every one down) is not a connect failure to retry.
            Err(e) => match may_retry
                .filter(|r| r.on.connect_failure && !matches!(e, ProxyError::NoHealthyTarget))
            {
                Some(_) => {
                    retry::take(up, &w.rng, left, &mut retries).await;
                    continue;
                }
                None => {
                    let connect_failed = !matches!(e, ProxyError::NoHealthyTarget);
                    if budget_short.is_some_and(|r| r.on.connect_failure && connect_failed) {
                        up.stats.borrow_mut().record_budget_refusal();
                    }
                    return Err(failed(prepared.is_some(), e));
                }
            },
        };
        let p = match &mut prepared {
            Some(p) => p,
            None => prepared.insert(prepare(
                c,
                w,
                route,
                up.target(lease.target).name.as_bytes(),
                strip_prefix,
            )?),
        };
        let started = Stamp::now();
        let head_at = Cell::new(None);
        let on = may_retry.map(|r| r.on);
        let timeout = left.map_or(up.request_timeout, |l| l.min(up.request_timeout));
        let attempt = forward(c, w, route, up, &lease, conn, &head_at, p, on, timeout).await;
        let latency_us = head_at.get().map(|at: Stamp| at.micros_since(started));
        if let Some(outcome) = attempt.outcome(latency_us) {
            client::record(up, lease.target, outcome, latency_us, c.resp.status);
        }
        c.ex.log.upstream = Some((up.id, lease.target));
        c.ex.log.upstream_us = latency_us;
        match attempt {
            Attempt::Done(result) => {
                // A failure a retry would have followed, but for the budget, is counted.
                let on = budget_short.and_then(|r| retry::after_send(r.on, c.head.method));
                let retryable = on.is_some_and(|on| match &result {
                    Ok(_) => latency_us.is_some() && on.status(c.resp.status),
                    Err(f) => f.error().is_some_and(|e| retry::retries_error(on, e)),
                });
                if retryable {
                    up.stats.borrow_mut().record_budget_refusal();
                }
                return result;
            }
            Attempt::Retry(_) => {
                up.stats.borrow_mut().record_retry(lease.target);
                tried.push(lease.target);
                retry::take(up, &w.rng, left, &mut retries).await;
            }
        }
    }
}

/// How an attempt ended: done (well or not), or failed in a way to try again.
enum Attempt {
    Done(Result<Next, Failure>),
    Retry(ProxyError),
}

impl Attempt {
    /// What the target's passive health and metrics learn from it (`latency_us`: the final
    /// head came after this long).
    fn outcome(&self, latency_us: Option<u64>) -> Option<UpstreamOutcome> {
        match (self, latency_us) {
            (_, Some(_)) => Some(UpstreamOutcome::Response),
            (Attempt::Done(Err(f)), None) => f.upstream_outcome(),
            (Attempt::Retry(e), None) => Failure::AfterBody(e.clone()).upstream_outcome(),
            (Attempt::Done(Ok(_)), None) => None,
        }
    }
}

/// `f`, bounded by what is `left` of the route's `timeout_ms`, if it has one.
async fn within<T>(
    left: Option<Duration>,
    f: impl std::future::Future<Output = Result<T, ProxyError>>,
) -> Result<T, ProxyError> {
    match left {
        None => f.await,
        Some(left) => monoio::time::timeout(left, f)
            .await
            .unwrap_or(Err(ProxyError::UpstreamTimeout)),
    }
}

/// A failure before any attempt sent the request (its head still unread), or after one did
/// (past the first attempt the whole request has been read).
fn failed(sent: bool, e: ProxyError) -> Failure {
    if sent {
        Failure::AfterBody(e)
    } else {
        Failure::BeforeBody(e)
    }
}

/// The request as the first attempt prepared it: the head and any buffered body are in
/// `up_out` (kept there for a retry), the rest of the body is still to read.
struct Prepared {
    body: BodyReader,
    reframe: Reframe,
    /// Body bytes seen so far.
    seen: u64,
    head_len: u64,
}

/// Writes the head going upstream and takes what of the body is already buffered.
fn prepare<S: Io>(
    c: &mut Session<'_, S>,
    w: &Worker,
    route: &RouteEntry,
    target_name: &[u8],
    strip_prefix: Option<&[u8]>,
) -> Result<Prepared, Failure> {
    write_upstream_head(c, w, route, target_name, strip_prefix);
    let head = &c.head;
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
        &mut Plain,
    )
    .map_err(body_failure)?;
    Ok(Prepared {
        body,
        reframe,
        seen,
        head_len,
    })
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
        let info = request_info(buf, head, who, id, route, &c.ex.gen.metrics);
        route
            .chain
            .on_upstream_request(&info, &c.ex.slots, &mut c.ex.up_edits);
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
            port: write::forwarded_port(head.host.map(|h| h.get(buf)), c.ex.tls.is_some()),
            forwarded: c.ex.gen.forwarded_header,
            request_id: &c.ex.request_id,
            fallback_host: target_name,
            strip_prefix,
            traceparent: &trace.header,
            edits: &c.ex.up_edits,
        },
    );
}

/// Sends the request on `conn` and the response back: one attempt of `proxy`. With `retry_on`
/// (retries left), a failure it names, met before anything reached the client, on a request
/// complete in `up_out` whose method may be repeated, is handed back to retry.
#[allow(clippy::too_many_arguments)]
async fn forward<S: Io>(
    c: &mut Session<'_, S>,
    w: &Rc<Worker>,
    route: &RouteEntry,
    up: &UpstreamState,
    lease: &TargetLease<'_>,
    mut conn: UpstreamConn,
    head_at: &Cell<Option<Stamp>>,
    p: &mut Prepared,
    retry_on: Option<RetryOn>,
    request_timeout: Duration,
) -> Attempt {
    let method = c.head.method;
    let expect_continue = c.head.expect_continue && c.head.version == Version::Http11;
    let retry_on = retry_on
        .filter(|_| p.body.is_done())
        .and_then(|on| retry::after_send(on, method));
    let ctx = ResponseCtx {
        to_head: method == Method::Head,
        client_version: c.head.version,
        client_keep_alive: c.head.keep_alive,
        upgrade_requested: c.head.upgrade,
        request_id: &c.ex.request_id,
        request_timeout,
        write_timeout: w.limits.write_timeout,
        sent: &c.ex.log.bytes_out,
        head_at,
        deadline: &c.deadline,
        worker: w,
    };
    let mut st = ResponseState {
        gen: &c.ex.gen,
        chain: &route.chain,
        slots: &mut c.ex.slots,
        lines: &mut c.ex.extra,
        resp_edits: &c.ex.resp_edits,
        upstream_edits: &mut c.ex.upstream_edits,
    };

    let (done, body_complete) = if p.body.is_done() {
        let sent = exchange(
            &mut conn,
            up,
            lease.target,
            &mut c.up_out,
            &mut c.w,
            &mut c.out,
            &mut c.resp,
            &ctx,
            &mut st,
            method.is_idempotent(),
            retry_on,
        )
        .await;
        match sent {
            Ok(done) => (done, true),
            Err(f)
                if ctx.sent.get() == 0
                    && retry_on
                        .is_some_and(|on| f.status_retry || retry::retries_error(on, &f.error)) =>
            {
                debug!(upstream = %up.name, error = ?f.error, "retrying on another target");
                return Attempt::Retry(f.error);
            }
            Err(f) => return Attempt::Done(Err(response_failure(f, &ctx, true))),
        }
    } else {
        if expect_continue {
            c.out.clear();
            c.out.extend_from_slice(write::CONTINUE);
            if send(&mut c.w, &mut c.out, &c.deadline, w.limits.write_timeout)
                .await
                .is_err()
            {
                return Attempt::Done(Err(Failure::Abort));
            }
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
            reader: &mut p.body,
            reframe: p.reframe,
            seen: &mut p.seen,
            max: route.max_body_bytes,
        };
        match stream_both_ways(client, &mut conn, body, &ctx, &mut st, w).await {
            Ok(r) => r,
            Err(f) => return Attempt::Done(Err(f)),
        }
    };

    c.ex.log.status = done.status;
    c.ex.log.bytes_in = p.head_len + p.seen;
    if done.upgrade {
        tunnel::run(c, w, &mut conn, w.limits.tunnel_idle_timeout).await;
        return Attempt::Done(Ok(Next::Close));
    }
    if done.upstream_reusable && body_complete {
        up.checkin(lease.target, conn, w.now());
    }
    Attempt::Done(Ok(if done.client_keep_alive && body_complete {
        Next::KeepAlive
    } else {
        Next::Close
    }))
}

pub(super) fn response_failure(
    f: ResponseFailure,
    ctx: &ResponseCtx<'_>,
    body_complete: bool,
) -> Failure {
    debug!(error = ?f.error, "upstream exchange failed");
    if ctx.sent.get() > 0 {
        Failure::Abort
    } else if body_complete {
        Failure::AfterBody(f.error)
    } else {
        Failure::MidBody(f.error)
    }
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
    st: &mut ResponseState<'_>,
    idempotent: bool,
    retry_on: Option<RetryOn>,
) -> Result<ResponseDone, ResponseFailure> {
    let mut retried = false;
    loop {
        // One timer covers sending the request and waiting for the response head.
        let attempt = {
            let attempt = pin!(async {
                if write_out(&mut conn.w, up_out).await.is_err() {
                    return Err(ResponseFailure {
                        error: ProxyError::UpstreamUnreachable("write failed"),
                        closed_early: true,
                        status_retry: false,
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
            });
            ctx.deadline.within(ctx.request_timeout, attempt).await
        };
        let result = attempt.unwrap_or(Err(ResponseFailure::new(ProxyError::UpstreamTimeout)));
        match result {
            Err(f) if f.closed_early && conn.reused && idempotent && !retried => {
                debug!(upstream = %up.name, "pooled connection was closed; retrying on a new one");
                retried = true;
                *conn = match up.connect(target, ctx.deadline).await {
                    Ok(fresh) => fresh,
                    Err(e) => {
                        if !matches!(e, ConnectError::TimedOut) {
                            client::mark_down(&ctx.worker.upstream_ctx(), up, target, &e);
                        }
                        return Err(ResponseFailure::new(e.proxy_error()));
                    }
                };
            }
            Err(f) => return Err(f),
            // A status to retry: the response is dropped with its connection.
            Ok(()) if retry_on.is_some_and(|on| on.status(resp.status)) => {
                return Err(ResponseFailure::status_retry())
            }
            Ok(()) => {
                return send_response(&mut conn.r, &mut conn.rbuf, cw, out, resp, ctx, st).await
            }
        }
    }
}
