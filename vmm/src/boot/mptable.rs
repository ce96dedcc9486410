//! Intel MultiProcessor Specification 1.4 table: how Linux finds the vCPUs (and the IOAPIC)
//! without ACPI. The floating pointer sits at the start of the EBDA (0x9fc00), where Linux scans,
//! and the configuration table follows it, inside the e820-reserved area below 1 MiB.
//!
//! Entries are serialised byte by byte (little-endian) instead of through `#[repr(packed)]`
//! structs: no unsafe `ByteValued` impls, and the layout is visible here.

use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use super::GuestMemory;
use crate::layout::{HIGH_RAM_START, MPTABLE_ADDR};

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const CPU_ENTRY_LEN: usize = 20;
const ENTRY_LEN: usize = 8;
const ISA_IRQS: u8 = 16;
/// Bus, IOAPIC, the ISA interrupts and the two local interrupts.
const FIXED_ENTRIES: usize = 2 + ISA_IRQS as usize + 2;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// KVM's in-kernel LAPIC and IOAPIC report these versions.
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const LAPIC_ADDR: u32 = 0xfee0_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
const SPEC_REV: u8 = 4;
/// Family 6 signature and the FPU + APIC feature bits: what Linux expects of any x86-64 CPU.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

/// Bytes the whole structure (floating pointer + configuration table) takes for `vcpus` vCPUs.
pub const fn mptable_size(vcpus: usize) -> usize {
    FLOATING_LEN + HEADER_LEN + vcpus * CPU_ENTRY_LEN + FIXED_ENTRIES * ENTRY_LEN
}

/// vCPUs whose entries fit between `MPTABLE_ADDR` and 1 MiB (about 19700).
const FIT_VCPUS: usize =
    ((HIGH_RAM_START - MPTABLE_ADDR) as usize - mptable_size(0)) / CPU_ENTRY_LEN;
/// xAPIC ids are 8 bits, 0xff is the broadcast id, and the IOAPIC takes the id after the last
/// vCPU, so ids 0..=253 are available to vCPUs; that, not space, is the limit.
pub const MAX_VCPUS: u8 = if FIT_VCPUS < 254 {
    FIT_VCPUS as u8
} else {
    254
};

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

fn entries(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut t = Vec::new();
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        t.extend([ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        t.extend(CPU_SIGNATURE.to_le_bytes());
        t.extend(CPU_FEATURES.to_le_bytes());
        t.extend([0u8; 8]);
    }
    t.extend([ENTRY_BUS, 0]);
    t.extend(*b"ISA   ");
    t.extend([ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    t.extend(IOAPIC_ADDR.to_le_bytes());
    // ISA IRQ n to IOAPIC pin n, conforming polarity and trigger: KVM's default GSI routing.
    for irq in 0..ISA_IRQS {
        t.extend([
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
    }
    // PIC to LINT0 of the BSP, NMI to LINT1 of every LAPIC (0xff).
    t.extend([ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    t.extend([ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    t
}

fn config_table(vcpus: u8) -> Vec<u8> {
    let body = entries(vcpus);
    let len = HEADER_LEN + body.len();
    let count = usize::from(vcpus) + FIXED_ENTRIES;
    let mut t = Vec::with_capacity(len);
    t.extend(*b"PCMP");
    t.extend((len as u16).to_le_bytes());
    t.extend([SPEC_REV, 0]); // checksum filled in below
    t.extend(*b"MINIVMM ");
    t.extend(*b"minivmm     ");
    t.extend([0u8; 6]); // no OEM table
    t.extend((count as u16).to_le_bytes());
    t.extend(LAPIC_ADDR.to_le_bytes());
    t.extend([0u8; 4]); // no extended table
    t.extend(body);
    t[7] = checksum(&t);
    t
}

fn floating_pointer(table_addr: u32) -> [u8; FLOATING_LEN] {
    let mut f = [0u8; FLOATING_LEN];
    f[..4].copy_from_slice(b"_MP_");
    f[4..8].copy_from_slice(&table_addr.to_le_bytes());
    f[8] = 1; // length in 16-byte units
    f[9] = SPEC_REV;
    // Feature byte 1 = 0: a configuration table is present (no default configuration).
    f[10] = checksum(&f);
    f
}

/// Writes the MP floating pointer and configuration table for `vcpus` vCPUs (APIC ids
/// 0..vcpus, vCPU 0 the BSP) and an IOAPIC with id `vcpus`.
pub fn write_mptable(mem: &GuestMemory, vcpus: u8) -> Result<(), BootError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(BootError::VcpuCount {
            vcpus,
            max: MAX_VCPUS,
        });
    }
    let table_addr = MPTABLE_ADDR + FLOATING_LEN as u64;
    let mut bytes = floating_pointer(table_addr as u32).to_vec();
    bytes.extend(config_table(vcpus));
    debug_assert_eq!(bytes.len(), mptable_size(usize::from(vcpus)));
    mem.write_slice(&bytes, GuestAddress(MPTABLE_ADDR))
        .map_err(BootError::write("MP table"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::testutil::guest_mem;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    /// Processor entries, I/O interrupt entries, and the other (8-byte) entries, in order.
    type Parsed = (Vec<[u8; 20]>, Vec<[u8; 8]>, Vec<[u8; 8]>);

    /// Parses the table back from guest memory, checking both checksums and the entry count.
    fn parse(mem: &GuestMemory) -> Parsed {
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(MPTABLE_ADDR)).unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!((sum(&fp), fp[8], fp[9], fp[11]), (0, 1, 4, 0));
        let addr = u64::from(u32::from_le_bytes(fp[4..8].try_into().unwrap()));
        let mut hdr = [0u8; HEADER_LEN];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        assert_eq!(&hdr[..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([hdr[4], hdr[5]]));
        let count = u16::from_le_bytes([hdr[34], hdr[35]]);
        assert_eq!(
            u32::from_le_bytes(hdr[36..40].try_into().unwrap()),
            LAPIC_ADDR
        );
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        assert_eq!(sum(&t), 0, "config table checksum");
        let (mut cpus, mut ints, mut other, mut off) = (vec![], vec![], vec![], HEADER_LEN);
        for _ in 0..count {
            match t[off] {
                ENTRY_PROCESSOR => cpus.push(t[off..off + 20].try_into().unwrap()),
                ENTRY_IO_INTERRUPT => ints.push(t[off..off + 8].try_into().unwrap()),
                _ => other.push(t[off..off + 8].try_into().unwrap()),
            }
            off += if t[off] == ENTRY_PROCESSOR { 20 } else { 8 };
        }
        assert_eq!(off, len, "entry count matches the table length");
        (cpus, ints, other)
    }

    #[test]
    fn table_for_four_vcpus() {
        let mem = guest_mem(2 << 20);
        write_mptable(&mem, 4).unwrap();
        let (cpus, ints, other) = parse(&mem);
        let ids: Vec<_> = cpus.iter().map(|c| (c[1], c[3])).collect();
        assert_eq!(ids, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(ints.len(), 16);
        assert!(
            ints.iter()
                .enumerate()
                .all(|(i, e)| e[5] == i as u8 && e[7] == i as u8 && e[6] == 4)
        );
        assert_eq!(other[0][..2], [ENTRY_BUS, 0]);
        assert_eq!(&other[0][2..], b"ISA   ");
        assert_eq!(other[1][..4], [ENTRY_IOAPIC, 4, IOAPIC_VERSION, 1]);
        assert_eq!(
            u32::from_le_bytes(other[1][4..].try_into().unwrap()),
            IOAPIC_ADDR
        );
        assert_eq!(
            other[2],
            [ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            other[3],
            [ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]
        );
    }

    // The APIC id space, not the room below 1 MiB, limits the vCPU count.
    const _: () = assert!(MAX_VCPUS == 254 && FIT_VCPUS > 19_000);

    #[test]
    fn vcpu_limits() {
        let mem = guest_mem(2 << 20);
        write_mptable(&mem, MAX_VCPUS).unwrap();
        let (cpus, _, _) = parse(&mem);
        assert_eq!(cpus.len(), 254);
        assert!(MPTABLE_ADDR + mptable_size(254) as u64 <= HIGH_RAM_START);
        for bad in [0, 255] {
            let err = write_mptable(&mem, bad).unwrap_err();
            assert!(err.to_string().contains("1 to 254"), "{err}");
        }
    }
}
