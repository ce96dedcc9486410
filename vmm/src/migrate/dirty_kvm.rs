//! KVM's dirty log as a migration `DirtySource`.
//!
//! KVM_GET_DIRTY_LOG (fetch-and-clear in one ioctl) is used: on these hosts it is the
//! cheapest of the three mechanisms for our slot sizes (see scripts/bench-dirty-log), and it
//! needs no per-vCPU ring setup before the vCPUs are created, so a VM can start a migration
//! at any time without having been prepared for it.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use migration::dirty::{DirtyError, DirtySource, RamSlot};

use crate::vstate::memory::GuestMemory;
use crate::vstate::vm::set_ram_slots;

pub struct KvmDirtyLog {
    fd: Arc<VmFd>,
    mem: GuestMemory,
    on: bool,
}

impl KvmDirtyLog {
    pub fn new(fd: Arc<VmFd>, mem: GuestMemory) -> Self {
        KvmDirtyLog { fd, mem, on: false }
    }
}

impl DirtySource for KvmDirtyLog {
    fn name(&self) -> &str {
        "KVM"
    }

    fn start(&mut self) -> Result<(), DirtyError> {
        set_ram_slots(&self.fd, &self.mem, true)
            .map_err(|e| DirtyError::new("KVM", e.to_string()))?;
        self.on = true;
        Ok(())
    }

    fn dirty_bitmap(&mut self, slot: &RamSlot) -> Result<Vec<u64>, DirtyError> {
        self.fd
            .get_dirty_log(slot.index, slot.range.len as usize)
            .map_err(|e| DirtyError::new("KVM", format!("slot {}: {e}", slot.index)))
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if !self.on {
            return Ok(());
        }
        self.on = false;
        set_ram_slots(&self.fd, &self.mem, false).map_err(|e| DirtyError::new("KVM", e.to_string()))
    }
}

impl Drop for KvmDirtyLog {
    fn drop(&mut self) {
        // Logging costs the guest a write fault per page per pass; never leave it on.
        if let Err(e) = self.stop() {
            log::warn!("{e}");
        }
    }
}
