//! The KVM VM: in-kernel irqchip and PIT, RAM slots, dirty logging, and the VM-wide state
//! (clock, PIC, IOAPIC, PIT) that migrates with it.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY, kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::memory::Ram;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open {path}: {err} (is KVM available and do you have permission?)")]
    OpenKvm {
        path: String,
        err: kvm_ioctls::Error,
    },
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM {what} failed: {err}")]
    Kvm {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Kvm { what, err }
}

pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
}

/// VM-wide KVM state, as plain data.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
}

impl Vm {
    pub fn new() -> Result<Self, VmError> {
        // MINIVMM_KVM_DEVICE exists for tests of the error path and for unusual hosts.
        let path = std::env::var("MINIVMM_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".into());
        let cpath = std::ffi::CString::new(path.clone()).map_err(|_| VmError::OpenKvm {
            path: path.clone(),
            err: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let kvm = Kvm::new_with_path(&cpath).map_err(|err| VmError::OpenKvm { path, err })?;
        let v = kvm.get_api_version();
        if v != 12 {
            return Err(VmError::ApiVersion(v));
        }
        let fd = kvm.create_vm().map_err(kvm_err("create VM"))?;
        // The TSS and identity map live just under the BIOS area at the top of 4 GiB, which
        // is inside the PCI hole's reserved top and never RAM.
        fd.set_tss_address(0xfffb_d000)
            .map_err(kvm_err("set TSS address"))?;
        fd.set_identity_map_address(0xfffb_c000)
            .map_err(kvm_err("set identity map address"))?;
        fd.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("create PIT"))?;
        Ok(Vm { kvm, fd })
    }

    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Registers every RAM region as a slot (slot i = region i), with dirty logging on or off.
    pub fn set_ram_slots(&self, ram: &Ram, log_dirty: bool) -> Result<(), VmError> {
        let flags = if log_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in ram.mem.iter().enumerate() {
            let host = ram
                .mem
                .get_host_address(region.start_addr())
                .map_err(|_| VmError::Kvm {
                    what: "resolve RAM",
                    err: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region stays mapped for the VM's lifetime (Ram outlives Vm's use of it).
            unsafe { self.fd.set_user_memory_region(r) }.map_err(kvm_err("set memory region"))?;
        }
        Ok(())
    }

    /// KVM's dirty log for a slot since the last call (the call clears it).
    pub fn dirty_log(&self, slot: u32, len: u64) -> Result<Vec<u64>, VmError> {
        self.fd
            .get_dirty_log(slot, len as usize)
            .map_err(kvm_err("get dirty log"))
    }

    pub fn irq_line(&self, gsi: u32, level: bool) -> Result<(), VmError> {
        self.fd
            .set_irq_line(gsi, level)
            .map_err(kvm_err("set IRQ line"))
    }

    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(kvm_err("get irqchip"))?;
            Ok(c)
        };
        Ok(VmState {
            clock: self.fd.get_clock().map_err(kvm_err("get clock"))?,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("get PIT"))?,
        })
    }

    /// Restores in Firecracker's order: PIT, clock, irqchips.
    pub fn restore_state(&self, s: &VmState) -> Result<(), VmError> {
        self.fd.set_pit2(&s.pit).map_err(kvm_err("set PIT"))?;
        // Only the clock value moves; the TSC-stable flag describes the source host.
        let clock = kvm_clock_data {
            clock: s.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(kvm_err("set clock"))?;
        for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            self.fd.set_irqchip(c).map_err(kvm_err("set irqchip"))?;
        }
        Ok(())
    }
}

/// The first guest address of each RAM slot with its length, in slot order.
pub fn slot_layout(ram: &Ram) -> Vec<(GuestAddress, u64)> {
    ram.mem.iter().map(|r| (r.start_addr(), r.len())).collect()
}
