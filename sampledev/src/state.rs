//! The device's internal state: `size` bytes whose content is a function of a seed, changed
//! by every completed DMA operation. Stored only once something changes it, so a large state
//! costs nothing until used. During a migration save it also records which of its 4 KiB
//! pages changed, so that pre-copy can resend just those.

use std::ops::Range;

use crate::bitset::DenseBits;
use crate::pattern::{MUTATIONS_PER_OP, mutate_word, mutation_index, state_digest, state_word};

/// Granularity of change tracking and of the migration stream's page records.
pub const STATE_PAGE_SIZE: u64 = 4096;
const WORDS_PER_PAGE: u64 = STATE_PAGE_SIZE / 8;

#[derive(Debug, thiserror::Error)]
#[error("cannot allocate {0} bytes of internal state")]
pub struct NoMemory(pub u64);

#[derive(Debug, Clone)]
pub struct InternalState {
    size: u64,
    seed: u64,
    /// `None` while every word still equals `state_word(seed, i)`.
    words: Option<Vec<u64>>,
    /// Pages changed since tracking started or since their bit was last taken.
    changed: Option<DenseBits>,
}

impl InternalState {
    /// `size` must be a non-zero multiple of 8 (the CLI enforces it).
    pub fn new(size: u64, seed: u64) -> InternalState {
        InternalState {
            size,
            seed,
            words: None,
            changed: None,
        }
    }

    /// State with the given content (a restored migration); `words` has `size / 8` entries.
    pub fn from_words(seed: u64, words: Vec<u64>) -> InternalState {
        InternalState {
            size: words.len() as u64 * 8,
            seed,
            words: Some(words),
            changed: None,
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
        self.mark(index);
        Ok(())
    }

    /// Replaces the whole content with the one derived from `seed`.
    pub fn reseed(&mut self, seed: u64) {
        self.seed = seed;
        self.words = None;
        if let Some(c) = &mut self.changed {
            c.set_all();
        }
    }

    /// Applies the change that completed DMA operation `op` makes.
    pub fn mutate(&mut self, op: u64) -> Result<(), NoMemory> {
        let (seed, n) = (self.seed, self.word_count());
        let words = self.materialize()?;
        let mut touched = [0u64; MUTATIONS_PER_OP as usize];
        for (k, t) in (0..MUTATIONS_PER_OP).zip(touched.iter_mut()) {
            let i = mutation_index(seed, op, k, n);
            words[i as usize] = mutate_word(words[i as usize], op);
            *t = i;
        }
        touched.into_iter().for_each(|i| self.mark(i));
        Ok(())
    }

    /// STATE_DIGEST: a digest of every word.
    pub fn digest(&self) -> u64 {
        state_digest((0..self.word_count()).map(|i| self.word(i)))
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

    pub fn pages(&self) -> u64 {
        self.size.div_ceil(STATE_PAGE_SIZE)
    }

    /// Word indices of page `p`.
    pub fn page_words(&self, p: u64) -> Range<u64> {
        let first = p * WORDS_PER_PAGE;
        first.min(self.word_count())..(first + WORDS_PER_PAGE).min(self.word_count())
    }

    fn mark(&mut self, word: u64) {
        if let Some(c) = &mut self.changed {
            c.set(word / WORDS_PER_PAGE);
        }
    }

    /// Starts recording changed pages, all clean.
    pub fn start_tracking(&mut self) -> Result<(), NoMemory> {
        self.changed = Some(DenseBits::new(self.pages()).ok_or(NoMemory(self.pages() / 8))?);
        Ok(())
    }

    pub fn stop_tracking(&mut self) {
        self.changed = None;
    }

    /// Forgets that page `p` changed (its content is being saved now); whether it had.
    pub fn take_changed(&mut self, p: u64) -> bool {
        self.changed.as_mut().is_some_and(|c| c.take(p))
    }

    pub fn is_changed(&self, p: u64) -> bool {
        self.changed.as_ref().is_some_and(|c| c.get(p))
    }

    /// The lowest changed page below `limit`.
    pub fn first_changed_below(&self, limit: u64) -> Option<u64> {
        self.changed.as_ref()?.first_below(limit)
    }

    /// Changed pages below `limit`.
    pub fn changed_below(&self, limit: u64) -> u64 {
        self.changed.as_ref().map_or(0, |c| c.count_below(limit))
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
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), InternalState::new(1 << 16, 1).digest());
    }

    #[test]
    fn tracking_marks_changed_pages() {
        let mut s = InternalState::new(3 * 4096 + 8, 1);
        assert_eq!(s.pages(), 4);
        assert_eq!(s.page_words(3), 1536..1537);
        s.set_word(0, 1).unwrap();
        assert_eq!(s.first_changed_below(4), None);
        s.start_tracking().unwrap();
        s.set_word(600, 1).unwrap();
        s.set_word(1536, 1).unwrap();
        assert_eq!(s.first_changed_below(4), Some(1));
        assert_eq!(s.changed_below(3), 1);
        assert!(s.take_changed(1) && !s.take_changed(1));
        s.reseed(2);
        assert_eq!(s.changed_below(4), 4);
        s.stop_tracking();
        assert_eq!(s.changed_below(4), 0);
    }
}
