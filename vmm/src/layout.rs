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
}
