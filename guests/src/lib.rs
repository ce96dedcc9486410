//! Test guests for minivmm, embedded as ELF images.
//!
//! The images are built from `programs/*.rs` by `build.rs`; README.md describes the boot
//! contract they expect and the serial protocol they speak.

#[cfg(test)]
#[path = "../programs/sdpattern.rs"]
mod sdpattern;
#[cfg(test)]
mod sdpattern_tests;

/// One embedded guest program.
#[derive(Debug)]
pub struct Guest {
    /// Name used on minivmm's command line (`--guest NAME`).
    pub name: &'static str,
    /// One-line description for `minivmm guests`.
    pub about: &'static str,
    /// The ELF64 image, loadable like a vmlinux.
    pub elf: &'static [u8],
}

macro_rules! guest {
    ($name:literal, $about:literal) => {
        Guest {
            name: $name,
            about: $about,
            elf: include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".elf")),
        }
    };
}

// Keep in sync with `GUESTS` in build.rs.
static GUESTS: &[Guest] = &[
    guest!(
        "hello",
        "prints a greeting and its command line on serial, exits 0"
    ),
    guest!(
        "dirtier",
        "writes and verifies RAM pages pass after pass with heartbeats (share= rate= hb_ms= passes= hold= words= cpus=)"
    ),
    guest!(
        "smp",
        "starts every vCPU from the MP table with INIT-SIPI-SIPI; each reports on serial"
    ),
    guest!(
        "dmatest",
        "drives sampledev over PCI: moves BAR0, DMA fills with MSI-X (or irq=intx: level INTx via the IOAPIC) completion, verifies data and device state (rounds= buf_kb= bufs= hb_ms= irq_ms= bar= state_every= state_seed= irq=)"
    ),
    guest!(
        "gpio",
        "drives a PCI-IDIO-16 GPIO card (libvfio-user's gpio-pci-idio-16) through its I/O BAR: pulses outputs, checks inputs (rounds= ms=)"
    ),
    guest!(
        "mtty",
        "drives the kernel's mtty sample (4348:3253): prints its config space, counts INTx loopback rounds, leaves FIFO/scratch state to check after a migration (rounds= after= hold_ms= hb_ms= irq_ms= gap_ms=)"
    ),
];

/// Every embedded guest.
pub fn all() -> &'static [Guest] {
    GUESTS
}

/// The guest called `name`.
pub fn find(name: &str) -> Option<&'static Guest> {
    GUESTS.iter().find(|g| g.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PT_LOAD: u32 = 1;
    const PF_X: u32 = 1;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    struct Phdr {
        p_type: u32,
        flags: u32,
        offset: u64,
        vaddr: u64,
        paddr: u64,
        filesz: u64,
        memsz: u64,
    }

    fn phdrs(elf: &[u8]) -> Vec<Phdr> {
        let phoff = u64_at(elf, 0x20) as usize;
        let phentsize = u16_at(elf, 0x36) as usize;
        let phnum = u16_at(elf, 0x38) as usize;
        assert_eq!(phentsize, 56, "Elf64_Phdr size");
        (0..phnum)
            .map(|i| {
                let p = phoff + i * phentsize;
                Phdr {
                    p_type: u32_at(elf, p),
                    flags: u32_at(elf, p + 4),
                    offset: u64_at(elf, p + 8),
                    vaddr: u64_at(elf, p + 0x10),
                    paddr: u64_at(elf, p + 0x18),
                    filesz: u64_at(elf, p + 0x20),
                    memsz: u64_at(elf, p + 0x28),
                }
            })
            .collect()
    }

    #[test]
    fn names_are_unique_and_findable() {
        for g in all() {
            assert_eq!(find(g.name).unwrap().name, g.name);
            assert_eq!(all().iter().filter(|h| h.name == g.name).count(), 1);
        }
        assert!(find("hello").is_some());
        assert!(find("dirtier").is_some());
        assert!(find("smp").is_some());
        assert!(find("dmatest").is_some());
        assert!(find("nonesuch").is_none());
    }

    #[test]
    fn elf_headers() {
        for g in all() {
            let e = g.elf;
            assert!(e.len() > 0x40, "{}: too short", g.name);
            assert_eq!(&e[..4], b"\x7fELF", "{}: magic", g.name);
            assert_eq!(e[4], 2, "{}: ELFCLASS64", g.name);
            assert_eq!(e[5], 1, "{}: little endian", g.name);
            assert_eq!(u16_at(e, 0x10), 2, "{}: ET_EXEC", g.name);
            assert_eq!(u16_at(e, 0x12), 0x3e, "{}: EM_X86_64", g.name);
        }
    }

    #[test]
    fn segments_fit_the_boot_contract() {
        for g in all() {
            let entry = u64_at(g.elf, 0x18);
            let loads: Vec<_> = phdrs(g.elf)
                .into_iter()
                .filter(|p| p.p_type == PT_LOAD)
                .collect();
            assert!(!loads.is_empty(), "{}: no PT_LOAD", g.name);
            for p in &loads {
                assert!(p.paddr >= 0x20_0000, "{}: segment below 2 MiB", g.name);
                assert_eq!(p.paddr, p.vaddr, "{}: not identity-mapped", g.name);
                assert!(p.filesz <= p.memsz, "{}: filesz > memsz", g.name);
                assert!(
                    p.offset + p.filesz <= g.elf.len() as u64,
                    "{}: segment past end of file",
                    g.name
                );
                // The dirtier owns RAM from 16 MiB up.
                assert!(
                    p.paddr + p.memsz <= 0x100_0000,
                    "{}: image reaches past 16 MiB",
                    g.name
                );
            }
            assert!(
                loads
                    .iter()
                    .any(|p| p.flags & PF_X != 0 && (p.vaddr..p.vaddr + p.memsz).contains(&entry)),
                "{}: entry {entry:#x} not in an executable PT_LOAD",
                g.name
            );
        }
    }

    #[test]
    fn guest_code_uses_no_sse() {
        // The host's KVM emulates guest instructions and cannot execute SSE (README). The only
        // SSE code allowed is core's prebuilt integer formatting, which the guests link but never
        // run (their panic handler prints no formatted messages).
        let dir = std::env::temp_dir().join(format!("guests-sse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for g in all() {
            let path = dir.join(g.name);
            std::fs::write(&path, g.elf).unwrap();
            let Ok(out) = std::process::Command::new("objdump")
                .arg("-d")
                .arg(&path)
                .output()
            else {
                eprintln!("objdump not found; skipping");
                return;
            };
            assert!(out.status.success(), "objdump failed on {}", g.name);
            let text = String::from_utf8_lossy(&out.stdout);
            let mut function = "";
            for line in text.lines() {
                if line.ends_with(">:") {
                    function = line;
                } else if line.contains("%xmm") || line.contains("%ymm") {
                    assert!(
                        function.contains("4core3fmt") || function.contains("4core3str5count"),
                        "{}: SSE in {function}: {line}",
                        g.name
                    );
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn multiboot_header_describes_the_image() {
        // QEMU's -kernel finds the header in the first 8 KiB of the file and, with the a.out
        // kludge (flags bit 16), loads file bytes from the header's offset to
        // [load_addr, load_end_addr) and clears up to bss_end_addr: that must reproduce
        // exactly what the PT_LOAD segments describe, so the file image must be contiguous.
        for g in all() {
            let e = g.elf;
            let off = (0..0x2000 - 48)
                .step_by(4)
                .find(|&o| u32_at(e, o) == 0x1bad_b002)
                .unwrap_or_else(|| panic!("{}: no multiboot header in the first 8 KiB", g.name));
            assert_eq!(off, 0x1000, "{}: header not at the image start", g.name);
            let f = |i: usize| u32_at(e, off + 4 * i);
            let (flags, sum) = (f(1), f(2));
            assert_eq!(
                0x1bad_b002u32.wrapping_add(flags).wrapping_add(sum),
                0,
                "{}: checksum",
                g.name
            );
            assert_ne!(flags & 1 << 16, 0, "{}: a.out kludge bit", g.name);
            assert_ne!(flags & 1 << 1, 0, "{}: memory map wanted", g.name);
            let (header_addr, load_addr, load_end, bss_end, entry) = (f(3), f(4), f(5), f(6), f(7));

            let loads: Vec<_> = phdrs(e)
                .into_iter()
                .filter(|p| p.p_type == PT_LOAD)
                .collect();
            let first = loads.iter().min_by_key(|p| p.paddr).unwrap();
            assert_eq!(first.paddr, 0x20_0000, "{}: image start", g.name);
            let delta = first.paddr - first.offset;
            for p in loads.iter().filter(|p| p.filesz > 0) {
                assert_eq!(
                    p.paddr - p.offset,
                    delta,
                    "{}: file image not contiguous",
                    g.name
                );
            }
            let file_end = loads.iter().map(|p| p.paddr + p.filesz).max().unwrap();
            let mem_end = loads.iter().map(|p| p.paddr + p.memsz).max().unwrap();
            assert_eq!(load_addr as u64, first.paddr, "{}: load_addr", g.name);
            assert_eq!(
                header_addr as u64 - load_addr as u64,
                off as u64 - first.offset
            );
            assert_eq!(load_end as u64, file_end, "{}: load_end_addr", g.name);
            assert_eq!(bss_end as u64, mem_end, "{}: bss_end_addr", g.name);
            assert!(
                file_end - delta <= e.len() as u64,
                "{}: load_end_addr past the end of the file",
                g.name
            );
            assert!(
                loads.iter().any(|p| p.flags & PF_X != 0
                    && (p.vaddr..p.vaddr + p.memsz).contains(&(entry as u64))),
                "{}: multiboot entry {entry:#x} not in an executable PT_LOAD",
                g.name
            );
            assert_ne!(
                entry as u64,
                u64_at(e, 0x18),
                "{}: 32-bit entry is not _start",
                g.name
            );
        }
    }
}
