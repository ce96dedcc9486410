//! DMA logging of the device's own writes (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`): started
//! with IOVA ranges (none: everything) and a page size, reported as a bitmap that the report
//! also clears. Bit `i % 64` of word `i / 64` is page `i` of the reported range.

use vfio_user::{DmaLoggingReport, DmaLoggingStart, DmaRange, MAX_DATA_XFER_SIZE};

use crate::bitset::SparseBits;
use crate::error::Refusal;

const MIN_PAGE: u64 = 4096;
const MAX_PAGE: u64 = 1 << 30;

#[derive(Debug)]
pub struct DirtyLog {
    page_shift: u32,
    /// Sorted, non-overlapping; empty means every write is logged.
    ranges: Vec<DmaRange>,
    dirty: SparseBits,
}

fn valid_page(p: u64) -> bool {
    p.is_power_of_two() && (MIN_PAGE..=MAX_PAGE).contains(&p)
}

impl DirtyLog {
    /// Checks `req` as the kernel does: page size a power of two (4 KiB..1 GiB), ranges
    /// aligned to it, non-empty, not wrapping and not overlapping.
    pub fn start(req: &DmaLoggingStart) -> Result<DirtyLog, Refusal> {
        let ps = req.page_size;
        if !valid_page(ps) {
            return Err(Refusal::inval(format!("DMA logging page size {ps}")));
        }
        let mut ranges = req.ranges.clone();
        ranges.sort_by_key(|r| r.iova);
        for r in &ranges {
            let aligned = r.iova.is_multiple_of(ps) && r.length.is_multiple_of(ps);
            if r.length == 0 || !aligned || r.iova.checked_add(r.length).is_none() {
                return Err(Refusal::inval(format!("DMA logging range {r:?}")));
            }
        }
        if ranges
            .windows(2)
            .any(|w| w[0].iova + w[0].length > w[1].iova)
        {
            return Err(Refusal::inval("overlapping DMA logging ranges"));
        }
        Ok(DirtyLog {
            page_shift: ps.trailing_zeros(),
            ranges,
            dirty: SparseBits::default(),
        })
    }

    pub fn page_size(&self) -> u64 {
        1 << self.page_shift
    }

    /// Records a write of `len` bytes at `iova`, clipped to the logged ranges.
    pub fn mark(&mut self, iova: u64, len: u64) {
        let Some(last) = len.checked_sub(1).and_then(|l| iova.checked_add(l)) else {
            return;
        };
        if self.ranges.is_empty() {
            self.dirty
                .set_range(iova >> self.page_shift, last >> self.page_shift);
            return;
        }
        for r in &self.ranges {
            let (start, end) = (iova.max(r.iova), last.min(r.iova + (r.length - 1)));
            if start <= end {
                self.dirty
                    .set_range(start >> self.page_shift, end >> self.page_shift);
            }
        }
    }

    /// The bitmap of `req` (read and clear). Logged pages wholly inside the range are cleared;
    /// one that straddles its edge stays set, to be reported again rather than lost.
    pub fn report(&mut self, req: &DmaLoggingReport) -> Result<Vec<u64>, Refusal> {
        let bad = || Refusal::inval(format!("DMA logging report {req:?}"));
        let (rps, bytes) = (req.page_size, req.bitmap_bytes().ok_or_else(bad)?);
        if !valid_page(rps) || !req.iova.is_multiple_of(rps) || req.length == 0 {
            return Err(bad());
        }
        // One data transfer's worth; the reply's fixed fields fit the message slack.
        if bytes > MAX_DATA_XFER_SIZE as u64 {
            return Err(Refusal::new(
                libc::E2BIG,
                "DMA logging report bitmap too large",
            ));
        }
        let mut bitmap = vec![0u64; (bytes / 8) as usize];
        let (start, last) = (req.iova, req.iova + (req.length - 1));
        let shift = self.page_shift;
        for p in self.dirty.collect(start >> shift, last >> shift) {
            let (pstart, plast) = (p << shift, (p << shift) + ((1 << shift) - 1));
            let (from, to) = (pstart.max(start), plast.min(last));
            for r in (from - start) / rps..=(to - start) / rps {
                bitmap[(r / 64) as usize] |= 1 << (r % 64);
            }
            if pstart >= start && plast <= last {
                self.dirty.clear(p);
            }
        }
        Ok(bitmap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(ps: u64, ranges: &[(u64, u64)]) -> Result<DirtyLog, Refusal> {
        DirtyLog::start(&DmaLoggingStart {
            page_size: ps,
            ranges: ranges
                .iter()
                .map(|&(iova, length)| DmaRange { iova, length })
                .collect(),
        })
    }

    fn report(l: &mut DirtyLog, iova: u64, length: u64, page_size: u64) -> Vec<u64> {
        l.report(&DmaLoggingReport {
            iova,
            length,
            page_size,
        })
        .unwrap()
    }

    #[test]
    fn validation() {
        assert!(start(3000, &[]).is_err());
        assert!(start(4096, &[(0x800, 0x1000)]).is_err());
        assert!(start(4096, &[(0, 0)]).is_err());
        assert!(start(4096, &[(0, 0x2000), (0x1000, 0x1000)]).is_err());
        assert!(start(4096, &[(0x2000, 0x1000), (0, 0x2000)]).is_ok());
    }

    #[test]
    fn marks_clip_to_ranges_and_report_clears() {
        let mut l = start(4096, &[(0x10000, 0x10000)]).unwrap();
        l.mark(0xf000, 0x2001); // pages 0xf (outside), 0x10, 0x11 (one byte)
        l.mark(0x30000, 0x1000); // outside
        assert_eq!(report(&mut l, 0x10000, 0x10000, 4096), vec![0b11]);
        assert_eq!(report(&mut l, 0x10000, 0x10000, 4096), vec![0]);
        // A coarser report page ORs the fine pages.
        l.mark(0x13000, 8);
        assert_eq!(report(&mut l, 0x10000, 0x10000, 0x4000), vec![0b1]);
    }

    #[test]
    fn unranged_log_and_straddling_pages() {
        let mut l = start(0x4000, &[]).unwrap();
        l.mark(0x7_0000_0000, 1);
        assert_eq!(report(&mut l, 0x7_0000_0000, 0x2000, 0x1000), vec![0b11]);
        // The 16 KiB logged page straddled the 8 KiB report: still set for the rest.
        assert_eq!(report(&mut l, 0x7_0000_2000, 0x2000, 0x1000), vec![0b11]);
        assert_eq!(report(&mut l, 0x7_0000_0000, 0x4000, 0x1000), vec![0b1111]);
        assert_eq!(report(&mut l, 0x7_0000_0000, 0x4000, 0x1000), vec![0]);
        let words = report(&mut l, 0, 65 * 4096, 4096);
        assert_eq!(words.len(), 2);
    }
}
