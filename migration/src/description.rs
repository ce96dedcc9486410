//! What the source says about the VM before any memory moves, and the destination's check of
//! it: a mismatch is refused with a reason instead of surfacing later as a broken guest.

use serde::{Deserialize, Serialize};

use crate::ranges::{MemoryRange, PAGE_SIZE};

/// Limits on a received description; a peer claiming more is malformed, not just different.
pub const MAX_RAM_RANGES: usize = 64;
pub const MAX_VCPUS: u32 = 1024;
pub const MAX_CPUID_ENTRIES: usize = 1024;
pub const MAX_DEVICES: usize = 256;
pub const MAX_ID_LEN: usize = 256;

/// One `kvm_cpuid_entry2`, as plain data so this crate needs no KVM types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// The VFIO migration features a device offers (`VFIO_MIGRATION_*`) plus DMA logging; an
/// emulated device reports only `stop_copy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCaps {
    pub stop_copy: bool,
    pub p2p: bool,
    pub pre_copy: bool,
    pub dirty_tracking: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDescription {
    pub id: String,
    pub kind: String,
    pub caps: MigrationCaps,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    pub ram: Vec<MemoryRange>,
    pub vcpus: u32,
    pub cpuid: Vec<CpuidEntry>,
    pub devices: Vec<DeviceDescription>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptionError {
    #[error("invalid VM description: {0}")]
    Invalid(String),
    #[error("incompatible VM: {0}")]
    Incompatible(String),
}

fn invalid(reason: impl Into<String>) -> DescriptionError {
    DescriptionError::Invalid(reason.into())
}

fn incompatible(reason: impl Into<String>) -> DescriptionError {
    DescriptionError::Incompatible(reason.into())
}

impl VmDescription {
    /// Checks the description is self-consistent: what a decoder must ensure before anything
    /// sizes memory or vCPUs from it.
    pub fn validate(&self) -> Result<(), DescriptionError> {
        self.validate_ram()?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(invalid(format!("{} vCPUs (1..={MAX_VCPUS})", self.vcpus)));
        }
        if self.cpuid.len() > MAX_CPUID_ENTRIES {
            return Err(invalid(format!("{} CPUID entries", self.cpuid.len())));
        }
        self.validate_devices()
    }

    fn validate_ram(&self) -> Result<(), DescriptionError> {
        if self.ram.is_empty() || self.ram.len() > MAX_RAM_RANGES {
            return Err(invalid(format!("{} RAM ranges", self.ram.len())));
        }
        let mut prev_end = 0;
        for (i, r) in self.ram.iter().enumerate() {
            let end = r
                .end()
                .ok_or_else(|| invalid(format!("RAM range {i} wraps")))?;
            if r.len == 0 || r.gpa % PAGE_SIZE != 0 || r.len % PAGE_SIZE != 0 {
                return Err(invalid(format!("RAM range {i} {r:x?} is not page-aligned")));
            }
            if i > 0 && r.gpa < prev_end {
                return Err(invalid(format!(
                    "RAM range {i} {r:x?} overlaps or is unsorted"
                )));
            }
            prev_end = end;
        }
        Ok(())
    }

    fn validate_devices(&self) -> Result<(), DescriptionError> {
        if self.devices.len() > MAX_DEVICES {
            return Err(invalid(format!("{} devices", self.devices.len())));
        }
        for (i, d) in self.devices.iter().enumerate() {
            if d.id.is_empty() || d.id.len() > MAX_ID_LEN || d.kind.len() > MAX_ID_LEN {
                return Err(invalid(format!("device {i} has a bad id or kind")));
            }
            if self.devices[..i].iter().any(|o| o.id == d.id) {
                return Err(invalid(format!("device id {:?} appears twice", d.id)));
            }
        }
        Ok(())
    }

    /// Total guest RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        crate::ranges::total_len(&self.ram)
    }

    /// Whether a VM described by `self` (the source's) can be resumed on a destination whose
    /// own view is `local`; the error names the first difference, for the Refuse reason.
    pub fn check_compatible(&self, local: &VmDescription) -> Result<(), DescriptionError> {
        if self.ram != local.ram {
            return Err(incompatible(format!(
                "RAM layout {:x?} differs from the destination's {:x?}",
                self.ram, local.ram
            )));
        }
        if self.vcpus != local.vcpus {
            return Err(incompatible(format!(
                "{} vCPUs, destination has {}",
                self.vcpus, local.vcpus
            )));
        }
        check_cpuid(&self.cpuid, &local.cpuid)?;
        check_devices(&self.devices, &local.devices)
    }
}

fn check_cpuid(src: &[CpuidEntry], dst: &[CpuidEntry]) -> Result<(), DescriptionError> {
    for s in src {
        match dst
            .iter()
            .find(|d| d.function == s.function && d.index == s.index)
        {
            None => {
                return Err(incompatible(format!(
                    "CPUID leaf {:#x}.{} missing on the destination",
                    s.function, s.index
                )));
            }
            Some(d) if d != s => {
                return Err(incompatible(format!(
                    // Only the source's own values: a refusal goes to an unvetted peer, and
                    // must not tell it about the destination host.
                    "CPUID leaf {:#x}.{} differs on the destination (source has {s:x?})",
                    s.function, s.index
                )));
            }
            Some(_) => {}
        }
    }
    if dst.len() != src.len() {
        return Err(incompatible(format!(
            "the destination has CPUID leaves that the source's {} entries lack",
            src.len()
        )));
    }
    Ok(())
}

/// The destination's devices against the source's: the same ids and kinds, and states the
/// streams rely on. A source that does not pre-copy a device (`pre-copy=off`) needs nothing
/// of the destination's PRE_COPY; one that does needs it there too.
pub fn check_devices(
    src: &[DeviceDescription],
    dst: &[DeviceDescription],
) -> Result<(), DescriptionError> {
    for s in src {
        let Some(d) = dst.iter().find(|d| d.id == s.id) else {
            return Err(incompatible(format!(
                "device {:?} missing on the destination",
                s.id
            )));
        };
        if d.kind != s.kind {
            return Err(incompatible(format!(
                "device {:?} is a {:?} here but a {:?} on the destination",
                s.id, s.kind, d.kind
            )));
        }
        let dst_caps = MigrationCaps {
            pre_copy: d.caps.pre_copy && s.caps.pre_copy,
            ..d.caps
        };
        if dst_caps != s.caps {
            return Err(incompatible(format!(
                "device {:?} migration capabilities differ: source {:?}, destination {:?}",
                s.id, s.caps, d.caps
            )));
        }
    }
    if let Some(extra) = dst.iter().find(|d| !src.iter().any(|s| s.id == d.id)) {
        return Err(incompatible(format!(
            "destination has device {:?} that the source lacks",
            extra.id
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> VmDescription {
        VmDescription {
            ram: vec![
                MemoryRange::new(0, 0x8000_0000),
                MemoryRange::new(0x1_0000_0000, 0x4000_0000),
            ],
            vcpus: 2,
            cpuid: vec![CpuidEntry {
                function: 1,
                index: 0,
                flags: 0,
                eax: 0x806f8,
                ebx: 0x800,
                ecx: 0xfffa3223,
                edx: 0x0f8bfbff,
            }],
            devices: vec![DeviceDescription {
                id: "sampledev0".into(),
                kind: "vfio-user".into(),
                caps: MigrationCaps {
                    stop_copy: true,
                    p2p: true,
                    pre_copy: true,
                    dirty_tracking: true,
                },
            }],
        }
    }

    #[test]
    fn sample_is_valid_and_compatible_with_itself() {
        let d = sample();
        d.validate().unwrap();
        d.check_compatible(&d).unwrap();
    }

    #[test]
    fn invalid_descriptions_are_refused() {
        let mut d = sample();
        d.ram[1].gpa = 0x1000; // overlaps range 0
        assert!(matches!(d.validate(), Err(DescriptionError::Invalid(_))));
        let mut d = sample();
        d.vcpus = 0;
        assert!(d.validate().is_err());
        let mut d = sample();
        d.devices.push(d.devices[0].clone());
        assert!(d.validate().is_err());
        let mut d = sample();
        d.ram[0].len = 100;
        assert!(d.validate().is_err());
    }

    #[test]
    fn each_mismatch_has_a_reason() {
        let src = sample();
        let mut dst = sample();
        dst.vcpus = 4;
        let e = src.check_compatible(&dst).unwrap_err().to_string();
        assert!(e.contains("vCPUs"), "{e}");
        let mut dst = sample();
        dst.cpuid[0].ecx ^= 1;
        let e = src.check_compatible(&dst).unwrap_err().to_string();
        assert!(e.contains("CPUID leaf 0x1.0"), "{e}");
        let mut dst = sample();
        dst.devices[0].caps.pre_copy = false;
        let e = src.check_compatible(&dst).unwrap_err().to_string();
        assert!(e.contains("sampledev0"), "{e}");
        let mut dst = sample();
        dst.devices.clear();
        assert!(src.check_compatible(&dst).is_err());
        // A source that does not pre-copy the device can use one that could.
        let mut src = sample();
        src.devices[0].caps.pre_copy = false;
        src.check_compatible(&sample()).unwrap();
    }
}
