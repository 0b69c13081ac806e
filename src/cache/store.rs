//! One worker's cache index: entries in a slab threaded on an LRU list, found by URL (each URL
//! with a few variants), evicted from the cold end while the total is over `max_bytes`.

use std::sync::Arc;

use ahash::AHashMap;
use slab::Slab;

use super::{Change, Entry};

/// Variants kept per URL; a new one past this replaces the coldest.
const MAX_VARIANTS: usize = 8;
const NONE: usize = usize::MAX;

struct Node {
    entry: Arc<Entry>,
    /// Towards the most recently used end.
    newer: usize,
    older: usize,
}

pub struct Store {
    max_bytes: usize,
    bytes: usize,
    nodes: Slab<Node>,
    urls: AHashMap<u64, Vec<usize>>,
    newest: usize,
    oldest: usize,
    /// Entries evicted to stay within `max_bytes`.
    pub evictions: u64,
}

impl Store {
    pub fn new(max_bytes: usize) -> Store {
        Store {
            max_bytes,
            bytes: 0,
            nodes: Slab::new(),
            urls: AHashMap::new(),
            newest: NONE,
            oldest: NONE,
            evictions: 0,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn unlink(&mut self, id: usize) {
        let (newer, older) = (self.nodes[id].newer, self.nodes[id].older);
        match newer {
            NONE => self.newest = older,
            n => self.nodes[n].older = older,
        }
        match older {
            NONE => self.oldest = newer,
            o => self.nodes[o].newer = newer,
        }
    }

    fn push_newest(&mut self, id: usize) {
        self.nodes[id].newer = NONE;
        self.nodes[id].older = self.newest;
        match self.newest {
            NONE => self.oldest = id,
            n => self.nodes[n].newer = id,
        }
        self.newest = id;
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
        self.bytes -= node.entry.size();
        if let Some(ids) = self.urls.get_mut(&node.entry.url) {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.urls.remove(&node.entry.url);
            }
        }
        node.entry
    }

    /// Stores `entry` (replacing the same URL and variant); returns what was evicted for
    /// space, as `(url, variant)`.
    pub fn insert(&mut self, entry: Arc<Entry>) -> Vec<(u64, u64)> {
        self.remove_variant(entry.url, entry.variant);
        if entry.size() > self.max_bytes {
            return Vec::new();
        }
        if let Some(ids) = self.urls.get(&entry.url) {
            if ids.len() >= MAX_VARIANTS {
                let coldest = ids[0];
                self.remove(coldest);
            }
        }
        let size = entry.size();
        let url = entry.url;
        let id = self.nodes.insert(Node {
            entry,
            newer: NONE,
            older: NONE,
        });
        self.push_newest(id);
        self.urls.entry(url).or_default().push(id);
        self.bytes += size;
        let mut evicted = Vec::new();
        while self.bytes > self.max_bytes && self.oldest != NONE && self.oldest != id {
            let e = self.remove(self.oldest);
            self.evictions += 1;
            evicted.push((e.url, e.variant));
        }
        evicted
    }

    pub fn remove_url(&mut self, url: u64) {
        if let Some(ids) = self.urls.get(&url).cloned() {
            for id in ids {
                self.remove(id);
            }
        }
    }

    fn remove_variant(&mut self, url: u64, variant: u64) {
        let found = self.urls.get(&url).and_then(|ids| {
            ids.iter()
                .copied()
                .find(|&id| self.nodes[id].entry.variant == variant)
        });
        if let Some(id) = found {
            self.remove(id);
        }
    }

    /// Removes the entries whose request-target `matches`; returns how many.
    pub fn remove_where(&mut self, matches: impl Fn(&[u8]) -> bool) -> usize {
        let ids: Vec<usize> = self
            .nodes
            .iter()
            .filter(|(_, n)| matches(&n.entry.target))
            .map(|(id, _)| id)
            .collect();
        for &id in &ids {
            self.remove(id);
        }
        ids.len()
    }

    /// Applies another worker's (or the admin's) change.
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Stored(entry) => {
                // Their evictions arrive as changes too; ours stay local.
                self.insert(Arc::clone(entry));
            }
            Change::Url(url) => self.remove_url(*url),
            Change::Variant { url, variant } => self.remove_variant(*url, *variant),
            Change::Prefix(prefix) => {
                self.remove_where(|t| t.starts_with(prefix));
            }
            Change::Target(target) => {
                self.remove_where(|t| t == &target[..]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use bytes::Bytes;

    use super::*;

    fn entry(url: u64, variant: u64, body: usize) -> Arc<Entry> {
        Arc::new(Entry {
            url,
            variant,
            vary: vec![],
            target: format!("/u{url}").into_bytes().into(),
            host: Box::default(),
            request_headers: Box::default(),
            status: 200,
            reason: Box::default(),
            head: Bytes::new(),
            body: Bytes::from(vec![0u8; body]),
            etag: None,
            last_modified: None,
            stored_at: Instant::now(),
            initial_age: Duration::ZERO,
            freshness: Duration::from_secs(60),
            stale_while_revalidate: Duration::ZERO,
            must_revalidate: false,
        })
    }

    #[test]
    fn evicts_least_recently_used_to_stay_within_max_bytes() {
        let size = entry(0, 0, 1000).size();
        let mut s = Store::new(size * 3);
        for url in 1..=3 {
            assert!(s.insert(entry(url, 0, 1000)).is_empty());
        }
        assert!(s.get(1, |_| 0).is_some()); // 1 is now the newest
        let evicted = s.insert(entry(4, 0, 1000));
        assert_eq!(evicted, [(2, 0)]);
        assert!(s.get(2, |_| 0).is_none());
        assert!(s.get(1, |_| 0).is_some());
        assert_eq!(s.bytes(), size * 3);
    }

    #[test]
    fn variants_are_kept_apart_and_urls_removed_whole() {
        let mut s = Store::new(1 << 20);
        s.insert(entry(7, 1, 10));
        s.insert(entry(7, 2, 10));
        assert_eq!(s.get(7, |_| 2).unwrap().variant, 2);
        assert!(s.get(7, |_| 3).is_none());
        s.insert(entry(7, 2, 20));
        assert_eq!(s.len(), 2);
        s.remove_url(7);
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn prefix_purge_removes_matching_targets() {
        let mut s = Store::new(1 << 20);
        s.insert(entry(11, 0, 1));
        s.insert(entry(12, 0, 1));
        s.insert(entry(21, 0, 1));
        assert_eq!(s.remove_where(|t| t.starts_with(b"/u1")), 2);
        assert_eq!(s.len(), 1);
    }
}
