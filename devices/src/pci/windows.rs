//! The address windows BARs are assigned from, and how a BAR is placed in them: by natural
//! alignment in the first free gap that fits, as firmware does. Devices arrive one at a time,
//! so a free list (not a bump pointer) keeps the gaps that alignment leaves usable by the
//! next device's smaller BARs.

use super::config::BarKind;

/// Address windows the root assigns BARs from (guest-physical, and ports for I/O), each as
/// (base, length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindows {
    /// Below 4 GiB: 32-bit BARs, and 64-bit ones when `mmio64` is absent or full.
    pub mmio32: (u64, u64),
    /// Above RAM: 64-bit prefetchable BARs first, other 64-bit BARs when `mmio32` is full.
    pub mmio64: Option<(u64, u64)>,
    /// Port I/O.
    pub io: (u64, u64),
}

/// One window's free gaps, as sorted, disjoint [start, end) ranges.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Window {
    pub name: &'static str,
    pub base: u64,
    pub end: u64,
    free: Vec<(u64, u64)>,
}

impl Window {
    pub fn new(name: &'static str, (base, len): (u64, u64)) -> Self {
        let end = base.saturating_add(len);
        Window {
            name,
            base,
            end,
            free: vec![(base, end)],
        }
    }

    /// A naturally aligned range of `size` bytes (a power of two) from the lowest gap that
    /// holds one.
    pub fn allocate(&mut self, size: u64) -> Option<u64> {
        let (i, addr) = self
            .free
            .iter()
            .enumerate()
            .find_map(|(i, &(start, end))| {
                let addr = start.checked_next_multiple_of(size)?;
                (addr.checked_add(size)? <= end).then_some((i, addr))
            })?;
        let (start, end) = self.free.remove(i);
        let tail = addr + size;
        if tail < end {
            self.free.insert(i, (tail, end));
        }
        if start < addr {
            self.free.insert(i, (start, addr));
        }
        Some(addr)
    }
}

/// The root's three windows.
pub(super) struct Windows {
    pub mmio32: Window,
    pub mmio64: Option<Window>,
    pub io: Window,
}

impl Windows {
    pub fn new(w: PciWindows) -> Self {
        Windows {
            mmio32: Window::new("32-bit MMIO", w.mmio32),
            mmio64: w.mmio64.map(|m| Window::new("64-bit MMIO", m)),
            io: Window::new("I/O", w.io),
        }
    }

    /// Places a BAR of `kind` and `size`. On failure, the window it last tried, for the
    /// error message.
    pub fn allocate(&mut self, kind: BarKind, size: u64) -> Result<u64, &Window> {
        match kind {
            BarKind::Io => self.io.allocate(size).ok_or(&self.io),
            BarKind::Mem32 { .. } => self.mmio32.allocate(size).ok_or(&self.mmio32),
            // Prefetchable 64-bit BARs (GPU apertures, NVMe CMBs) belong above 4 GiB, where
            // they cannot crowd out the 32-bit BARs; the rest stay low while they fit.
            BarKind::Mem64 { prefetchable } => {
                let high_first = prefetchable && self.mmio64.is_some();
                let first = if high_first {
                    self.mmio64.as_mut().and_then(|w| w.allocate(size))
                } else {
                    self.mmio32.allocate(size)
                };
                if let Some(a) = first {
                    return Ok(a);
                }
                let second = if high_first {
                    self.mmio32.allocate(size)
                } else {
                    self.mmio64.as_mut().and_then(|w| w.allocate(size))
                };
                second.ok_or(match &self.mmio64 {
                    Some(w) => w,
                    None => &self.mmio32,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_gaps_are_reused() {
        let mut w = Window::new("I/O", (0x1000, 0xf000));
        assert_eq!(w.allocate(0x8), Some(0x1000));
        // 16 KiB aligns up to 0x4000, leaving [0x1008, 0x4000) free.
        assert_eq!(w.allocate(0x4000), Some(0x4000));
        assert_eq!(w.allocate(0x100), Some(0x1100));
        assert_eq!(w.allocate(0x8), Some(0x1008));
        assert_eq!(w.allocate(0x2000), Some(0x2000));
        assert_eq!(w.allocate(0x8000), Some(0x8000));
        // Only [0x1010, 0x1100), [0x1200, 0x2000) and nothing above 0x10000 remain.
        assert_eq!(w.allocate(0x1000), None);
        assert_eq!(w.allocate(0x800), Some(0x1800));
    }

    #[test]
    fn a_window_never_hands_out_past_its_end() {
        let mut w = Window::new("32-bit MMIO", (0xc000_0000, 0x2000_0000));
        assert_eq!(w.allocate(0x1000_0000), Some(0xc000_0000));
        assert_eq!(w.allocate(0x1000_0000), Some(0xd000_0000));
        assert_eq!(w.allocate(0x1000), None);
    }

    #[test]
    fn prefetchable_64_bit_bars_go_high_and_others_low() {
        let mut w = Windows::new(PciWindows {
            mmio32: (0xc000_0000, 0x2000_0000),
            mmio64: Some((1 << 36, 1 << 36)),
            io: (0x1000, 0xf000),
        });
        let pf = BarKind::Mem64 { prefetchable: true };
        let np = BarKind::Mem64 {
            prefetchable: false,
        };
        assert_eq!(w.allocate(pf, 1 << 33), Ok(1 << 36));
        assert_eq!(w.allocate(np, 0x1000), Ok(0xc000_0000));
        // A non-prefetchable BAR too large for the low window still finds room high.
        assert_eq!(w.allocate(np, 1 << 30), Ok((1 << 36) + (1 << 33)));
        let err = w.allocate(BarKind::Io, 1 << 20).unwrap_err();
        assert_eq!((err.name, err.base, err.end), ("I/O", 0x1000, 0x10000));
    }

    #[test]
    fn without_a_high_window_64_bit_bars_share_the_low_one() {
        let mut w = Windows::new(PciWindows {
            mmio32: (0xc000_0000, 0x2000_0000),
            mmio64: None,
            io: (0x1000, 0xf000),
        });
        let pf = BarKind::Mem64 { prefetchable: true };
        assert_eq!(w.allocate(pf, 0x1000), Ok(0xc000_0000));
        assert_eq!(w.allocate(pf, 1 << 30).unwrap_err().name, "32-bit MMIO");
    }
}
