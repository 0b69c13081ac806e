//! A worker's own fast random numbers (wyrand), for balancer picks and request ids. Not for
//! secrets; seeded per worker from the OS so that workers and restarts differ.

use std::cell::Cell;

pub struct Rng(Cell<u64>);

impl Rng {
    pub fn from_os() -> Rng {
        // RandomState draws its keys from the OS.
        Rng(Cell::new(
            ahash::RandomState::new().hash_one(std::thread::current().id()),
        ))
    }

    #[cfg(test)]
    pub fn seeded(seed: u64) -> Rng {
        Rng(Cell::new(seed))
    }

    #[inline]
    pub fn next_u64(&self) -> u64 {
        let s = self.0.get().wrapping_add(0xa076_1d64_78bd_642f);
        self.0.set(s);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for small n).
    #[inline]
    pub fn below(&self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// 32 lower-case hex digits: a request id.
    pub fn hex_id(&self, out: &mut Vec<u8>) {
        let mut id = [0u8; 32];
        self.fill_hex(&mut id);
        out.extend_from_slice(&id);
    }

    /// Fills `out` with random lower-case hex digits, 16 from each draw.
    pub fn fill_hex(&self, out: &mut [u8]) {
        let mut blocks = out.chunks_exact_mut(16);
        for block in &mut blocks {
            block.copy_from_slice(&hex16(self.next_u64()));
        }
        let rest = blocks.into_remainder();
        if !rest.is_empty() {
            let n = rest.len();
            rest.copy_from_slice(&hex16(self.next_u64())[..n]);
        }
    }
}

/// The 16 nibbles of `x` as lower-case hex digits, computed eight at a time in a `u64`
/// (no table, no loop). The digits come high nibbles first, then low ones: for a random
/// `x` every order is as good, and this one needs no shuffle.
fn hex16(x: u64) -> [u8; 16] {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let digits = |nibbles: u64| {
        // 1 in each byte whose nibble is 10 or more: those skip from '9' + 1 to 'a'.
        let letters = ((nibbles + 6 * ONES) >> 4) & ONES;
        nibbles + u64::from(b'0') * ONES + letters * u64::from(b'a' - b'9' - 1)
    };
    let mut hex = [0u8; 16];
    hex[..8].copy_from_slice(&digits((x >> 4) & (0x0f * ONES)).to_le_bytes());
    hex[8..].copy_from_slice(&digits(x & (0x0f * ONES)).to_le_bytes());
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_spreads() {
        let rng = Rng::seeded(7);
        let mut counts = [0usize; 3];
        for _ in 0..30_000 {
            counts[rng.below(3)] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn hex16_writes_every_nibble() {
        assert_eq!(&hex16(0x0123_4567_89ab_cdef), b"eca86420fdb97531");
        assert_eq!(&hex16(u64::MAX), b"ffffffffffffffff");
        assert_eq!(&hex16(0), b"0000000000000000");
    }

    #[test]
    fn fill_hex_fills_any_length() {
        let rng = Rng::seeded(3);
        for len in [0, 5, 16, 17, 32] {
            let mut out = vec![b'!'; len];
            rng.fill_hex(&mut out);
            assert!(out
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)));
        }
    }

    #[test]
    fn hex_id_is_32_hex_digits() {
        let mut out = Vec::new();
        Rng::seeded(1).hex_id(&mut out);
        assert_eq!(out.len(), 32);
        assert!(out.iter().all(u8::is_ascii_hexdigit));
    }
}
