//! A request whose body is still arriving: its body streams up while the response streams down
//! (`stream_both_ways`), so an upstream may answer (or refuse) before the body is complete.

use std::cell::Cell;
use std::future::Future;
use std::pin::pin;
use std::task::Poll;

use tracing::debug;

use super::forward::response_failure;
use super::response::{
    read_final_head, send_response, HeadWait, ResponseCtx, ResponseDone, ResponseFailure,
    ResponseState,
};
use super::{body_failure, Failure, Io};
use crate::body::{copy_body, BodyError, BodyReader, Plain, Reframe, Transfer};
use crate::buffer::{send, ReadBuf};
use crate::error::ProxyError;
use crate::http::ResponseHead;
use crate::upstream::UpstreamConn;
use crate::worker::Worker;

/// The client connection's parts a streaming exchange borrows, each on its own, so that the
/// request pump and the response side can hold theirs at once.
pub(super) struct ClientSide<'a, S: Io> {
    pub(super) r: &'a mut S::Read,
    pub(super) w: &'a mut S::Write,
    pub(super) rbuf: &'a mut ReadBuf,
    pub(super) out: &'a mut Vec<u8>,
    pub(super) up_out: &'a mut Vec<u8>,
    pub(super) resp: &'a mut ResponseHead,
}

/// A request body still arriving.
pub(super) struct Streaming<'a> {
    pub(super) reader: &'a mut BodyReader,
    pub(super) reframe: Reframe,
    /// Body bytes seen so far, for the route's `max_body_bytes` and the access log.
    pub(super) seen: &'a mut u64,
    pub(super) max: Option<u64>,
}

/// Sends the head (in `up_out`), then pumps the rest of the request body up while the response
/// comes down. Returns how the response ended and whether the request body was complete.
pub(super) async fn stream_both_ways<S: Io>(
    c: ClientSide<'_, S>,
    conn: &mut UpstreamConn,
    body: Streaming<'_>,
    ctx: &ResponseCtx<'_>,
    st: &mut ResponseState<'_>,
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
        let r = copy_body(
            cr, crbuf, uw, up_out, reader, reframe, seen, &transfer, &mut Plain,
        )
        .await;
        if r.is_ok() {
            // The request is complete: the wait for the response head starts now.
            ctx.deadline.arm(ctx.request_timeout);
        }
        r
    };
    let response = async {
        read_final_head(ur, urbuf, cw, out, resp, ctx, HeadWait::AfterBody).await?;
        send_response(ur, urbuf, cw, out, resp, ctx, st).await
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
