//! What the PCI root needs from a function on its bus.

use std::sync::{Arc, Mutex, MutexGuard};

use migration::state::StateError;

use super::config::BarRegion;

/// A PCI function. Configuration accesses arrive at most 4 bytes wide and never cross a
/// dword; `offset` is within the 4 KiB ECAM view of the function.
pub trait PciDevice: Send {
    fn read_config(&mut self, offset: usize, data: &mut [u8]);
    fn write_config(&mut self, offset: usize, data: &[u8]);

    /// Every BAR the device declares, at the address its register holds now (whether or not
    /// decoding is enabled: the root reads COMMAND for that).
    fn bars(&self) -> Vec<BarRegion>;

    /// An access to BAR `bar` at `offset` from its base, dispatched from the MMIO or PIO bus.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// The root placed BAR `bar` on its bus at `addr`, or took it off (`None`). Devices that map
    /// BAR memory directly into the guest (VFIO mmap) move their mappings here.
    fn bar_mapped(&mut self, _bar: usize, _addr: Option<u64>) {}

    /// The registers the VMM emulates for this function, as one encoded blob.
    fn save_state(&self) -> Result<Vec<u8>, StateError>;
    /// Loads [`PciDevice::save_state`]'s blob and re-applies what it implies (interrupt routes).
    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), StateError>;
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Locks a PCI device, ignoring poisoning as [`crate::bus::lock`] does.
pub fn lock_pci(dev: &SharedPciDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}
