//! Where dirty pages come from, and their merge into one range table per pass.
//!
//! Each writer of guest memory reports through a [`DirtySource`]: KVM's log (in the VMM), the
//! VMM's own writes ([`VmmWrites`], vm-memory's `AtomicBitmap`), each passthrough device's DMA
//! log, or [`AlwaysDirty`] for a device that cannot log (forced migration). A page is dirty
//! if any source says so.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::bitmap;
use crate::ranges::{MemoryRange, PAGE_SIZE};

/// One contiguous RAM region, numbered like the VMM's KVM memory slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamSlot {
    pub index: u32,
    pub range: MemoryRange,
}

impl RamSlot {
    pub fn pages(&self) -> u64 {
        self.range.len / PAGE_SIZE
    }

    /// The slots of `mem`, in region order (the order the VMM registers them with KVM).
    pub fn of_memory<M: GuestMemoryBackend>(mem: &M) -> Vec<RamSlot> {
        mem.iter()
            .enumerate()
            .map(|(i, r)| RamSlot {
                index: i as u32,
                range: MemoryRange::new(r.start_addr().0, r.len()),
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("dirty log of {name}: {reason}")]
pub struct DirtyError {
    pub name: String,
    pub reason: String,
}

impl DirtyError {
    pub fn new(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            reason: reason.into(),
        }
    }
}

pub trait DirtySource: Send {
    fn name(&self) -> &str;

    /// Begins tracking; pages written before this are covered by the first full pass.
    fn start(&mut self) -> Result<(), DirtyError> {
        Ok(())
    }

    /// Pages of `slot` written since the previous call (or `start`), in KVM's bit layout;
    /// reading clears them. A shorter bitmap means the missing pages are clean.
    fn dirty_bitmap(&mut self, slot: &RamSlot) -> Result<Vec<u64>, DirtyError>;

    fn stop(&mut self) -> Result<(), DirtyError> {
        Ok(())
    }
}

/// The union of all sources over all slots.
pub struct DirtyLog {
    slots: Vec<RamSlot>,
    sources: Vec<Box<dyn DirtySource>>,
}

impl DirtyLog {
    pub fn new(slots: Vec<RamSlot>) -> Self {
        Self {
            slots,
            sources: Vec::new(),
        }
    }

    pub fn add(&mut self, source: Box<dyn DirtySource>) {
        self.sources.push(source);
    }

    pub fn slots(&self) -> &[RamSlot] {
        &self.slots
    }

    /// Starts every source; if one fails, those already started are stopped again.
    pub fn start(&mut self) -> Result<(), DirtyError> {
        for i in 0..self.sources.len() {
            if let Err(e) = self.sources[i].start() {
                for s in &mut self.sources[..i] {
                    if let Err(e2) = s.stop() {
                        log::warn!("stopping after a failed start: {e2}");
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Every page of every slot: what the first pass sends.
    pub fn all_ranges(&self) -> Vec<MemoryRange> {
        self.slots.iter().map(|s| s.range).collect()
    }

    /// Collects and clears the dirty pages of all sources, merged per slot.
    pub fn collect(&mut self) -> Result<Vec<MemoryRange>, DirtyError> {
        let mut out = Vec::new();
        for slot in &self.slots {
            let mut merged = Vec::new();
            for s in &mut self.sources {
                bitmap::or_into(&mut merged, &s.dirty_bitmap(slot)?);
            }
            bitmap::truncate(&mut merged, slot.pages());
            out.extend(bitmap::to_ranges(&merged, slot.range.gpa));
        }
        Ok(out)
    }

    /// Stops every source (all are tried); returns the first error.
    pub fn stop(&mut self) -> Result<(), DirtyError> {
        let mut first = None;
        for s in &mut self.sources {
            if let Err(e) = s.stop() {
                log::warn!("{e}");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Writes the VMM itself made through vm-memory (device emulation, virtio rings), which KVM's
/// log does not see.
pub struct VmmWrites {
    mem: GuestMemoryMmap<AtomicBitmap>,
}

impl VmmWrites {
    pub fn new(mem: GuestMemoryMmap<AtomicBitmap>) -> Self {
        Self { mem }
    }
}

impl DirtySource for VmmWrites {
    fn name(&self) -> &str {
        "vmm-writes"
    }

    fn start(&mut self) -> Result<(), DirtyError> {
        for r in self.mem.iter() {
            r.get_mmap().bitmap().reset();
        }
        Ok(())
    }

    fn dirty_bitmap(&mut self, slot: &RamSlot) -> Result<Vec<u64>, DirtyError> {
        let region = self
            .mem
            .iter()
            .find(|r| r.start_addr().0 == slot.range.gpa)
            .ok_or_else(|| DirtyError::new("vmm-writes", format!("no region for {slot:x?}")))?;
        Ok(region.get_mmap().bitmap().get_and_reset())
    }
}

/// Treats fixed ranges as dirty on every pass: a device whose DMA cannot be logged, migrated
/// only because the user forced it, keeps its whole DMA window dirty.
pub struct AlwaysDirty {
    name: String,
    ranges: Vec<MemoryRange>,
}

impl AlwaysDirty {
    pub fn new(name: impl Into<String>, ranges: Vec<MemoryRange>) -> Self {
        Self {
            name: name.into(),
            ranges,
        }
    }
}

impl DirtySource for AlwaysDirty {
    fn name(&self) -> &str {
        &self.name
    }

    fn dirty_bitmap(&mut self, slot: &RamSlot) -> Result<Vec<u64>, DirtyError> {
        let mut bm = vec![0u64; bitmap::words_for(slot.pages())];
        let (base, end) = (slot.range.gpa, slot.range.gpa + slot.range.len);
        for r in &self.ranges {
            let start = r.gpa.max(base);
            let stop = r.end().unwrap_or(u64::MAX).min(end);
            let first = (start - base) / PAGE_SIZE;
            let last = stop.saturating_sub(base).div_ceil(PAGE_SIZE);
            for page in first..last.max(first) {
                bm[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
        Ok(bm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    struct Fixed(Vec<u64>);
    impl DirtySource for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn dirty_bitmap(&mut self, slot: &RamSlot) -> Result<Vec<u64>, DirtyError> {
            Ok(if slot.index == 0 {
                self.0.clone()
            } else {
                vec![]
            })
        }
    }

    #[test]
    fn merges_kvm_like_vmm_writes_and_forced_device() {
        let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x100_0000), 0x10_0000),
        ])
        .unwrap();
        let mut log = DirtyLog::new(RamSlot::of_memory(&mem));
        log.add(Box::new(Fixed(vec![0b101])));
        log.add(Box::new(VmmWrites::new(mem.clone())));
        log.add(Box::new(AlwaysDirty::new(
            "dev",
            vec![MemoryRange::new(0x100_1000, 0x1800)],
        )));
        mem.write_obj(1u8, GuestAddress(0x1000)).unwrap(); // before start: not reported
        log.start().unwrap();
        mem.write_obj(7u64, GuestAddress(0x100_4000)).unwrap();
        let ranges = log.collect().unwrap();
        assert_eq!(
            ranges,
            vec![
                MemoryRange::new(0, PAGE_SIZE),
                MemoryRange::new(2 * PAGE_SIZE, PAGE_SIZE),
                MemoryRange::new(0x100_1000, 2 * PAGE_SIZE),
                MemoryRange::new(0x100_4000, PAGE_SIZE),
            ]
        );
        // The VMM-write bit was consumed; the forced device stays dirty.
        let again = log.collect().unwrap();
        assert!(again.contains(&MemoryRange::new(0x100_1000, 2 * PAGE_SIZE)));
        assert!(!again.contains(&MemoryRange::new(0x100_4000, PAGE_SIZE)));
        log.stop().unwrap();
    }

    #[test]
    fn bits_past_the_slot_are_ignored() {
        let slot = RamSlot {
            index: 0,
            range: MemoryRange::new(0, 2 * PAGE_SIZE),
        };
        let mut log = DirtyLog::new(vec![slot]);
        log.add(Box::new(Fixed(vec![u64::MAX, u64::MAX])));
        assert_eq!(log.collect().unwrap(), vec![slot.range]);
    }
}
