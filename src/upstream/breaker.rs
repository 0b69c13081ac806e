//! Circuit breaking (`[upstreams.limits]`) on one worker, against its share of the process's
//! limits: requests in flight to the upstream, connections open to its targets (in use and
//! idle), and requests waiting for a connection while all of those are open. Past a limit the
//! request is refused at once (503, the limit named in the body) instead of piling onto an
//! upstream that is already saturated.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use slab::Slab;

use crate::config::UpstreamLimits;

pub struct Breaker {
    limits: UpstreamLimits,
    slots: Rc<Slots>,
    inflight: Cell<u32>,
    pending: Cell<u32>,
}

/// The connections open, shared with each connection's `ConnSlot`.
#[derive(Default)]
pub struct Slots {
    open: Cell<u32>,
    /// Requests waiting for a connection to be freed; each removes its own entry however its
    /// wait ends, so the table never holds more than the requests waiting.
    waiters: RefCell<Slab<Waiter>>,
}

#[derive(Default)]
struct Waiter {
    woken: bool,
    waker: Option<Waker>,
}

impl Slots {
    fn wake(&self) {
        for (_, w) in self.waiters.borrow_mut().iter_mut() {
            w.woken = true;
            if let Some(waker) = w.waker.take() {
                waker.wake();
            }
        }
    }
}

/// Removes a waiter's entry when its wait ends.
struct Waiting<'a>(&'a RefCell<Slab<Waiter>>, usize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.borrow_mut().try_remove(self.1);
    }
}

/// Counts a connection as open until it is dropped (closed).
pub struct ConnSlot(Rc<Slots>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get().saturating_sub(1));
        self.0.wake();
    }
}

pub use crate::config::Limit;

/// Counts a request as in flight until dropped.
pub struct InFlight<'a>(&'a Cell<u32>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

impl Breaker {
    /// `limits`: this worker's share.
    pub fn new(limits: UpstreamLimits) -> Breaker {
        Breaker {
            limits,
            slots: Rc::default(),
            inflight: Cell::new(0),
            pending: Cell::new(0),
        }
    }

    /// This worker's share of the limits.
    pub fn limits(&self) -> UpstreamLimits {
        self.limits
    }

    /// Admits a request under `max_requests`; it counts until the guard is dropped.
    pub fn admit(&self) -> Result<InFlight<'_>, Limit> {
        if self.inflight.get() >= self.limits.max_requests {
            return Err(Limit::Requests);
        }
        self.inflight.set(self.inflight.get() + 1);
        Ok(InFlight(&self.inflight))
    }

    /// Whether another connection may be opened.
    pub fn may_connect(&self) -> bool {
        self.slots.open.get() < self.limits.max_connections
    }

    /// Counts a new connection as open.
    pub fn slot(&self) -> ConnSlot {
        self.slots.open.set(self.slots.open.get() + 1);
        ConnSlot(Rc::clone(&self.slots))
    }

    /// A connection went back to the pool: a waiting request may take it.
    pub fn released(&self) {
        self.slots.wake();
    }

    /// Waits, at most `limit`, for a connection to be freed (returned to the pool or closed);
    /// refused at once past `max_pending` waiting.
    pub async fn wait(&self, limit: Duration) -> Result<(), Limit> {
        if self.pending.get() >= self.limits.max_pending {
            return Err(Limit::Pending);
        }
        self.pending.set(self.pending.get() + 1);
        let _pending = InFlight(&self.pending);
        let key = self.slots.waiters.borrow_mut().insert(Waiter::default());
        let _entry = Waiting(&self.slots.waiters, key);
        let freed = std::future::poll_fn(|cx| {
            let mut waiters = self.slots.waiters.borrow_mut();
            match waiters.get_mut(key) {
                Some(w) if !w.woken => {
                    w.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                _ => Poll::Ready(()),
            }
        });
        monoio::time::timeout(limit, freed)
            .await
            .map_err(|_| Limit::Connections)
    }
}
