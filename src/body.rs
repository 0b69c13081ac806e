//! Moving one message body from one peer to the other through bounded buffers, in either
//! direction: Content-Length bodies as they are, chunked bodies decoded and re-encoded (so the
//! next hop sees framing the gateway wrote), close-delimited response bodies until EOF. Memory
//! per transfer is bounded by the read buffer's capacity, whatever the body's size.

use std::cell::{Cell, RefCell};
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

/// A copy of a body's data taken as it passes (for the cache), given up past `max` bytes.
#[derive(Debug, Default)]
pub struct Tee {
    pub data: Vec<u8>,
    pub max: usize,
    pub overflowed: bool,
}

impl Tee {
    pub fn new(max: usize) -> Tee {
        Tee {
            data: Vec::new(),
            max,
            overflowed: false,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.overflowed || self.data.len() + bytes.len() > self.max {
            self.overflowed = true;
            self.data = Vec::new();
        } else {
            self.data.extend_from_slice(bytes);
        }
    }
}

/// How the data leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reframe {
    /// The data bytes only (a Content-Length body, a decoded chunked body, or until-close).
    AsIs,
    /// Chunked, ending with the last chunk.
    Chunked,
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

    /// Moves the body bytes already in `rbuf` to `out`, stopping at the body's end so that a
    /// pipelined request behind it stays in `rbuf`. `seen` counts data bytes against `max`.
    pub fn take_buffered(
        &mut self,
        rbuf: &mut ReadBuf,
        out: &mut Vec<u8>,
        reframe: Reframe,
        seen: &mut u64,
        max: Option<u64>,
        mut tee: Option<&mut Tee>,
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
                if let Some(t) = tee.as_deref_mut() {
                    t.push(&rbuf.data()[..n]);
                }
                out.extend_from_slice(&rbuf.data()[..n]);
                rbuf.consume(n);
                *remaining -= n as u64;
                if *remaining == 0 {
                    *self = BodyReader::Done;
                }
            }
            BodyReader::UntilClose => {
                let n = rbuf.len();
                if let Some(t) = tee.as_deref_mut() {
                    t.push(rbuf.data());
                }
                out.extend_from_slice(rbuf.data());
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
                        if let Some(t) = tee.as_deref_mut() {
                            t.push(&rbuf.data()[range.clone()]);
                        }
                        if reframe == Reframe::Chunked {
                            write_chunk_header(out, range.len());
                        }
                        out.extend_from_slice(&rbuf.data()[range]);
                        if reframe == Reframe::Chunked {
                            out.extend_from_slice(b"\r\n");
                        }
                        rbuf.consume(used);
                    }
                    Decoded::Done => {
                        rbuf.consume(used);
                        if reframe == Reframe::Chunked {
                            out.extend_from_slice(LAST_CHUNK);
                        }
                        *self = BodyReader::Done;
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
    /// Where to copy the data as it passes, if anywhere.
    pub tee: Option<&'a RefCell<Tee>>,
    /// Leave the last bytes in `out` for the caller to send, so that it can act once the input
    /// has ended but before the receiver has all of it.
    pub keep_last: bool,
}

/// Streams the rest of a body from `src` to `dst`. `out` may hold bytes to send first (a head);
/// it is flushed before every wait for input, so the receiver never waits on the gateway, and at
/// the end unless `keep_last`.
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
) -> Result<(), BodyError> {
    let mut streaming = false;
    loop {
        let mut tee = t.tee.map(RefCell::borrow_mut);
        body.take_buffered(rbuf, out, reframe, seen, t.max, tee.as_deref_mut())?;
        drop(tee);
        if body.is_done() {
            break;
        }
        // A small rest of a sized body is as good as here: waiting for it sends head and body
        // in one write instead of two (an origin that writes its head and body separately
        // would otherwise cost a send and a receive more per request).
        let rest_is_small =
            matches!(body, BodyReader::Length(n) if out.len() as u64 + *n <= COALESCE_BYTES);
        if !out.is_empty() && !rest_is_small {
            t.sent.set(t.sent.get() + out.len() as u64);
            send(dst, out, t.deadline, t.write_timeout)
                .await
                .map_err(BodyError::Write)?;
            out.clear();
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
                break;
            }
            Ok(Ok(0)) => return Err(BodyError::Truncated),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(BodyError::Read(e)),
        }
    }
    if !out.is_empty() && !t.keep_last {
        t.sent.set(t.sent.get() + out.len() as u64);
        send(dst, out, t.deadline, t.write_timeout)
            .await
            .map_err(BodyError::Write)?;
        out.clear();
    }
    Ok(())
}
