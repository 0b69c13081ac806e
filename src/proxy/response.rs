//! The response side of a proxied exchange: read the upstream's final head (relaying interim
//! responses), let the route's cache see it, write the client's head with the route's edits,
//! and stream the body back.

use std::cell::Cell;
use std::io;
use std::time::{Duration, Instant};

use monoio::io::{AsyncReadRent, AsyncWriteRent};
use tracing::debug;

use crate::body::{copy_body, BodyReader, Reframe, Transfer};
use crate::buffer::{send, write_out, ReadBuf};
use crate::deadline::{Deadline, TimedOut};
use crate::error::ProxyError;
use crate::filter::cache::CacheExchange;
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
    /// Header lines the gateway adds to the response.
    pub(super) extra: &'a [u8],
    /// The route's edits to the response head.
    pub(super) edits: &'a HeaderEdits,
    /// What caching asks of this exchange, if the route caches.
    pub(super) cache: Option<&'a CacheExchange>,
    /// Times the response side's operations.
    pub(super) deadline: &'a Deadline<'a>,
    pub(super) worker: &'a Worker,
}

pub(super) struct ResponseDone {
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

/// Writes the response head for the client and streams the body after it.
pub(super) async fn send_response<R: AsyncReadRent, W: AsyncWriteRent>(
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
    // The route's cache sees the head first: a 304 that revalidated a stale entry, or a 5xx a
    // stale entry answers instead, is taken over (the pipeline answers from the entry), so
    // nothing is written here; a body left unread makes the connection unusable.
    if ctx
        .cache
        .is_some_and(|cx| cx.on_upstream_response(ctx.worker.cache.as_ref(), urbuf.data(), resp))
    {
        urbuf.consume(resp.len);
        let bodiless = matches!(resp.body, BodyLength::None | BodyLength::Length(0));
        return Ok(ResponseDone {
            client_keep_alive: keep,
            upstream_reusable: resp.keep_alive && bodiless,
            upgrade: false,
        });
    }
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
        keep_last: ctx.cache.is_some(),
    };
    let mut seen = 0;
    if let Err(e) = copy_body(ur, urbuf, cw, out, &mut body, reframe, &mut seen, &transfer).await {
        debug!(error = ?e, "response body failed");
        return Err(ResponseFailure::new(ProxyError::UpstreamUnreachable(
            "closed inside the response body",
        )));
    }
    if let Some(cx) = ctx.cache {
        // Stored (and sent to every worker) before the client can have the whole response.
        let arrived = ctx
            .head_at
            .get()
            .map_or_else(Instant::now, Stamp::to_instant);
        cx.on_body_complete(ctx.worker.cache.as_ref(), arrived);
        if !out.is_empty() {
            ctx.sent.set(ctx.sent.get() + out.len() as u64);
            send(cw, out, ctx.deadline, ctx.write_timeout)
                .await
                .map_err(|_| {
                    ResponseFailure::new(ProxyError::UpstreamUnreachable("client gone"))
                })?;
            out.clear();
        }
    }
    Ok(ResponseDone {
        client_keep_alive: keep,
        upstream_reusable: resp.keep_alive,
        upgrade: false,
    })
}
