//! Stable hashing: the same value in every worker and every run of one build, so that
//! consistent hashing, cache keys and rate-limit keys agree across workers; and SHA-256, for
//! what is compared by digest (API keys, the config file). A leaf module: it
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

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// SHA-256 of `bytes`, in lower-case hex.
pub fn hex_sha256(bytes: &[u8]) -> String {
    use std::fmt::Write;
    sha256(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn digests_are_sha256() {
        let d = super::sha256(b"test");
        assert_eq!(
            d[..4],
            [0x9f, 0x86, 0xd0, 0x81],
            "sha256(\"test\") starts 9f86d081"
        );
        assert!(super::hex_sha256(b"test").starts_with("9f86d081"));
    }
}
