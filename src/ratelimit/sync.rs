//! The sync thread: holds every limit's global token buckets, applies the workers' reports of
//! what they admitted, and every sync interval hands each worker its grants (see the module
//! docs of `ratelimit` for the algorithm and its error bound). Reports and grants travel over
//! crossbeam channels; a worker reads its grants on its tick.
//!
//! Grants go only for keys with recent demand, and only to workers that have reported the key:
//! a worker ignores grants for keys it does not hold, and idle keys need no coordination.

use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use crossbeam_channel::{Receiver, Sender};

use super::{Grants, KeyGrant, Report, FLOOR_SHARE};
use crate::config::{RateLimit, RateLimitId};

/// A key idle and full for this many rounds is forgotten (it is then the same as a new key).
const FORGET_AFTER_ROUNDS: u32 = 4;
/// Demand below this (it halves every round) no longer earns grants.
const ACTIVE_DEMAND: f64 = 0.01;

/// One key's global bucket. Per-worker figures live in `Table::demand` and `Table::seen`, at
/// `index * workers + worker`, so that a key costs no allocation of its own.
struct Bucket {
    key: u64,
    /// Tokens in the global bucket (briefly negative after a race).
    level: f64,
    refilled: Instant,
    idle_rounds: u32,
}

/// Every key of one limit.
struct Table {
    rate: f64,
    burst: f64,
    interval: Duration,
    next_round: Instant,
    workers: usize,
    index: AHashMap<u64, u32>,
    buckets: Vec<Bucket>,
    /// Recent demand per key and worker (halved every round, so recent rounds weigh most).
    demand: Vec<f64>,
    /// Whether the worker has reported the key (so holds it and can use grants for it).
    seen: Vec<bool>,
    /// The latest report sequence seen from each worker.
    basis: Vec<u64>,
}

impl Table {
    fn new(limit: &RateLimit, workers: usize, now: Instant) -> Table {
        Table {
            rate: limit.rate,
            burst: limit.burst,
            interval: limit.sync_interval,
            next_round: now + limit.sync_interval,
            workers,
            index: AHashMap::new(),
            buckets: Vec::new(),
            demand: Vec::new(),
            seen: Vec::new(),
            basis: vec![0; workers],
        }
    }

    fn refill(&mut self, i: usize, now: Instant) {
        let b = &mut self.buckets[i];
        let dt = now.saturating_duration_since(b.refilled).as_secs_f64();
        b.level = (b.level + self.rate * dt).min(self.burst);
        b.refilled = now;
    }

    fn bucket(&mut self, key: u64, now: Instant) -> usize {
        if let Some(&i) = self.index.get(&key) {
            return i as usize;
        }
        let i = self.buckets.len();
        self.buckets.push(Bucket {
            key,
            level: self.burst,
            refilled: now,
            idle_rounds: 0,
        });
        self.demand.extend(std::iter::repeat_n(0.0, self.workers));
        self.seen.extend(std::iter::repeat_n(false, self.workers));
        self.index.insert(key, i as u32);
        i
    }

    /// Removes bucket `i` by moving the last one into its place.
    fn forget(&mut self, i: usize) {
        let w = self.workers;
        let last = self.buckets.len() - 1;
        self.index.remove(&self.buckets[i].key);
        if i != last {
            self.buckets.swap(i, last);
            for k in 0..w {
                self.demand.swap(i * w + k, last * w + k);
                self.seen.swap(i * w + k, last * w + k);
            }
            self.index.insert(self.buckets[i].key, i as u32);
        }
        self.buckets.pop();
        self.demand.truncate(last * w);
        self.seen.truncate(last * w);
    }
}

/// Starts the sync thread. It ends when every worker has dropped its report sender.
pub fn spawn(
    limits: &[RateLimit],
    workers: usize,
    reports: Receiver<Report>,
    grants: Vec<Sender<Grants>>,
) -> std::io::Result<JoinHandle<()>> {
    let now = Instant::now();
    let mut tables: Vec<Table> = limits.iter().map(|l| Table::new(l, workers, now)).collect();
    thread::Builder::new()
        .name("ringway-sync".into())
        .spawn(move || loop {
            let next = tables.iter().map(|t| t.next_round).min().unwrap_or(now);
            let wait = next.saturating_duration_since(Instant::now());
            match reports.recv_timeout(wait) {
                Ok(report) => apply_report(&mut tables, report),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            for (i, table) in tables.iter_mut().enumerate() {
                if table.next_round <= now {
                    table.next_round = now + table.interval;
                    round(RateLimitId(i as u16), table, now, &grants);
                }
            }
        })
}

fn apply_report(tables: &mut [Table], report: Report) {
    let Some(table) = tables.get_mut(usize::from(report.limit.0)) else {
        return;
    };
    if report.worker >= table.workers {
        return;
    }
    let now = Instant::now();
    table.basis[report.worker] = report.seq;
    for k in report.keys {
        let i = table.bucket(k.key, now);
        table.refill(i, now);
        let slot = i * table.workers + report.worker;
        table.buckets[i].level -= f64::from(k.consumed);
        table.buckets[i].idle_rounds = 0;
        table.demand[slot] += f64::from(k.demand);
        table.seen[slot] = true;
    }
}

/// Splits what each active key's bucket can afford until the next round among the workers.
fn round(id: RateLimitId, table: &mut Table, now: Instant, grants: &[Sender<Grants>]) {
    let w = table.workers;
    let mut out: Vec<Vec<KeyGrant>> = vec![Vec::new(); w];
    let mut shares = vec![0.0; w];
    let mut i = 0;
    while i < table.buckets.len() {
        table.refill(i, now);
        let demand = &table.demand[i * w..(i + 1) * w];
        let total: f64 = demand.iter().sum();
        let bucket = &mut table.buckets[i];
        if total < ACTIVE_DEMAND {
            if bucket.level >= table.burst {
                bucket.idle_rounds += 1;
                if bucket.idle_rounds > FORGET_AFTER_ROUNDS {
                    table.forget(i);
                    continue;
                }
                // Idle and full again: the holders may admit a whole burst (a grant that is
                // lost is repeated each round until the key is forgotten).
                for (k, keys) in out.iter_mut().enumerate() {
                    if table.seen[i * w + k] {
                        keys.push(KeyGrant {
                            key: bucket.key,
                            tokens: table.burst,
                            share: 1.0,
                        });
                    }
                }
            }
            i += 1;
            continue;
        }
        // A bucket in debt (workers admitted more than it held, racing on a full key) grants
        // nothing until it has refilled from the debt.
        let available = (bucket.level + table.rate * table.interval.as_secs_f64()).max(0.0);
        let mut sum = 0.0;
        for (s, d) in shares.iter_mut().zip(demand) {
            *s = (d / total).max(FLOOR_SHARE);
            sum += *s;
        }
        for (k, share) in shares.iter().enumerate() {
            if table.seen[i * w + k] {
                out[k].push(KeyGrant {
                    key: bucket.key,
                    tokens: available * share / sum,
                    share: share / sum,
                });
            }
        }
        for d in &mut table.demand[i * w..(i + 1) * w] {
            *d /= 2.0;
        }
        i += 1;
    }
    for (k, keys) in out.into_iter().enumerate() {
        if !keys.is_empty() {
            // Grants replace each other: one a busy worker has not read yet is superseded by
            // the next, so dropping it when the channel is full loses nothing lasting.
            let _ = grants[k].try_send(Grants {
                limit: id,
                basis: table.basis[k],
                keys,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimitKey;
    use crate::ratelimit::KeyReport;

    fn table() -> Table {
        let limit = RateLimit {
            name: "l".into(),
            key: RateLimitKey::ClientIp,
            rate: 100.0,
            burst: 200.0,
            max_keys: 10,
            sync_interval: Duration::from_millis(50),
            headers: true,
        };
        Table::new(&limit, 2, Instant::now())
    }

    fn report(worker: usize, consumed: u32, demand: u32) -> Report {
        Report {
            worker,
            limit: RateLimitId(0),
            seq: 1,
            keys: vec![KeyReport {
                key: 9,
                consumed,
                demand,
            }],
        }
    }

    fn grants_for(tables: &mut [Table]) -> (Grants, Grants) {
        let (tx0, rx0) = crossbeam_channel::unbounded();
        let (tx1, rx1) = crossbeam_channel::unbounded();
        round(RateLimitId(0), &mut tables[0], Instant::now(), &[tx0, tx1]);
        (rx0.try_recv().unwrap(), rx1.try_recv().unwrap())
    }

    #[test]
    fn grants_of_a_round_add_up_to_what_the_bucket_affords() {
        let mut tables = vec![table()];
        apply_report(&mut tables, report(0, 20, 30));
        apply_report(&mut tables, report(1, 20, 10));
        let (g0, g1) = grants_for(&mut tables);
        let total = g0.keys[0].tokens + g1.keys[0].tokens;
        // 200 in the bucket, 40 consumed, one interval (5 tokens) of refill ahead.
        assert!((total - 165.0).abs() < 0.5, "{total}");
        assert!((g0.keys[0].share - 0.75).abs() < 1e-9);
        assert_eq!((g0.basis, g1.basis), (1, 1));
    }

    #[test]
    fn a_worker_without_demand_keeps_the_floor_share() {
        let mut tables = vec![table()];
        apply_report(&mut tables, report(0, 5, 50));
        apply_report(&mut tables, report(1, 0, 0));
        let (g0, g1) = grants_for(&mut tables);
        assert!((g1.keys[0].share - FLOOR_SHARE / (1.0 + FLOOR_SHARE)).abs() < 1e-9);
        assert!(g0.keys[0].share > 0.97);
    }

    #[test]
    fn a_bucket_in_debt_grants_nothing_until_repaid() {
        let mut tables = vec![table()];
        // Both workers admitted a whole burst from their optimistic quota: 200 over the bucket.
        apply_report(&mut tables, report(0, 200, 200));
        apply_report(&mut tables, report(1, 200, 200));
        let (g0, g1) = grants_for(&mut tables);
        assert_eq!((g0.keys[0].tokens, g1.keys[0].tokens), (0.0, 0.0));
    }

    #[test]
    fn an_idle_key_whose_bucket_is_full_again_gets_a_whole_burst_on_every_holder() {
        let mut tables = vec![table()];
        apply_report(&mut tables, report(0, 0, 1));
        apply_report(&mut tables, report(1, 0, 1));
        let (tx0, rx0) = crossbeam_channel::unbounded();
        let (tx1, rx1) = crossbeam_channel::unbounded();
        let full = |g: Grants| g.keys.iter().any(|k| k.tokens == 200.0 && k.share == 1.0);
        let mut rounds = 0;
        while !(rx0.try_iter().any(full) && rx1.try_iter().any(full)) {
            rounds += 1;
            assert!(rounds < 20, "no full grant after the demand died down");
            round(
                RateLimitId(0),
                &mut tables[0],
                Instant::now(),
                &[tx0.clone(), tx1.clone()],
            );
        }
    }

    #[test]
    fn idle_full_keys_are_forgotten_and_others_move_into_their_place() {
        let mut tables = vec![table()];
        apply_report(&mut tables, report(0, 0, 1));
        let mut other = report(1, 0, 1);
        other.keys[0].key = 10;
        apply_report(&mut tables, other);
        let (tx, _rx) = crossbeam_channel::unbounded();
        let (tx1, _rx1) = crossbeam_channel::unbounded();
        for _ in 0..20 {
            round(
                RateLimitId(0),
                &mut tables[0],
                Instant::now(),
                &[tx.clone(), tx1.clone()],
            );
        }
        assert!(tables[0].buckets.is_empty());
        assert!(tables[0].index.is_empty() && tables[0].demand.is_empty());
    }
}
