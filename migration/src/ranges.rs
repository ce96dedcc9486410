//! Guest-physical ranges: the unit that dirty logs, zero detection and the wire all speak.

use serde::{Deserialize, Serialize};

/// Page size of every dirty bitmap and of the page accounting (x86 host pages).
pub const PAGE_SIZE: u64 = 4096;

/// `len` bytes of guest-physical memory starting at `gpa`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemoryRange {
    pub gpa: u64,
    pub len: u64,
}

impl MemoryRange {
    pub const fn new(gpa: u64, len: u64) -> Self {
        Self { gpa, len }
    }

    /// One past the last byte, or `None` when the range wraps the address space (which no
    /// valid range does, so callers treat `None` as malformed input).
    pub fn end(&self) -> Option<u64> {
        self.gpa.checked_add(self.len)
    }

    /// Whether `inner` lies entirely inside `self`.
    pub fn contains(&self, inner: &MemoryRange) -> bool {
        match (self.end(), inner.end()) {
            (Some(end), Some(inner_end)) => inner.gpa >= self.gpa && inner_end <= end,
            _ => false,
        }
    }

    /// Pages touched by the range, counting a partial page as one.
    pub fn pages(&self) -> u64 {
        if self.len == 0 {
            return 0;
        }
        let first = self.gpa / PAGE_SIZE;
        let last = (self.gpa + (self.len - 1)) / PAGE_SIZE;
        last - first + 1
    }

    /// Splits the range into pieces of at most `max` bytes (`max` > 0).
    pub fn chunks(self, max: u64) -> impl Iterator<Item = MemoryRange> {
        let max = max.max(1);
        let mut next = self;
        std::iter::from_fn(move || {
            if next.len == 0 {
                return None;
            }
            let len = next.len.min(max);
            let piece = MemoryRange::new(next.gpa, len);
            next = MemoryRange::new(next.gpa + len, next.len - len);
            Some(piece)
        })
    }
}

/// Sum of the lengths of `ranges`.
pub fn total_len(ranges: &[MemoryRange]) -> u64 {
    ranges.iter().map(|r| r.len).sum()
}

/// Appends `range` to `list`, merging it into the last entry when the two touch, so a run of
/// adjacent pages pushed one by one ends up as one entry.
pub fn push_coalesced(list: &mut Vec<MemoryRange>, range: MemoryRange) {
    if range.len == 0 {
        return;
    }
    if let Some(last) = list.last_mut().filter(|l| l.end() == Some(range.gpa)) {
        last.len += range.len;
        return;
    }
    list.push(range);
}

/// Union of two lists of ranges, sorted and with overlapping or touching ranges merged.
pub fn union(a: &[MemoryRange], b: &[MemoryRange]) -> Vec<MemoryRange> {
    let mut all: Vec<MemoryRange> = a.iter().chain(b).copied().filter(|r| r.len > 0).collect();
    all.sort_unstable_by_key(|r| r.gpa);
    let mut out: Vec<MemoryRange> = Vec::with_capacity(all.len());
    for r in all {
        let end = r.end().unwrap_or(u64::MAX);
        match out.last_mut() {
            Some(last) if r.gpa <= last.gpa + last.len => {
                last.len = end.max(last.gpa + last.len) - last.gpa;
            }
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_merges_overlaps_and_neighbours() {
        let a = [
            MemoryRange::new(0, 0x2000),
            MemoryRange::new(0x8000, 0x1000),
        ];
        let b = [
            MemoryRange::new(0x1000, 0x2000),
            MemoryRange::new(0x9000, 0x1000),
        ];
        assert_eq!(
            union(&a, &b),
            vec![
                MemoryRange::new(0, 0x3000),
                MemoryRange::new(0x8000, 0x2000)
            ]
        );
        assert_eq!(union(&[], &b[..1]), vec![b[0]]);
    }

    #[test]
    fn chunks_cover_the_range_exactly() {
        let r = MemoryRange::new(0x1000, 10 * PAGE_SIZE + 5);
        let parts: Vec<_> = r.chunks(4 * PAGE_SIZE).collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], MemoryRange::new(0x1000, 4 * PAGE_SIZE));
        assert_eq!(parts[2].len, 2 * PAGE_SIZE + 5);
        assert_eq!(total_len(&parts), r.len);
    }

    #[test]
    fn coalesces_adjacent_only() {
        let mut l = Vec::new();
        push_coalesced(&mut l, MemoryRange::new(0, 4096));
        push_coalesced(&mut l, MemoryRange::new(4096, 4096));
        push_coalesced(&mut l, MemoryRange::new(3 * 4096, 4096));
        assert_eq!(
            l,
            vec![MemoryRange::new(0, 8192), MemoryRange::new(3 * 4096, 4096)]
        );
    }

    #[test]
    fn pages_and_containment() {
        assert_eq!(MemoryRange::new(4095, 2).pages(), 2);
        assert_eq!(MemoryRange::new(0, 0).pages(), 0);
        let outer = MemoryRange::new(0x1000, 0x3000);
        assert!(outer.contains(&MemoryRange::new(0x2000, 0x2000)));
        assert!(!outer.contains(&MemoryRange::new(0x2000, 0x2001)));
        assert!(!outer.contains(&MemoryRange::new(u64::MAX, 2)));
    }
}
