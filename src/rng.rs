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

    /// Fills `out` with random lower-case hex digits.
    pub fn fill_hex(&self, out: &mut [u8]) {
        /// Each byte's two hex digits.
        static HEX_PAIRS: [[u8; 2]; 256] = {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let mut t = [[0u8; 2]; 256];
            let mut i = 0;
            while i < 256 {
                t[i] = [HEX[i >> 4], HEX[i & 0xf]];
                i += 1;
            }
            t
        };
        for block in out.chunks_mut(16) {
            let mut hex = [0u8; 16];
            for (i, b) in self.next_u64().to_le_bytes().into_iter().enumerate() {
                let [hi, lo] = HEX_PAIRS[usize::from(b)];
                hex[2 * i] = hi;
                hex[2 * i + 1] = lo;
            }
            block.copy_from_slice(&hex[..block.len()]);
        }
    }
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
    fn hex_id_is_32_hex_digits() {
        let mut out = Vec::new();
        Rng::seeded(1).hex_id(&mut out);
        assert_eq!(out.len(), 32);
        assert!(out.iter().all(u8::is_ascii_hexdigit));
    }
}
