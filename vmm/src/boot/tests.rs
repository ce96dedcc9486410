//! End-to-end tests of `load`: a hand-made ELF, the real Debian bzImage when the Linux kit is
//! present, and a KVM run of the resulting state when /dev/kvm is usable.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress};

use super::testutil::{guest_mem, linux_kit, tiny_elf};
use super::*;
use crate::layout::{CMDLINE_ADDR, ZERO_PAGE_ADDR};

/// A file under the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(contents: &[u8]) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "minivmm-boot-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn zero_page(mem: &GuestMemory) -> boot_params {
    mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap()
}

fn spec(kernel: KernelImage, initramfs: Option<PathBuf>, mem_size: u64) -> BootSpec {
    BootSpec {
        kernel,
        initramfs,
        cmdline: "console=ttyS0 reboot=k".into(),
        vcpus: 2,
        mem_size,
    }
}

fn leak(v: Vec<u8>) -> &'static [u8] {
    Box::leak(v.into_boxed_slice())
}

#[test]
fn elf_with_initramfs() {
    let mem = guest_mem(64 << 20);
    let rd = TempFile::new(&[0x5a; 0x1801]);
    let elf = leak(tiny_elf(0x20_0000, &[0xf4], 0x1_0000));
    let info = load(
        &mem,
        &spec(KernelImage::Embedded(elf), Some(rd.0.clone()), 64 << 20),
    )
    .unwrap();
    assert_eq!(info.entry, GuestAddress(0x20_0000));
    assert_eq!(info.kernel_end, GuestAddress(0x21_0000));
    assert_eq!(
        info.initramfs,
        Some((GuestAddress((64 << 20) - 0x2000), 0x1801))
    );
    let p = zero_page(&mem);
    assert_eq!(
        ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
        ((64 << 20) - 0x2000, 0x1801)
    );
    assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
    let mut got = vec![0u8; 0x1801];
    mem.read_slice(&mut got, GuestAddress((64 << 20) - 0x2000))
        .unwrap();
    assert!(got.iter().all(|&b| b == 0x5a));
}

#[test]
fn missing_files_are_named() {
    let mem = guest_mem(64 << 20);
    let s = spec(
        KernelImage::Path("/nonexistent/vmlinuz".into()),
        None,
        64 << 20,
    );
    let err = load(&mem, &s).unwrap_err().to_string();
    assert!(err.contains("kernel image /nonexistent/vmlinuz"), "{err}");
    let elf = leak(tiny_elf(0x20_0000, &[0xf4], 0x1000));
    let s = spec(
        KernelImage::Embedded(elf),
        Some("/nonexistent/rd".into()),
        64 << 20,
    );
    let err = load(&mem, &s).unwrap_err().to_string();
    assert!(err.contains("initramfs /nonexistent/rd"), "{err}");
}

#[test]
fn initramfs_too_big_for_ram() {
    let mem = guest_mem(4 << 20);
    let rd = TempFile::new(&vec![1u8; 2 << 20]);
    let elf = leak(tiny_elf(0x20_0000, &[0xf4], 0x1000));
    let err = load(
        &mem,
        &spec(KernelImage::Embedded(elf), Some(rd.0.clone()), 4 << 20),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("RAM too small for kernel and initramfs"),
        "{err}"
    );
}

fn real_kit_load(
    mem_size: u64,
) -> Option<(GuestMemory, Result<BootInfo, BootError>, PathBuf, PathBuf)> {
    let (kernel, initramfs) = linux_kit()?;
    let mem = guest_mem(mem_size);
    let s = spec(
        KernelImage::Path(kernel.clone()),
        Some(initramfs.clone()),
        mem_size,
    );
    let res = load(&mem, &s);
    Some((mem, res, kernel, initramfs))
}

#[test]
fn real_bzimage_boot_params() {
    let Some((mem, res, kernel, initramfs)) = real_kit_load(512 << 20) else {
        return;
    };
    let info = res.unwrap();
    let p = zero_page(&mem);
    let h = p.hdr;
    assert!({ h.version } >= 0x20c, "{:#x}", { h.version });
    assert_eq!(
        ({ h.boot_flag }, { h.header }, { h.type_of_loader }),
        (0xaa55, 0x5372_6448, 0xff)
    );
    assert_eq!(info.entry, GuestAddress(u64::from(h.code32_start) + 0x200));
    assert_eq!({ h.code32_start }, 0x10_0000);
    assert!(info.kernel_end.0 >= { h.pref_address } + u64::from(h.init_size));
    // The protected-mode kernel is the file after the setup sectors.
    let image = std::fs::read(&kernel).unwrap();
    let setup = (usize::from(h.setup_sects) + 1) * 512;
    let mut got = vec![0u8; 4096];
    mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(got, image[setup..setup + 4096]);
    // Command line, e820.
    assert_eq!(({ h.cmd_line_ptr }, { h.cmdline_size }), (0x6_0000, 22));
    let mut cl = [0u8; 23];
    mem.read_slice(&mut cl, GuestAddress(CMDLINE_ADDR)).unwrap();
    assert_eq!(&cl, b"console=ttyS0 reboot=k\0");
    assert_eq!(p.e820_entries, 3);
    let e = p.e820_table[2];
    assert_eq!(
        ({ e.addr }, { e.size }),
        (0x10_0000, (512 << 20) - 0x10_0000)
    );
    // Initramfs: page-aligned, at the top of RAM, under initrd_addr_max, above the kernel.
    let rd = std::fs::read(&initramfs).unwrap();
    let (addr, len) = info.initramfs.unwrap();
    assert_eq!(
        ({ h.ramdisk_image }, { h.ramdisk_size }),
        (addr.0 as u32, len as u32)
    );
    assert_eq!(len, rd.len() as u64);
    assert_eq!(addr.0 % 4096, 0);
    assert!(addr.0 + len <= 512 << 20 && (512 << 20) - (addr.0 + len) < 4096);
    assert!(addr.0 + len - 1 <= u64::from(h.initrd_addr_max));
    assert!(addr.0 >= info.kernel_end.0);
    let mut got = vec![0u8; rd.len()];
    mem.read_slice(&mut got, addr).unwrap();
    assert!(got == rd);
}

#[test]
fn real_bzimage_cmdline_limit() {
    let Some((kernel, _)) = linux_kit() else {
        return;
    };
    let mem = guest_mem(512 << 20);
    let mut s = spec(KernelImage::Path(kernel), None, 512 << 20);
    s.cmdline = "x".repeat(3000);
    let err = load(&mem, &s).unwrap_err();
    // Debian's kernels keep 2047 bytes (COMMAND_LINE_SIZE 2048), less than our 4 KiB area.
    assert!(
        matches!(
            err,
            BootError::CmdlineTooLong {
                len: 3000,
                max: 2047
            }
        ),
        "{err}"
    );
}

#[test]
fn real_bzimage_ram_too_small() {
    let Some((_, res, ..)) = real_kit_load(16 << 20) else {
        return;
    };
    let err = res.unwrap_err().to_string();
    assert!(err.contains("RAM too small for kernel:"), "{err}");
    // Find the kernel's footprint, then leave less than the initramfs above it.
    let Some((_, res, ..)) = real_kit_load(512 << 20) else {
        return;
    };
    let end = res.unwrap().kernel_end.0.next_multiple_of(4096);
    let Some((_, res, ..)) = real_kit_load(end + (512 << 10)) else {
        return;
    };
    let err = res.unwrap_err().to_string();
    assert!(
        err.contains("RAM too small for kernel and initramfs"),
        "{err}"
    );
}

#[test]
fn real_bzimage_above_the_pci_hole() {
    let Some((mem, res, ..)) = real_kit_load(4 << 30) else {
        return;
    };
    let (addr, len) = res.unwrap().initramfs.unwrap();
    let p = zero_page(&mem);
    let max = u64::from(p.hdr.initrd_addr_max);
    assert!(addr.0 + len - 1 <= max.min(3 << 30));
    assert_eq!(p.e820_entries, 4);
    let e = p.e820_table[3];
    assert_eq!(({ e.addr }, { e.size }), (4 << 30, 1 << 30));
}

/// Boots `code` as a tiny ELF at 0x20_0000 on 4.5 GiB of RAM (1.5 GiB of it above 4 GiB) with
/// the state `load` and the cpu helpers produce, and runs until the first exit. `None` without KVM.
fn run_on_kvm(code: &[u8]) -> Option<(GuestMemory, String)> {
    use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_userspace_memory_region};
    use kvm_ioctls::Kvm;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    let Ok(kvm) = Kvm::new() else {
        eprintln!("SKIPPED: /dev/kvm not usable");
        return None;
    };
    let mem_size = 9 << 29;
    let mem = guest_mem(mem_size);
    let s = BootSpec {
        kernel: KernelImage::Embedded(leak(tiny_elf(0x20_0000, code, 0x1000))),
        initramfs: None,
        cmdline: String::new(),
        vcpus: 1,
        mem_size,
    };
    let info = load(&mem, &s).unwrap();
    let vm = kvm.create_vm().unwrap();
    for (slot, region) in mem.iter().enumerate() {
        let host = mem.get_host_address(region.start_addr()).unwrap();
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: `mem` maps the region and outlives `vm`, which is dropped on return.
        unsafe { vm.set_user_memory_region(r) }.unwrap();
    }
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    long_mode_sregs(&mut sregs);
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&boot_regs(info.entry)).unwrap();
    vcpu.set_fpu(&boot_fpu()).unwrap();
    let exit = format!("{:?}", vcpu.run().unwrap());
    let rip = vcpu.get_regs().unwrap().rip;
    Some((mem, format!("{exit} at rip {rip:#x}")))
}

/// KVM accepts the GDT, segments, control registers and page tables, and 64-bit code reaches
/// RAM above the PCI hole through the identity map.
#[test]
fn long_mode_entry_runs_on_kvm() {
    #[rustfmt::skip]
    let code = [
        0x48, 0xbf, 0x00, 0x00, 0x00, 0x20, 0x01, 0x00, 0x00, 0x00, // mov rdi, 0x1_2000_0000
        0x48, 0x89, 0x37,                                           // mov [rdi], rsi
        0x48, 0x89, 0x67, 0x08,                                     // mov [rdi+8], rsp
        0xb0, 0x2a,                                                 // mov al, 42
        0xe6, 0xf4,                                                 // out 0xf4, al
        0xf4,                                                       // hlt
    ];
    let Some((mem, exit)) = run_on_kvm(&code) else {
        return;
    };
    assert_eq!(exit, "IoOut(244, [42]) at rip 0x200015");
    let got: [u64; 2] = mem.read_obj(GuestAddress(0x1_2000_0000)).unwrap();
    assert_eq!(got, [ZERO_PAGE_ADDR, crate::layout::BOOT_STACK]);
}

/// SSE works (CR0.MP, CR4.OSFXSR): guests and Linux use it from the first instructions.
/// PVM hosts (the 2-core build machines) run non-PVM guest kernel code through KVM's
/// instruction emulator, which lacks most SSE instructions, so it cannot be checked there.
#[test]
fn sse_is_enabled_on_kvm() {
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("SKIPPED: kvm_pvm emulates guest supervisor code; SSE is not emulated");
        return;
    }
    #[rustfmt::skip]
    let code = [
        0x66, 0x48, 0x0f, 0x6e, 0xc6, // movq xmm0, rsi
        0x0f, 0x57, 0xc9,             // xorps xmm1, xmm1
        0x66, 0x0f, 0xeb, 0xc8,       // por xmm1, xmm0
        0x66, 0x48, 0x0f, 0x7e, 0xc8, // movq rax, xmm1
        0x48, 0xc1, 0xe8, 0x08,       // shr rax, 8
        0xe6, 0xf4,                   // out 0xf4, al
        0xf4,                         // hlt
    ];
    let Some((_, exit)) = run_on_kvm(&code) else {
        return;
    };
    // RSI (the zero page, 0x7000) made the round trip through the XMM registers.
    assert_eq!(exit, "IoOut(244, [112]) at rip 0x200017");
}
