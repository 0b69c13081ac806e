//! ringway patch: stream sockets on io_uring receive through one multishot receive.

use std::{
    cell::UnsafeCell,
    future::{poll_fn, Future},
    io,
    ptr::NonNull,
    rc::Rc,
    task::{Context, Poll},
};

use super::{super::shared_fd::SharedFd, recv::RecvRead, Op, OpCanceller};
use crate::{
    buf::{IoBufMut, IoVecBufMut},
    driver::{
        uring::{end_error, End, Found, Multi, UringInner},
        Inner, CURRENT,
    },
    io::{operation_canceled, CancelHandle},
    BufResult,
};

/// A stream socket's receives on io_uring, read ahead by one multishot receive.
///
/// A single-shot receive submitted when the socket is empty (the usual case on a keep-alive
/// connection: the next request is not there yet) costs the kernel a failed receive, a poll
/// armed on the socket and, once bytes arrive, the poll torn down again, for every read. A
/// multishot receive arms its poll once: each time bytes arrive the kernel receives them into
/// a buffer from the driver's ring and posts a completion, and the stream's reads copy them
/// out and give the buffer back. It is armed at the stream's first read and stays armed; it
/// is stopped when the reader falls behind (`MAX_FILLED` buffers unread), at the reader's
/// cancellation and at the stream's drop, and armed again at the next read. When the ring is
/// out of buffers, that read receives once into the caller's buffer as before.
pub(crate) struct ReadAhead {
    /// The driver, on io_uring with a buffer ring; `None` otherwise (reads go one by one).
    driver: Option<Rc<UnsafeCell<UringInner>>>,
    /// The armed receive.
    armed: Option<Armed>,
}

/// An armed multishot receive.
struct Armed {
    /// Its slot in the driver.
    index: usize,
    /// Its state, boxed in the slot (see `UringInner::arm_multi`).
    multi: NonNull<Multi>,
    /// Keeps the fd open while armed.
    _fd: SharedFd,
}

impl ReadAhead {
    pub(crate) fn new(fd: &SharedFd) -> ReadAhead {
        let driver = match fd.is_uring() && CURRENT.is_set() {
            true => CURRENT.with(|inner| match inner {
                Inner::Uring(driver) => Some(driver.clone()),
                #[allow(unreachable_patterns)]
                _ => None,
            }),
            false => None,
        };
        ReadAhead {
            driver,
            armed: None,
        }
    }

    /// Whether reads go through a multishot receive.
    #[inline]
    pub(crate) fn enabled(&self) -> bool {
        self.driver.is_some()
    }

    /// Reads into the `cap` bytes at `dst` (valid for writes until it is ready), arming the
    /// receive first if needed. `Ready(None)`: read once into the caller's buffer instead (no
    /// buffer ring, or the ring ran out).
    #[inline]
    pub(crate) fn poll_read(
        &mut self,
        fd: &SharedFd,
        cx: &mut Context<'_>,
        dst: *mut u8,
        cap: usize,
    ) -> Poll<Option<io::Result<usize>>> {
        if cap == 0 {
            // As a receive into no room: nothing, at once.
            return Poll::Ready(Some(Ok(0)));
        }
        loop {
            if self.armed.is_none() && !self.arm(fd) {
                return Poll::Ready(None);
            }
            match ready!(self.poll_armed(cx, dst, cap, None)) {
                Step::Done(res) => return Poll::Ready(res),
                Step::Again => {}
            }
        }
    }

    /// `poll_read` that `cancel` can cancel: the receive is cancelled, and the read returns
    /// `ECANCELED` unless bytes came first.
    async fn read_into_cancelable(
        &mut self,
        fd: &SharedFd,
        dst: *mut u8,
        cap: usize,
        cancel: &CancelHandle,
    ) -> Option<io::Result<usize>> {
        if cap == 0 {
            return Some(Ok(0));
        }
        loop {
            if self.armed.is_none() && !self.arm(fd) {
                return None;
            }
            let index = self.armed.as_ref().map_or(usize::MAX, |a| a.index);
            let _guard = cancel.clone().associate_op(OpCanceller {
                index,
                #[cfg(feature = "legacy")]
                direction: None,
            });
            match poll_fn(|cx| self.poll_armed(cx, dst, cap, Some(cancel))).await {
                Step::Done(res) => return res,
                Step::Again => {}
            }
        }
    }

    /// Arms a receive; false if it cannot (no buffer ring, or no room to submit).
    #[cold]
    fn arm(&mut self, fd: &SharedFd) -> bool {
        let Some(driver) = self.driver.as_ref() else {
            return false;
        };
        let Some((index, multi)) = UringInner::arm_multi(driver, fd) else {
            return false;
        };
        self.armed = Some(Armed {
            index,
            multi,
            _fd: fd.clone(),
        });
        true
    }

    /// One look at the armed receive: bytes, or how it ended.
    #[inline]
    fn poll_armed(
        &mut self,
        cx: &mut Context<'_>,
        dst: *mut u8,
        cap: usize,
        cancel: Option<&CancelHandle>,
    ) -> Poll<Step> {
        let (Some(driver), Some(armed)) = (&self.driver, &self.armed) else {
            return Poll::Ready(Step::Done(None));
        };
        // SAFETY: `armed` holds what `arm_multi` gave, and its slot is only freed by the read
        // that finds it ended (after which `armed` is cleared below) or after our drop.
        let found = unsafe { UringInner::read_multi(driver, armed.index, armed.multi, cx, dst, cap) };
        let end = match ready!(found) {
            Found::Bytes(n) => return Poll::Ready(Step::Done(Some(Ok(n)))),
            Found::Ended(end) => end,
        };
        self.armed = None;
        Poll::Ready(match end {
            End::Eof => Step::Done(Some(Ok(0))),
            End::Error(errno) => Step::Done(Some(Err(end_error(errno)))),
            End::NoBuffers => Step::Done(None),
            End::Unsupported => {
                self.driver = None;
                Step::Done(None)
            }
            End::Stopped if cancel.is_some_and(|c| c.canceled()) => {
                Step::Done(Some(Err(operation_canceled())))
            }
            End::Stopped => Step::Again,
        })
    }
}

/// What one look at an armed receive gives.
enum Step {
    /// The read's result, or `None` to read once into the caller's buffer.
    Done(Option<io::Result<usize>>),
    /// The receive stopped with nothing unread: arm another.
    Again,
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        if let (Some(armed), Some(driver)) = (self.armed.take(), &self.driver) {
            UringInner::drop_multi(driver, armed.index);
        }
    }
}

/// ringway: the future of a read on io_uring: through the multishot receive where there is
/// one (see `ReadAhead`), else (or when the ring is out of buffers) once into the buffer.
pub(crate) enum StreamRead<'a, T: IoBufMut + 'static> {
    Ahead {
        ahead: &'a mut ReadAhead,
        fd: &'a SharedFd,
        buf: Option<T>,
    },
    Once(RecvRead<T>),
}

impl<'a, T: IoBufMut> StreamRead<'a, T> {
    #[inline(always)]
    pub(crate) fn ahead(ahead: &'a mut ReadAhead, fd: &'a SharedFd, buf: T) -> Self {
        StreamRead::Ahead {
            ahead,
            fd,
            buf: Some(buf),
        }
    }

    #[inline(always)]
    pub(crate) fn once(fd: &SharedFd, buf: T) -> Self {
        StreamRead::Once(Op::recv_stream(fd.clone(), buf).unwrap().read())
    }
}

impl<T: IoBufMut> Future for StreamRead<'_, T> {
    type Output = BufResult<usize, T>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.get_mut();
        let (ahead, fd, slot) = match this {
            StreamRead::Once(once) => return std::pin::Pin::new(once).poll(cx),
            StreamRead::Ahead { ahead, fd, buf } => (ahead, *fd, buf),
        };
        let Some(buf) = slot.as_mut() else {
            panic!("StreamRead polled after it completed");
        };
        let (dst, cap) = (buf.write_ptr(), buf.bytes_total());
        let res = std::task::ready!(ahead.poll_read(fd, cx, dst, cap));
        let Some(mut buf) = slot.take() else {
            unreachable!("the buffer was there above");
        };
        match res {
            Some(Ok(n)) => {
                // SAFETY: `poll_read` copied `n` bytes to the buffer's spare capacity.
                unsafe { buf.set_init(n) };
                std::task::Poll::Ready((Ok(n), buf))
            }
            Some(Err(e)) => std::task::Poll::Ready((Err(e), buf)),
            None => {
                *this = StreamRead::Once(Op::recv_stream(fd.clone(), buf).unwrap().read());
                match this {
                    StreamRead::Once(once) => std::pin::Pin::new(once).poll(cx),
                    StreamRead::Ahead { .. } => unreachable!("set just above"),
                }
            }
        }
    }
}

impl ReadAhead {
    /// A read that `c` can cancel, through the multishot receive, or once into `buf` without.
    pub(crate) async fn read_cancelable<T: IoBufMut>(
        &mut self,
        fd: &SharedFd,
        mut buf: T,
        c: &CancelHandle,
    ) -> BufResult<usize, T> {
        if self.enabled() {
            let (dst, cap) = (buf.write_ptr(), buf.bytes_total());
            match self.read_into_cancelable(fd, dst, cap, c).await {
                Some(Ok(n)) => {
                    // SAFETY: `read_cancelable` copied `n` bytes to the buffer's spare capacity.
                    unsafe { buf.set_init(n) };
                    return (Ok(n), buf);
                }
                Some(Err(e)) => return (Err(e), buf),
                None => {}
            }
        }
        let op = Op::recv_stream(fd.clone(), buf).unwrap();
        let _guard = c.clone().associate_op(op.op_canceller());
        op.read().await
    }

    /// A vectored read: through the multishot receive it fills the first non-empty buffer (a
    /// read may return fewer bytes than asked for); without one, as before.
    pub(crate) async fn readv<T: IoVecBufMut>(
        &mut self,
        fd: &SharedFd,
        mut buf: T,
        c: Option<&CancelHandle>,
    ) -> BufResult<usize, T> {
        if self.enabled() {
            let (iov, len) = (buf.write_iovec_ptr(), buf.write_iovec_len());
            // SAFETY: `IoVecBufMut` guarantees `len` valid iovecs at `iov`.
            let iovs = unsafe { std::slice::from_raw_parts(iov, len) };
            if let Some(first) = iovs.iter().find(|v| v.iov_len > 0) {
                let (dst, cap) = (first.iov_base.cast::<u8>(), first.iov_len);
                let res = match c {
                    Some(c) => self.read_into_cancelable(fd, dst, cap, c).await,
                    None => poll_fn(|cx| self.poll_read(fd, cx, dst, cap)).await,
                };
                match res {
                    Some(Ok(n)) => {
                        // SAFETY: `n` bytes were copied to the first non-empty buffer, so the
                        // first `n` bytes of the vector are written.
                        unsafe { buf.set_init(n) };
                        return (Ok(n), buf);
                    }
                    Some(Err(e)) => return (Err(e), buf),
                    None => {}
                }
            }
        }
        let op = Op::readv(fd.clone(), buf).unwrap();
        let _guard = c.map(|c| c.clone().associate_op(op.op_canceller()));
        op.read().await
    }
}
