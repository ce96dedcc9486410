//! CPUID for each vCPU: KVM's supported set, plus the hypervisor bit and a topology whose
//! APIC ids match the vCPU count (what Linux's SMP bring-up checks).

use kvm_bindings::{CpuId, kvm_cpuid_entry2};
pub use migration::description::CpuidEntry;

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// KVM's entry as the plain data that migrates (kvm_cpuid_entry2 has no serde impl).
fn plain(e: &kvm_cpuid_entry2) -> CpuidEntry {
    CpuidEntry {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

fn kvm_entry(e: &CpuidEntry) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

pub fn to_entries(c: &CpuId) -> Vec<CpuidEntry> {
    c.as_slice().iter().map(plain).collect()
}

pub fn from_entries(entries: &[CpuidEntry]) -> Result<CpuId, vmm_sys_util::fam::Error> {
    let raw: Vec<kvm_cpuid_entry2> = entries.iter().map(kvm_entry).collect();
    CpuId::from_entries(&raw)
}

/// Bits needed to number `n` things (the APIC-id shift of a topology level).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adapts the supported CPUID to vCPU `index` of `count`: one socket, one thread per core.
pub fn for_vcpu(supported: &CpuId, index: u32, count: u32) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ecx |= ECX_HYPERVISOR;
                e.ebx = (e.ebx & 0xffff) | (count.min(255) << 16) | (index << 24);
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            // EAX[31:26] = cores per package - 1; keep the cache description.
            LEAF_CACHE_PARAMS if e.eax & 0x1f != 0 => {
                e.eax = (e.eax & 0x03ff_ffff) | ((count.saturating_sub(1)) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => topology_level(e, index, count),
            _ => {}
        }
    }
    c
}

fn topology_level(e: &mut kvm_cpuid_entry2, index: u32, count: u32) {
    e.edx = index;
    match e.index {
        // SMT level: one thread per core.
        0 => {
            e.eax = 0;
            e.ebx = 1;
            e.ecx = 1 << 8;
        }
        // Core level: all vCPUs in one package.
        1 => {
            e.eax = id_bits(count);
            e.ebx = count;
            e.ecx = (2 << 8) | 1;
        }
        n => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = n & 0xff;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 1,
            ebx: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn topology_matches_vcpu_count() {
        let base = CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1)]).unwrap();
        let c = for_vcpu(&base, 2, 3);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 2);
        assert_eq!((s[0].ebx >> 16) & 0xff, 3);
        assert_ne!(s[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(s[0].edx & EDX_HTT, 0);
        assert_eq!((s[2].eax, s[2].ebx, s[2].edx), (2, 3, 2));
        let back = from_entries(&to_entries(&c)).unwrap();
        assert_eq!(back.as_slice()[1].edx, 2);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(
            (id_bits(1), id_bits(2), id_bits(3), id_bits(4), id_bits(5)),
            (0, 1, 2, 2, 3)
        );
    }
}
