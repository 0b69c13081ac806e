//! ringway patch: the ring of provided buffers that multishot receives fill (see `ReadAhead`).

use std::{
    alloc::{alloc, alloc_zeroed, dealloc, Layout},
    ptr::NonNull,
    sync::atomic::{AtomicU16, Ordering},
};

use io_uring::{types::BufRingEntry, IoUring};

/// A buffer ring registered with the kernel as one buffer group: the kernel takes a buffer
/// from it for each receive it completes, and the reader gives the buffer back once it has
/// copied the bytes out.
pub(crate) struct BufRing {
    /// The ring of entries the kernel reads, page-aligned as it requires.
    ring: NonNull<BufRingEntry>,
    /// The buffers themselves, `ENTRIES` of `SIZE` bytes.
    bufs: NonNull<u8>,
    /// Our copy of the ring's tail (the kernel only reads it).
    tail: u16,
}

impl BufRing {
    /// The buffer group the multishot receives name.
    pub(crate) const GROUP: u16 = 0;
    /// Buffers in the ring: with `SIZE`, 1 MiB per thread. The kernel takes them in ring
    /// order, so all of them are touched (resident) once a worker has received 1 MiB; a stream
    /// holds one only from its arrival to the read that copies it out (and at most
    /// `MAX_FILLED` for a slow reader), and with none left a read receives once as before.
    const ENTRIES: u16 = 64;
    /// Bytes per buffer: a request head fits in one, and a bulk transfer takes few.
    pub(crate) const SIZE: u32 = 16 * 1024;

    fn ring_layout() -> Layout {
        // A u16 count of 16-byte entries, page-aligned: always a valid layout.
        Layout::from_size_align(Self::ENTRIES as usize * 16, 4096).expect("valid layout")
    }

    fn bufs_layout() -> Layout {
        Layout::from_size_align(Self::ENTRIES as usize * Self::SIZE as usize, 64)
            .expect("valid layout")
    }

    /// Registers a ring full of buffers; `None` if the kernel cannot (before 5.19).
    pub(crate) fn new(uring: &IoUring) -> Option<BufRing> {
        // SAFETY: both layouts have a non-zero size.
        let (ring, bufs) = unsafe { (alloc_zeroed(Self::ring_layout()), alloc(Self::bufs_layout())) };
        let (Some(ring), Some(bufs)) = (NonNull::new(ring.cast()), NonNull::new(bufs)) else {
            // SAFETY: each non-null pointer came from `alloc` with its own layout.
            unsafe { Self::free(ring.cast(), bufs) };
            return None;
        };
        let mut this = BufRing {
            ring,
            bufs,
            tail: 0,
        };
        // SAFETY: the ring is valid, page-aligned memory for `ENTRIES` entries, and stays so
        // until `Drop` unregisters the group.
        let registered = unsafe {
            uring
                .submitter()
                .register_buf_ring(ring.as_ptr() as u64, Self::ENTRIES, Self::GROUP)
        };
        if registered.is_err() {
            // SAFETY: both pointers came from `alloc` with their layouts; the kernel has neither.
            unsafe { Self::free(ring.as_ptr().cast(), bufs.as_ptr()) };
            return None;
        }
        for bid in 0..Self::ENTRIES {
            this.give_back(bid);
        }
        Some(this)
    }

    /// The first `len` bytes the kernel put in buffer `bid`, from `from`.
    ///
    /// # Safety
    /// `bid` must come from a completion that filled `len` bytes of it, and the buffer must not
    /// have been given back since.
    pub(crate) unsafe fn filled(&self, bid: u16, from: u32, len: u32) -> &[u8] {
        let start = self.buf(bid).add(from as usize);
        std::slice::from_raw_parts(start, (len - from) as usize)
    }

    fn buf(&self, bid: u16) -> *mut u8 {
        // SAFETY: a buffer id is below `ENTRIES` (ours, echoed by the kernel), so the offset
        // stays inside the allocation.
        unsafe {
            self.bufs
                .as_ptr()
                .add((bid % Self::ENTRIES) as usize * Self::SIZE as usize)
        }
    }

    /// Puts buffer `bid` back in the ring for the kernel to fill again.
    pub(crate) fn give_back(&mut self, bid: u16) {
        let slot = (self.tail % Self::ENTRIES) as usize;
        // SAFETY: `slot` < `ENTRIES`; the kernel reads entries only up to the published tail,
        // so this one is ours to write until the store below.
        unsafe {
            let entry = &mut *self.ring.as_ptr().add(slot);
            entry.set_addr(self.buf(bid) as u64);
            entry.set_len(Self::SIZE);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field overlays the first entry's reserved field, which the kernel
        // reads; the release store publishes the entry written above (as liburing does).
        unsafe {
            let tail = BufRingEntry::tail(self.ring.as_ptr()) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// # Safety
    /// Each pointer is null or came from `alloc` with its layout, and the kernel has neither.
    unsafe fn free(ring: *mut u8, bufs: *mut u8) {
        if !ring.is_null() {
            dealloc(ring, Self::ring_layout());
        }
        if !bufs.is_null() {
            dealloc(bufs, Self::bufs_layout());
        }
    }

    /// Unregisters the group, then frees the memory; the memory is leaked if the kernel could
    /// not let go of it.
    pub(crate) fn release(self, uring: &IoUring) {
        let this = std::mem::ManuallyDrop::new(self);
        if uring.submitter().unregister_buf_ring(Self::GROUP).is_ok() {
            // SAFETY: the kernel no longer holds the group, so it no longer writes either;
            // both came from `alloc` with their layouts.
            unsafe { Self::free(this.ring.as_ptr().cast(), this.bufs.as_ptr()) };
        }
    }
}
