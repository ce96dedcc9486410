//! Boot path: everything the VMM writes into guest memory before the first `KVM_RUN`, and the
//! register values vCPU 0 starts with. Plain functions over guest memory and plain KVM structs,
//! no KVM file descriptors, so all of it is unit-testable.
//!
//! Both kinds of kernel enter through the Linux 64-bit boot protocol: an ELF (a vmlinux or one
//! of our test guests) at its `e_entry`, a bzImage at its protected-mode load address + 0x200,
//! in long mode with RSI pointing at the zero page.

mod cpu;
mod kernel;
mod mptable;
mod paging;
mod params;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub use cpu::{boot_fpu, boot_lapic, boot_regs, long_mode_sregs, write_gdt};
pub use mptable::{MAX_VCPUS, write_mptable};
pub use paging::write_page_tables;

pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// The kernel to boot.
#[derive(Clone, Debug)]
pub enum KernelImage {
    /// An ELF vmlinux or a bzImage on disk.
    Path(PathBuf),
    /// An ELF built into minivmm (the test guests).
    Embedded(&'static [u8]),
}

/// What to boot and on what machine.
#[derive(Clone, Debug)]
pub struct BootSpec {
    pub kernel: KernelImage,
    pub initramfs: Option<PathBuf>,
    /// Written verbatim; nothing is added.
    pub cmdline: String,
    pub vcpus: u8,
    /// Guest RAM in bytes, laid out by `layout::ram_ranges`.
    pub mem_size: u64,
}

/// Where things landed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// RIP for vCPU 0 (see [`boot_regs`]).
    pub entry: GuestAddress,
    /// First byte past the memory the kernel may occupy (for a bzImage: its decompression area).
    pub kernel_end: GuestAddress,
    /// Address and length of the initramfs.
    pub initramfs: Option<(GuestAddress, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unrecognised kernel image {0}: neither an ELF (vmlinux) nor a bzImage")]
    UnrecognisedImage(String),
    #[error("unsupported kernel image {image}: {reason}")]
    UnsupportedImage { image: String, reason: String },
    #[error(
        "RAM too small for {what}: it needs guest memory up to {need:#x}, usable RAM ends at {have:#x}"
    )]
    RamTooSmall {
        what: &'static str,
        need: u64,
        have: u64,
    },
    #[error("kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("loading the kernel failed: {0}")]
    Loader(#[from] linux_loader::loader::Error),
    #[error("writing the zero page failed: {0}")]
    BootParams(#[from] linux_loader::configurator::Error),
    #[error("writing {what} to guest memory failed: {source}")]
    GuestWrite {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
    #[error("{mem_size:#x} bytes of RAM reach {top:#x}; the boot page tables map at most {max:#x}")]
    TooMuchRam { mem_size: u64, top: u64, max: u64 },
    #[error("{vcpus} vCPUs requested; the MP table supports 1 to {max}")]
    VcpuCount { vcpus: u8, max: u8 },
}

impl BootError {
    fn write(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> Self {
        move |source| BootError::GuestWrite { what, source }
    }
}

impl KernelImage {
    fn describe(&self) -> String {
        match self {
            KernelImage::Path(p) => p.display().to_string(),
            KernelImage::Embedded(_) => "(built-in guest)".to_string(),
        }
    }

    fn bytes(&self) -> Result<Cow<'static, [u8]>, BootError> {
        match self {
            KernelImage::Path(p) => {
                std::fs::read(p)
                    .map(Cow::Owned)
                    .map_err(|source| BootError::Read {
                        what: "kernel image",
                        path: p.clone(),
                        source,
                    })
            }
            KernelImage::Embedded(b) => Ok(Cow::Borrowed(b)),
        }
    }
}

/// Prepares guest memory for booting `spec`: kernel, command line, initramfs, zero page, GDT
/// and IDT, identity page tables and MP table. vCPU state then comes from [`long_mode_sregs`],
/// [`boot_regs`], [`boot_fpu`] and [`boot_lapic`].
pub fn load(mem: &GuestMemory, spec: &BootSpec) -> Result<BootInfo, BootError> {
    let low_end = params::low_ram_end(spec.mem_size);
    let image = spec.kernel.bytes()?;
    let kernel = kernel::load(mem, &image, &spec.kernel.describe(), low_end)?;
    let cmdline_max = params::cmdline_max(kernel.setup_header.as_ref());
    params::write_cmdline(mem, &spec.cmdline, cmdline_max)?;
    let initramfs = match &spec.initramfs {
        Some(path) => Some(load_initramfs(mem, path, &kernel, low_end)?),
        None => None,
    };
    let zero_page = params::boot_params(
        kernel.setup_header,
        spec.cmdline.len(),
        initramfs,
        spec.mem_size,
    );
    params::write_boot_params(mem, &zero_page)?;
    write_gdt(mem)?;
    write_page_tables(mem, spec.mem_size)?;
    write_mptable(mem, spec.vcpus)?;
    log::info!(
        "boot: {} entry {:#x}, kernel ends {:#x}, initramfs {:x?}",
        spec.kernel.describe(),
        kernel.entry.0,
        kernel.end,
        initramfs
    );
    Ok(BootInfo {
        entry: kernel.entry,
        kernel_end: GuestAddress(kernel.end),
        initramfs: initramfs.map(|(a, l)| (GuestAddress(a), l)),
    })
}

fn load_initramfs(
    mem: &GuestMemory,
    path: &Path,
    kernel: &kernel::Loaded,
    low_end: u64,
) -> Result<(u64, u64), BootError> {
    let read_err = |source| BootError::Read {
        what: "initramfs",
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let max = params::initrd_addr_max(kernel.setup_header.as_ref());
    let addr = params::place_initramfs(size, kernel.end, low_end, max)?;
    let len = usize::try_from(size).map_err(|_| BootError::RamTooSmall {
        what: "initramfs",
        need: u64::MAX,
        have: low_end,
    })?;
    use vm_memory::Bytes;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(BootError::write("initramfs"))?;
    Ok((addr, size))
}
