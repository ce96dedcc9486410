//! Kernel image detection and loading through linux-loader.
//!
//! Footprints are checked against RAM before anything is copied, so a machine that is too small
//! gets "RAM too small" rather than an opaque loader error from a half-written guest.

use std::io::Cursor;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{ByteValued, GuestAddress};

use super::{BootError, GuestMemory};
use crate::layout::HIGH_RAM_START;

/// Offset of the setup header in a bzImage (boot protocol: the real-mode header at 0x1f1).
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// "HdrS" at offset 0x202.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Boot protocol 2.12 introduced `xloadflags`, which says whether the 64-bit entry exists.
pub const MIN_BZIMAGE_VERSION: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1;
/// The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;

/// A kernel copied into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    pub entry: GuestAddress,
    /// First byte above everything the kernel occupies or will unpack itself into.
    pub end: u64,
    /// The bzImage's setup header (with `code32_start` set to where it was loaded); `None` for ELF.
    pub setup_header: Option<setup_header>,
}

/// Loads an ELF or a bzImage; `low_end` is the end of RAM below the PCI hole.
pub fn load(
    mem: &GuestMemory,
    image: &[u8],
    name: &str,
    low_end: u64,
) -> Result<Loaded, BootError> {
    if image.starts_with(ELF_MAGIC) {
        load_elf(mem, image, name, low_end)
    } else if let Some(hdr) = bzimage_header(image) {
        load_bzimage(mem, image, hdr, name, low_end)
    } else {
        Err(BootError::UnrecognisedImage(name.to_string()))
    }
}

fn unsupported(name: &str, reason: impl Into<String>) -> BootError {
    BootError::UnsupportedImage {
        image: name.to_string(),
        reason: reason.into(),
    }
}

fn too_small(need: u64, have: u64) -> BootError {
    BootError::RamTooSmall {
        what: "kernel",
        need,
        have,
    }
}

fn load_elf(
    mem: &GuestMemory,
    image: &[u8],
    name: &str,
    low_end: u64,
) -> Result<Loaded, BootError> {
    let (start, end) = elf_footprint(image).map_err(|r| unsupported(name, r))?;
    if start < HIGH_RAM_START {
        let reason = format!("a segment at {start:#x} overlaps the boot area below 1 MiB");
        return Err(unsupported(name, reason));
    }
    if end > low_end {
        return Err(too_small(end, low_end));
    }
    let res = Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(HIGH_RAM_START)),
    )?;
    // linux-loader leaves BSS-only segments out of kernel_end; the footprint includes them.
    Ok(Loaded {
        entry: res.kernel_load,
        end: end.max(res.kernel_end),
        setup_header: None,
    })
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Lowest and highest-plus-one physical address of the PT_LOAD segments of an x86-64 ELF64.
fn elf_footprint(image: &[u8]) -> Result<(u64, u64), String> {
    let truncated = || "truncated ELF header".to_string();
    if image.get(4) != Some(&ELFCLASS64) || u16_at(image, 0x12) != Some(EM_X86_64) {
        return Err("not an x86-64 ELF64 executable".into());
    }
    let phoff = u64_at(image, 0x20).ok_or_else(truncated)?;
    let phentsize = u16_at(image, 0x36).ok_or_else(truncated)?;
    let phnum = u16_at(image, 0x38).ok_or_else(truncated)?;
    let (mut start, mut end) = (u64::MAX, 0u64);
    for i in 0..u64::from(phnum) {
        let off = phoff
            .checked_add(i * u64::from(phentsize))
            .and_then(|o| usize::try_from(o).ok())
            .ok_or_else(truncated)?;
        let ph = image
            .get(off..off.saturating_add(56))
            .ok_or("truncated program headers")?;
        let (paddr, memsz) = (u64_at(ph, 24), u64_at(ph, 40));
        let (Some(paddr), Some(memsz)) = (paddr, memsz) else {
            return Err("truncated program headers".into());
        };
        if u32_at(ph, 0) != Some(PT_LOAD) || memsz == 0 {
            continue;
        }
        let seg_end = paddr
            .checked_add(memsz)
            .ok_or("segment wraps the address space")?;
        start = start.min(paddr);
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err("no loadable segments".into());
    }
    Ok((start, end))
}

fn bzimage_header(image: &[u8]) -> Option<setup_header> {
    let bytes = image.get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size_of::<setup_header>())?;
    let mut hdr = setup_header::default();
    hdr.as_mut_slice().copy_from_slice(bytes);
    let magic = hdr.header;
    (magic == HDRS_MAGIC).then_some(hdr)
}

/// Memory the kernel needs from its protected-mode load address: a relocatable kernel unpacks
/// itself at the load address rounded up to `kernel_alignment` but not below `pref_address`
/// (its link address), and needs `init_size` bytes there.
fn bzimage_end(hdr: &setup_header, load: u64, payload: u64) -> u64 {
    let align = u64::from(hdr.kernel_alignment).max(1);
    let run_at = if hdr.relocatable_kernel != 0 {
        load.div_ceil(align) * align
    } else {
        load
    };
    let run_at = run_at.max(hdr.pref_address);
    (run_at + u64::from(hdr.init_size)).max(load + payload)
}

fn load_bzimage(
    mem: &GuestMemory,
    image: &[u8],
    hdr: setup_header,
    name: &str,
    low_end: u64,
) -> Result<Loaded, BootError> {
    let (version, xloadflags) = (hdr.version, hdr.xloadflags);
    if version < MIN_BZIMAGE_VERSION || xloadflags & XLF_KERNEL_64 == 0 {
        let reason = format!("boot protocol {version:#x} without a 64-bit entry point");
        return Err(unsupported(name, reason));
    }
    let load = u64::from(hdr.code32_start);
    let setup_sects = if hdr.setup_sects == 0 {
        4
    } else {
        hdr.setup_sects
    };
    let payload = (image.len() as u64).saturating_sub((u64::from(setup_sects) + 1) * 512);
    let end = bzimage_end(&hdr, load, payload);
    if end > low_end {
        return Err(too_small(end, low_end));
    }
    let res = BzImage::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(HIGH_RAM_START)),
    )?;
    Ok(Loaded {
        entry: GuestAddress(res.kernel_load.0 + BZIMAGE_ENTRY64_OFFSET),
        end: end.max(res.kernel_end),
        setup_header: res.setup_header,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::testutil::{guest_mem, tiny_elf};
    use vm_memory::Bytes;

    #[test]
    fn loads_elf_at_its_paddr() {
        let mem = guest_mem(64 << 20);
        let code = [0xf4u8, 0x90, 0x90, 0xcc];
        let elf = tiny_elf(0x20_0000, &code, 0x3000);
        let k = load(&mem, &elf, "t", 64 << 20).unwrap();
        assert_eq!(k.entry, GuestAddress(0x20_0000));
        assert_eq!(k.end, 0x20_3000);
        assert!(k.setup_header.is_none());
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(got, code);
    }

    #[test]
    fn elf_that_does_not_fit_is_ram_too_small() {
        let mem = guest_mem(4 << 20);
        let elf = tiny_elf(0x20_0000, &[0xf4], 4 << 20);
        let err = load(&mem, &elf, "t", 4 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                BootError::RamTooSmall {
                    need: 0x60_0000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("RAM too small for kernel"));
    }

    #[test]
    fn elf_in_the_boot_area_is_refused() {
        let mem = guest_mem(4 << 20);
        let err = load(&mem, &tiny_elf(0x8000, &[0xf4], 0x1000), "t", 4 << 20).unwrap_err();
        assert!(err.to_string().contains("below 1 MiB"), "{err}");
    }

    #[test]
    fn garbage_is_unrecognised() {
        let mem = guest_mem(4 << 20);
        let err = load(&mem, &[0u8; 4096], "junk.bin", 4 << 20).unwrap_err();
        assert!(matches!(err, BootError::UnrecognisedImage(_)));
        assert!(err.to_string().contains("junk.bin"));
        let mut elf32 = tiny_elf(0x20_0000, &[0xf4], 0x1000);
        elf32[4] = 1;
        let err = load(&mem, &elf32, "e32", 4 << 20).unwrap_err();
        assert!(err.to_string().contains("x86-64 ELF64"), "{err}");
    }

    #[test]
    fn bzimage_footprint_follows_alignment_and_pref_address() {
        let mut hdr = setup_header {
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            pref_address: 0x100_0000,
            init_size: 0x300_0000,
            ..Default::default()
        };
        assert_eq!(bzimage_end(&hdr, 0x10_0000, 0x80_0000), 0x400_0000);
        hdr.pref_address = 0;
        assert_eq!(bzimage_end(&hdr, 0x10_0000, 0x80_0000), 0x320_0000);
        hdr.relocatable_kernel = 0;
        assert_eq!(bzimage_end(&hdr, 0x10_0000, 0x80_0000), 0x310_0000);
    }

    #[test]
    fn old_bzimage_is_refused() {
        let mem = guest_mem(64 << 20);
        let mut image = vec![0u8; 0x2000];
        let hdr = setup_header {
            header: HDRS_MAGIC,
            version: 0x20a,
            loadflags: 1,
            code32_start: 0x10_0000,
            ..Default::default()
        };
        image[SETUP_HEADER_OFFSET..][..size_of::<setup_header>()].copy_from_slice(hdr.as_slice());
        let err = load(&mem, &image, "old", 64 << 20).unwrap_err();
        assert!(err.to_string().contains("64-bit entry"), "{err}");
    }
}
