//! Stable hashing: the same value in every worker and every run of one build, so that
//! consistent hashing, cache keys and rate-limit keys agree across workers. A leaf module: it
//! imports nothing from the crate, so every concern can use it without import cycles.

use std::hash::BuildHasher;

fn stable_state() -> ahash::RandomState {
    ahash::RandomState::with_seeds(
        0x243f_6a88_85a3_08d3,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
    )
}

/// The stable hash of `bytes`.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    stable_state().hash_one(bytes)
}

/// A hasher for keys built from several parts.
pub fn stable_hasher() -> impl std::hash::Hasher {
    stable_state().build_hasher()
}
