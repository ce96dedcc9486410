//! The deterministic functions behind DMA fill data and internal-state contents, public so
//! that tests and guest drivers can predict every byte.

/// SplitMix64 finalizer: a cheap bijective mixer with good avalanche.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The little-endian u64 that a FILL with `seed` writes at byte offset `8 * word` of its
/// destination (a partial last word is truncated).
pub fn fill_word(seed: u64, word: u64) -> u64 {
    splitmix64(seed ^ word.wrapping_mul(0xa076_1d64_78bd_642f))
}

/// The byte a FILL with `seed` writes at `offset` from the start of its destination.
pub fn fill_byte(seed: u64, offset: u64) -> u8 {
    fill_word(seed, offset / 8).to_le_bytes()[(offset % 8) as usize]
}

/// Word `index` of freshly seeded internal state.
pub fn state_word(seed: u64, index: u64) -> u64 {
    splitmix64(seed.wrapping_add(index.wrapping_mul(0xe703_7ed1_a0b4_28db)))
}

/// Words of internal state touched by each completed DMA operation.
pub const MUTATIONS_PER_OP: u64 = 4;

/// Index of the `k`-th word that completed DMA operation number `op` (1-based, the value
/// COUNTER takes) mutates, in a state of `words` words.
pub fn mutation_index(seed: u64, op: u64, k: u64, words: u64) -> u64 {
    splitmix64(seed ^ op.rotate_left(17) ^ k) % words
}

/// New value of a mutated word.
pub fn mutate_word(old: u64, op: u64) -> u64 {
    splitmix64(old ^ op)
}

/// One step of the word digest used for STATE_DIGEST and the migration stream checksums.
/// Bijective in both `h` and `w` (xor, then an odd multiplier), so changing any one word of
/// a sequence always changes the result.
pub fn mix_word(h: u64, w: u64) -> u64 {
    (h.rotate_left(23) ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Start value of digests.
pub const DIGEST_SEED: u64 = 0x5344_5631_6d69_6721;

/// STATE_DIGEST of internal state whose words are `words`.
pub fn state_digest(words: impl IntoIterator<Item = u64>) -> u64 {
    words.into_iter().fold(DIGEST_SEED, mix_word)
}
