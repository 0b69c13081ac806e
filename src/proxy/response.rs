//! The response side of a proxied exchange: read the upstream's final head (relaying interim
//! responses), hand it to the route's `on_upstream_response` filters (which may edit it, or
//! replace it with a reply), write the client's head with the route's edits, and stream the body
//! back through the route's `on_body` filters.

use std::cell::Cell;
use std::io;
use std::rc::Rc;
use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRent};
use tracing::debug;

use super::reply::{self, ReplyHead};
use crate::body::{copy_body, frame, BodyHook, BodyReader, Plain, Reframe, Transfer};
use crate::buffer::{send, write_out, ReadBuf};
use crate::deadline::{Deadline, TimedOut};
use crate::error::ProxyError;
use crate::filter::{BodyStep, Chain, Ctx, Reply, ResponseOut, ResponseView, Slot};
use crate::generation::Generation;
use crate::http::write::{self, ClientFraming, ClientHead};
use crate::http::{parse_response, BodyLength, HeaderEdits, ResponseError, ResponseHead, Version};
use crate::stamp::Stamp;
use crate::worker::Worker;

/// What the response side needs to know about the request.
pub(super) struct ResponseCtx<'a> {
    pub(super) to_head: bool,
    pub(super) client_version: Version,
    pub(super) client_keep_alive: bool,
    pub(super) upgrade_requested: bool,
    pub(super) request_id: &'a [u8],
    pub(super) request_timeout: Duration,
    pub(super) write_timeout: Duration,
    /// Bytes of response sent to the client so far.
    pub(super) sent: &'a Cell<u64>,
    /// When the final response head arrived.
    pub(super) head_at: &'a Cell<Option<Stamp>>,
    /// Times the response side's operations.
    pub(super) deadline: &'a Deadline<'a>,
    pub(super) worker: &'a Rc<Worker>,
}

/// The exchange's state the response side writes: the route's filters with their slots, and
/// the lines and edits of the client's head.
pub(super) struct ResponseState<'a> {
    pub(super) gen: &'a Generation,
    pub(super) chain: &'a Chain,
    pub(super) slots: &'a mut [Slot],
    /// Header lines the gateway adds to the response.
    pub(super) lines: &'a mut Vec<u8>,
    /// The route's edits to every response head.
    pub(super) resp_edits: &'a HeaderEdits,
    /// The filters' edits to the upstream's head.
    pub(super) upstream_edits: &'a mut HeaderEdits,
}

pub(super) struct ResponseDone {
    /// The status the client got.
    pub(super) status: u16,
    pub(super) client_keep_alive: bool,
    pub(super) upstream_reusable: bool,
    pub(super) upgrade: bool,
}

#[derive(Debug)]
pub(super) struct ResponseFailure {
    pub(super) error: ProxyError,
    /// The upstream closed or reset before sending a byte: a stale pooled connection.
    pub(super) closed_early: bool,
    /// The upstream answered a status the retry policy retries (the answer was dropped).
    pub(super) status_retry: bool,
}

impl ResponseFailure {
    pub(super) fn new(error: ProxyError) -> Self {
        ResponseFailure {
            error,
            closed_early: false,
            status_retry: false,
        }
    }

    pub(super) fn status_retry() -> Self {
        ResponseFailure {
            error: ProxyError::UpstreamUnreachable("answered a status that is retried"),
            closed_early: false,
            status_retry: true,
        }
    }
}

/// Who bounds the wait for a response head.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum HeadWait {
    /// The caller's deadline covers the whole exchange.
    Caller,
    /// The request body is streaming up concurrently: no limit until it is complete, when the
    /// pump arms `ctx.deadline` with `request_timeout`.
    AfterBody,
}

/// Reads the upstream's final response head into `resp`. Interim responses are passed to an
/// HTTP/1.1 client, except `100 Continue`, which the gateway already answered itself.
pub(super) async fn read_final_head<R: AsyncReadRent, W: AsyncWriteRent>(
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
                    ctx.head_at.set(Some(Stamp::now()));
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
                    status_retry: false,
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
                    status_retry: false,
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

/// The route's body filters between the upstream's body and the client's framing.
struct FilterBody<'a> {
    chain: &'a Chain,
    cx: &'a Ctx<'a>,
    slots: &'a mut [Slot],
}

impl FilterBody<'_> {
    fn step(&mut self, step: BodyStep<'_>, out: &mut Vec<u8>, reframe: Reframe) {
        self.chain
            .on_body(self.cx, self.slots, step, &mut |d| frame(out, d, reframe));
    }
}

impl BodyHook for FilterBody<'_> {
    fn data(&mut self, data: &[u8], out: &mut Vec<u8>, reframe: Reframe) {
        self.step(BodyStep::Data(data), out, reframe);
    }

    fn flush(&mut self, out: &mut Vec<u8>, reframe: Reframe) {
        self.step(BodyStep::Flush, out, reframe);
    }

    fn end(&mut self, out: &mut Vec<u8>, reframe: Reframe) {
        self.step(BodyStep::End, out, reframe);
        Plain.end(out, reframe);
    }
}

/// Writes the response head for the client and streams the body after it; or, when a filter
/// replaces the upstream's response, its reply.
pub(super) async fn send_response<R: AsyncReadRent, W: AsyncWriteRent>(
    ur: &mut R,
    urbuf: &mut ReadBuf,
    cw: &mut W,
    out: &mut Vec<u8>,
    resp: &ResponseHead,
    ctx: &ResponseCtx<'_>,
    st: &mut ResponseState<'_>,
) -> Result<ResponseDone, ResponseFailure> {
    let http11 = ctx.client_version == Version::Http11;
    let chain = st.chain;
    let filtered = chain.runs_on_upstream_response() || chain.runs_on_body();
    let cx = filtered.then(|| ctx.worker.filter_ctx(st.gen, ctx.deadline));
    let mut reframes = false;
    if let Some(cx) = cx.as_ref().filter(|_| chain.runs_on_upstream_response()) {
        let mut o = ResponseOut {
            lines: st.lines,
            edits: st.upstream_edits,
            reframes: false,
        };
        let view = ResponseView {
            buf: urbuf.data(),
            head: resp,
        };
        if let Some(answer) = chain.on_upstream_response(cx, st.slots, view, &mut o) {
            return replace(urbuf, cw, out, resp, ctx, st, &answer).await;
        }
        reframes = o.reframes;
    }
    let (framing, reframe) = match resp.body {
        BodyLength::None => (ClientFraming::Bodiless, Reframe::AsIs),
        _ if reframes && http11 => (ClientFraming::Chunked, Reframe::Chunked),
        BodyLength::Length(n) if !reframes => (ClientFraming::Length(n), Reframe::AsIs),
        BodyLength::Chunked if http11 => (ClientFraming::Chunked, Reframe::Chunked),
        // An HTTP/1.0 client cannot read chunked: decode and delimit by closing.
        _ => (ClientFraming::Close, Reframe::AsIs),
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
            extra: st.lines,
            edits: st.resp_edits,
            upstream_edits: st.upstream_edits,
        },
    );
    let mut body = BodyReader::new(resp.body, &ctx.worker.parse_limits);
    urbuf.consume(resp.len);
    if upgrade {
        ctx.sent.set(ctx.sent.get() + out.len() as u64);
        send(cw, out, ctx.deadline, ctx.write_timeout)
            .await
            .map_err(|_| ResponseFailure::new(ProxyError::UpstreamUnreachable("client gone")))?;
        return Ok(ResponseDone {
            status: resp.status,
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
    };
    let mut seen = 0;
    let copied = match cx.as_ref().filter(|_| chain.runs_on_body()) {
        Some(cx) => {
            let mut hook = FilterBody {
                chain,
                cx,
                slots: st.slots,
            };
            if body.is_done() {
                hook.end(out, reframe);
            }
            copy_body(
                ur, urbuf, cw, out, &mut body, reframe, &mut seen, &transfer, &mut hook,
            )
            .await
        }
        None => {
            copy_body(
                ur, urbuf, cw, out, &mut body, reframe, &mut seen, &transfer, &mut Plain,
            )
            .await
        }
    };
    if let Err(e) = copied {
        debug!(error = ?e, "response body failed");
        return Err(ResponseFailure::new(ProxyError::UpstreamUnreachable(
            "closed inside the response body",
        )));
    }
    Ok(ResponseDone {
        status: resp.status,
        client_keep_alive: keep,
        upstream_reusable: resp.keep_alive,
        upgrade: false,
    })
}

/// A filter's reply instead of the upstream's response (a refreshed cache entry after a 304,
/// a stale one for a 5xx). The upstream's body is left unread, so its connection is kept only
/// when it had none.
async fn replace<W: AsyncWriteRent>(
    urbuf: &mut ReadBuf,
    cw: &mut W,
    out: &mut Vec<u8>,
    resp: &ResponseHead,
    ctx: &ResponseCtx<'_>,
    st: &ResponseState<'_>,
    answer: &Reply,
) -> Result<ResponseDone, ResponseFailure> {
    urbuf.consume(resp.len);
    let bodiless = matches!(resp.body, BodyLength::None | BodyLength::Length(0));
    let keep = ctx.client_keep_alive && !ctx.worker.draining.get();
    out.clear();
    let rest = reply::render(
        out,
        answer,
        &ReplyHead {
            extra: st.lines,
            edits: st.resp_edits,
            head_only: ctx.to_head,
            keep_alive: keep,
            client_version: ctx.client_version,
            request_id: ctx.request_id,
        },
    );
    ctx.sent
        .set(ctx.sent.get() + (out.len() + rest.len()) as u64);
    let gone = |_| ResponseFailure::new(ProxyError::UpstreamUnreachable("client gone"));
    send(cw, out, ctx.deadline, ctx.write_timeout)
        .await
        .map_err(gone)?;
    reply::write_rest(cw, rest, ctx.deadline, ctx.write_timeout)
        .await
        .map_err(|()| ResponseFailure::new(ProxyError::UpstreamUnreachable("client gone")))?;
    Ok(ResponseDone {
        status: answer.status,
        client_keep_alive: keep,
        upstream_reusable: resp.keep_alive && bodiless,
        upgrade: false,
    })
}
