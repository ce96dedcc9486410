//! Port-I/O and MMIO buses: each device owns an explicit address range, and the vCPU loop
//! dispatches an exit to whichever device covers the address. No device reaches into another.
//!
//! The range table sits behind a `RwLock` so that a bus shared as `Arc<Bus>` by every vCPU can
//! still change at run time (a guest moving a PCI BAR). The lock is held only to look a range
//! up, never while a device runs, so a device may itself insert or remove ranges.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A device on a bus. `offset` is relative to the base of the range it was inserted with.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("empty range at {0:#x}")]
    Empty(u64),
    #[error("no device at {0:#x}")]
    NotFound(u64),
}

type Ranges = BTreeMap<u64, (u64, SharedDevice)>;

#[derive(Default)]
pub struct Bus {
    ranges: RwLock<Ranges>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    // Poisoning is ignored: the map is only mutated by whole-entry inserts and removes, so a
    // panic elsewhere cannot leave it half-updated.
    fn ranges(&self) -> RwLockReadGuard<'_, Ranges> {
        self.ranges.read().unwrap_or_else(|e| e.into_inner())
    }

    fn ranges_mut(&self) -> RwLockWriteGuard<'_, Ranges> {
        self.ranges.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, base: u64, len: u64, dev: SharedDevice) -> Result<(), BusError> {
        insert_into(&mut self.ranges_mut(), base, len, dev)
    }

    /// Removes the range starting exactly at `base` (used when a guest moves a PCI BAR).
    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        self.ranges_mut()
            .remove(&base)
            .map(|(_, d)| d)
            .ok_or(BusError::NotFound(base))
    }

    /// Moves the range at `old_base` to `new_base` in one step, so no vCPU sees the device
    /// missing in between; on overlap the range stays where it was.
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        let mut ranges = self.ranges_mut();
        let (len, dev) = ranges
            .remove(&old_base)
            .ok_or(BusError::NotFound(old_base))?;
        if let Err(e) = insert_into(&mut ranges, new_base, len, dev.clone()) {
            ranges.insert(old_base, (len, dev));
            return Err(e);
        }
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` inside its range.
    pub fn resolve(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges();
        let (&base, (len, dev)) = ranges.range(..=addr).next_back()?;
        (addr - base < *len).then(|| (addr - base, dev.clone()))
    }

    /// Returns false when no device covers `addr` (reads then see all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((off, dev)) => {
                lock(&dev).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((off, dev)) => {
                lock(&dev).write(off, data);
                true
            }
            None => false,
        }
    }
}

fn insert_into(
    ranges: &mut Ranges,
    base: u64,
    len: u64,
    dev: SharedDevice,
) -> Result<(), BusError> {
    if len == 0 {
        return Err(BusError::Empty(base));
    }
    let end = base
        .checked_add(len)
        .ok_or(BusError::Overlap { base, len })?;
    if let Some((&b, &(l, _))) = ranges.range(..end).next_back()
        && b + l > base
    {
        return Err(BusError::Overlap { base, len });
    }
    ranges.insert(base, (len, dev));
    Ok(())
}

/// Locks a device, ignoring poisoning: a panicked device thread must not take the bus down.
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rec(Vec<(u64, u8)>);
    impl BusDevice for Rec {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn dispatch_overlap_and_remove() {
        let bus = Bus::new();
        let d: SharedDevice = Arc::new(Mutex::new(Rec(vec![])));
        bus.insert(0x3f8, 8, d.clone()).unwrap();
        assert_eq!(
            bus.insert(0x3f0, 9, d.clone()),
            Err(BusError::Overlap {
                base: 0x3f0,
                len: 9
            })
        );
        assert_eq!(
            bus.insert(0x3ff, 1, d.clone()),
            Err(BusError::Overlap {
                base: 0x3ff,
                len: 1
            })
        );
        bus.insert(0x400, 1, d.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(!bus.read(0x3f7, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x3f8, &[9]));
        bus.remove(0x3f8).unwrap();
        assert!(!bus.write(0x3f8, &[9]));
    }

    #[test]
    fn relocate_moves_or_keeps() {
        let bus = Bus::new();
        let d: SharedDevice = Arc::new(Mutex::new(Rec(vec![])));
        bus.insert(0x1000, 0x100, d.clone()).unwrap();
        bus.insert(0x3000, 0x100, d.clone()).unwrap();
        bus.relocate(0x1000, 0x2000).unwrap();
        assert!(bus.resolve(0x1000).is_none());
        assert_eq!(bus.resolve(0x2010).map(|(o, _)| o), Some(0x10));
        assert_eq!(
            bus.relocate(0x2000, 0x2f80),
            Err(BusError::Overlap {
                base: 0x2f80,
                len: 0x100
            })
        );
        assert!(bus.resolve(0x2000).is_some());
        assert_eq!(
            bus.relocate(0x5000, 0x6000),
            Err(BusError::NotFound(0x5000))
        );
    }
}
