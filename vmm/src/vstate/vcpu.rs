//! One vCPU: its KVM setup at boot, and its full architectural state as plain data
//! (saved and restored with all vCPUs parked; see `runner.rs` for the threads).

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_debugregs, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::cpuid::{self, CpuidEntry};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {index}: KVM {what} failed: {err}")]
    Kvm {
        index: u8,
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM accepted only {done} of {total} MSRs (first refused: {first:#x})")]
    Msrs {
        index: u8,
        done: usize,
        total: usize,
        first: u32,
    },
    #[error("vCPU {index}: bad CPUID/MSR list: {reason}")]
    Fam { index: u8, reason: String },
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<CpuidEntry>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
}

impl Vcpu {
    fn err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError + '_ {
        move |err| VcpuError::Kvm {
            index: self.index,
            what,
            err,
        }
    }

    /// Boot-time setup shared by every vCPU: CPUID, boot MSRs, LAPIC LINT0/LINT1.
    pub fn configure(&self, supported: &CpuId, count: u8) -> Result<(), VcpuError> {
        let c = cpuid::for_vcpu(supported, self.index as u32, count as u32);
        self.fd.set_cpuid2(&c).map_err(self.err("set CPUID"))?;
        let boot = [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
            (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
        ];
        self.set_msrs(&boot)?;
        let mut lapic = self.fd.get_lapic().map_err(self.err("get LAPIC"))?;
        crate::boot::boot_lapic(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(self.err("set LAPIC"))
    }

    /// Sets MSRs and insists that KVM took every one (`set_msrs` stops at the first refusal).
    pub fn set_msrs(&self, list: &[(u32, u64)]) -> Result<(), VcpuError> {
        let entries: Vec<kvm_msr_entry> = list
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| VcpuError::Fam {
            index: self.index,
            reason: format!("{e:?}"),
        })?;
        let done = self.fd.set_msrs(&msrs).map_err(self.err("set MSRs"))?;
        if done != list.len() {
            return Err(VcpuError::Msrs {
                index: self.index,
                done,
                total: list.len(),
                first: list[done].0,
            });
        }
        Ok(())
    }

    /// Reads the given MSRs; KVM stops at the first it cannot read, so report that.
    pub fn get_msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuError> {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| VcpuError::Fam {
            index: self.index,
            reason: format!("{e:?}"),
        })?;
        let done = self.fd.get_msrs(&mut msrs).map_err(self.err("get MSRs"))?;
        if done != indices.len() {
            return Err(VcpuError::Msrs {
                index: self.index,
                done,
                total: indices.len(),
                first: indices[done],
            });
        }
        Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect())
    }

    /// The MSRs of `candidates` this vCPU can actually read (some in KVM's list are not
    /// readable on every host); computed once at start of a migration.
    pub fn readable_msrs(&self, candidates: &[u32]) -> Vec<u32> {
        let mut list = candidates.to_vec();
        loop {
            match self.get_msrs(&list) {
                Ok(_) => return list,
                Err(VcpuError::Msrs { done, .. }) if done < list.len() => {
                    log::debug!(
                        "vCPU {}: MSR {:#x} not readable, skipped",
                        self.index,
                        list[done]
                    );
                    list.remove(done);
                }
                Err(_) => return Vec::new(),
            }
        }
    }

    pub fn save(&self, msr_list: &[u32]) -> Result<VcpuState, VcpuError> {
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(self.err("get CPUID"))?;
        // mp_state first: reading it makes KVM accept pending INIT/SIPI events.
        let mp_state = self.fd.get_mp_state().map_err(self.err("get MP state"))?;
        Ok(VcpuState {
            cpuid: cpuid::to_entries(&cpuid),
            mp_state,
            regs: self.fd.get_regs().map_err(self.err("get regs"))?,
            sregs: self.fd.get_sregs().map_err(self.err("get sregs"))?,
            xsave: self.fd.get_xsave().map_err(self.err("get xsave"))?,
            xcrs: self.fd.get_xcrs().map_err(self.err("get xcrs"))?,
            debugregs: self
                .fd
                .get_debug_regs()
                .map_err(self.err("get debugregs"))?,
            lapic: self.fd.get_lapic().map_err(self.err("get LAPIC"))?,
            msrs: self.get_msrs(msr_list)?,
            events: self.fd.get_vcpu_events().map_err(self.err("get events"))?,
            tsc_khz: self.fd.get_tsc_khz().ok(),
        })
    }

    /// Restores in Firecracker's order: CPUID, MP state, regs, sregs, xsave, xcrs, debug
    /// registers, LAPIC, MSRs (all of them), events last.
    pub fn restore(&self, s: &VcpuState) -> Result<(), VcpuError> {
        let cpuid = cpuid::from_entries(&s.cpuid).map_err(|e| VcpuError::Fam {
            index: self.index,
            reason: format!("{e:?}"),
        })?;
        self.fd.set_cpuid2(&cpuid).map_err(self.err("set CPUID"))?;
        if let Some(khz) = s.tsc_khz
            && self.fd.get_tsc_khz().ok() != Some(khz)
            && let Err(e) = self.fd.set_tsc_khz(khz)
        {
            log::warn!(
                "vCPU {}: cannot set TSC to {khz} kHz ({e}); guest time may drift",
                self.index
            );
        }
        self.fd
            .set_mp_state(s.mp_state)
            .map_err(self.err("set MP state"))?;
        self.fd.set_regs(&s.regs).map_err(self.err("set regs"))?;
        self.fd.set_sregs(&s.sregs).map_err(self.err("set sregs"))?;
        // SAFETY: kvm_xsave is the fixed 4 KiB layout; KVM_CAP_XSAVE2 reports 4096 on these
        // hosts, so no extended area is cut off.
        unsafe { self.fd.set_xsave(&s.xsave) }.map_err(self.err("set xsave"))?;
        self.fd.set_xcrs(&s.xcrs).map_err(self.err("set xcrs"))?;
        self.fd
            .set_debug_regs(&s.debugregs)
            .map_err(self.err("set debugregs"))?;
        self.fd.set_lapic(&s.lapic).map_err(self.err("set LAPIC"))?;
        self.set_msrs(&s.msrs)?;
        self.fd
            .set_vcpu_events(&s.events)
            .map_err(self.err("set events"))?;
        Ok(())
    }
}
