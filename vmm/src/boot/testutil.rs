//! Helpers shared by the boot tests.

use std::path::PathBuf;

use vm_memory::GuestAddress;

use super::GuestMemory;
use crate::layout::ram_ranges;

/// Guest memory laid out as the VMM would for `size` bytes (split around the PCI hole).
pub fn guest_mem(size: u64) -> GuestMemory {
    let ranges: Vec<_> = ram_ranges(size)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).unwrap()
}

/// A minimal x86-64 ELF64 executable: one PT_LOAD at `paddr` holding `code`, `memsz` bytes in
/// memory, entry at `paddr`.
pub fn tiny_elf(paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let mut e = vec![0u8; EHDR + PHDR];
    e[..8].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    e[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
    e[0x18..0x20].copy_from_slice(&paddr.to_le_bytes());
    e[0x20..0x28].copy_from_slice(&(EHDR as u64).to_le_bytes());
    e[0x34..0x36].copy_from_slice(&(EHDR as u16).to_le_bytes());
    e[0x36..0x38].copy_from_slice(&(PHDR as u16).to_le_bytes());
    e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    e[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
    let ph = &mut e[EHDR..];
    ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    ph[8..16].copy_from_slice(&((EHDR + PHDR) as u64).to_le_bytes());
    ph[16..24].copy_from_slice(&paddr.to_le_bytes());
    ph[24..32].copy_from_slice(&paddr.to_le_bytes());
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&memsz.to_le_bytes());
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    e.extend_from_slice(code);
    e
}

/// The Linux kit from scripts/linux-guest.sh: $MINIVMM_LINUX_KIT or <workspace>/.cache/linux-guest.
/// `None` (with a note on stderr, so a skipped test is visible) when it has not been built.
pub fn linux_kit() -> Option<(PathBuf, PathBuf)> {
    let dir = std::env::var_os("MINIVMM_LINUX_KIT").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/linux-guest"),
        PathBuf::from,
    );
    let (kernel, initramfs) = (dir.join("bzImage"), dir.join("initramfs.cpio.gz"));
    if kernel.is_file() && initramfs.is_file() {
        Some((kernel, initramfs))
    } else {
        eprintln!(
            "SKIPPED: no Linux kit in {} (run scripts/linux-guest.sh)",
            dir.display()
        );
        None
    }
}
