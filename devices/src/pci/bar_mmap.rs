//! The fast path for passthrough BARs: device memory mmapped from the backend's region fd and
//! installed as a KVM memory slot at the BAR's guest address, so guest accesses to it never
//! exit. Whatever is not mapped (the MSI-X table and PBA pages, sub-page areas, backends
//! without an fd) stays on the trapped path, which always works.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

use super::vfio_backend::MmapArea;

pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BarMapError {
    #[error("mmap of {size:#x} bytes at file offset {offset:#x}: {err}")]
    Mmap {
        size: u64,
        offset: u64,
        #[source]
        err: std::io::Error,
    },
    #[error("KVM_SET_USER_MEMORY_REGION for BAR memory at {gpa:#x}: {err}")]
    Slot {
        gpa: u64,
        #[source]
        err: kvm_ioctls::Error,
    },
    #[error("no KVM memory slot left for BAR memory")]
    NoSlot,
}

/// Installs device memory in the guest. `map` returns a handle for `unmap`.
pub trait BarMemoryMapper: Send + Sync {
    fn map(
        &self,
        gpa: u64,
        size: u64,
        file: &File,
        file_offset: u64,
        writable: bool,
    ) -> Result<u64, BarMapError>;
    fn unmap(&self, handle: u64);
}

/// The page-aligned parts of `areas` that avoid `holes` (both as (offset, size) in the BAR).
pub fn mappable_ranges(areas: &[MmapArea], holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for a in areas {
        let mut pieces = vec![(a.offset, a.offset.saturating_add(a.size))];
        for &(h, len) in holes {
            let (hs, he) = (
                h / PAGE_SIZE * PAGE_SIZE,
                (h + len).next_multiple_of(PAGE_SIZE),
            );
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| [(s, e.min(hs)), (s.max(he), e)])
                .filter(|(s, e)| s < e)
                .collect();
        }
        for (s, e) in pieces {
            let (s, e) = (s.next_multiple_of(PAGE_SIZE), e / PAGE_SIZE * PAGE_SIZE);
            if s < e {
                out.push((s, e - s));
            }
        }
    }
    out
}

struct Mapping {
    host: usize,
    size: u64,
}

struct Slots {
    next: u32,
    end: u32,
    free: Vec<u32>,
    maps: BTreeMap<u32, Mapping>,
}

impl Slots {
    fn take(&mut self) -> Option<u32> {
        if let Some(s) = self.free.pop() {
            return Some(s);
        }
        (self.next < self.end).then(|| {
            self.next += 1;
            self.next - 1
        })
    }
}

/// A fresh shared mapping of `size` bytes of `file` at `offset`; returns its address.
fn mmap_shared(file: &File, offset: u64, size: u64, writable: bool) -> Result<usize, BarMapError> {
    let err = |err| BarMapError::Mmap { size, offset, err };
    let invalid = || err(std::io::ErrorKind::InvalidInput.into());
    let len = usize::try_from(size).map_err(|_| invalid())?;
    let off = libc::off_t::try_from(offset).map_err(|_| invalid())?;
    let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
    let fd = file.as_raw_fd();
    // SAFETY: a new shared mapping at an address the kernel picks; it aliases no Rust object.
    let host = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, off) };
    if host == libc::MAP_FAILED {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(host as usize)
}

/// [`BarMemoryMapper`] on KVM: slots `first_slot..first_slot+count` are reserved for BARs
/// (the VMM keeps its RAM slots below).
pub struct KvmBarMapper {
    vm: Arc<VmFd>,
    slots: Mutex<Slots>,
}

impl KvmBarMapper {
    pub fn new(vm: Arc<VmFd>, first_slot: u32, count: u32) -> Self {
        KvmBarMapper {
            vm,
            slots: Mutex::new(Slots {
                next: first_slot,
                end: first_slot.saturating_add(count),
                free: Vec::new(),
                maps: BTreeMap::new(),
            }),
        }
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_slot(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host: usize,
    ) -> Result<(), kvm_ioctls::Error> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is a live mapping of `size` bytes owned by this mapper (or size is 0,
        // which deletes the slot); it is unmapped only after the slot is deleted.
        unsafe { self.vm.set_user_memory_region(region) }
    }
}

impl BarMemoryMapper for KvmBarMapper {
    fn map(
        &self,
        gpa: u64,
        size: u64,
        file: &File,
        file_offset: u64,
        writable: bool,
    ) -> Result<u64, BarMapError> {
        let mut slots = self.slots();
        let slot = slots.take().ok_or(BarMapError::NoSlot)?;
        let host = match mmap_shared(file, file_offset, size, writable) {
            Ok(h) => h,
            Err(e) => {
                slots.free.push(slot);
                return Err(e);
            }
        };
        if let Err(err) = self.set_slot(slot, gpa, size, host) {
            // SAFETY: the mapping was created just above and is not in use anywhere.
            unsafe { libc::munmap(host as *mut libc::c_void, size as usize) };
            slots.free.push(slot);
            return Err(BarMapError::Slot { gpa, err });
        }
        slots.maps.insert(slot, Mapping { host, size });
        Ok(u64::from(slot))
    }

    fn unmap(&self, handle: u64) {
        let mut slots = self.slots();
        let Ok(slot) = u32::try_from(handle) else {
            return;
        };
        let Some(m) = slots.maps.remove(&slot) else {
            return;
        };
        if let Err(e) = self.set_slot(slot, 0, 0, 0) {
            // KVM may still reach the memory: leaking the mapping is the safe choice.
            log::error!("deleting BAR memory slot {slot}: {e}");
            return;
        }
        // SAFETY: the slot that used the mapping is gone; nothing else refers to it.
        unsafe { libc::munmap(m.host as *mut libc::c_void, m.size as usize) };
        slots.free.push(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(offset: u64, size: u64) -> MmapArea {
        MmapArea { offset, size }
    }

    #[test]
    fn holes_and_alignment() {
        let r = mappable_ranges(&[area(0, 0x4000)], &[(0x2000, 0x40), (0x3000, 8)]);
        assert_eq!(r, vec![(0, 0x2000)]);
        let r = mappable_ranges(&[area(0x800, 0x3000)], &[]);
        assert_eq!(r, vec![(0x1000, 0x2000)], "sub-page edges stay trapped");
        assert!(mappable_ranges(&[area(0, 0x100)], &[]).is_empty());
        let r = mappable_ranges(&[area(0, 0x10000)], &[(0x8000, 0x1000)]);
        assert_eq!(r, vec![(0, 0x8000), (0x9000, 0x7000)]);
    }

    #[test]
    fn kvm_slots_map_and_unmap() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        let tmp = vmm_sys_util::tempfile::TempFile::new().unwrap();
        tmp.as_file().set_len(0x4000).unwrap();
        let m = KvmBarMapper::new(vm, 10, 1);
        let h = m
            .map(0xc000_0000, 0x2000, tmp.as_file(), 0x1000, true)
            .unwrap();
        assert!(matches!(
            m.map(0xc001_0000, 0x1000, tmp.as_file(), 0, true),
            Err(BarMapError::NoSlot)
        ));
        m.unmap(h);
        let h2 = m.map(0xd000_0000, 0x1000, tmp.as_file(), 0, false).unwrap();
        assert_eq!(h2, h, "slot reused");
        m.unmap(h2);
    }
}
