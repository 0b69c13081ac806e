//! Load balancers. Each worker has its own balancer state (no sharing), so round robin is
//! round robin per worker and least-request compares the worker's own in-flight counts.
//! Targets that are down are skipped; `None` means none is available.

use std::cell::Cell;

use crate::config::{Balance, Upstream};
use crate::hash::stable_hash;
use crate::rng::Rng;

pub enum Balancer {
    RoundRobin {
        next: Cell<usize>,
    },
    /// Power of two choices on in-flight requests.
    LeastRequest,
    Random,
    /// Maglev: a lookup table in which each target owns an almost equal share of slots, and
    /// removing a target moves only the keys it owned.
    ConsistentHash {
        table: Box<[u16]>,
    },
}

/// What a balancer may ask about the targets.
pub trait Targets {
    fn len(&self) -> usize;
    fn is_up(&self, i: usize) -> bool;
    fn inflight(&self, i: usize) -> u32;
}

/// Maglev table sizes: primes, the smallest at least 100 × targets is used.
const MAGLEV_SIZES: [usize; 6] = [4093, 8191, 16381, 32749, 65521, 65521];

impl Balancer {
    pub fn new(upstream: &Upstream) -> Balancer {
        match upstream.balance {
            Balance::RoundRobin => Balancer::RoundRobin { next: Cell::new(0) },
            Balance::LeastRequest => Balancer::LeastRequest,
            Balance::Random => Balancer::Random,
            Balance::ConsistentHash => {
                // Over the primaries: backups are picked only when no primary is up.
                let names: Vec<&str> = upstream.targets[..upstream.primaries]
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect();
                Balancer::ConsistentHash {
                    table: maglev_table(&names),
                }
            }
        }
    }

    /// Picks a target. `key` is the hash of the request's key, for consistent hashing.
    pub fn pick<T: Targets + ?Sized>(&self, targets: &T, rng: &Rng, key: u64) -> Option<usize> {
        let n = targets.len();
        match self {
            Balancer::RoundRobin { next } => {
                let start = next.get();
                let i = first_up(targets, start % n)?;
                next.set((i + 1) % n);
                Some(i)
            }
            Balancer::Random => first_up(targets, rng.below(n)),
            Balancer::LeastRequest => {
                let a = first_up(targets, rng.below(n))?;
                if n == 1 {
                    return Some(a);
                }
                // A second, different candidate.
                let start = (a + 1 + rng.below(n - 1)) % n;
                let b = (0..n)
                    .map(|k| (start + k) % n)
                    .find(|&i| i != a && targets.is_up(i));
                match b {
                    Some(b) if targets.inflight(b) < targets.inflight(a) => Some(b),
                    _ => Some(a),
                }
            }
            Balancer::ConsistentHash { table } => {
                let m = table.len();
                let slot = (key % m as u64) as usize;
                // On a down target, continue along the table: its keys spread over the others.
                (0..m)
                    .map(|k| usize::from(table[(slot + k) % m]))
                    .find(|&i| targets.is_up(i))
            }
        }
    }
}

/// The first target that is up, looking from `start` round the list.
pub fn first_up<T: Targets + ?Sized>(targets: &T, start: usize) -> Option<usize> {
    let n = targets.len();
    (0..n).map(|k| (start + k) % n).find(|&i| targets.is_up(i))
}

/// Builds the Maglev lookup table (Eisenbud et al., NSDI 2016, §3.4).
fn maglev_table(names: &[&str]) -> Box<[u16]> {
    let n = names.len();
    let m = MAGLEV_SIZES
        .iter()
        .copied()
        .find(|&m| m >= 100 * n)
        .unwrap_or(MAGLEV_SIZES[MAGLEV_SIZES.len() - 1]);
    let perms: Vec<(usize, usize)> = names
        .iter()
        .map(|name| {
            let h = stable_hash(name.as_bytes());
            let offset = (h % m as u64) as usize;
            let skip = ((h >> 32) % (m as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; n];
    let mut table = vec![u16::MAX; m];
    let mut filled = 0;
    'fill: loop {
        for i in 0..n {
            let (offset, skip) = perms[i];
            let mut c = (offset + next[i] * skip) % m;
            while table[c] != u16::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            table[c] = i as u16;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    table.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        up: Vec<bool>,
        inflight: Vec<u32>,
    }

    impl Targets for Fake {
        fn len(&self) -> usize {
            self.up.len()
        }
        fn is_up(&self, i: usize) -> bool {
            self.up[i]
        }
        fn inflight(&self, i: usize) -> u32 {
            self.inflight[i]
        }
    }

    fn fake(n: usize) -> Fake {
        Fake {
            up: vec![true; n],
            inflight: vec![0; n],
        }
    }

    #[test]
    fn round_robin_skips_down_targets() {
        let b = Balancer::RoundRobin { next: Cell::new(0) };
        let mut t = fake(3);
        t.up[1] = false;
        let rng = Rng::seeded(1);
        let picks: Vec<_> = (0..4).map(|_| b.pick(&t, &rng, 0).unwrap()).collect();
        assert_eq!(picks, [0, 2, 0, 2]);
        t.up = vec![false; 3];
        assert_eq!(b.pick(&t, &rng, 0), None);
    }

    #[test]
    fn least_request_prefers_the_idle_target() {
        let mut t = fake(2);
        t.inflight = vec![5, 0];
        let rng = Rng::seeded(3);
        for _ in 0..100 {
            assert_eq!(Balancer::LeastRequest.pick(&t, &rng, 0), Some(1));
        }
    }

    #[test]
    fn maglev_is_balanced_and_minimally_disruptive() {
        let names = ["a:1", "b:1", "c:1"];
        let table = maglev_table(&names);
        let mut counts = [0usize; 3];
        for &e in table.iter() {
            counts[usize::from(e)] += 1;
        }
        for c in counts {
            let share = c as f64 / table.len() as f64;
            assert!((share - 1.0 / 3.0).abs() < 0.02, "{counts:?}");
        }
        let b = Balancer::ConsistentHash { table };
        let rng = Rng::seeded(1);
        let mut t = fake(3);
        let before: Vec<_> = (0..1000u64)
            .map(|k| b.pick(&t, &rng, stable_hash(&k.to_le_bytes())).unwrap())
            .collect();
        t.up[2] = false;
        for (k, &was) in (0..1000u64).zip(&before) {
            let now = b.pick(&t, &rng, stable_hash(&k.to_le_bytes())).unwrap();
            if was != 2 {
                assert_eq!(now, was, "key {k} moved although its target stayed up");
            }
        }
    }
}
