//! Coarse deadlines for socket operations. A timer per operation costs a timer-wheel insert and
//! removal each time, several times per request. Instead each connection task holds a slot in
//! its worker's `Deadlines` table: arming it is a store of the due time, and the worker's tick
//! wakes the tasks whose deadline has passed. A timeout therefore fires within one tick of its
//! due time (early by at most the age of the coarse clock, late by at most one tick), which is
//! ample for timeouts measured in hundreds of milliseconds or more.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use pin_project_lite::pin_project;
use slab::Slab;

/// The operation did not finish before its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut;

pub struct Deadlines {
    slots: RefCell<Slab<Slot>>,
    clock: Cell<Instant>,
    /// Wall-clock seconds since the epoch at the last tick (token expiry checks).
    unix: Cell<u64>,
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Default)]
struct Slot {
    due: Option<Instant>,
    fired: bool,
    waker: Option<Waker>,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            slots: RefCell::new(Slab::new()),
            clock: Cell::new(Instant::now()),
            unix: Cell::new(unix_seconds()),
        }
    }
}

impl Deadlines {
    /// The coarse clock: the time of the last `tick`.
    pub fn now(&self) -> Instant {
        self.clock.get()
    }

    /// The wall clock, in seconds since the epoch, as of the last `tick`.
    pub fn unix_now(&self) -> u64 {
        self.unix.get()
    }

    /// Advances the clock and wakes every task whose deadline has passed.
    pub fn tick(&self) {
        let now = Instant::now();
        self.clock.set(now);
        self.unix.set(unix_seconds());
        for (_, slot) in self.slots.borrow_mut().iter_mut() {
            if !slot.fired && slot.due.is_some_and(|due| due <= now) {
                slot.fired = true;
                if let Some(w) = slot.waker.take() {
                    w.wake();
                }
            }
        }
    }

    /// A slot for one task (or one branch of a task) to time its operations with.
    pub fn slot(&self) -> Deadline<'_> {
        let key = self.slots.borrow_mut().insert(Slot::default());
        Deadline { table: self, key }
    }

    /// Slots in use: one per connection, plus one per request body streaming up.
    pub fn len(&self) -> usize {
        self.slots.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Deadline<'a> {
    table: &'a Deadlines,
    key: usize,
}

impl<'a> Deadline<'a> {
    /// Runs `fut` to completion, or gives up (dropping it) once `limit` has passed.
    /// Pass a large future pinned (`pin!(fut)`): by value, its whole state is copied in.
    pub fn within<'s, F: Future>(&'s self, limit: Duration, fut: F) -> UntilFired<'s, 'a, F> {
        self.arm(limit);
        UntilFired {
            fut,
            deadline: self,
            disarm: true,
        }
    }

    /// Runs `fut` until it completes or the deadline, as it is armed now or later (by another
    /// branch of the same task, say), passes. An unarmed deadline never passes.
    pub fn until_fired<'s, F: Future>(&'s self, fut: F) -> UntilFired<'s, 'a, F> {
        UntilFired {
            fut,
            deadline: self,
            disarm: false,
        }
    }

    /// Arms the deadline without running anything: `fired` says whether it has passed.
    pub fn arm(&self, limit: Duration) {
        let mut slots = self.table.slots.borrow_mut();
        let slot = &mut slots[self.key];
        slot.due = Some(self.table.now() + limit);
        slot.fired = false;
    }

    pub fn disarm(&self) {
        self.table.slots.borrow_mut()[self.key].due = None;
    }

    pub fn fired(&self) -> bool {
        self.table.slots.borrow()[self.key].fired
    }

    /// Registers the current task to be woken when the armed deadline passes.
    pub fn register(&self, waker: &Waker) {
        let mut slots = self.table.slots.borrow_mut();
        let slot = &mut slots[self.key];
        match &slot.waker {
            Some(w) if w.will_wake(waker) => {}
            _ => slot.waker = Some(waker.clone()),
        }
    }
}

pin_project! {
    /// A future bounded by a `Deadline`; a plain struct rather than an `async fn` so that the
    /// wrapped future is not moved once more on the way in.
    pub struct UntilFired<'s, 'a, F> {
        #[pin]
        fut: F,
        deadline: &'s Deadline<'a>,
        disarm: bool,
    }
}

impl<F: Future> Future for UntilFired<'_, '_, F> {
    type Output = Result<F::Output, TimedOut>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let done = match this.fut.poll(cx) {
            Poll::Ready(v) => Ok(v),
            Poll::Pending if this.deadline.fired() => Err(TimedOut),
            Poll::Pending => {
                this.deadline.register(cx.waker());
                return Poll::Pending;
            }
        };
        if *this.disarm {
            this.deadline.disarm();
        }
        Poll::Ready(done)
    }
}

impl Drop for Deadline<'_> {
    fn drop(&mut self) {
        self.table.slots.borrow_mut().remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_fires_on_the_tick_after_it_is_due_and_slots_are_freed() {
        let table = Deadlines::default();
        {
            let d = table.slot();
            d.arm(Duration::from_millis(0));
            assert!(!d.fired());
            table.tick();
            assert!(d.fired());
            d.arm(Duration::from_secs(60));
            table.tick();
            assert!(!d.fired());
            assert_eq!(table.len(), 1);
        }
        assert!(table.is_empty());
    }
}
