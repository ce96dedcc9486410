//! GDT/IDT in guest memory and the vCPU register state for the 64-bit boot protocol.
//!
//! The segment registers are derived from the same GDT entries that are written to memory, so
//! what KVM holds in the hidden descriptor parts matches what a reload would fetch.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::{BootError, GuestMemory};
use crate::layout::{BOOT_STACK, GDT_ADDR, IDT_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};

/// Linux's `__BOOT_CS` / `__BOOT_DS`; the guests README promises these selectors.
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;

/// Packs a segment descriptor: `flags` holds the access byte (bits 0-7) and the
/// G/DB/L/AVL nibble (bits 12-15); `limit` is 20 bits.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

/// null; 32-bit flat code at 0x8 (as in Linux's boot GDT); 64-bit code at 0x10; flat data at
/// 0x18. No TSS descriptor: a 16-byte one would run into the IDT at 0x520, and TR keeps KVM's
/// reset value (a busy TSS at 0), which VM entry accepts and Linux replaces with its own.
pub const GDT: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
];
const _: () = assert!(GDT_ADDR + (GDT.len() * 8) as u64 <= IDT_ADDR);

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_WP: u64 = 1 << 16;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const X86_CR4_OSFXSR: u64 = 1 << 9;
const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Writes the GDT and an empty IDT (8 zero bytes: no 16-byte gate fits its limit, so any
/// exception before the kernel loads its own IDT is a triple fault, i.e. a visible shutdown).
pub fn write_gdt(mem: &GuestMemory) -> Result<(), BootError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(BootError::write("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(BootError::write("IDT"))
}

/// The hidden-descriptor form KVM wants for GDT entry `index`.
pub fn segment_from_gdt(index: usize) -> kvm_segment {
    let e = GDT[index];
    let bit = |n: u32| ((e >> n) & 1) as u8;
    let raw_limit = (((e >> 32) & 0x000f_0000) | (e & 0xffff)) as u32;
    let g = bit(55);
    kvm_segment {
        base: ((e >> 16) & 0x00ff_ffff) | ((e >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (index * 8) as u16,
        type_: ((e >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((e >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: 1 - bit(47),
        padding: 0,
    }
}

/// Long mode with paging, SSE enabled, flat segments from the GDT. Start from the vCPU's
/// `get_sregs()`: APIC base, TR and LDTR are kept as KVM set them.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let code = segment_from_gdt(usize::from(BOOT_CS / 8));
    let data = segment_from_gdt(usize::from(BOOT_DS / 8));
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// General registers of the boot vCPU: RSI points at the zero page, interrupts off.
pub fn boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// x87 and SSE control words at their reset values (all exceptions masked).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
    let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (dst, b) in lapic.regs[reg..reg + 4].iter_mut().zip(v.to_le_bytes()) {
        *dst = b as _;
    }
}

/// LINT0 = ExtINT (the PIC), LINT1 = NMI, matching the MP table's local interrupt entries.
/// Apply to every vCPU's `get_lapic()` (in-kernel irqchip) before its first run.
pub fn boot_lapic(lapic: &mut kvm_lapic_state) {
    set_delivery_mode(lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_delivery_mode(lapic, APIC_LVT1, APIC_MODE_NMI);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::testutil::guest_mem;

    #[test]
    fn gdt_in_memory_matches_sregs() {
        let mem = guest_mem(1 << 20);
        write_gdt(&mem).unwrap();
        let mut sregs = kvm_sregs::default();
        long_mode_sregs(&mut sregs);
        let limit = u64::from(sregs.gdt.limit);
        assert_eq!(sregs.gdt.base, GDT_ADDR);
        for (seg, sel) in [
            (sregs.cs, BOOT_CS),
            (sregs.ds, BOOT_DS),
            (sregs.ss, BOOT_DS),
        ] {
            assert_eq!(seg.selector, sel);
            assert!(u64::from(sel) + 7 <= limit);
            let raw: u64 = mem
                .read_obj(GuestAddress(sregs.gdt.base + u64::from(sel)))
                .unwrap();
            assert_eq!(raw, GDT[usize::from(sel / 8)]);
            assert_eq!(
                (seg.base, seg.limit, seg.present, seg.s, seg.g),
                (0, 0xffff_ffff, 1, 1, 1)
            );
        }
        assert_eq!((sregs.cs.type_, sregs.cs.l, sregs.cs.db), (0xb, 1, 0));
        assert_eq!((sregs.ds.type_, sregs.ds.l, sregs.ds.db), (0x3, 0, 1));
        assert!(sregs.idt.base > sregs.gdt.base + limit);
        let idt: u64 = mem.read_obj(GuestAddress(IDT_ADDR)).unwrap();
        assert_eq!((idt, sregs.idt.limit), (0, 7));
    }

    #[test]
    fn control_registers() {
        let mut sregs = kvm_sregs::default();
        long_mode_sregs(&mut sregs);
        assert_eq!(sregs.cr0, 0x8001_0033);
        assert_eq!(sregs.cr3, 0x9000);
        assert_eq!(sregs.cr4, 0x620);
        assert_eq!(sregs.efer, 0x500);
    }

    #[test]
    fn registers_and_fpu() {
        let r = boot_regs(GuestAddress(0x100_0200));
        assert_eq!(
            (r.rip, r.rsp, r.rbp, r.rsi, r.rflags),
            (0x100_0200, 0x8ff0, 0x8ff0, 0x7000, 2)
        );
        let f = boot_fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
    }

    #[test]
    fn lapic_lints() {
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[APIC_LVT0 + 1] = 0x17; // junk delivery mode bits plus bit 12
        boot_lapic(&mut lapic);
        let word = |r: usize| u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[r + i] as u8));
        assert_eq!(word(APIC_LVT0), 0x1700);
        assert_eq!(word(APIC_LVT1), 0x400);
    }
}
