//! Rate limiting: per-worker admission against a process-wide token bucket.
//!
//! # Algorithm
//!
//! For each limit and key there is one *global* token bucket (capacity `burst` = B, refill
//! `rate` = r per second), held by the sync thread (`sync`). Workers never touch it: each
//! admits from its own *quota* for the key, a plain number of tokens, with no lock.
//!
//! Every sync interval T each worker reports, per key it saw, what it admitted (`consumed`) and
//! what was asked of it (`demand`, admitted or not). The sync thread applies the consumption
//! to the global bucket (refilled for the elapsed time, capped at B) and hands out the tokens
//! the bucket can afford until the next round, L + r·T (L: tokens in the bucket now), split
//! between workers by their share of recent demand, each worker getting at least a floor share
//! f = 2% so that traffic moving to it is seen. Every worker receives a quota for every active
//! key, so a key whose traffic lands on one worker gets almost all of it (1 − (N−1)·f), and a
//! key spread over N workers does not get N times the rate: the quotas of one round add up to
//! what the bucket can afford. A worker sets its quota to the grant minus what it admitted
//! since the report the grant was based on, so consumption racing a grant is not counted twice
//! or not at all.
//!
//! A key a worker does not hold (never seen, or evicted) starts with a full bucket's quota, B:
//! a full bucket admits its burst at once, whichever worker the burst lands on. When a key has
//! had no demand anywhere and its global bucket is full again, the sync thread says so to every
//! worker that holds it (a grant of B at share 1), so a burst after idle gets B too, not the
//! remainder of the last grant.
//!
//! # Error bound
//!
//! With N workers, over any period t, per key: admitted ≤ r·t + N·B. The excess over one bucket,
//! at most (N−1)·B, arises only when a burst on a full (new or idle) key lands on several workers
//! within one round (T plus a tick), each admitting from its optimistic B. The sync thread
//! charges all of it to the global bucket, which then grants nothing until it has refilled from
//! that debt (grants are what the bucket holds plus one interval of refill, never less than
//! zero), so over a period that includes the repayment admitted ≤ r·t + B, and the excess cannot
//! recur before the bucket is full again. A burst on one worker gets exactly B. Under sustained
//! demand above the rate, admitted ≥ r·t + B − r·(T + t_tick)·k − f·(r·T + B), where k is the
//! number of times the traffic moved wholly to another worker (each move costs at most one round
//! at the floor share) and t_tick (25 ms) is how late a worker may apply a grant. With r = 100/s,
//! B = 200, T = 50 ms, N = 2 over 5 s: at least about 690 with one move (±2% of 700).
//!
//! # Memory
//!
//! Each worker keeps at most `max_keys` keys per limit in a fixed table; when it is full, a
//! clock sweep evicts a key not seen since the hand last passed it (an evicted key behaves as a
//! new one). The sync thread forgets keys whose global bucket is full and idle.

pub mod sync;

use std::time::Duration;

use ahash::AHashMap;

use crate::config::{RateLimit, RateLimitId, RateLimitKey};
use crate::hash::stable_hash;
use crate::http::write::field;

/// The smallest share of a key's grant any worker gets (see the module docs).
pub const FLOOR_SHARE: f64 = 0.02;

use crate::config::MAX_LIMITS_PER_ROUTE;

/// What a refusal tells the client (`RateLimit-*` and `Retry-After` headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub limit: RateLimitId,
    pub info: Headroom,
}

/// The figures behind the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headroom {
    /// `RateLimit-Limit`: the burst.
    pub limit: u64,
    /// `RateLimit-Remaining`: this worker's estimate of the tokens left process-wide.
    pub remaining: u64,
    /// `RateLimit-Reset`: seconds until the bucket would be full again.
    pub reset: u64,
    /// `Retry-After`: seconds until a token is likely.
    pub retry_after: u64,
}

impl Headroom {
    /// `RateLimit-Limit`, `-Remaining`, `-Reset` (IETF draft), and on a refusal `Retry-After`.
    pub fn write_headers(&self, out: &mut Vec<u8>, refused: bool) {
        let mut b = itoa::Buffer::new();
        field(out, b"ratelimit-limit", b.format(self.limit).as_bytes());
        field(
            out,
            b"ratelimit-remaining",
            b.format(self.remaining).as_bytes(),
        );
        field(out, b"ratelimit-reset", b.format(self.reset).as_bytes());
        if refused {
            field(out, b"retry-after", b.format(self.retry_after).as_bytes());
        }
    }
}

/// Admits a request under every limit in `ids` or refuses it: all are checked before any is
/// charged, so a request refused by one limit takes no token from another. `key` gives the
/// request's key hash for a limit's key kind. On admission, returns the headroom of the first
/// limit that puts `RateLimit-*` headers on admitted responses.
pub fn admit(
    limiters: &mut [Limiter],
    ids: &[RateLimitId],
    key: impl Fn(&RateLimitKey) -> u64,
) -> Result<Option<Headroom>, Refusal> {
    let ids = &ids[..ids.len().min(MAX_LIMITS_PER_ROUTE)];
    let mut slots = [0usize; MAX_LIMITS_PER_ROUTE];
    for (n, id) in ids.iter().enumerate() {
        let limiter = &mut limiters[usize::from(id.0)];
        let k = key(&limiter.key);
        match limiter.check(k) {
            Ok(slot) => slots[n] = slot,
            Err(info) => return Err(Refusal { limit: *id, info }),
        }
    }
    let mut shown = None;
    for (id, &slot) in ids.iter().zip(&slots) {
        let l = &mut limiters[usize::from(id.0)];
        let info = l.charge(slot);
        if l.headers && shown.is_none() {
            shown = Some(info);
        }
    }
    Ok(shown)
}

/// One key's state on one worker.
#[derive(Debug, Clone, Copy)]
struct Slot {
    key: u64,
    /// Tokens this worker may still admit.
    tokens: f64,
    /// This worker's share of the key, from the last grant (1 until one arrives).
    share: f64,
    /// Admitted since the last report, and in the last report.
    consumed: u32,
    consumed_reported: u32,
    /// Asked since the last report.
    demand: u32,
    /// Seen since the eviction hand last passed.
    referenced: bool,
}

/// One limit on one worker.
pub struct Limiter {
    pub id: RateLimitId,
    pub name: String,
    pub key: RateLimitKey,
    /// Whether admitted responses carry `RateLimit-*` headers.
    pub headers: bool,
    /// When this worker last reported.
    pub last_report: std::time::Instant,
    rate: f64,
    burst: f64,
    interval: Duration,
    max_keys: usize,
    index: AHashMap<u64, u32>,
    slots: Vec<Slot>,
    hand: usize,
    /// Sequence of this worker's reports, so that grants can say which they answer.
    report_seq: u64,
    /// Keys evicted to make room (a gauge of key churn).
    pub evictions: u64,
}

/// What a worker tells the sync thread about one key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyReport {
    pub key: u64,
    pub consumed: u32,
    pub demand: u32,
}

/// A worker's report for one limit.
#[derive(Debug, Clone)]
pub struct Report {
    pub worker: usize,
    pub limit: RateLimitId,
    pub seq: u64,
    pub keys: Vec<KeyReport>,
}

/// A grant for one key to one worker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyGrant {
    pub key: u64,
    pub tokens: f64,
    pub share: f64,
}

/// Grants for one worker and limit, answering its report `basis`.
#[derive(Debug, Clone)]
pub struct Grants {
    pub limit: RateLimitId,
    pub basis: u64,
    pub keys: Vec<KeyGrant>,
}

impl Limiter {
    pub fn new(id: RateLimitId, cfg: &RateLimit) -> Limiter {
        Limiter {
            id,
            name: cfg.name.clone(),
            key: cfg.key.clone(),
            headers: cfg.headers,
            last_report: std::time::Instant::now(),
            rate: cfg.rate,
            burst: cfg.burst,
            interval: cfg.sync_interval,
            max_keys: cfg.max_keys,
            // Reserved up front so the table never doubles (and briefly holds twice its size);
            // pages are touched only as keys arrive.
            index: AHashMap::with_capacity(cfg.max_keys.min(1 << 20)),
            slots: Vec::with_capacity(cfg.max_keys.min(1 << 20)),
            hand: 0,
            report_seq: 0,
            evictions: 0,
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Keys held now (at most `max_keys`).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The hash a key is held under.
    pub fn hash_key(key: &[u8]) -> u64 {
        stable_hash(key)
    }

    /// The slot for `key`, creating it (evicting if the table is full).
    fn slot(&mut self, key: u64) -> usize {
        if let Some(&i) = self.index.get(&key) {
            return i as usize;
        }
        let fresh = Slot {
            key,
            tokens: self.burst,
            share: 1.0,
            consumed: 0,
            consumed_reported: 0,
            demand: 0,
            referenced: true,
        };
        let i = if self.slots.len() < self.max_keys {
            self.slots.push(fresh);
            self.slots.len() - 1
        } else {
            let victim = self.sweep();
            self.index.remove(&self.slots[victim].key);
            self.evictions += 1;
            self.slots[victim] = fresh;
            victim
        };
        self.index.insert(key, i as u32);
        i
    }

    /// Clock (second-chance) sweep: the first slot not referenced since the hand last passed.
    /// Ends within two turns of the hand.
    fn sweep(&mut self) -> usize {
        loop {
            let i = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            let slot = &mut self.slots[i];
            if !slot.referenced {
                return i;
            }
            slot.referenced = false;
        }
    }

    /// Whether a request with this key may pass, counting it as demand; `charge` takes the
    /// token. A route with several limits checks them all before charging any.
    #[inline]
    pub fn check(&mut self, key: u64) -> Result<usize, Headroom> {
        let i = self.slot(key);
        let slot = &mut self.slots[i];
        slot.referenced = true;
        slot.demand = slot.demand.saturating_add(1);
        if slot.tokens >= 1.0 {
            Ok(i)
        } else {
            Err(self.headroom(i))
        }
    }

    /// Takes a token for a request `check` admitted.
    #[inline]
    pub fn charge(&mut self, slot: usize) -> Headroom {
        let s = &mut self.slots[slot];
        s.tokens -= 1.0;
        s.consumed = s.consumed.saturating_add(1);
        self.headroom(slot)
    }

    fn headroom(&self, slot: usize) -> Headroom {
        let s = &self.slots[slot];
        let remaining = (s.tokens.max(0.0) / s.share.max(FLOOR_SHARE)).min(self.burst);
        let missing = (self.burst - remaining).max(0.0);
        Headroom {
            limit: self.burst as u64,
            remaining: remaining as u64,
            reset: (missing / self.rate).ceil() as u64,
            retry_after: ((1.0 - s.tokens).max(0.0) / (self.rate * s.share.max(FLOOR_SHARE)))
                .ceil()
                .max(1.0) as u64,
        }
    }

    /// What this worker did with each key since the last report; `None` if nothing (then no
    /// report is counted, so grants keep answering the last one sent).
    pub fn report(&mut self, worker: usize) -> Option<Report> {
        if self.slots.iter().all(|s| s.demand == 0 && s.consumed == 0) {
            return None;
        }
        let mut keys = Vec::new();
        for s in self.slots.iter_mut() {
            if s.demand > 0 || s.consumed > 0 {
                keys.push(KeyReport {
                    key: s.key,
                    consumed: s.consumed,
                    demand: s.demand,
                });
            }
            s.consumed_reported = s.consumed;
            s.consumed = 0;
            s.demand = 0;
        }
        self.report_seq += 1;
        Some(Report {
            worker,
            limit: self.id,
            seq: self.report_seq,
            keys,
        })
    }

    /// Applies the sync thread's grants. A grant answers report `basis`: what was admitted
    /// since then (one later report's worth at most) comes off it.
    pub fn apply(&mut self, grants: &Grants) {
        let lag = self.report_seq.saturating_sub(grants.basis);
        if lag > 1 {
            return; // Stale: a newer grant is on its way.
        }
        for g in &grants.keys {
            let Some(&i) = self.index.get(&g.key) else {
                continue;
            };
            let s = &mut self.slots[i as usize];
            let since = f64::from(s.consumed)
                + if lag == 1 {
                    f64::from(s.consumed_reported)
                } else {
                    0.0
                };
            s.tokens = g.tokens - since;
            s.share = g.share;
        }
    }
}

/// Bytes a key costs a worker's table: the slot plus its index entry (a rough upper bound of
/// the hash map's per-entry overhead included).
pub const BYTES_PER_KEY: usize =
    std::mem::size_of::<Slot>() + 2 * std::mem::size_of::<(u64, u32)>();

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: f64, burst: f64, max_keys: usize) -> Limiter {
        let cfg = RateLimit {
            name: "l".into(),
            key: RateLimitKey::ClientIp,
            rate,
            burst,
            max_keys,
            sync_interval: Duration::from_millis(50),
            headers: true,
        };
        Limiter::new(RateLimitId(0), &cfg)
    }

    #[test]
    fn a_new_key_starts_with_a_full_burst() {
        let mut l = limiter(100.0, 200.0, 10);
        let admitted = (0..300)
            .filter(|_| l.check(7).map(|i| l.charge(i)).is_ok())
            .count();
        assert_eq!(admitted, 200);
    }

    #[test]
    fn grants_subtract_what_was_admitted_since_their_report() {
        let mut l = limiter(100.0, 200.0, 10);
        for _ in 0..3 {
            let i = l.check(1).unwrap();
            l.charge(i);
        }
        let report = l.report(0).unwrap();
        assert_eq!(
            report.keys,
            [KeyReport {
                key: 1,
                consumed: 3,
                demand: 3
            }]
        );
        let i = l.check(1).unwrap();
        l.charge(i);
        l.apply(&Grants {
            limit: RateLimitId(0),
            basis: report.seq,
            keys: vec![KeyGrant {
                key: 1,
                tokens: 10.0,
                share: 1.0,
            }],
        });
        let admitted = (0..20)
            .filter(|_| l.check(1).map(|i| l.charge(i)).is_ok())
            .count();
        assert_eq!(admitted, 9);
    }

    #[test]
    fn the_table_never_holds_more_than_max_keys() {
        let mut l = limiter(100.0, 200.0, 1000);
        for k in 0..200_000u64 {
            let _ = l.check(k);
        }
        assert_eq!(l.len(), 1000);
        assert_eq!(l.slots.len(), 1000);
        assert!(l.evictions >= 199_000);
    }
}
