//! One worker's cache index: entries in a slab, found by URL (each URL with a few variants),
//! threaded on two LRU lists: the entries this worker stored (its own) and the replicas other
//! workers sent.
//!
//! Each worker owns `max_bytes / workers` of the budget and evicts only its own entries, from
//! the cold end of its own list, telling the others; replicas go when their owner evicts them.
//! Every entry has one owner, so the entries in the process, which every worker indexes and
//! whose bodies they share, add up to at most `max_bytes`, whichever worker's traffic is hot.

use std::sync::Arc;
use std::time::Instant;

use ahash::AHashMap;
use slab::Slab;

use super::Entry;

/// Variants kept per URL; a new one past this replaces the coldest.
const MAX_VARIANTS: usize = 8;
const NONE: usize = usize::MAX;
const OWN: usize = 0;
const REPLICA: usize = 1;

struct Node {
    entry: Arc<Entry>,
    /// `OWN` or `REPLICA`: the list it is on.
    list: usize,
    /// Towards the most recently used end.
    newer: usize,
    older: usize,
}

#[derive(Clone, Copy)]
struct List {
    newest: usize,
    oldest: usize,
    bytes: usize,
}

pub struct Store {
    /// This worker's share of `max_bytes`, for its own entries.
    budget: usize,
    /// All entries together, own and replicas: past this (a peer's evictions were missed) the
    /// coldest replicas go too.
    max_bytes: usize,
    nodes: Slab<Node>,
    urls: AHashMap<u64, Vec<usize>>,
    lists: [List; 2],
    /// Own entries evicted to stay within the budget.
    pub evictions: u64,
}

impl Store {
    /// The index of one of `workers` workers sharing `max_bytes`.
    pub fn new(max_bytes: usize, workers: usize) -> Store {
        let empty = List {
            newest: NONE,
            oldest: NONE,
            bytes: 0,
        };
        Store {
            budget: max_bytes / workers.max(1),
            max_bytes,
            nodes: Slab::new(),
            urls: AHashMap::new(),
            lists: [empty; 2],
            evictions: 0,
        }
    }

    /// Bytes indexed: own entries and replicas.
    pub fn bytes(&self) -> usize {
        self.lists[OWN].bytes + self.lists[REPLICA].bytes
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn unlink(&mut self, id: usize) {
        let (newer, older, l) = (
            self.nodes[id].newer,
            self.nodes[id].older,
            self.nodes[id].list,
        );
        match newer {
            NONE => self.lists[l].newest = older,
            n => self.nodes[n].older = older,
        }
        match older {
            NONE => self.lists[l].oldest = newer,
            o => self.nodes[o].newer = newer,
        }
    }

    fn push_newest(&mut self, id: usize) {
        let l = self.nodes[id].list;
        self.nodes[id].newer = NONE;
        self.nodes[id].older = self.lists[l].newest;
        match self.lists[l].newest {
            NONE => self.lists[l].oldest = id,
            n => self.nodes[n].newer = id,
        }
        self.lists[l].newest = id;
    }

    /// The entry for `url` whose variant `variant_of` computes for it, marked recently used.
    pub fn get(&mut self, url: u64, variant_of: impl Fn(&Entry) -> u64) -> Option<Arc<Entry>> {
        let id = *self
            .urls
            .get(&url)?
            .iter()
            .find(|&&id| variant_of(&self.nodes[id].entry) == self.nodes[id].entry.variant)?;
        self.unlink(id);
        self.push_newest(id);
        Some(Arc::clone(&self.nodes[id].entry))
    }

    fn remove(&mut self, id: usize) -> Arc<Entry> {
        self.unlink(id);
        let node = self.nodes.remove(id);
        self.lists[node.list].bytes -= node.entry.size();
        if let Some(ids) = self.urls.get_mut(&node.entry.url) {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.urls.remove(&node.entry.url);
            }
        }
        node.entry
    }

    /// Stores `entry` as this worker's own (replacing an older one for the same URL and
    /// variant); returns the own entries evicted for space, as `(url, variant, stored_at)`, for
    /// the other workers to drop.
    pub fn insert(&mut self, entry: Arc<Entry>) -> Vec<(u64, u64, Instant)> {
        if entry.size() > self.budget {
            self.remove_variant(entry.url, entry.variant, entry.stored_at);
            return Vec::new();
        }
        let Some(id) = self.link(entry, OWN) else {
            return Vec::new();
        };
        let mut evicted = Vec::new();
        while self.lists[OWN].bytes > self.budget && self.lists[OWN].oldest != id {
            let e = self.remove(self.lists[OWN].oldest);
            self.evictions += 1;
            evicted.push((e.url, e.variant, e.stored_at));
        }
        self.trim_replicas();
        evicted
    }

    /// Indexes another worker's entry (its owner evicts it).
    pub(super) fn insert_replica(&mut self, entry: Arc<Entry>) {
        self.link(entry, REPLICA);
        self.trim_replicas();
    }

    /// Links `entry` in, replacing the same URL and variant unless that one is newer (then
    /// returns `None`: of two entries for one key, the newer stays, in whichever order they
    /// arrive).
    fn link(&mut self, entry: Arc<Entry>, list: usize) -> Option<usize> {
        if self
            .variant(entry.url, entry.variant)
            .is_some_and(|id| self.nodes[id].entry.stored_at > entry.stored_at)
        {
            return None;
        }
        self.remove_variant(entry.url, entry.variant, entry.stored_at);
        if let Some(ids) = self.urls.get(&entry.url) {
            if ids.len() >= MAX_VARIANTS {
                let coldest = ids[0];
                self.remove(coldest);
            }
        }
        let (size, url) = (entry.size(), entry.url);
        let id = self.nodes.insert(Node {
            entry,
            list,
            newer: NONE,
            older: NONE,
        });
        self.push_newest(id);
        self.urls.entry(url).or_default().push(id);
        self.lists[list].bytes += size;
        Some(id)
    }

    /// Only when a peer's evictions were missed (its channel was full) do replicas exceed
    /// what the other workers may own.
    fn trim_replicas(&mut self) {
        while self.bytes() > self.max_bytes && self.lists[REPLICA].oldest != NONE {
            self.remove(self.lists[REPLICA].oldest);
        }
    }

    /// Removes every variant of `url` whose response arrived at or before `at`.
    pub fn remove_url(&mut self, url: u64, at: Instant) {
        if let Some(ids) = self.urls.get(&url).cloned() {
            for id in ids {
                if self.nodes[id].entry.stored_at <= at {
                    self.remove(id);
                }
            }
        }
    }

    fn variant(&self, url: u64, variant: u64) -> Option<usize> {
        self.urls.get(&url).and_then(|ids| {
            ids.iter()
                .copied()
                .find(|&id| self.nodes[id].entry.variant == variant)
        })
    }

    /// Removes the variant if its response arrived at or before `at`.
    pub fn remove_variant(&mut self, url: u64, variant: u64, at: Instant) {
        if let Some(id) = self.variant(url, variant) {
            if self.nodes[id].entry.stored_at <= at {
                self.remove(id);
            }
        }
    }

    /// Removes the entries `matches` selects; returns how many.
    pub fn remove_where(&mut self, matches: impl Fn(&Entry) -> bool) -> usize {
        let ids: Vec<usize> = self
            .nodes
            .iter()
            .filter(|(_, n)| matches(&n.entry))
            .map(|(id, _)| id)
            .collect();
        for &id in &ids {
            self.remove(id);
        }
        ids.len()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::{Duration, Instant};

    use bytes::Bytes;

    use super::*;

    pub(in crate::cache) fn entry(url: u64, variant: u64, body: usize) -> Arc<Entry> {
        Arc::new(Entry {
            url,
            variant,
            vary: vec![],
            target: format!("/u{url}").into_bytes().into(),
            host: Box::default(),
            request_headers: Box::default(),
            replay: Box::default(),
            authorized: false,
            status: 200,
            reason: Bytes::new(),
            head: Bytes::new(),
            body: Bytes::from(vec![0u8; body]),
            etag: None,
            last_modified: None,
            date: None,
            stored_at: Instant::now(),
            initial_age: Duration::ZERO,
            freshness: Duration::from_secs(60),
            stale_while_revalidate: Duration::ZERO,
            must_revalidate: false,
            stale_if_error: None,
        })
    }

    #[test]
    fn evicts_least_recently_used_to_stay_within_max_bytes() {
        let size = entry(0, 0, 1000).size();
        let mut s = Store::new(size * 3, 1);
        for url in 1..=3 {
            assert!(s.insert(entry(url, 0, 1000)).is_empty());
        }
        assert!(s.get(1, |_| 0).is_some()); // 1 is now the newest
        let evicted = s.insert(entry(4, 0, 1000));
        assert_eq!(evicted.len(), 1);
        assert_eq!((evicted[0].0, evicted[0].1), (2, 0));
        assert!(s.get(2, |_| 0).is_none());
        assert!(s.get(1, |_| 0).is_some());
        assert_eq!(s.bytes(), size * 3);
    }

    #[test]
    fn workers_storing_at_once_hold_one_set_within_max_bytes() {
        // Two workers each store 20 entries at once in a cache that fits 8; then each applies
        // the other's batch (entries and evictions), as the sync does.
        let size = entry(100, 0, 1000).size(); // the larger target of the two workers'
        let (mut a, mut b) = (Store::new(size * 8, 2), Store::new(size * 8, 2));
        let (mut from_a, mut from_b) = (Vec::new(), Vec::new());
        for i in 0..20u64 {
            for (store, batch, url) in [(&mut a, &mut from_a, i), (&mut b, &mut from_b, 100 + i)] {
                let e = entry(url, 0, 1000);
                batch.push((Arc::clone(&e), store.insert(e)));
            }
            // Hits on a worker's own entries do not change what the other holds.
            assert!(a.get(i, |_| 0).is_some());
        }
        for (store, batch) in [(&mut b, &from_a), (&mut a, &from_b)] {
            for (e, evicted) in batch {
                store.insert_replica(Arc::clone(e));
                for &(url, variant, at) in evicted {
                    store.remove_variant(url, variant, at);
                }
            }
        }
        let held = |s: &Store| {
            let mut urls: Vec<u64> = s.nodes.iter().map(|(_, n)| n.entry.url).collect();
            urls.sort_unstable();
            urls
        };
        assert_eq!(held(&a), held(&b));
        // Each worker's four most recent.
        assert_eq!(held(&a), [16, 17, 18, 19, 116, 117, 118, 119]);
        assert!(a.bytes() <= size * 8 && b.bytes() <= size * 8);
    }

    #[test]
    fn variants_are_kept_apart_and_urls_removed_whole() {
        let mut s = Store::new(1 << 20, 1);
        s.insert(entry(7, 1, 10));
        s.insert(entry(7, 2, 10));
        assert_eq!(s.get(7, |_| 2).unwrap().variant, 2);
        assert!(s.get(7, |_| 3).is_none());
        s.insert(entry(7, 2, 20));
        assert_eq!(s.len(), 2);
        s.remove_url(7, Instant::now());
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn of_two_entries_for_one_key_the_newer_stays_whichever_arrives_last() {
        let older = entry(5, 0, 10);
        let mut newer = Arc::try_unwrap(entry(5, 0, 20)).expect("unique");
        newer.stored_at = older.stored_at + Duration::from_millis(1);
        let newer = Arc::new(newer);
        for order in [[&older, &newer], [&newer, &older]] {
            let mut s = Store::new(1 << 20, 2);
            for e in order {
                s.insert_replica(Arc::clone(e));
            }
            assert_eq!(s.get(5, |_| 0).unwrap().body.len(), 20);
        }
        // A removal takes only what is not newer than it.
        let mut s = Store::new(1 << 20, 2);
        s.insert_replica(Arc::clone(&newer));
        s.remove_url(5, older.stored_at);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn prefix_purge_removes_matching_targets() {
        let mut s = Store::new(1 << 20, 1);
        s.insert(entry(11, 0, 1));
        s.insert(entry(12, 0, 1));
        s.insert(entry(21, 0, 1));
        assert_eq!(s.remove_where(|e| e.target.starts_with(b"/u1")), 2);
        assert_eq!(s.len(), 1);
    }
}
