//! The sync thread: holds every limit's global token buckets, applies the workers' reports of
//! what they admitted, and every sync interval hands each worker its grants (see the module
//! docs of `ratelimit` for the algorithm and its error bound). Reports and grants travel over
//! crossbeam channels; a worker reads its grants on its tick.

use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use crossbeam_channel::{Receiver, Sender};

use super::{Grants, KeyGrant, Report, FLOOR_SHARE};
use crate::config::{RateLimit, RateLimitId};

/// A key idle and full for this many rounds is forgotten (it is then the same as a new key).
const FORGET_AFTER_ROUNDS: u32 = 4;

struct Bucket {
    /// Tokens in the global bucket (may be briefly negative after a race).
    level: f64,
    refilled: Instant,
    /// Recent demand per worker (halved every round, so recent rounds weigh most).
    demand: Vec<f64>,
    idle_rounds: u32,
}

struct LimitState {
    rate: f64,
    burst: f64,
    interval: Duration,
    next_round: Instant,
    keys: AHashMap<u64, Bucket>,
    /// The latest report sequence seen from each worker.
    basis: Vec<u64>,
}

impl Bucket {
    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.level = (self.level + rate * dt).min(burst);
        self.refilled = now;
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
    let mut state: Vec<LimitState> = limits
        .iter()
        .map(|l| LimitState {
            rate: l.rate,
            burst: l.burst,
            interval: l.sync_interval,
            next_round: now + l.sync_interval,
            keys: AHashMap::new(),
            basis: vec![0; workers],
        })
        .collect();
    thread::Builder::new()
        .name("ringway-sync".into())
        .spawn(move || loop {
            let next = state.iter().map(|l| l.next_round).min().unwrap_or(now);
            let wait = next.saturating_duration_since(Instant::now());
            match reports.recv_timeout(wait) {
                Ok(report) => apply_report(&mut state, report, workers),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            for (i, limit) in state.iter_mut().enumerate() {
                if limit.next_round <= now {
                    limit.next_round = now + limit.interval;
                    round(RateLimitId(i as u16), limit, now, &grants);
                }
            }
        })
}

fn apply_report(state: &mut [LimitState], report: Report, workers: usize) {
    let Some(limit) = state.get_mut(usize::from(report.limit.0)) else {
        return;
    };
    let now = Instant::now();
    if let Some(b) = limit.basis.get_mut(report.worker) {
        *b = report.seq;
    }
    for k in report.keys {
        let bucket = limit.keys.entry(k.key).or_insert_with(|| Bucket {
            level: limit.burst,
            refilled: now,
            demand: vec![0.0; workers],
            idle_rounds: 0,
        });
        bucket.refill(now, limit.rate, limit.burst);
        bucket.level -= f64::from(k.consumed);
        if let Some(d) = bucket.demand.get_mut(report.worker) {
            *d += f64::from(k.demand);
        }
        bucket.idle_rounds = 0;
    }
}

/// Splits what each key's bucket can afford until the next round among the workers.
fn round(id: RateLimitId, limit: &mut LimitState, now: Instant, grants: &[Sender<Grants>]) {
    let workers = grants.len();
    let mut out: Vec<Vec<KeyGrant>> = vec![Vec::with_capacity(limit.keys.len()); workers];
    let (rate, burst, interval) = (limit.rate, limit.burst, limit.interval.as_secs_f64());
    limit.keys.retain(|&key, bucket| {
        bucket.refill(now, rate, burst);
        let total: f64 = bucket.demand.iter().sum();
        if total == 0.0 && bucket.level >= burst {
            bucket.idle_rounds += 1;
            if bucket.idle_rounds > FORGET_AFTER_ROUNDS {
                return false;
            }
        }
        let available = bucket.level.max(0.0) + rate * interval;
        let shares: Vec<f64> = if total == 0.0 {
            vec![1.0 / workers as f64; workers]
        } else {
            let raw: Vec<f64> = bucket
                .demand
                .iter()
                .map(|d| (d / total).max(FLOOR_SHARE))
                .collect();
            let sum: f64 = raw.iter().sum();
            raw.into_iter().map(|s| s / sum).collect()
        };
        for (w, share) in shares.into_iter().enumerate() {
            out[w].push(KeyGrant {
                key,
                tokens: available * share,
                share,
            });
        }
        for d in &mut bucket.demand {
            *d /= 2.0;
        }
        true
    });
    for (w, keys) in out.into_iter().enumerate() {
        if !keys.is_empty() {
            // A worker that has not read its last grants gets these later or not at all:
            // grants replace each other, so dropping one loses nothing lasting.
            let _ = grants[w].try_send(Grants {
                limit: id,
                basis: limit.basis[w],
                keys,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::KeyReport;

    fn limit() -> LimitState {
        LimitState {
            rate: 100.0,
            burst: 200.0,
            interval: Duration::from_millis(50),
            next_round: Instant::now(),
            keys: AHashMap::new(),
            basis: vec![0; 2],
        }
    }

    #[test]
    fn grants_of_a_round_add_up_to_what_the_bucket_affords() {
        let mut state = vec![limit()];
        for (worker, demand) in [(0, 30), (1, 10)] {
            apply_report(
                &mut state,
                Report {
                    worker,
                    limit: RateLimitId(0),
                    seq: 1,
                    keys: vec![KeyReport {
                        key: 9,
                        consumed: 20,
                        demand,
                    }],
                },
                2,
            );
        }
        let (tx0, rx0) = crossbeam_channel::unbounded();
        let (tx1, rx1) = crossbeam_channel::unbounded();
        let now = Instant::now();
        round(RateLimitId(0), &mut state[0], now, &[tx0, tx1]);
        let (g0, g1) = (rx0.try_recv().unwrap(), rx1.try_recv().unwrap());
        let total = g0.keys[0].tokens + g1.keys[0].tokens;
        // 200 in the bucket, 40 consumed, one interval (5 tokens) of refill ahead.
        assert!((total - 165.0).abs() < 0.5, "{total}");
        assert!((g0.keys[0].share - 0.75).abs() < 1e-9);
        assert_eq!((g0.basis, g1.basis), (1, 1));
    }

    #[test]
    fn a_worker_without_demand_keeps_the_floor_share() {
        let mut state = vec![limit()];
        apply_report(
            &mut state,
            Report {
                worker: 0,
                limit: RateLimitId(0),
                seq: 1,
                keys: vec![KeyReport {
                    key: 9,
                    consumed: 5,
                    demand: 50,
                }],
            },
            2,
        );
        let (tx0, rx0) = crossbeam_channel::unbounded();
        let (tx1, rx1) = crossbeam_channel::unbounded();
        round(RateLimitId(0), &mut state[0], Instant::now(), &[tx0, tx1]);
        let (g0, g1) = (rx0.try_recv().unwrap(), rx1.try_recv().unwrap());
        assert!((g1.keys[0].share - FLOOR_SHARE / (1.0 + FLOOR_SHARE)).abs() < 1e-9);
        assert!(g0.keys[0].share > 0.97);
    }
}
