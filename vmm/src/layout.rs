//! Guest-physical memory layout: where RAM, the PCI hole and the boot structures live.
//! One place for these numbers so the loader, the VM builder and migration agree.

/// Start of the PCI hole below 4 GiB; RAM above this moves to 4 GiB.
pub const PCI_HOLE_START: u64 = 3 << 30;
pub const FOUR_GIB: u64 = 1 << 32;
/// End of conventional low RAM (start of the EBDA where the MP table lives).
pub const EBDA_START: u64 = 0x9_fc00;
pub const HIGH_RAM_START: u64 = 0x10_0000;

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directories, one 4 KiB page per GiB identity-mapped with 2 MiB pages.
pub const PD_ADDR: u64 = 0x1_0000;
pub const MAX_PD_PAGES: u64 = 64;
pub const CMDLINE_ADDR: u64 = 0x6_0000;
pub const CMDLINE_MAX: usize = 4096;
pub const MPTABLE_ADDR: u64 = EBDA_START;
/// ECAM window for PCI configuration space, inside the PCI hole.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// 32-bit MMIO window for BARs, inside the PCI hole below the ECAM.
pub const PCI_MMIO_START: u64 = 0xc000_0000;
pub const PCI_MMIO_SIZE: u64 = PCI_ECAM_START - PCI_MMIO_START;

/// Port I/O window for BARs: everything above the legacy ISA ports (which all sit below
/// 0x1000, as does 0xCF8).
pub const PCI_IO_START: u64 = 0x1000;
pub const PCI_IO_SIZE: u64 = 0x1_0000 - PCI_IO_START;
/// 64-bit MMIO window for large (e.g. GPU) BARs: from the first GiB boundary above RAM.
pub const PCI_MMIO64_SIZE: u64 = 256 << 30;

pub fn pci_mmio64_start(ram_size: u64) -> u64 {
    ram_top(ram_size).max(FOUR_GIB).next_multiple_of(1 << 30)
}

/// IOAPIC pins for the INTx of passthrough devices, above the 16 ISA interrupts (KVM's
/// IOAPIC has 24 pins); devices share them round-robin, as PCI INTx lines are shared.
pub const PCI_INTX_GSIS: [u32; 8] = [16, 17, 18, 19, 20, 21, 22, 23];

/// The IOAPIC pin of the `n`th passthrough device's INTx.
pub fn intx_gsi(n: usize) -> u32 {
    PCI_INTX_GSIS[n % PCI_INTX_GSIS.len()]
}

/// RAM ranges (guest address, length) for a VM with `size` bytes of RAM: one range, or two
/// around the PCI hole.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= PCI_HOLE_START {
        vec![(0, size)]
    } else {
        vec![(0, PCI_HOLE_START), (FOUR_GIB, size - PCI_HOLE_START)]
    }
}

/// Highest guest-physical address of RAM plus one.
pub fn ram_top(size: u64) -> u64 {
    ram_ranges(size).last().map(|&(a, l)| a + l).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hole_splits_large_ram() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (FOUR_GIB, 1 << 30)]);
        assert_eq!(ram_top(4 << 30), 5 << 30);
    }

    #[test]
    fn the_64_bit_window_sits_above_ram_and_4_gib() {
        assert_eq!(pci_mmio64_start(512 << 20), FOUR_GIB);
        assert_eq!(pci_mmio64_start(4 << 30), 5 << 30);
        assert_eq!(pci_mmio64_start((4 << 30) + 1), 6 << 30);
    }
}
