//! Page bit sets: dense for the internal state's pages (a known, modest count), sparse for
//! DMA logging (IOVA ranges can be huge while few pages are written).

use std::collections::BTreeMap;

/// A fixed-size bit set.
#[derive(Debug, Clone)]
pub struct DenseBits {
    words: Vec<u64>,
    len: u64,
}

impl DenseBits {
    /// `None` if the words cannot be allocated.
    pub fn new(len: u64) -> Option<DenseBits> {
        let n = usize::try_from(len.div_ceil(64)).ok()?;
        let mut words = Vec::new();
        words.try_reserve_exact(n).ok()?;
        words.resize(n, 0);
        Some(DenseBits { words, len })
    }

    pub fn set(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    pub fn set_all(&mut self) {
        for (k, w) in self.words.iter_mut().enumerate() {
            let left = self.len - k as u64 * 64;
            *w = if left >= 64 {
                u64::MAX
            } else {
                (1 << left) - 1
            };
        }
    }

    /// Clears bit `i`, returning whether it was set.
    pub fn take(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let was = *w & (1 << (i % 64)) != 0;
        *w &= !(1 << (i % 64));
        was
    }

    /// The lowest set bit below `limit`.
    pub fn first_below(&self, limit: u64) -> Option<u64> {
        let limit = limit.min(self.len);
        for (k, &w) in self.words.iter().enumerate() {
            let base = k as u64 * 64;
            if base >= limit {
                break;
            }
            if w != 0 {
                let i = base + u64::from(w.trailing_zeros());
                return (i < limit).then_some(i);
            }
        }
        None
    }

    /// Set bits below `limit`.
    pub fn count_below(&self, limit: u64) -> u64 {
        let limit = limit.min(self.len);
        let full = (limit / 64) as usize;
        let mut n: u64 = self.words[..full]
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        if !limit.is_multiple_of(64) {
            let mask = (1u64 << (limit % 64)) - 1;
            n += u64::from((self.words[full] & mask).count_ones());
        }
        n
    }
}

/// Pages per block of the sparse set: one block is 64 words.
const BLOCK_PAGES: u64 = 4096;

/// A bit set over the whole u64 page space, storing only 512-byte blocks that have bits set.
#[derive(Debug, Clone, Default)]
pub struct SparseBits {
    blocks: BTreeMap<u64, Box<[u64; 64]>>,
}

impl SparseBits {
    /// Sets pages `first..=last`.
    pub fn set_range(&mut self, first: u64, last: u64) {
        let mut p = first;
        loop {
            let block = self
                .blocks
                .entry(p / BLOCK_PAGES)
                .or_insert_with(|| Box::new([0; 64]));
            let i = p % BLOCK_PAGES;
            block[(i / 64) as usize] |= 1 << (i % 64);
            if p >= last {
                break;
            }
            p += 1;
        }
    }

    /// The set pages in `first..=last`, in order.
    pub fn collect(&self, first: u64, last: u64) -> Vec<u64> {
        let mut out = Vec::new();
        for (&b, words) in self.blocks.range(first / BLOCK_PAGES..=last / BLOCK_PAGES) {
            for (k, &w) in words.iter().enumerate() {
                let mut bits = w;
                while bits != 0 {
                    let p = b * BLOCK_PAGES + k as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    if (first..=last).contains(&p) {
                        out.push(p);
                    }
                }
            }
        }
        out
    }

    pub fn clear(&mut self, p: u64) {
        let b = p / BLOCK_PAGES;
        if let Some(words) = self.blocks.get_mut(&b) {
            let i = p % BLOCK_PAGES;
            words[(i / 64) as usize] &= !(1 << (i % 64));
            if words.iter().all(|&w| w == 0) {
                self.blocks.remove(&b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense() {
        let mut d = DenseBits::new(130).unwrap();
        assert_eq!(d.first_below(130), None);
        d.set(129);
        d.set(64);
        assert_eq!(d.first_below(100), Some(64));
        assert_eq!(d.count_below(129), 1);
        assert_eq!(d.count_below(130), 2);
        assert!(d.take(64) && !d.take(64));
        assert_eq!(d.first_below(129), None);
        d.set_all();
        assert_eq!(d.count_below(u64::MAX), 130);
    }

    #[test]
    fn sparse() {
        let mut s = SparseBits::default();
        s.set_range(4090, 4100);
        s.set_range(u64::MAX - 1, u64::MAX);
        assert_eq!(s.collect(4095, 4096), vec![4095, 4096]);
        assert_eq!(s.collect(0, u64::MAX).len(), 13);
        for p in 4090..=4100 {
            s.clear(p);
        }
        assert_eq!(s.blocks.len(), 1);
        assert_eq!(s.collect(u64::MAX, u64::MAX), vec![u64::MAX]);
    }
}
