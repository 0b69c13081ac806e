//! Connection buffers over monoio's ownership-passing I/O: a read buffer that parsers borrow
//! from and bodies stream through, and writes bounded by a timeout. Buffers are owned by a
//! connection and reused for every request on it, so a keep-alive request allocates nothing here.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelableAsyncReadRent, Canceller,
};

use crate::deadline::{Deadline, TimedOut};

/// Initial capacity of every read buffer.
pub const INITIAL_CAPACITY: usize = 8 * 1024;
/// Capacity a buffer grows to while a large body streams through it.
pub const STREAMING_CAPACITY: usize = 64 * 1024;
/// Below this much free space a read first compacts or grows the buffer.
const MIN_READ: usize = 2 * 1024;

/// Bytes read from a peer and not yet consumed: `buf[pos..]`.
#[derive(Debug, Default)]
pub struct ReadBuf {
    buf: Vec<u8>,
    pos: usize,
}

impl ReadBuf {
    pub fn new() -> Self {
        ReadBuf {
            buf: Vec::with_capacity(INITIAL_CAPACITY),
            pos: 0,
        }
    }

    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// The unconsumed bytes, to rewrite in place (a request path normalized where it was read).
    #[inline]
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.pos..]
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.buf.len() - self.pos
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.pos += n;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// Lets the buffer grow to `STREAMING_CAPACITY` so a large body moves in large reads.
    pub fn reserve_for_streaming(&mut self) {
        if self.buf.capacity() < STREAMING_CAPACITY {
            self.compact();
            self.buf.reserve_exact(STREAMING_CAPACITY - self.buf.len());
        }
    }

    fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.copy_within(self.pos.., 0);
            self.buf.truncate(self.buf.len() - self.pos);
            self.pos = 0;
        }
    }

    /// Makes room for a read without growing past `max` bytes of capacity. False when the
    /// buffer is full of unconsumed data at `max`.
    fn make_room(&mut self, max: usize) -> bool {
        if self.buf.capacity() - self.buf.len() >= MIN_READ {
            return true;
        }
        self.compact();
        let spare = self.buf.capacity() - self.buf.len();
        if spare >= MIN_READ || (spare > 0 && self.buf.capacity() >= max) {
            return true;
        }
        if self.buf.capacity() >= max {
            return false;
        }
        let want = (self.buf.capacity() * 2).clamp(INITIAL_CAPACITY, max.max(INITIAL_CAPACITY));
        self.buf.reserve_exact(want - self.buf.len());
        true
    }

    /// One read from `r`, appended; Ok(0) is end of stream. `max` caps the buffer's growth.
    pub async fn fill<R: AsyncReadRent>(&mut self, r: &mut R, max: usize) -> io::Result<usize> {
        if !self.make_room(max) {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "read buffer full",
            ));
        }
        let buf = std::mem::take(&mut self.buf);
        let len = buf.len();
        let (res, slice) = r.read(buf.slice_mut(len..)).await;
        self.buf = slice.into_inner();
        res
    }

    /// Like `fill`, but gives up when `deadline` (armed by the caller) passes, without losing
    /// bytes that arrive as it does: the read is cancelled and then awaited, so whatever it
    /// read is kept. Ok(None): the deadline passed with nothing read.
    pub async fn fill_until<R: CancelableAsyncReadRent>(
        &mut self,
        r: &mut R,
        max: usize,
        deadline: &Deadline<'_>,
    ) -> io::Result<Option<usize>> {
        if !self.make_room(max) {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "read buffer full",
            ));
        }
        let buf = std::mem::take(&mut self.buf);
        let len = buf.len();
        let canceller = Canceller::new();
        let mut read = pin!(r.cancelable_read(buf.slice_mut(len..), canceller.handle()));
        let mut canceller = Some(canceller);
        let (res, slice) = std::future::poll_fn(|cx| {
            if let Poll::Ready(done) = read.as_mut().poll(cx) {
                return Poll::Ready(done);
            }
            if deadline.fired() {
                if let Some(c) = canceller.take() {
                    c.cancel();
                }
                return read.as_mut().poll(cx);
            }
            deadline.register(cx.waker());
            Poll::Pending
        })
        .await;
        self.buf = slice.into_inner();
        match res {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl ReadBuf {
    /// Writes every unconsumed byte to `w` straight from the buffer, then empties it.
    pub async fn write_all_to<W: AsyncWriteRent>(&mut self, w: &mut W) -> io::Result<()> {
        let buf = std::mem::take(&mut self.buf);
        let (pos, end) = (self.pos, buf.len());
        let (res, slice) = w.write_all(buf.slice(pos..end)).await;
        self.buf = slice.into_inner();
        self.buf.clear();
        self.pos = 0;
        res.map(drop)
    }
}

/// Writes all of `out`. The buffer comes back unchanged.
pub async fn write_out<W: AsyncWriteRent>(w: &mut W, out: &mut Vec<u8>) -> io::Result<()> {
    let (res, buf) = w.write_all(std::mem::take(out)).await;
    *out = buf;
    res.map(drop)
}

/// Writes all of `out`, or fails once `limit` has passed (the buffer is then lost: the
/// connection is unusable anyway).
pub async fn send<W: AsyncWriteRent>(
    w: &mut W,
    out: &mut Vec<u8>,
    deadline: &Deadline<'_>,
    limit: Duration,
) -> io::Result<()> {
    let write = pin!(w.write_all(std::mem::take(out)));
    match deadline.within(limit, write).await {
        Ok((res, buf)) => {
            *out = buf;
            res.map(drop)
        }
        Err(TimedOut) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consume_and_compact_keep_unread_bytes() {
        let mut b = ReadBuf::new();
        b.buf.extend_from_slice(b"hello world");
        b.consume(6);
        assert_eq!(b.data(), b"world");
        b.compact();
        assert_eq!(b.data(), b"world");
        assert_eq!(b.pos, 0);
        b.consume(5);
        assert!(b.is_empty());
        assert_eq!(b.buf.len(), 0);
    }

    #[test]
    fn make_room_grows_up_to_max_only() {
        let mut b = ReadBuf::new();
        b.buf.resize(INITIAL_CAPACITY, b'x');
        assert!(b.make_room(INITIAL_CAPACITY * 4));
        assert!(b.buf.capacity() >= INITIAL_CAPACITY * 2);
        let cap = b.buf.capacity();
        b.buf.resize(cap, b'x');
        assert!(!b.make_room(cap));
    }
}
