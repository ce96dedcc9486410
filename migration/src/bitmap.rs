//! Dirty bitmaps in KVM's layout (bit `i % 64` of word `i / 64` is page `i` of a slot), shared by
//! KVM's log, vm-memory's `AtomicBitmap` and VFIO DMA logging, so they merge with a plain OR.

use crate::ranges::{MemoryRange, PAGE_SIZE};

/// Words needed for a bitmap of `pages` pages.
pub fn words_for(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

/// A bitmap with exactly the first `pages` bits set: the first pass sends everything, and a
/// device that cannot log its DMA keeps its whole window dirty.
pub fn all_set(pages: u64) -> Vec<u64> {
    let mut bm = vec![u64::MAX; words_for(pages)];
    let tail = pages % 64;
    if let Some(last) = bm.last_mut().filter(|_| tail != 0) {
        *last = (1u64 << tail) - 1;
    }
    bm
}

/// ORs `src` into `dst`, growing `dst` when `src` is longer (sources may size their bitmaps
/// differently; missing words are simply clean).
pub fn or_into(dst: &mut Vec<u64>, src: &[u64]) {
    if dst.len() < src.len() {
        dst.resize(src.len(), 0);
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= *s;
    }
}

/// Clears every bit at or past `pages`, so a source that reports beyond its slot cannot make
/// the sender read outside guest memory.
pub fn truncate(bm: &mut Vec<u64>, pages: u64) {
    bm.truncate(words_for(pages));
    let tail = pages % 64;
    if let Some(last) = bm.last_mut().filter(|_| tail != 0) {
        *last &= (1u64 << tail) - 1;
    }
}

/// Number of dirty pages.
pub fn count(bm: &[u64]) -> u64 {
    bm.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// Iterates the runs of set bits as `(first_page, npages)`, skipping clean words whole.
pub fn runs(bm: &[u64]) -> Runs<'_> {
    Runs { bm, bit: 0 }
}

pub struct Runs<'a> {
    bm: &'a [u64],
    bit: u64,
}

impl Runs<'_> {
    fn word(&self, bit: u64) -> Option<u64> {
        self.bm.get((bit / 64) as usize).map(|w| w >> (bit % 64))
    }

    /// Next bit at or after `self.bit` whose value is `set`, or the bitmap's end.
    fn seek(&self, set: bool) -> u64 {
        let mut bit = self.bit;
        while let Some(w) = self.word(bit) {
            let w = if set {
                w
            } else {
                !w & (u64::MAX >> (bit % 64))
            };
            if w != 0 {
                return bit + u64::from(w.trailing_zeros());
            }
            bit = (bit / 64 + 1) * 64;
        }
        self.bm.len() as u64 * 64
    }
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        self.bit = self.seek(true);
        if self.bit >= self.bm.len() as u64 * 64 {
            return None;
        }
        let first = self.bit;
        self.bit = self.seek(false);
        Some((first, self.bit - first))
    }
}

/// Guest-physical ranges of the dirty pages of a slot that starts at `base_gpa`.
pub fn to_ranges(bm: &[u64], base_gpa: u64) -> Vec<MemoryRange> {
    runs(bm)
        .map(|(first, n)| MemoryRange::new(base_gpa + first * PAGE_SIZE, n * PAGE_SIZE))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_runs(bm: &[u64]) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for i in 0..bm.len() as u64 * 64 {
            if bm[(i / 64) as usize] >> (i % 64) & 1 == 1 {
                match out.last_mut() {
                    Some((f, n)) if *f + *n == i => *n += 1,
                    _ => out.push((i, 1)),
                }
            }
        }
        out
    }

    #[test]
    fn runs_match_a_naive_scan() {
        let cases: Vec<Vec<u64>> = vec![
            vec![],
            vec![0],
            vec![u64::MAX],
            vec![u64::MAX, u64::MAX, 1],
            vec![0x8000_0000_0000_0001, 0x1, 0, 0xF0F0],
            vec![1 << 63, 1],
            vec![0xdead_beef_0bad_f00d, 0x0123_4567_89ab_cdef],
        ];
        for bm in cases {
            assert_eq!(runs(&bm).collect::<Vec<_>>(), naive_runs(&bm), "{bm:x?}");
        }
    }

    #[test]
    fn all_set_and_truncate_respect_the_page_count() {
        assert_eq!(all_set(0), Vec::<u64>::new());
        assert_eq!(all_set(3), vec![0b111]);
        assert_eq!(count(&all_set(130)), 130);
        let mut bm = vec![u64::MAX; 4];
        truncate(&mut bm, 65);
        assert_eq!(bm, vec![u64::MAX, 1]);
    }

    #[test]
    fn or_merges_sources_of_different_lengths() {
        let mut dst = vec![0b0001];
        or_into(&mut dst, &[0b0100, 0b1]);
        assert_eq!(dst, vec![0b0101, 0b1]);
        assert_eq!(count(&dst), 3);
        assert_eq!(
            to_ranges(&dst, 0x10_0000),
            vec![
                MemoryRange::new(0x10_0000, PAGE_SIZE),
                MemoryRange::new(0x10_0000 + 2 * PAGE_SIZE, PAGE_SIZE),
                MemoryRange::new(0x10_0000 + 64 * PAGE_SIZE, PAGE_SIZE),
            ]
        );
    }
}
