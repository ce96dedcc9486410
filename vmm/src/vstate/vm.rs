//! The KVM VM: in-kernel irqchip and PIT, RAM slots, dirty logging, and the VM-wide state
//! (clock, PIC, IOAPIC, PIT) that migrates with it.

use std::sync::Arc;

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY, kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::{GuestMemory, Ram};

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

/// The VM fd is shared: the migration thread reads dirty logs while vCPUs run.
pub struct Vm {
    pub kvm: Kvm,
    pub fd: Arc<VmFd>,
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
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
        })
    }

    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Registers every RAM region as a slot (slot i = region i), with dirty logging off.
    pub fn set_ram_slots(&self, ram: &Ram) -> Result<(), VmError> {
        set_ram_slots(&self.fd, &ram.mem, false)
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

/// (Re-)registers every RAM region as KVM slot i = region i; re-registering an existing slot
/// with other flags is how dirty logging is switched on and off for a running guest.
pub fn set_ram_slots(fd: &VmFd, mem: &GuestMemory, log_dirty: bool) -> Result<(), VmError> {
    let flags = if log_dirty {
        KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    };
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
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
        // SAFETY: the mapping belongs to the VM's Ram, which lives as long as the VM.
        unsafe { fd.set_user_memory_region(r) }.map_err(kvm_err("set memory region"))?;
    }
    Ok(())
}
