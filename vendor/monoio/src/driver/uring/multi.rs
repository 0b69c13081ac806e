//! ringway patch: multishot receives (see `ReadAhead`): one receive armed per stream, which
//! the kernel completes again each time bytes arrive, into buffers from the `BufRing`.

use std::{
    cell::UnsafeCell,
    collections::VecDeque,
    io,
    rc::Rc,
    task::{Context, Poll, Waker},
};

use io_uring::{cqueue, opcode, types};

use super::{bufring::BufRing, lifecycle::Lifecycle, UringInner};
use crate::{driver::shared_fd::SharedFd, utils::slab::Slab};

/// Filled buffers a stream may hold unread before its receive is stopped; it is armed again
/// once they are read, so a slow reader holds a few buffers rather than the whole ring, and
/// the socket's own receive window applies again.
const MAX_FILLED: usize = 4;

/// A multishot receive's state, in its slot of the driver's operations.
pub(crate) struct Multi {
    /// Buffers the kernel filled that the reader has not finished: (buffer id, bytes).
    filled: VecDeque<(u16, u32)>,
    /// Bytes of the oldest filled buffer already read.
    head: u32,
    /// How the receive ended (a completion without `IORING_CQE_F_MORE`); `None` while armed.
    end: Option<End>,
    /// The reader's waker, kept between reads (the reader is the same task), and whether it
    /// waits for a wake-up.
    waker: Option<Waker>,
    waiting: bool,
    /// The stream is gone: buffers go straight back, and the slot goes with the last completion.
    orphan: bool,
    /// A cancellation is on its way (the reader fell `MAX_FILLED` behind, or was cancelled).
    stopping: bool,
}

/// How a multishot receive ended.
#[derive(Clone, Copy, Debug)]
pub(crate) enum End {
    /// The peer closed its side.
    Eof,
    /// Stopped (cancelled, or the kernel ended it): arm another.
    Stopped,
    /// The ring had no buffer left: receive once into the caller's buffer, then arm another.
    NoBuffers,
    /// The kernel has buffer rings but not multishot receives (5.19 to 5.x): receive one at
    /// a time from now on.
    Unsupported,
    /// A socket error (an errno), for the reader.
    Error(i32),
}

/// What a multishot read found.
pub(crate) enum Found {
    /// Bytes copied into the caller's buffer.
    Bytes(usize),
    /// Nothing buffered, and the receive has ended; its slot is freed.
    Ended(End),
}

impl Multi {
    fn new() -> Multi {
        Multi {
            filled: VecDeque::new(),
            head: 0,
            end: None,
            waker: None,
            waiting: false,
            orphan: false,
            stopping: false,
        }
    }

    /// Takes one completion. True when the slot should be freed (orphaned and over).
    fn complete(&mut self, res: i32, flags: u32, bufs: &mut BufRing) -> bool {
        if let Some(bid) = cqueue::buffer_select(flags) {
            match res > 0 && !self.orphan {
                true => self.filled.push_back((bid, res as u32)),
                false => bufs.give_back(bid),
            }
        }
        if !cqueue::more(flags) {
            self.end = Some(match res {
                0 => End::Eof,
                r if r > 0 || r == -libc::ECANCELED => End::Stopped,
                r if r == -libc::ENOBUFS => End::NoBuffers,
                r if r == -libc::EINVAL => End::Unsupported,
                r => End::Error(-r),
            });
        }
        if std::mem::take(&mut self.waiting) {
            if let Some(waker) = &self.waker {
                waker.wake_by_ref();
            }
        }
        self.orphan && self.end.is_some()
    }

    /// Whether the reader fell behind and the receive should be stopped now.
    fn behind(&mut self) -> bool {
        let stop = self.end.is_none() && !self.stopping && self.filled.len() >= MAX_FILLED;
        self.stopping |= stop;
        stop
    }
}

/// Takes a completion: a multishot slot's here, any other by `Lifecycle::complete`.
/// Receives that fell behind are put in `stops`, to be cancelled once the completion queue
/// is let go (`UringInner::stop_behind`).
#[inline]
pub(super) fn complete(
    slab: &mut Slab<Lifecycle>,
    bufs: &mut Option<BufRing>,
    stops: &mut Vec<usize>,
    index: usize,
    cqe: &cqueue::Entry,
) {
    // SAFETY: the kernel only posts completions for occupied slots.
    let mut slot = unsafe { slab.get(index).unwrap_unchecked() };
    let (Lifecycle::Multi(multi), Some(bufs)) = (&mut *slot, bufs.as_mut()) else {
        slot.complete(super::resultify(cqe), cqe.flags());
        return;
    };
    if multi.complete(cqe.result(), cqe.flags(), bufs) {
        slot.remove();
    } else if multi.behind() {
        stops.push(index);
    }
}

impl UringInner {
    /// Submits the cancellations `complete` asked for.
    pub(super) fn stop_behind(&mut self) {
        while let Some(index) = self.stops.pop() {
            // SAFETY: the index is a multishot slot's, still occupied (a slot with a stop
            // pending is not freed before its last completion).
            unsafe { self.push_cancel(index) };
        }
    }

    /// Arms a multishot receive on `fd`: its slot, and its state, boxed in the slot, so its
    /// address holds until the slot is freed (by `read_multi` once it ended, or after
    /// `drop_multi`). `None` without a buffer ring.
    pub(crate) fn arm_multi(
        this: &Rc<UnsafeCell<UringInner>>,
        fd: &SharedFd,
    ) -> Option<(usize, std::ptr::NonNull<Multi>)> {
        // SAFETY: the driver is used from its own thread only, and no other borrow of it is
        // live across this call.
        let inner = unsafe { &mut *this.get() };
        inner.bufs.as_ref()?;
        if inner.uring.submission().is_full() {
            inner.submit().ok()?;
        }
        let mut multi = Box::new(Multi::new());
        let ptr = std::ptr::NonNull::from(&mut *multi);
        let index = inner.ops.slab.insert(Lifecycle::Multi(multi));
        let sqe = match fd.fixed() {
            Some(slot) => opcode::RecvMulti::new(types::Fixed(slot), BufRing::GROUP).build(),
            None => opcode::RecvMulti::new(types::Fd(fd.raw_fd()), BufRing::GROUP).build(),
        };
        // SAFETY: the entry names no memory of ours but the buffer ring, which outlives it.
        if unsafe { inner.uring.submission().push(&sqe.user_data(index as u64)) }.is_err() {
            inner.ops.slab.remove(index);
            return None;
        }
        Some((index, ptr))
    }

    /// Copies what the receive at `index`, whose state is at `multi`, has buffered into the
    /// `cap` bytes at `dst` (which must be valid for writes), giving each buffer back once
    /// read; registers the waker when there is nothing yet.
    ///
    /// # Safety
    /// `multi` is what `arm_multi` gave with `index`, and the slot has not been freed since.
    #[inline]
    pub(crate) unsafe fn read_multi(
        this: &Rc<UnsafeCell<UringInner>>,
        index: usize,
        multi: std::ptr::NonNull<Multi>,
        cx: &mut Context<'_>,
        dst: *mut u8,
        cap: usize,
    ) -> Poll<Found> {
        // SAFETY: as in `arm_multi`; the caller vouches for `multi`, which is not otherwise
        // borrowed (the driver reaches it only while completing, not during this call).
        let (inner, multi) = unsafe { (&mut *this.get(), &mut *multi.as_ptr()) };
        let Some(bufs) = inner.bufs.as_mut() else {
            return Poll::Ready(Found::Ended(End::Stopped));
        };
        let mut n = 0;
        while let (Some(&(bid, len)), true) = (multi.filled.front(), n < cap) {
            // SAFETY: `bid` was filled with `len` bytes and is not given back before the
            // read below finishes it.
            let src = unsafe { bufs.filled(bid, multi.head, len) };
            let take = src.len().min(cap - n);
            // SAFETY: the caller gives `cap` writable bytes at `dst`, `n + take` <= `cap`, and
            // the ring's buffers are not the caller's.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.add(n), take) };
            n += take;
            multi.head += take as u32;
            if multi.head == len {
                multi.filled.pop_front();
                multi.head = 0;
                bufs.give_back(bid);
            }
        }
        if n > 0 {
            return Poll::Ready(Found::Bytes(n));
        }
        if let Some(end) = multi.end {
            inner.ops.slab.remove(index);
            return Poll::Ready(Found::Ended(end));
        }
        match &multi.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => multi.waker = Some(cx.waker().clone()),
        }
        multi.waiting = true;
        Poll::Pending
    }

    /// Lets go of the receive at `index` for a stream that is gone: its buffers go back, and it
    /// is cancelled unless it already ended.
    pub(crate) fn drop_multi(this: &Rc<UnsafeCell<UringInner>>, index: usize) {
        // SAFETY: as in `arm_multi`.
        let inner = unsafe { &mut *this.get() };
        let (Some(mut slot), Some(bufs)) = (inner.ops.slab.get(index), inner.bufs.as_mut()) else {
            return;
        };
        let Lifecycle::Multi(multi) = &mut *slot else {
            return;
        };
        for (bid, _) in multi.filled.drain(..) {
            bufs.give_back(bid);
        }
        if multi.end.is_some() {
            slot.remove();
            return;
        }
        multi.orphan = true;
        multi.waker = None;
        if !std::mem::replace(&mut multi.stopping, true) {
            // SAFETY: the slot stays occupied until the receive's last completion.
            unsafe { inner.push_cancel(index) };
        }
    }
}

/// The error a receive that ended with `End::Error` returns.
pub(crate) fn end_error(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}
