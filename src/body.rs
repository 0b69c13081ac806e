//! Moving one message body from one peer to the other through bounded buffers, in either
//! direction: Content-Length bodies as they are, chunked bodies decoded and re-encoded (so the
//! next hop sees framing the gateway wrote), close-delimited response bodies until EOF. Memory
//! per transfer is bounded by the read buffer's capacity, whatever the body's size.

use std::cell::Cell;
use std::io;
use std::pin::pin;
use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRent};

use crate::buffer::{send, ReadBuf, STREAMING_CAPACITY};
use crate::deadline::Deadline;
use crate::http::chunked::{write_chunk_header, ChunkError, ChunkedDecoder, Decoded, LAST_CHUNK};
use crate::http::BodyLength;
use crate::http::ParseLimits;

/// The part of a body still to come, in the framing it arrives in.
#[derive(Debug)]
pub enum BodyReader {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

/// How the data leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reframe {
    /// The data bytes only (a Content-Length body, a decoded chunked body, or until-close).
    AsIs,
    /// Chunked, ending with the last chunk.
    Chunked,
}

/// What a body's data meets on its way from the sender's framing to the receiver's: written
/// as it is (`Plain`), or handed to the route's body filters (`proxy::response`), which may
/// observe or transform it.
pub trait BodyHook {
    /// Data arrived; appends what the receiver gets to `out`, framed by `reframe`.
    fn data(&mut self, data: &[u8], out: &mut Vec<u8>, reframe: Reframe);
    /// The sender paused with everything so far handed over: anything held back goes now.
    fn flush(&mut self, _out: &mut Vec<u8>, _reframe: Reframe) {}
    /// The body ended: the rest, and the last chunk when chunked.
    fn end(&mut self, out: &mut Vec<u8>, reframe: Reframe);
}

/// The data as it is.
pub struct Plain;

impl BodyHook for Plain {
    #[inline(always)]
    fn data(&mut self, data: &[u8], out: &mut Vec<u8>, reframe: Reframe) {
        frame(out, data, reframe);
    }

    #[inline]
    fn end(&mut self, out: &mut Vec<u8>, reframe: Reframe) {
        if reframe == Reframe::Chunked {
            out.extend_from_slice(LAST_CHUNK);
        }
    }
}

/// Appends `data` to `out` in the receiver's framing (an empty chunk would end the body, so
/// empty data writes nothing).
#[inline(always)]
pub fn frame(out: &mut Vec<u8>, data: &[u8], reframe: Reframe) {
    if reframe == Reframe::Chunked {
        if data.is_empty() {
            return;
        }
        write_chunk_header(out, data.len());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(data);
    }
}

#[derive(Debug)]
pub enum BodyError {
    /// The sender broke the chunked coding.
    Framing(ChunkError),
    /// Over the route's `max_body_bytes`.
    TooLarge,
    ReadTimeout,
    /// The sender closed before the body's end.
    Truncated,
    Read(io::Error),
    /// The receiver failed or stopped reading (including the write timeout).
    Write(io::Error),
}

impl BodyReader {
    pub fn new(length: BodyLength, limits: &ParseLimits) -> BodyReader {
        match length {
            BodyLength::None | BodyLength::Length(0) => BodyReader::Done,
            BodyLength::Length(n) => BodyReader::Length(n),
            BodyLength::Chunked => BodyReader::Chunked(ChunkedDecoder::new(
                limits.max_chunk_extension_bytes,
                limits.max_trailer_bytes,
            )),
            BodyLength::UntilClose => BodyReader::UntilClose,
        }
    }

    #[inline]
    pub fn is_done(&self) -> bool {
        matches!(self, BodyReader::Done)
    }

    /// Moves the body bytes already in `rbuf` to `out` through `hook`, stopping at the body's
    /// end (where the hook's `end` runs) so that a pipelined request behind it stays in
    /// `rbuf`. `seen` counts data bytes against `max`.
    pub fn take_buffered(
        &mut self,
        rbuf: &mut ReadBuf,
        out: &mut Vec<u8>,
        reframe: Reframe,
        seen: &mut u64,
        max: Option<u64>,
        hook: &mut impl BodyHook,
    ) -> Result<(), BodyError> {
        let mut count = |n: usize| {
            *seen += n as u64;
            match max {
                Some(max) if *seen > max => Err(BodyError::TooLarge),
                _ => Ok(()),
            }
        };
        match self {
            BodyReader::Done => {}
            BodyReader::Length(remaining) => {
                let n = rbuf
                    .len()
                    .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                count(n)?;
                hook.data(&rbuf.data()[..n], out, reframe);
                rbuf.consume(n);
                *remaining -= n as u64;
                if *remaining == 0 {
                    *self = BodyReader::Done;
                    hook.end(out, reframe);
                }
            }
            BodyReader::UntilClose => {
                let n = rbuf.len();
                hook.data(rbuf.data(), out, reframe);
                rbuf.consume(n);
            }
            BodyReader::Chunked(decoder) => loop {
                if rbuf.is_empty() {
                    break;
                }
                let (used, found) = decoder.decode(rbuf.data()).map_err(BodyError::Framing)?;
                match found {
                    Decoded::Data(range) => {
                        count(range.len())?;
                        hook.data(&rbuf.data()[range], out, reframe);
                        rbuf.consume(used);
                    }
                    Decoded::Done => {
                        rbuf.consume(used);
                        *self = BodyReader::Done;
                        hook.end(out, reframe);
                        break;
                    }
                    Decoded::NeedMore => {
                        rbuf.consume(used);
                        break;
                    }
                }
            },
        }
        Ok(())
    }
}

/// Up to this many bytes of a sized body are gathered before the first write.
const COALESCE_BYTES: u64 = 16 * 1024;

pub struct Transfer<'a> {
    /// Longest wait for the next bytes from the sender.
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub max: Option<u64>,
    pub deadline: &'a Deadline<'a>,
    /// Bytes written to the receiver, counted as they go.
    pub sent: &'a Cell<u64>,
}

/// Streams the rest of a body from `src` to `dst` through `hook`. `out` may hold bytes to send
/// first (a head); it is flushed (the hook's first) before every wait for input, so the
/// receiver never waits on the gateway, and at the end.
#[allow(clippy::too_many_arguments)]
pub async fn copy_body<R: AsyncReadRent, W: AsyncWriteRent>(
    src: &mut R,
    rbuf: &mut ReadBuf,
    dst: &mut W,
    out: &mut Vec<u8>,
    body: &mut BodyReader,
    reframe: Reframe,
    seen: &mut u64,
    t: &Transfer<'_>,
    hook: &mut impl BodyHook,
) -> Result<(), BodyError> {
    let mut streaming = false;
    loop {
        body.take_buffered(rbuf, out, reframe, seen, t.max, hook)?;
        if body.is_done() {
            break;
        }
        // A small rest of a sized body is as good as here: waiting for it sends head and body
        // in one write instead of two (an origin that writes its head and body separately
        // would otherwise cost a send and a receive more per request).
        let rest_is_small =
            matches!(body, BodyReader::Length(n) if out.len() as u64 + *n <= COALESCE_BYTES);
        if !rest_is_small {
            hook.flush(out, reframe);
            if !out.is_empty() {
                t.sent.set(t.sent.get() + out.len() as u64);
                send(dst, out, t.deadline, t.write_timeout)
                    .await
                    .map_err(BodyError::Write)?;
                out.clear();
            }
        }
        if !streaming {
            rbuf.reserve_for_streaming();
            streaming = true;
        }
        let fill = pin!(rbuf.fill(src, STREAMING_CAPACITY));
        match t.deadline.within(t.read_timeout, fill).await {
            Err(_) => return Err(BodyError::ReadTimeout),
            Ok(Ok(0)) if matches!(body, BodyReader::UntilClose) => {
                *body = BodyReader::Done;
                hook.end(out, reframe);
                break;
            }
            Ok(Ok(0)) => return Err(BodyError::Truncated),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(BodyError::Read(e)),
        }
    }
    // Not shared with the send above through a helper: one more future on every proxied
    // response costs about 50 instructions (measured).
    if !out.is_empty() {
        t.sent.set(t.sent.get() + out.len() as u64);
        send(dst, out, t.deadline, t.write_timeout)
            .await
            .map_err(BodyError::Write)?;
        out.clear();
    }
    Ok(())
}
