//! The device's internal state: `size` bytes whose content is a function of a seed, changed
//! by every completed DMA operation. Stored only once something changes it, so a large state
//! costs nothing until used.

use crate::pattern::{MUTATIONS_PER_OP, mutate_word, mutation_index, state_word};

#[derive(Debug, thiserror::Error)]
#[error("cannot allocate {0} bytes of internal state")]
pub struct NoMemory(pub u64);

#[derive(Debug, Clone)]
pub struct InternalState {
    size: u64,
    seed: u64,
    /// `None` while every word still equals `state_word(seed, i)`.
    words: Option<Vec<u64>>,
}

impl InternalState {
    /// `size` must be a non-zero multiple of 8 (the CLI enforces it).
    pub fn new(size: u64, seed: u64) -> InternalState {
        InternalState {
            size,
            seed,
            words: None,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn word_count(&self) -> u64 {
        self.size / 8
    }

    /// Word `index`; out-of-range indices read as zero (callers check first).
    pub fn word(&self, index: u64) -> u64 {
        if index >= self.word_count() {
            return 0;
        }
        match &self.words {
            Some(w) => w[index as usize],
            None => state_word(self.seed, index),
        }
    }

    pub fn set_word(&mut self, index: u64, value: u64) -> Result<(), NoMemory> {
        if index >= self.word_count() {
            return Ok(());
        }
        self.materialize()?[index as usize] = value;
        Ok(())
    }

    /// Replaces the whole content with the one derived from `seed`.
    pub fn reseed(&mut self, seed: u64) {
        self.seed = seed;
        self.words = None;
    }

    /// Applies the change that completed DMA operation `op` makes.
    pub fn mutate(&mut self, op: u64) -> Result<(), NoMemory> {
        let (seed, n) = (self.seed, self.word_count());
        let words = self.materialize()?;
        for k in 0..MUTATIONS_PER_OP {
            let i = mutation_index(seed, op, k, n) as usize;
            words[i] = mutate_word(words[i], op);
        }
        Ok(())
    }

    fn materialize(&mut self) -> Result<&mut Vec<u64>, NoMemory> {
        if self.words.is_none() {
            let n = self.word_count();
            let mut v: Vec<u64> = Vec::new();
            // try_reserve rather than vec![]: a huge --state-size must become an error
            // status, not an abort.
            usize::try_from(n)
                .ok()
                .and_then(|n| v.try_reserve_exact(n).ok())
                .ok_or(NoMemory(self.size))?;
            v.extend((0..n).map(|i| state_word(self.seed, i)));
            self.words = Some(v);
        }
        // Just filled above when it was None.
        Ok(self.words.get_or_insert_with(Vec::new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_and_materialized_agree() {
        let mut s = InternalState::new(4096, 7);
        let before: Vec<u64> = (0..512).map(|i| s.word(i)).collect();
        s.set_word(3, 42).unwrap();
        assert_eq!(s.word(3), 42);
        for i in (0..512).filter(|&i| i != 3) {
            assert_eq!(s.word(i), before[i as usize]);
        }
        s.reseed(7);
        assert_eq!(s.word(3), before[3]);
    }

    #[test]
    fn mutation_changes_few_words_deterministically() {
        let mut a = InternalState::new(1 << 16, 1);
        let mut b = a.clone();
        a.mutate(1).unwrap();
        b.mutate(1).unwrap();
        let changed = (0..a.word_count())
            .filter(|&i| a.word(i) != state_word(1, i))
            .count() as u64;
        assert!((1..=MUTATIONS_PER_OP).contains(&changed));
        assert!((0..a.word_count()).all(|i| a.word(i) == b.word(i)));
    }
}
