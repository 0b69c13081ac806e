//! Keeping the workers' indexes one cache, without a lock.
//!
//! A worker publishes every change it makes (a store, its evictions, an invalidation) to every
//! other worker's inbox at once, before the response that caused it reaches the client, and
//! applies its own inbox before every lookup. A client that saw a response can therefore not
//! reach a worker that has not yet received the change behind it: the change was in that
//! worker's inbox before the client had the response.
//!
//! Changes made at the same time on different workers arrive in different orders on different
//! workers, so applying them must not depend on the order. Every change carries a time on the
//! process's monotonic clock: an entry's is when its response arrived (`stored_at`), a removal's
//! is when it was decided. A removal takes the matching entries that are not newer than it, and
//! is remembered (a tombstone) so that an entry not newer than it that arrives later is not
//! stored; of two entries for one key, the newer stays. Every worker thus ends with the same
//! entries whatever the order of arrival: the outcome is that of applying the changes in time
//! order, as one worker would have.
//!
//! Tombstones are kept for `TOMBSTONE_TTL`; an entry whose response arrived longer ago than that
//! is not stored at all (so none can outlive the tombstone meant to stop it). A worker keeps at
//! most `MAX_TOMBSTONES`; dropping one for room raises a horizon below which nothing is stored,
//! which errs towards storing less, never towards serving what was removed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use crossbeam_channel::{Sender, TrySendError};

use super::{Batch, Change, Entry};

/// How long a removal is remembered, and the oldest response that may still be stored.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(60);
/// URL removals remembered per worker (16 bytes each, twice).
const MAX_TOMBSTONES: usize = 1 << 16;
/// Purges by prefix or target remembered per worker (admin operations: few).
const MAX_PURGES: usize = 1024;
/// Changes held for a peer whose inbox is full, past which stored entries are dropped from
/// them (the peer then misses those entries; removals are kept).
const MAX_BACKLOG: usize = 1 << 16;

/// What a removal matched, for entries that arrive after it.
#[derive(Debug)]
pub enum Purged {
    Prefix(Box<[u8]>),
    Target(Box<[u8]>),
}

impl Purged {
    pub fn matches(&self, target: &[u8]) -> bool {
        match self {
            Purged::Prefix(p) => target.starts_with(p),
            Purged::Target(t) => target == &t[..],
        }
    }
}

/// Recent removals on one worker.
pub struct Tombstones {
    urls: AHashMap<u64, Instant>,
    order: VecDeque<(u64, Instant)>,
    purges: VecDeque<(Arc<Purged>, Instant)>,
    /// Nothing whose response arrived at or before this is stored.
    horizon: Instant,
}

impl Tombstones {
    pub fn new(now: Instant) -> Tombstones {
        Tombstones {
            urls: AHashMap::new(),
            order: VecDeque::new(),
            purges: VecDeque::new(),
            horizon: now,
        }
    }

    /// Whether `entry` is older than a removal that matches it (and so must not be stored).
    pub fn bury(&self, entry: &Entry, now: Instant) -> bool {
        let stored = entry.stored_at;
        stored <= self.horizon
            || now.saturating_duration_since(stored) >= TOMBSTONE_TTL
            || self.urls.get(&entry.url).is_some_and(|&at| stored <= at)
            || self
                .purges
                .iter()
                .any(|(p, at)| stored <= *at && p.matches(&entry.target))
    }

    pub fn url(&mut self, url: u64, at: Instant) {
        let latest = self.urls.entry(url).or_insert(at);
        *latest = (*latest).max(at);
        self.order.push_back((url, at));
        while self.order.len() > MAX_TOMBSTONES {
            self.pop_url();
        }
    }

    pub fn purge(&mut self, what: Arc<Purged>, at: Instant) {
        self.purges.push_back((what, at));
        while self.purges.len() > MAX_PURGES {
            if let Some((_, at)) = self.purges.pop_front() {
                self.horizon = self.horizon.max(at);
            }
        }
    }

    fn pop_url(&mut self) {
        if let Some((url, at)) = self.order.pop_front() {
            if self.urls.get(&url) == Some(&at) {
                self.urls.remove(&url);
            }
            self.horizon = self.horizon.max(at);
        }
    }

    /// Forgets removals older than `TOMBSTONE_TTL` (entries that old are not stored anyway).
    pub fn expire(&mut self, now: Instant) {
        let Some(cutoff) = now.checked_sub(TOMBSTONE_TTL) else {
            return;
        };
        while self.order.front().is_some_and(|&(_, at)| at < cutoff) {
            if let Some((url, at)) = self.order.pop_front() {
                if self.urls.get(&url) == Some(&at) {
                    self.urls.remove(&url);
                }
            }
        }
        while self.purges.front().is_some_and(|(_, at)| *at < cutoff) {
            self.purges.pop_front();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.order.len() + self.purges.len()
    }
}

/// Senders to the other workers, with what could not be sent yet because an inbox was full.
pub struct Peers {
    senders: Vec<Sender<Batch>>,
    backlog: Vec<Vec<Change>>,
}

impl Peers {
    pub fn new(senders: Vec<Sender<Batch>>) -> Peers {
        let backlog = senders.iter().map(|_| Vec::new()).collect();
        Peers { senders, backlog }
    }

    pub fn count(&self) -> usize {
        self.senders.len()
    }

    /// Sends `changes` to every peer now, behind anything still held for it.
    pub fn publish(&mut self, changes: Vec<Change>) {
        if self.senders.is_empty() || changes.is_empty() {
            return;
        }
        let batch: Batch = Arc::new(changes);
        for (tx, held) in self.senders.iter().zip(&mut self.backlog) {
            if !held.is_empty() {
                held.extend(batch.iter().map(Change::clone));
                continue;
            }
            if let Err(TrySendError::Full(b)) = tx.try_send(Arc::clone(&batch)) {
                held.extend(b.iter().map(Change::clone));
            }
        }
        self.trim();
    }

    /// Retries what a full inbox refused (on the worker's tick).
    pub fn flush(&mut self) {
        for (tx, held) in self.senders.iter().zip(&mut self.backlog) {
            if held.is_empty() {
                continue;
            }
            let batch: Batch = Arc::new(std::mem::take(held));
            if let Err(TrySendError::Full(b)) = tx.try_send(batch) {
                *held =
                    Arc::try_unwrap(b).unwrap_or_else(|b| b.iter().map(Change::clone).collect());
            }
        }
    }

    /// A peer that stops reading must not make this worker grow without bound.
    fn trim(&mut self) {
        for held in &mut self.backlog {
            if held.len() > MAX_BACKLOG {
                held.retain(|c| !matches!(c, Change::Stored(_)));
                if held.len() > MAX_BACKLOG {
                    let excess = held.len() - MAX_BACKLOG;
                    held.drain(..excess);
                }
                tracing::warn!("a worker is not reading cache changes; dropping some for it");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cache::store::tests::entry;
    use crate::cache::{links, WorkerCache};
    use crate::config::CacheSettings;

    fn two_workers() -> (WorkerCache, WorkerCache) {
        let settings = CacheSettings {
            max_bytes: 1 << 20,
            max_entry_bytes: 1 << 16,
            sync_interval: Duration::from_millis(20),
        };
        let (mut per_worker, _admin) = links(2);
        let (peers_b, inbox_b) = per_worker.pop().expect("two");
        let (peers_a, inbox_a) = per_worker.pop().expect("two");
        (
            WorkerCache::new(settings.clone(), peers_a, inbox_a),
            WorkerCache::new(settings, peers_b, inbox_b),
        )
    }

    fn held(w: &WorkerCache, url: u64) -> bool {
        w.get(url, |_| 0).is_some()
    }

    #[test]
    fn a_store_on_one_worker_is_found_on_the_other_at_its_next_lookup() {
        let (a, b) = two_workers();
        a.insert(entry(1, 0, 10));
        assert!(held(&b, 1));
    }

    #[test]
    fn an_invalidation_racing_an_older_store_wins_on_both_workers() {
        // A's response arrived, then B invalidated the URL, then A stored: neither worker has
        // applied the other's change when it acts, and both end without the entry.
        let (a, b) = two_workers();
        let old = entry(2, 0, 10);
        b.invalidate(&[2]);
        a.store.borrow_mut().insert(Arc::clone(&old)); // as if A stored before reading its inbox
        a.peers.borrow_mut().publish(vec![Change::Stored(old)]);
        assert!(!held(&a, 2), "A applies B's newer invalidation");
        assert!(
            !held(&b, 2),
            "B refuses the entry older than its invalidation"
        );
    }

    #[test]
    fn an_older_invalidation_arriving_late_leaves_a_newer_entry() {
        let (a, b) = two_workers();
        let at = Instant::now();
        let mut fresh = Arc::try_unwrap(entry(3, 0, 10)).expect("unique");
        fresh.stored_at = at + Duration::from_millis(1);
        a.insert(Arc::new(fresh));
        b.peers
            .borrow_mut()
            .publish(vec![Change::Url { url: 3, at }]);
        assert!(held(&a, 3) && held(&b, 3));
    }

    #[test]
    fn a_purge_buries_entries_older_than_it_that_arrive_after_it() {
        let (a, b) = two_workers();
        let old = entry(4, 0, 10); // target "/u4"
        let purge = Change::Purge(
            Arc::new(Purged::Prefix(b"/u".as_slice().into())),
            Instant::now(),
        );
        a.peers.borrow_mut().publish(vec![purge.clone()]);
        b.peers.borrow_mut().publish(vec![purge]);
        b.receive();
        a.insert(Arc::clone(&old));
        assert!(!held(&a, 4) && !held(&b, 4));
    }

    #[test]
    fn tombstones_are_bounded_and_dropping_one_raises_the_horizon() {
        let now = Instant::now();
        let mut t = Tombstones::new(now);
        for url in 0..(MAX_TOMBSTONES as u64 + 10) {
            t.url(url, now + Duration::from_micros(url));
        }
        assert_eq!(t.len(), MAX_TOMBSTONES);
        // URL 0's tombstone is gone, but the horizon still refuses what it refused.
        let mut e = Arc::try_unwrap(entry(0, 0, 1)).expect("unique");
        e.stored_at = now;
        assert!(t.bury(&e, now));
        e.stored_at = now + Duration::from_secs(1);
        assert!(!t.bury(&e, now), "newer than every removal");
    }
}
