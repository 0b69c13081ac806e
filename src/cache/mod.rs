//! Response caching. Each worker has its own index (`Store`: an LRU by bytes, no lock); the
//! entries in it are `Arc<Entry>` whose body is `bytes::Bytes`, so an entry one worker stores is
//! handed to the others without copying its bytes. A worker sends every entry it stores and every
//! key it removes (invalidated, purged or evicted for space) to every other worker over crossbeam
//! channels at once, and applies what it received before every lookup, so that the workers are
//! one cache (see `coherence`). Each worker owns `max_bytes / workers` and evicts only the entries
//! it stored, so the workers hold one set of entries, whose bodies count once, within `max_bytes`
//! (see `store`).
//!
//! What may be stored and for how long follows RFC 9111 (`policy`). Concurrent misses for one
//! key on a worker make one upstream request (`Flight`); the others wait for it, bounded.

pub mod coherence;
pub mod policy;
pub mod range;
pub mod record;
mod store;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use ahash::AHashMap;
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};

use coherence::{Peers, Purged, Tombstones};
pub use store::Store;

use crate::config::CacheSettings;
use std::hash::Hasher;

use crate::hash::stable_hasher;

/// A stored response, shared by every worker that holds it.
#[derive(Debug)]
pub struct Entry {
    /// Hash of host and request-target: what an unsafe request invalidates.
    pub url: u64,
    /// Hash of the request's partition (see `filter::cache`: scheme, port, and on a
    /// per-consumer route the identity) and its values for the route's `key_headers` and the
    /// response's `Vary`.
    pub variant: u64,
    /// Lower-cased names of the request headers the variant depends on.
    pub vary: Vec<Box<[u8]>>,
    /// The request-target, for prefix purges.
    pub target: Box<[u8]>,
    /// The request's Host, and its header lines the variant depends on: for revalidating.
    pub host: Box<[u8]>,
    pub request_headers: Box<[u8]>,
    /// What the gateway told the upstream about the request that stored it (forwarding and
    /// identity lines): a background revalidation sends the same, never another consumer's.
    pub replay: Box<[u8]>,
    /// Stored for a request with credentials, shared across consumers: RFC 9111 §3.5 decides
    /// whether a new representation from a revalidation may replace it.
    pub authorized: bool,
    pub status: u16,
    /// The reason phrase, shared with every answer from the entry.
    pub reason: Bytes,
    /// The response's header lines as they are replayed (no framing, hop-by-hop, Age).
    pub head: Bytes,
    pub body: Bytes,
    pub etag: Option<Box<[u8]>>,
    pub last_modified: Option<(SystemTime, Box<[u8]>)>,
    /// The response's `Date`: what `If-Modified-Since` is compared with when it has no
    /// `Last-Modified` (RFC 9110 §13.1.3).
    pub date: Option<SystemTime>,
    /// When the response arrived, and the age it already had (its `Age`).
    pub stored_at: Instant,
    pub initial_age: Duration,
    pub freshness: Duration,
    pub stale_while_revalidate: Duration,
    pub must_revalidate: bool,
    /// How long past freshness the response's own `stale-if-error` lets it answer when the
    /// origin fails; `None` when it may never (`must-revalidate`, `proxy-revalidate`,
    /// `no-cache`, `s-maxage`: RFC 9111 §4.2.4 and §5.2.2 for a shared cache).
    pub stale_if_error: Option<Duration>,
}

impl Entry {
    /// Bytes this entry accounts for.
    pub fn size(&self) -> usize {
        self.body.len()
            + self.head.len()
            + self.target.len()
            + self.request_headers.len()
            + self.replay.len()
            + 256
    }

    /// Its age now (RFC 9111 §4.2.3, with the arrival time standing in for the request's).
    pub fn age(&self, now: Instant) -> Duration {
        self.initial_age + now.saturating_duration_since(self.stored_at)
    }

    pub fn is_fresh(&self, now: Instant) -> bool {
        self.age(now) < self.freshness
    }

    /// Stale, but within `stale-while-revalidate` (and not `must-revalidate`).
    pub fn may_serve_stale(&self, now: Instant) -> bool {
        !self.must_revalidate && self.age(now) < self.freshness + self.stale_while_revalidate
    }

    /// May answer when the origin has failed: within its own `stale-if-error`, or the route's
    /// `serve_stale_on_error_ms`, past freshness, unless it forbids being served stale.
    pub fn may_serve_on_error(&self, now: Instant, route_window: Duration) -> bool {
        self.stale_if_error
            .is_some_and(|own| self.age(now) < self.freshness + own.max(route_window))
    }
}

/// Hash of a URL: the lower-cased authority (host and port, as the Host field gave them: the
/// upstream hears it as `X-Forwarded-Host` and `X-Forwarded-Port`) and the request-target.
pub fn url_hash(host: &[u8], target: &[u8]) -> u64 {
    let mut h = stable_hasher();
    // Only the name has letters to fold; a port is digits.
    let (name, port) = match host.iter().position(|&b| b == b':') {
        Some(colon) if host.first() != Some(&b'[') => host.split_at(colon),
        _ => (host, &b""[..]),
    };
    write_lowercase(&mut h, name);
    h.write(port);
    h.write_u8(b' ');
    h.write(target);
    h.finish()
}

/// Hash of `partition` and the request's values for `names` (each lower-cased), normalised as
/// RFC 9111 §4.1 allows: every line of a field, split into list items without the whitespace around them, so
/// that `a,b`, `a, b` and two lines `a` and `b` are one variant; the values of fields whose
/// values are case-insensitive compared without case. Missing fields count as empty.
pub fn variant_hash<'a, I: Iterator<Item = &'a [u8]>>(
    partition: u64,
    names: impl Iterator<Item = &'a [u8]>,
    values_of: impl Fn(&'a [u8]) -> I,
) -> u64 {
    let mut h = stable_hasher();
    h.write_u64(partition);
    for name in names {
        h.write(name);
        h.write_u8(b':');
        let fold = CASELESS_VALUES.iter().any(|n| name.eq_ignore_ascii_case(n));
        for value in values_of(name) {
            for item in crate::http::list_items(value) {
                if fold {
                    write_lowercase(&mut h, item);
                } else {
                    h.write(item);
                }
                h.write_u8(b',');
            }
        }
        h.write_u8(b'\n');
    }
    h.finish()
}

/// Request fields whose values compare without case (content codings, charsets, language tags).
const CASELESS_VALUES: [&[u8]; 3] = [b"accept-encoding", b"accept-charset", b"accept-language"];

fn write_lowercase(h: &mut impl Hasher, bytes: &[u8]) {
    for chunk in bytes.chunks(64) {
        let mut lower = [0u8; 64];
        let lower = &mut lower[..chunk.len()];
        lower.copy_from_slice(chunk);
        lower.make_ascii_lowercase();
        h.write(lower);
    }
}

/// What workers tell each other about their caches. Each carries its time (see `coherence`):
/// a removal takes the matching entries whose response arrived at or before `at`.
#[derive(Debug, Clone)]
pub enum Change {
    Stored(Arc<Entry>),
    /// Every variant of a URL.
    Url {
        url: u64,
        at: Instant,
    },
    /// One variant its owner evicted for space (`at`: the evicted entry's `stored_at`).
    Variant {
        url: u64,
        variant: u64,
        at: Instant,
    },
    /// Every entry whose request-target starts with this, or is exactly this (on any host).
    Purge(Arc<Purged>, Instant),
}

pub type Batch = Arc<Vec<Change>>;

/// A worker's links: senders to every other worker, and its own inbox.
pub type Links = (Vec<Sender<Batch>>, Receiver<Batch>);

/// A worker's cache: its store, its links to the other workers, what it removed recently, and
/// its flights.
pub struct WorkerCache {
    pub settings: CacheSettings,
    pub store: RefCell<Store>,
    peers: RefCell<Peers>,
    inbox: Receiver<Batch>,
    tombstones: RefCell<Tombstones>,
    flights: RefCell<AHashMap<u64, Rc<Flight>>>,
}

impl WorkerCache {
    pub fn new(settings: CacheSettings, peers: Vec<Sender<Batch>>, inbox: Receiver<Batch>) -> Self {
        WorkerCache {
            store: RefCell::new(Store::new(settings.max_bytes, peers.len() + 1)),
            settings,
            peers: RefCell::new(Peers::new(peers)),
            inbox,
            tombstones: RefCell::new(Tombstones::new(Instant::now())),
            flights: RefCell::new(AHashMap::new()),
        }
    }

    /// Looks `url` up, after applying what the other workers sent (an empty inbox costs one
    /// `try_recv`).
    pub fn get(&self, url: u64, variant_of: impl Fn(&Entry) -> u64) -> Option<Arc<Entry>> {
        self.receive();
        self.store.borrow_mut().get(url, variant_of)
    }

    /// Stores an entry here and sends it to the other workers, unless a removal newer than its
    /// response has been seen.
    pub fn insert(&self, entry: Arc<Entry>) {
        self.receive();
        if self.tombstones.borrow().bury(&entry, Instant::now()) {
            return;
        }
        let evicted = self.store.borrow_mut().insert(Arc::clone(&entry));
        let mut changes = Vec::with_capacity(1 + evicted.len());
        changes.push(Change::Stored(entry));
        changes.extend(
            evicted
                .into_iter()
                .map(|(url, variant, at)| Change::Variant { url, variant, at }),
        );
        self.peers.borrow_mut().publish(changes);
    }

    /// Removes every variant of these URLs here and on the other workers, now.
    pub fn invalidate(&self, urls: &[u64]) {
        let at = Instant::now();
        let changes: Vec<Change> = urls.iter().map(|&url| Change::Url { url, at }).collect();
        self.apply(&changes);
        self.peers.borrow_mut().publish(changes);
    }

    /// Applies what the other workers (or the admin) sent.
    pub fn receive(&self) {
        for batch in self.inbox.try_iter() {
            self.apply(&batch);
        }
    }

    fn apply(&self, changes: &[Change]) {
        let now = Instant::now();
        let mut store = self.store.borrow_mut();
        let mut tombstones = self.tombstones.borrow_mut();
        for change in changes {
            match change {
                Change::Stored(e) if !tombstones.bury(e, now) => {
                    store.insert_replica(Arc::clone(e))
                }
                Change::Stored(_) => {}
                Change::Url { url, at } => {
                    store.remove_url(*url, *at);
                    tombstones.url(*url, *at);
                }
                Change::Variant { url, variant, at } => store.remove_variant(*url, *variant, *at),
                Change::Purge(what, at) => {
                    store.remove_where(|e| e.stored_at <= *at && what.matches(&e.target));
                    tombstones.purge(Arc::clone(what), *at);
                }
            }
        }
    }

    /// The worker's tick: applies the inbox, retries changes a full peer inbox refused, and
    /// forgets old removals.
    pub fn sync(&self, now: Instant) {
        self.receive();
        self.peers.borrow_mut().flush();
        self.tombstones.borrow_mut().expire(now);
    }

    /// The flight for `key` if a request for it is already on its way upstream, or a new
    /// one that this caller leads.
    pub fn flight(&self, key: u64) -> (Rc<Flight>, bool) {
        let mut flights = self.flights.borrow_mut();
        if let Some(f) = flights.get(&key) {
            return (Rc::clone(f), false);
        }
        let f = Rc::new(Flight::default());
        flights.insert(key, Rc::clone(&f));
        (f, true)
    }

    /// Requests waiting for a flight to land.
    pub fn waiting(&self) -> usize {
        self.flights
            .borrow()
            .values()
            .map(|f| f.wakers.borrow().len())
            .sum()
    }

    /// Ends a flight this caller led: waiters look in the cache again.
    pub fn land(&self, key: u64) {
        if let Some(f) = self.flights.borrow_mut().remove(&key) {
            f.done.set(true);
            for w in f.wakers.borrow_mut().drain(..) {
                w.wake();
            }
        }
    }
}

/// A miss being fetched; others asking for the same key wait for it to land.
#[derive(Default)]
pub struct Flight {
    done: Cell<bool>,
    wakers: RefCell<Vec<Waker>>,
}

impl Flight {
    pub async fn landed(&self) {
        std::future::poll_fn(|cx| {
            if self.done.get() {
                return Poll::Ready(());
            }
            let mut wakers = self.wakers.borrow_mut();
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

/// Channels linking every worker's cache to every other's: `(peers, inbox)` per worker, and
/// senders to every worker for the admin's purges.
pub fn links(workers: usize) -> (Vec<Links>, Vec<Sender<Batch>>) {
    let channels: Vec<(Sender<Batch>, Receiver<Batch>)> = (0..workers)
        .map(|_| crossbeam_channel::bounded(1024))
        .collect();
    let all: Vec<Sender<Batch>> = channels.iter().map(|(tx, _)| tx.clone()).collect();
    let per_worker = channels
        .into_iter()
        .enumerate()
        .map(|(i, (_, rx))| {
            let peers = all
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, tx)| tx.clone())
                .collect();
            (peers, rx)
        })
        .collect();
    (per_worker, all)
}
