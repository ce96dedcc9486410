//! What sampledev's DMA engine writes and how its internal state evolves (sampledev/README.md
//! and `sampledev::pattern`), recomputed so that a guest can predict every byte, plus the
//! dmatest guest's own choice of seeds.
//!
//! Pure and `no_std`: included by the dmatest guest with `mod sdpattern;` and by this
//! crate's host-side tests, which hold values computed with `sampledev::pattern`.
#![allow(dead_code)]

/// SplitMix64 finalizer (sampledev's `splitmix64`).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The little-endian word a FILL with `seed` writes at byte offset `8 * word`.
pub fn fill_word(seed: u64, word: u64) -> u64 {
    splitmix64(seed ^ word.wrapping_mul(0xa076_1d64_78bd_642f))
}

/// Word `index` of internal state freshly seeded with `seed`.
pub fn state_word(seed: u64, index: u64) -> u64 {
    splitmix64(seed.wrapping_add(index.wrapping_mul(0xe703_7ed1_a0b4_28db)))
}

/// Words of internal state that each completed DMA operation changes.
pub const MUTATIONS_PER_OP: u64 = 4;

/// The `k`-th word that completed operation `op` (the value COUNTER takes) changes.
pub fn mutation_index(seed: u64, op: u64, k: u64, words: u64) -> u64 {
    splitmix64(seed ^ op.rotate_left(17) ^ k) % words
}

/// A changed word's new value.
pub fn mutate_word(old: u64, op: u64) -> u64 {
    splitmix64(old ^ op)
}

/// The FILL seed dmatest uses for buffer `buf` in round `round` (1-based): different for
/// every pair, so that a buffer left over from an earlier round never passes as current.
pub fn buffer_seed(round: u64, buf: u64) -> u64 {
    splitmix64(round << 32 | buf)
}

/// Order-sensitive running checksum of words: a cheap (two-instruction) step, because the
/// guest folds every word it verifies into it.
pub fn checksum_step(sum: u64, word: u64) -> u64 {
    sum.rotate_left(1) ^ word
}

/// The expected internal state of the device, for words `0..tracked()`, kept in two
/// caller-provided arrays so that the guest can place them in its RAM: `known` is a bitmap
/// of the words some operation has changed, `values` holds those words' values. A word not
/// in `known` still has its seeded value.
pub struct StateModel<'a> {
    seed: u64,
    words: u64,
    known: &'a mut [u64],
    values: &'a mut [u64],
}

impl<'a> StateModel<'a> {
    /// `words` is the device's STATE_SIZE / 8; `known` must be all zero; words from
    /// `values.len()` (or `known.len() * 64`) up are not tracked.
    pub fn new(seed: u64, words: u64, known: &'a mut [u64], values: &'a mut [u64]) -> Self {
        StateModel {
            seed,
            words,
            known,
            values,
        }
    }

    /// Words `0..tracked()` have a known expected value.
    pub fn tracked(&self) -> u64 {
        (self.values.len() as u64)
            .min(self.known.len() as u64 * 64)
            .min(self.words)
    }

    pub fn expected(&self, index: u64) -> Option<u64> {
        if index >= self.tracked() {
            return None;
        }
        let i = index as usize;
        if self.known[i / 64] & (1 << (i % 64)) != 0 {
            Some(self.values[i])
        } else {
            Some(state_word(self.seed, index))
        }
    }

    /// The `k`-th word that operation `op` changes (which may be untracked).
    pub fn mutation(&self, op: u64, k: u64) -> u64 {
        mutation_index(self.seed, op, k, self.words)
    }

    /// Applies what completed operation `op` does to the state, in the device's order (a word
    /// hit twice by one operation changes twice).
    pub fn apply(&mut self, op: u64) {
        for k in 0..MUTATIONS_PER_OP {
            let index = self.mutation(op, k);
            if let Some(old) = self.expected(index) {
                let i = index as usize;
                self.values[i] = mutate_word(old, op);
                self.known[i / 64] |= 1 << (i % 64);
            }
        }
    }
}
