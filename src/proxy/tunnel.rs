//! After a `101 Switching Protocols`: the client and upstream connections become a tunnel, and
//! bytes flow both ways untouched until both sides close or the pair goes idle.

use std::cell::Cell;
use std::time::{Duration, Instant};

use monoio::io::{AsyncWriteRent, CancelableAsyncReadRent};

use super::session::Session;
use super::Io;
use crate::buffer::{ReadBuf, STREAMING_CAPACITY};
use crate::deadline::Deadline;
use crate::upstream::UpstreamConn;
use crate::worker::Worker;

/// After a 101: bytes flow both ways untouched until both sides close or the pair goes idle.
/// The bytes relayed each way are added to the request's log record.
pub(super) async fn run<S: Io>(
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
    let (sent_up, sent_down) = monoio::join!(up, down);
    let log = &mut c.ex.log;
    log.bytes_in += sent_up;
    log.bytes_out.set(log.bytes_out.get() + sent_down);
}

async fn relay<R, W>(
    r: &mut R,
    rbuf: &mut ReadBuf,
    w: &mut W,
    last: &Cell<Instant>,
    idle: Duration,
    deadline: &Deadline<'_>,
) -> u64
where
    R: CancelableAsyncReadRent,
    W: AsyncWriteRent,
{
    let mut relayed = 0u64;
    loop {
        if !rbuf.is_empty() {
            let pending = rbuf.len() as u64;
            if !matches!(
                deadline.within(idle, rbuf.write_all_to(w)).await,
                Ok(Ok(()))
            ) {
                break;
            }
            relayed += pending;
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
    relayed
}
