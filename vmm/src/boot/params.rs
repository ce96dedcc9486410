//! The zero page (`boot_params`), the command line and where the initramfs goes.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::{BootError, GuestMemory};
use crate::layout::{
    CMDLINE_ADDR, CMDLINE_MAX, EBDA_START, HIGH_RAM_START, PCI_HOLE_START, ZERO_PAGE_ADDR,
    ram_ranges,
};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;
const BOOT_FLAG: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// The protocol version we speak when synthesising a header for an ELF kernel (64-bit entry).
const SYNTH_VERSION: u16 = 0x020c;
const LOADER_UNDEFINED: u8 = 0xff;
/// x86-64 kernels accept an initramfs anywhere below 2 GiB; headers older than 2.03 lack the field.
const DEFAULT_INITRD_ADDR_MAX: u32 = 0x7fff_ffff;
const PAGE: u64 = 0x1000;

/// End of RAM below the PCI hole: where the kernel and initramfs must fit.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(PCI_HOLE_START)
}

/// The e820 map: (address, size, type). Base memory stops at the EBDA, the legacy area up to
/// 1 MiB is reserved (it holds the MP table), the rest of RAM follows the PCI hole layout.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let low_end = low_ram_end(mem_size);
    let mut map = vec![
        (0, EBDA_START.min(low_end), E820_RAM),
        (EBDA_START, HIGH_RAM_START - EBDA_START, E820_RESERVED),
    ];
    if low_end > HIGH_RAM_START {
        map.push((HIGH_RAM_START, low_end - HIGH_RAM_START, E820_RAM));
    }
    map.extend(
        ram_ranges(mem_size)
            .into_iter()
            .skip(1)
            .map(|(a, l)| (a, l, E820_RAM)),
    );
    map
}

/// Longest command line (without the NUL) that fits our area and that the kernel keeps: a
/// bzImage states its limit in `cmdline_size` and silently truncates anything longer.
pub fn cmdline_max(hdr: Option<&setup_header>) -> usize {
    let ours = CMDLINE_MAX - 1;
    match hdr.map(|h| h.cmdline_size) {
        Some(n) if n != 0 => ours.min(n as usize),
        _ => ours,
    }
}

/// Writes the command line verbatim, NUL-terminated, at `CMDLINE_ADDR`.
pub fn write_cmdline(mem: &GuestMemory, cmdline: &str, max: usize) -> Result<(), BootError> {
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(BootError::write("command line"))
}

/// The highest address (inclusive) the kernel accepts for the initramfs.
pub fn initrd_addr_max(hdr: Option<&setup_header>) -> u32 {
    match hdr.map(|h| h.initrd_addr_max) {
        Some(max) if max != 0 => max,
        _ => DEFAULT_INITRD_ADDR_MAX,
    }
}

/// Page-aligned address as high as possible in low RAM and under `addr_max`, above the kernel.
pub fn place_initramfs(
    size: u64,
    kernel_end: u64,
    low_end: u64,
    addr_max: u32,
) -> Result<u64, BootError> {
    let limit = low_end.min(u64::from(addr_max) + 1);
    let floor = kernel_end.next_multiple_of(PAGE);
    match limit.checked_sub(size).map(|a| a / PAGE * PAGE) {
        Some(addr) if addr >= floor => Ok(addr),
        _ => Err(BootError::RamTooSmall {
            what: "kernel and initramfs",
            need: size
                .checked_next_multiple_of(PAGE)
                .and_then(|s| s.checked_add(floor))
                .unwrap_or(u64::MAX),
            have: limit,
        }),
    }
}

/// Header for an ELF kernel, which has none: just enough for Linux to accept the zero page.
fn synthesised_header() -> setup_header {
    setup_header {
        boot_flag: BOOT_FLAG,
        header: HDRS_MAGIC,
        version: SYNTH_VERSION,
        kernel_alignment: 0x100_0000,
        initrd_addr_max: DEFAULT_INITRD_ADDR_MAX,
        ..Default::default()
    }
}

/// Builds the zero page: the kernel's own setup header (bzImage) or a synthesised one (ELF),
/// plus where the command line and initramfs are and the e820 map.
pub fn boot_params(
    hdr: Option<setup_header>,
    cmdline_len: usize,
    initramfs: Option<(u64, u64)>,
    mem_size: u64,
) -> boot_params {
    let mut p = boot_params {
        hdr: hdr.unwrap_or_else(synthesised_header),
        ..Default::default()
    };
    p.hdr.type_of_loader = LOADER_UNDEFINED;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    // Firecracker and vmm-reference store the length here; the kernel itself never reads it.
    p.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, len)) = initramfs {
        // place_initramfs keeps both below 4 GiB.
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = len as u32;
    }
    let map = e820_map(mem_size);
    // boot_params is packed: edit a copy of the table rather than borrowing into it.
    let mut table = p.e820_table;
    for (slot, &(addr, size, r#type)) in table.iter_mut().zip(&map) {
        *slot = boot_e820_entry { addr, size, r#type };
    }
    p.e820_table = table;
    p.e820_entries = map.len() as u8;
    p
}

pub fn write_boot_params(mem: &GuestMemory, p: &boot_params) -> Result<(), BootError> {
    let params = BootParams::new(p, GuestAddress(ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams(&params, mem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::testutil::guest_mem;

    #[test]
    fn e820_without_hole() {
        assert_eq!(
            e820_map(512 << 20),
            vec![
                (0, 0x9_fc00, E820_RAM),
                (0x9_fc00, 0x6_0400, E820_RESERVED),
                (0x10_0000, (512 << 20) - 0x10_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_with_hole() {
        let map = e820_map(5 << 30);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2], (0x10_0000, (3 << 30) - 0x10_0000, E820_RAM));
        assert_eq!(map[3], (4 << 30, 2 << 30, E820_RAM));
        assert!(
            map.iter()
                .all(|&(a, l, _)| a + l <= 3 << 30 || a >= 4 << 30)
        );
    }

    #[test]
    fn cmdline_is_written_verbatim() {
        let mem = guest_mem(2 << 20);
        write_cmdline(&mem, " console=ttyS0  -- x ", 4095).unwrap();
        let mut buf = [0u8; 22];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&buf, b" console=ttyS0  -- x \0");
    }

    #[test]
    fn cmdline_limits() {
        let mem = guest_mem(2 << 20);
        let max = cmdline_max(None);
        write_cmdline(&mem, &"a".repeat(max), max).unwrap();
        let err = write_cmdline(&mem, &"a".repeat(CMDLINE_MAX), max).unwrap_err();
        assert!(matches!(
            err,
            BootError::CmdlineTooLong {
                len: 4096,
                max: 4095
            }
        ));
        assert!(matches!(
            write_cmdline(&mem, "a\0b", max),
            Err(BootError::CmdlineNul)
        ));
    }

    #[test]
    fn initramfs_goes_high_and_page_aligned() {
        let addr = place_initramfs(0x1234, 0x40_0000, 64 << 20, u32::MAX).unwrap();
        assert_eq!(addr, (64 << 20) - 0x2000);
        let addr = place_initramfs(0x1000, 0x40_0000, 64 << 20, 0x1ff_ffff).unwrap();
        assert_eq!(addr, 0x1ff_f000);
        let err = place_initramfs(0x1000_0000, 0x40_0000, 64 << 20, u32::MAX).unwrap_err();
        assert!(err.to_string().contains("RAM too small"), "{err}");
        assert!(place_initramfs(u64::MAX, 0, 64 << 20, u32::MAX).is_err());
    }

    #[test]
    fn synthesised_params() {
        let p = boot_params(None, 12, Some((0x300_0000, 0x1234)), 64 << 20);
        let h = p.hdr;
        assert_eq!({ h.boot_flag }, BOOT_FLAG);
        assert_eq!({ h.header }, HDRS_MAGIC);
        assert_eq!({ h.version }, 0x20c);
        assert_eq!({ h.type_of_loader }, 0xff);
        assert_eq!({ h.cmd_line_ptr }, 0x6_0000);
        assert_eq!({ h.cmdline_size }, 12);
        assert_eq!({ h.ramdisk_image }, 0x300_0000);
        assert_eq!({ h.ramdisk_size }, 0x1234);
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table[2];
        assert_eq!(
            ({ e.addr }, { e.size }, { e.r#type }),
            (0x10_0000, 0x3f0_0000, 1)
        );
    }
}
