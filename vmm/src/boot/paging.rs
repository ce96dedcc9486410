//! Identity page tables for entering long mode: one PML4 entry, one PDPT entry per GiB, and a
//! page directory of 2 MiB pages per GiB. The map always covers the first 4 GiB so the LAPIC,
//! IOAPIC and PCI windows are reachable, and all RAM above that.

use vm_memory::{Bytes, GuestAddress};

use super::{BootError, GuestMemory};
use crate::layout::{CMDLINE_ADDR, FOUR_GIB, MAX_PD_PAGES, PD_ADDR, PDPT_ADDR, PML4_ADDR, ram_top};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const HUGE: u64 = 1 << 7;
const GIB: u64 = 1 << 30;
const ENTRIES: usize = 512;
// The largest map's page directories must end before the command line.
const _: () = assert!(PD_ADDR + MAX_PD_PAGES * 0x1000 <= CMDLINE_ADDR);

/// End of the identity map for `mem_size` bytes of RAM: max(4 GiB, top of RAM), rounded up to a
/// GiB. Errors beyond `MAX_PD_PAGES` GiB, where the page directories would run out of room.
pub fn identity_map_end(mem_size: u64) -> Result<u64, BootError> {
    let top = ram_top(mem_size);
    let end = top.max(FOUR_GIB).next_multiple_of(GIB);
    let max = MAX_PD_PAGES * GIB;
    if end > max {
        return Err(BootError::TooMuchRam { mem_size, top, max });
    }
    Ok(end)
}

fn page_bytes(entries: impl Iterator<Item = u64>) -> Vec<u8> {
    let mut page = vec![0u8; ENTRIES * 8];
    for (chunk, e) in page.chunks_exact_mut(8).zip(entries) {
        chunk.copy_from_slice(&e.to_le_bytes());
    }
    page
}

/// Writes PML4, PDPT and page directories; CR3 = `PML4_ADDR`. Whole pages are written, so
/// stale entries from earlier contents cannot survive.
pub fn write_page_tables(mem: &GuestMemory, mem_size: u64) -> Result<(), BootError> {
    let gibs = identity_map_end(mem_size)? / GIB;
    let write = |bytes: Vec<u8>, addr| {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(BootError::write("page tables"))
    };
    write(
        page_bytes(std::iter::once(PDPT_ADDR | PRESENT | WRITABLE)),
        PML4_ADDR,
    )?;
    let pds = (0..gibs).map(|g| (PD_ADDR + g * 0x1000) | PRESENT | WRITABLE);
    write(page_bytes(pds), PDPT_ADDR)?;
    for g in 0..gibs {
        let pages = (0..ENTRIES as u64).map(|i| (g * GIB + (i << 21)) | PRESENT | WRITABLE | HUGE);
        write(page_bytes(pages), PD_ADDR + g * 0x1000)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::testutil::guest_mem;

    /// Walks the tables as the CPU would; `None` where a level is not present.
    fn translate(mem: &GuestMemory, va: u64) -> Option<u64> {
        let entry = |table: u64, idx: u64| -> u64 {
            mem.read_obj(GuestAddress((table & !0xfff & ((1 << 52) - 1)) + idx * 8))
                .unwrap()
        };
        let pml4e = entry(PML4_ADDR, (va >> 39) & 511);
        let pdpte = (pml4e & PRESENT != 0).then(|| entry(pml4e, (va >> 30) & 511))?;
        let pde = (pdpte & PRESENT != 0).then(|| entry(pdpte, (va >> 21) & 511))?;
        assert_ne!(pdpte & HUGE, HUGE, "no 1 GiB pages expected");
        (pde & PRESENT != 0 && pde & HUGE != 0)
            .then_some((pde & !0x1f_ffff & ((1 << 52) - 1)) | (va & 0x1f_ffff))
    }

    #[test]
    fn map_end_rounding_and_limit() {
        assert_eq!(identity_map_end(64 << 20).unwrap(), 4 << 30);
        assert_eq!(identity_map_end(3 << 30).unwrap(), 4 << 30);
        // 4.5 GiB of RAM: 1.5 GiB above 4 GiB, so RAM tops at 5.5 GiB.
        assert_eq!(identity_map_end(9 << 29).unwrap(), 6 << 30);
        // 63 GiB of RAM tops exactly at 64 GiB.
        assert_eq!(identity_map_end(63 << 30).unwrap(), 64 << 30);
        let err = identity_map_end((63 << 30) + 1).unwrap_err();
        assert!(err.to_string().contains("page tables"), "{err}");
    }

    #[test]
    fn identity_map_is_walkable() {
        let mem = guest_mem(2 << 20);
        // Fill the table area with junk first: stale entries must not survive.
        mem.write_slice(&vec![0xffu8; 0x5_0000 - 0x9000], GuestAddress(0x9000))
            .unwrap();
        // 8.5 GiB of RAM: 3 GiB below the hole, 5.5 GiB from 4 GiB, so RAM tops at 9.5 GiB.
        write_page_tables(&mem, 17 << 29).unwrap();
        for va in [
            0,
            0x7000,
            0x20_1234,
            0xfec0_0000,
            0xfee0_0ff0,
            (9 << 30) + 0x12_3456,
        ] {
            assert_eq!(translate(&mem, va), Some(va), "{va:#x}");
        }
        // Mapped up to the next GiB boundary.
        assert_eq!(translate(&mem, (10 << 30) - 8), Some((10 << 30) - 8));
        assert_eq!(translate(&mem, 10 << 30), None);
        assert_eq!(translate(&mem, 1 << 39), None);
    }
}
