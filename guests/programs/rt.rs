//! Runtime shared by the test guests: entry, serial output, exit port, boot data, TSC time.
//!
//! Included by every guest with `mod rt;`. Each guest uses only part of it.
#![allow(dead_code)]

use core::arch::{asm, global_asm};
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

/// Size of the stack `_start` switches to (the boot stack at 0x8ff0 belongs to minivmm's layout).
pub const STACK_SIZE: usize = 64 * 1024;

#[repr(C, align(16))]
pub struct Stack<const N: usize>(pub [u8; N]);

static mut BOOT_STACK: Stack<STACK_SIZE> = Stack([0; STACK_SIZE]);

// Two ways in, one Rust entry (README "Entry state" and "Booting under QEMU"):
// - `_start`, from minivmm: 64-bit mode, interrupts off, RSI = Linux zero page;
// - `mb_entry32`, from a multiboot loader (QEMU's `-kernel`): 32-bit protected mode, paging off,
//   EAX = multiboot magic, EBX = multiboot information. It builds an identity map with 2 MiB
//   pages (in `.boot_pt`, outside `.bss` so that clearing `.bss` cannot pull it from under the
//   CPU), enters long mode the way minivmm leaves the CPU (same CR0/CR4 bits, GDT selectors
//   0x10 code and 0x18 data), and joins `_start`'s path.
// `.bss` is cleared here rather than trusted to be zero so that a loader which copies only the
// file bytes into reused memory still gives Rust zeroed statics. The Rust entry gets the boot
// data's address in RDI and, in RSI, 0 from minivmm or (1 << 32 | EAX) from a multiboot loader.
//
// Multiboot v1 header: flags bit 1 asks for the memory map, bit 16 (the "a.out kludge") makes
// the loader take the load addresses from the header instead of the ELF headers; QEMU refuses
// ELF64 multiboot images without it. `guest.ld` puts `.multiboot` at the start of the image
// (file offset 0x1000) and the file bytes contiguous up to `__load_end`.
global_asm!(
    r#"
    .pushsection .multiboot, "a", @progbits
    .balign 4
mb_header:
    .long {mb_magic}
    .long {mb_flags}
    .long -({mb_magic} + {mb_flags})
    .long mb_header
    .long __image_start
    .long __load_end
    .long __image_end
    .long mb_entry32
    .popsection

    .pushsection .rodata.mb_gdt, "a", @progbits
    .balign 16
mb_gdt:
    .quad 0
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
mb_gdt_end:
    .balign 8
mb_gdtr:
    .word mb_gdt_end - mb_gdt - 1
    .long mb_gdt
    .popsection

    .pushsection .boot_pt, "aw", @nobits
    .balign 4096
mb_pml4:
    .skip 4096
mb_pdpt:
    .skip 4096
mb_pd:
    .skip 4096 * {max_gib}
    .popsection

    .pushsection .text.start, "ax", @progbits
    .global _start
    .type _start, @function
    .code64
_start:
    cli
    cld
    movq %rsi, %r12
    xorl %r13d, %r13d
rt_common:
    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb
    leaq {stack} + {stack_size}(%rip), %rsp
    xorl %ebp, %ebp
    movq %r12, %rdi
    movq %r13, %rsi
    call {entry}
2:
    cli
    hlt
    jmp 2b
    .size _start, . - _start

    .code32
    .global mb_entry32
    .type mb_entry32, @function
mb_entry32:
    cli
    cld
    movl %eax, %edi
    movl %ebx, %esi
    # GiB to map: 4, or more to cover the end of the highest RAM range in the memory map
    # (rounded up to a GiB), at most max_gib. Walked before anything in memory is written.
    movl $4, %ebp
    cmpl ${mb_boot_magic}, %edi
    jne .Lmb_sized
    testl $0x40, (%esi)
    jz .Lmb_sized
    movl 48(%esi), %ebx
    movl 44(%esi), %ecx
    addl %ebx, %ecx
.Lmb_entry:
    leal 24(%ebx), %eax
    cmpl %ecx, %eax
    ja .Lmb_sized
    cmpl $1, 20(%ebx)
    jne .Lmb_next
    movl 4(%ebx), %eax
    movl 8(%ebx), %edx
    addl 12(%ebx), %eax
    adcl 16(%ebx), %edx
    addl $0x3fffffff, %eax
    adcl $0, %edx
    shrdl $30, %edx, %eax
    shrl $30, %edx
    jnz .Lmb_most
    cmpl %ebp, %eax
    jbe .Lmb_next
    movl %eax, %ebp
.Lmb_next:
    addl (%ebx), %ebx
    addl $4, %ebx
    jmp .Lmb_entry
.Lmb_most:
    movl ${max_gib}, %ebp
.Lmb_sized:
    cmpl ${max_gib}, %ebp
    jbe 1f
    movl ${max_gib}, %ebp
1:
    movl %edi, %ebx
    # PML4 and PDPT cleared, one PML4 entry, one PDPT entry per GiB, then the page directories.
    movl $mb_pml4, %edi
    movl $2048, %ecx
    xorl %eax, %eax
    rep stosl
    movl $mb_pdpt + 3, mb_pml4
    movl $mb_pdpt, %edi
    movl $mb_pd + 3, %eax
    movl %ebp, %ecx
1:
    movl %eax, (%edi)
    addl $4096, %eax
    addl $8, %edi
    loop 1b
    movl $mb_pd, %edi
    movl %ebp, %ecx
    shll $9, %ecx
    movl $0x83, %eax
    xorl %edx, %edx
1:
    movl %eax, (%edi)
    movl %edx, 4(%edi)
    addl $8, %edi
    addl $0x200000, %eax
    adcl $0, %edx
    loop 1b
    # CR4: PAE, OSFXSR, OSXMMEXCPT; EFER.LME; CR0: PE, MP, PG, EM off (as minivmm sets them).
    movl %cr4, %eax
    orl $0x620, %eax
    movl %eax, %cr4
    movl $mb_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    andl $~4, %eax
    orl $0x80000003, %eax
    movl %eax, %cr0
    lgdt mb_gdtr
    ljmpl $0x10, $mb_entry64
    .code64
mb_entry64:
    movw $0x18, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl %esi, %r12d
    movl %ebx, %r13d
    btsq $32, %r13
    jmp rt_common
    .size mb_entry32, . - mb_entry32
    .popsection
"#,
    mb_magic = const MB_HEADER_MAGIC,
    mb_flags = const MB_HEADER_FLAGS,
    mb_boot_magic = const MB_BOOT_MAGIC,
    max_gib = const MB_MAX_GIB,
    stack = sym BOOT_STACK,
    stack_size = const STACK_SIZE,
    entry = sym rt_entry,
    options(att_syntax)
);

/// Multiboot v1 header magic and flags (memory map wanted; a.out kludge: load addresses in the
/// header).
const MB_HEADER_MAGIC: u32 = 0x1bad_b002;
const MB_HEADER_FLAGS: u32 = 1 << 1 | 1 << 16;
/// What a multiboot loader leaves in EAX.
const MB_BOOT_MAGIC: u32 = 0x2bad_b002;
/// The multiboot path maps at most this much: the page directories are reserved in the image.
const MB_MAX_GIB: u32 = 64;

extern "C" fn rt_entry(info: u64, how: u64) -> ! {
    let boot = if how >> 32 == 0 {
        Boot {
            info,
            kind: BootKind::Linux,
        }
    } else if how as u32 == MB_BOOT_MAGIC {
        // Firmware (SeaBIOS under QEMU) leaves its last serial line unterminated: end it, so
        // that the guest's first line starts a line of its own.
        putc(b'\n');
        Boot {
            info,
            kind: BootKind::Multiboot,
        }
    } else {
        line()
            .s("boot: entered through the multiboot header, but EAX=")
            .x(how & 0xffff_ffff)
            .s(" is not the multiboot magic");
        exit(EXIT_SETUP)
    };
    crate::guest_main(boot)
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    // The panicking CPU may hold the serial lock; a garbled line beats a hang.
    force_unlock_serial();
    {
        let mut w = line();
        w.s("PANIC");
        if let Some(msg) = info.message().as_str() {
            w.s(": ").s(msg);
        }
        if let Some(loc) = info.location() {
            w.s(" at ").s(loc.file()).s(":").u(loc.line() as u64);
        }
    }
    exit(EXIT_PANIC)
}

/// The prebuilt `core` is compiled for unwinding and its unwind tables name this symbol. With
/// panic=abort nothing ever unwinds, so it is never called; it only has to exist for the link.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

// Memory functions that compiled code calls and that a freestanding link must supply. The
// copies and fills use `rep` string instructions in asm so that LLVM cannot recognise them as
// loops and turn them back into calls to themselves.

/// # Safety
/// The C contract: `dest` valid for `n` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller gives a writable range of n bytes; DF is clear (cld in _start and
    // never set except inside memmove's own asm).
    unsafe {
        asm!("rep stosb", inout("rdi") dest => _, inout("rcx") n => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// The C contract: non-overlapping ranges of `n` bytes, `src` readable and `dest` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: as the caller promises; DF is clear as for memset.
    unsafe {
        asm!("rep movsb", inout("rdi") dest => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// The C contract: ranges of `n` bytes that may overlap, `src` readable and `dest` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // dest is below src or past its end: a forward copy never reads a byte it wrote.
        // SAFETY: as the caller promises.
        unsafe { memcpy(dest, src, n) }
    } else {
        // SAFETY: as the caller promises; copying backwards from the last byte handles the
        // overlap, and DF is cleared again before anything else can run.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rdi") dest.wrapping_add(n).wrapping_sub(1) => _,
                 inout("rsi") src.wrapping_add(n).wrapping_sub(1) => _,
                 inout("rcx") n => _, options(nostack));
        }
        dest
    }
}

/// # Safety
/// The C contract: both ranges readable for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n and the caller gives n readable bytes on both sides.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

/// # Safety
/// As for `memcmp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

// Exit codes, as listed in README.md.
pub const EXIT_OK: u8 = 0;
/// A bad command line, or boot data (zero page, MP table) not as README.md describes.
pub const EXIT_SETUP: u8 = 1;
pub const EXIT_PANIC: u8 = 2;
pub const EXIT_BAD_PAGE: u8 = 3;
pub const EXIT_SMP_TIMEOUT: u8 = 4;
/// An interrupt the guest waited for did not come (dmatest).
pub const EXIT_NO_IRQ: u8 = 5;
/// The device reported an error or a state it must not be in (dmatest).
pub const EXIT_DEVICE_ERROR: u8 = 6;

// ---------------------------------------------------------------------------------------------
// Port I/O

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O here only reaches the devices listed in README.md (UART, exit port, PIT,
    // i8042); none of them touches guest memory, so no Rust-visible state can change.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`; also reaches PCI configuration space (0xCFC-0xCFF), whose
    // registers change device decoding but never memory that Rust owns.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: as for `outw`.
    unsafe {
        asm!("in ax, dx", in("dx") port, out("ax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outw`; also reaches the PCI configuration address port 0xCF8.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outl`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Ends the VM through minivmm's exit port; halts if the port is absent.
pub fn exit(code: u8) -> ! {
    outb(0xf4, code);
    loop {
        halt();
    }
}

pub fn halt() {
    // SAFETY: with interrupts off `hlt` just stops this CPU; nothing in memory changes.
    unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
}

/// Spin-wait hint. Not `core::hint::spin_loop`, whose `_mm_pause` is an SSE2 intrinsic and
/// the guests are built without SSE.
pub fn pause() {
    // SAFETY: `pause` only delays the CPU.
    unsafe { asm!("pause", options(nomem, nostack, preserves_flags)) }
}

// ---------------------------------------------------------------------------------------------
// Serial output: one lock for all CPUs so that lines from different CPUs never interleave.

const COM1: u16 = 0x3f8;
const LSR_THR_EMPTY: u8 = 0x20;

static SERIAL_LOCK: AtomicBool = AtomicBool::new(false);

fn putc(byte: u8) {
    // Bounded: a missing UART reads 0xff (ready), a wedged one must not hang the guest.
    for _ in 0..100_000 {
        if inb(COM1 + 5) & LSR_THR_EMPTY != 0 {
            break;
        }
        pause();
    }
    outb(COM1, byte);
}

fn force_unlock_serial() {
    SERIAL_LOCK.store(false, Ordering::Release);
}

/// A serial line under construction: holds the serial lock, ends the line with `\n` on drop.
pub struct Line(());

/// Starts a line: `rt::line().s("HB ").u(seq);` prints `HB <seq>\n` atomically.
pub fn line() -> Line {
    while SERIAL_LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        pause();
    }
    Line(())
}

impl Line {
    pub fn b(&mut self, bytes: &[u8]) -> &mut Self {
        for &c in bytes {
            putc(c);
        }
        self
    }

    pub fn s(&mut self, s: &str) -> &mut Self {
        self.b(s.as_bytes())
    }

    /// Decimal.
    pub fn u(&mut self, mut v: u64) -> &mut Self {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.b(&buf[i..])
    }

    /// `0x`-prefixed lowercase hex without leading zeros.
    pub fn x(&mut self, v: u64) -> &mut Self {
        let mut buf = [0u8; 18];
        let mut i = buf.len();
        let mut v = v;
        loop {
            i -= 1;
            buf[i] = b"0123456789abcdef"[(v & 0xf) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        i -= 2;
        buf[i] = b'0';
        buf[i + 1] = b'x';
        self.b(&buf[i..])
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        putc(b'\n');
        SERIAL_LOCK.store(false, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------------------------
// Boot data: the Linux zero page minivmm passes in RSI, or the multiboot information a
// multiboot loader (QEMU's `-kernel`) passes in EBX. Guests see one interface: the command line
// and the RAM ranges (README "Entry state", "Booting under QEMU").

const ZP_E820_ENTRIES: u64 = 0x1e8;
const ZP_CMD_LINE_PTR: u64 = 0x228;
const ZP_E820_TABLE: u64 = 0x2d0;
const E820_MAX: usize = 128;
const CMDLINE_MAX: usize = 4096;

// Multiboot information: flags, and the fields the guests use.
const MBI_FLAGS: u64 = 0;
const MBI_CMDLINE: u64 = 16;
const MBI_MMAP_LENGTH: u64 = 44;
const MBI_MMAP_ADDR: u64 = 48;
const MBI_FLAG_CMDLINE: u32 = 1 << 2;
const MBI_FLAG_MMAP: u32 = 1 << 6;

pub const E820_RAM: u32 = 1;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BootKind {
    /// minivmm: Linux boot protocol, `info` is the zero page.
    Linux,
    /// A multiboot v1 loader: `info` is the multiboot information structure.
    Multiboot,
}

#[derive(Clone, Copy)]
pub struct Boot {
    info: u64,
    kind: BootKind,
}

#[derive(Clone, Copy)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

fn read_phys<T: Copy>(addr: u64) -> T {
    // SAFETY: only called for boot data the loader wrote before entry (the zero page, the
    // multiboot information, its memory map and command line) in identity-mapped memory below
    // 4 GiB that neither the guest image nor anything the guests write overlaps.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// A NUL-terminated string of at most `CMDLINE_MAX` bytes at `ptr`, without the NUL.
fn c_string(ptr: u64) -> &'static [u8] {
    if ptr == 0 {
        return &[];
    }
    // SAFETY: as for `read_phys`: both loaders put the command line in memory that stays
    // untouched for the guest's lifetime; reading up to 4 KiB past it stays in mapped RAM.
    let all = unsafe { core::slice::from_raw_parts(ptr as *const u8, CMDLINE_MAX) };
    let len = all.iter().position(|&c| c == 0).unwrap_or(CMDLINE_MAX);
    &all[..len]
}

impl Boot {
    pub fn kind(&self) -> BootKind {
        self.kind
    }

    fn mbi_flags(&self) -> u32 {
        read_phys(self.info + MBI_FLAGS)
    }

    /// The kernel command line, without its NUL. A multiboot loader puts the image's path
    /// first (QEMU and GRUB do); that word is dropped, so both VMMs show the same parameters.
    pub fn cmdline(&self) -> &'static [u8] {
        match self.kind {
            BootKind::Linux => c_string(read_phys::<u32>(self.info + ZP_CMD_LINE_PTR) as u64),
            BootKind::Multiboot => {
                if self.mbi_flags() & MBI_FLAG_CMDLINE == 0 {
                    return &[];
                }
                let all = c_string(read_phys::<u32>(self.info + MBI_CMDLINE) as u64);
                strip_image_path(all)
            }
        }
    }

    /// Entries of the memory map (e820, or the multiboot map, whose types mean the same).
    pub fn e820_len(&self) -> usize {
        match self.kind {
            BootKind::Linux => {
                (read_phys::<u8>(self.info + ZP_E820_ENTRIES) as usize).min(E820_MAX)
            }
            BootKind::Multiboot => {
                let mut n = 0;
                while n < E820_MAX && self.mmap_entry(n).is_some() {
                    n += 1;
                }
                n
            }
        }
    }

    pub fn e820(&self, i: usize) -> E820Entry {
        match self.kind {
            BootKind::Linux => {
                let base = self.info + ZP_E820_TABLE + 20 * i as u64;
                E820Entry {
                    addr: read_phys(base),
                    size: read_phys(base + 8),
                    kind: read_phys(base + 16),
                }
            }
            BootKind::Multiboot => self.mmap_entry(i).unwrap_or(E820Entry {
                addr: 0,
                size: 0,
                kind: 0,
            }),
        }
    }

    /// Entry `i` of the multiboot memory map. Entries are `size` (u32, not counting itself),
    /// then base, length (u64) and type (u32); `size` may be larger than 20, so the map is
    /// walked from its start.
    fn mmap_entry(&self, i: usize) -> Option<E820Entry> {
        if self.mbi_flags() & MBI_FLAG_MMAP == 0 {
            return None;
        }
        let start = read_phys::<u32>(self.info + MBI_MMAP_ADDR) as u64;
        let end = start + read_phys::<u32>(self.info + MBI_MMAP_LENGTH) as u64;
        let mut at = start;
        for k in 0.. {
            if at + 24 > end {
                return None;
            }
            if k == i {
                return Some(E820Entry {
                    addr: read_phys(at + 4),
                    size: read_phys(at + 12),
                    kind: read_phys(at + 20),
                });
            }
            at += 4 + read_phys::<u32>(at) as u64;
        }
        None
    }
}

/// The command line without a leading image path: the first word goes if it is not a
/// `key=value` parameter.
fn strip_image_path(cmdline: &[u8]) -> &[u8] {
    let trimmed = match cmdline.iter().position(|c| !c.is_ascii_whitespace()) {
        Some(p) => &cmdline[p..],
        None => return &[],
    };
    let first_end = trimmed
        .iter()
        .position(|c| c.is_ascii_whitespace())
        .unwrap_or(trimmed.len());
    if trimmed[..first_end].contains(&b'=') {
        return trimmed;
    }
    let rest = &trimmed[first_end..];
    match rest.iter().position(|c| !c.is_ascii_whitespace()) {
        Some(p) => &rest[p..],
        None => &[],
    }
}

// ---------------------------------------------------------------------------------------------
// Command line: space-separated `key=value` words.

/// The value of the last `key=...` word, if any.
pub fn arg<'a>(cmdline: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let key = key.as_bytes();
    let mut found = None;
    for word in cmdline.split(|c| c.is_ascii_whitespace()) {
        if word.len() > key.len() && word.starts_with(key) && word[key.len()] == b'=' {
            found = Some(&word[key.len() + 1..]);
        }
    }
    found
}

/// A decimal number, or hex with a `0x` prefix (addresses read better that way).
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix(b"0x") {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(v)
}

/// `key=<number>` from the command line, `default` when absent; prints and exits with
/// `EXIT_SETUP` when the value is not a number in `min..=max`.
pub fn arg_u64(cmdline: &[u8], who: &str, key: &str, default: u64, min: u64, max: u64) -> u64 {
    let Some(raw) = arg(cmdline, key) else {
        return default;
    };
    match parse_u64(raw) {
        Some(v) if (min..=max).contains(&v) => v,
        _ => {
            line()
                .s(who)
                .s(": bad ")
                .s(key)
                .s("=")
                .b(raw)
                .s(" (want ")
                .u(min)
                .s("..=")
                .u(max)
                .s(")");
            exit(EXIT_SETUP)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Time: TSC calibrated against PIT channel 2.
//
// A guest may be live-migrated mid-run: the TSC on the destination need not continue from the
// source's value. So only deltas between consecutive readings are used, and each is clamped
// (see `Clock`).

pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the time-stamp counter into EDX:EAX. No `nomem`, so the
    // compiler keeps it in order with the memory work it is timing.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nostack, preserves_flags)) }
    ((hi as u64) << 32) | lo as u64
}

const PIT_HZ: u64 = 1_193_182;
/// PIT ticks to measure over in total: 40 ms.
const CALIBRATE_PIT_TICKS: u64 = PIT_HZ * 40 / 1000;
/// Widest acceptable TSC window around one counter read (~0.4 ms at 2.5 GHz, against the
/// ~10 us such a read takes when the vCPU is not descheduled in the middle of it).
const MAX_SAMPLE_WINDOW: u64 = 1_000_000;
/// Longest acceptable TSC gap between consecutive reads: at most 10 ms for any TSC of 1 GHz or
/// more, far inside the 55 ms after which the 16-bit counter wraps and a delta is ambiguous.
const MAX_SAMPLE_GAP: u64 = 10_000_000;
const FALLBACK_TSC_HZ: u64 = 2_000_000_000;

/// (TSC at the middle of the read, PIT channel 2 count, width of the TSC window around it).
fn pit_sample() -> (u64, u16, u64) {
    let before = rdtsc();
    // Counter-latch command for channel 2, then the latched count, low byte first.
    outb(0x43, 0x80);
    let lo = inb(0x42) as u16;
    let hi = inb(0x42) as u16;
    let after = rdtsc();
    let window = after.wrapping_sub(before);
    (before.wrapping_add(window / 2), hi << 8 | lo, window)
}

/// TSC ticks per second, measured once against PIT channel 2 (free-running down from 0xffff
/// in mode 0, gated on through port 0x61).
///
/// It reads the counter, bracketed by TSC reads, over and over, and adds up TSC and PIT
/// deltas of consecutive reads. Pairs where the vCPU was descheduled (a wide bracket, or a
/// long gap in which the counter may have wrapped) are left out of both sums; on this host
/// two cores are shared by everything, and vCPUs regularly lose 10 ms or more. Falls back to
/// 2 GHz, with a message, if the PIT does not count or the result is nonsensical.
pub fn calibrate_tsc(who: &str) -> u64 {
    // Gate channel 2 on (bit 0), speaker off (bit 1).
    let ctl = inb(0x61);
    outb(0x61, (ctl & !0x02) | 0x01);
    // Channel 2, lobyte/hibyte, mode 0, binary; counting starts once the count is written.
    outb(0x43, 0xb0);
    outb(0x42, 0xff);
    outb(0x42, 0xff);

    let begin = rdtsc();
    let (mut tsc_sum, mut pit_sum) = (0u64, 0u64);
    let mut prev = pit_sample();
    // Bounded by TSC ticks: 4e9 ticks is at most 4 s on any CPU of 1 GHz or faster.
    while pit_sum < CALIBRATE_PIT_TICKS && rdtsc().wrapping_sub(begin) < 4_000_000_000 {
        let cur = pit_sample();
        let gap = cur.0.wrapping_sub(prev.0);
        if gap <= MAX_SAMPLE_GAP && prev.2 <= MAX_SAMPLE_WINDOW && cur.2 <= MAX_SAMPLE_WINDOW {
            tsc_sum += gap;
            pit_sum += prev.1.wrapping_sub(cur.1) as u64;
        }
        prev = cur;
    }
    if pit_sum >= CALIBRATE_PIT_TICKS {
        let hz = tsc_sum * PIT_HZ / pit_sum;
        if (100_000_000..=20_000_000_000).contains(&hz) {
            return hz;
        }
    }
    line()
        .s(who)
        .s(": PIT calibration failed, assuming TSC at ")
        .u(FALLBACK_TSC_HZ / 1_000_000)
        .s(" MHz");
    FALLBACK_TSC_HZ
}

/// Monotonic time from TSC deltas that survives a TSC that jumps (migration to another host,
/// a long pause): a backwards step counts as zero and a step above `max_step` as `max_step`.
pub struct Clock {
    last: u64,
    max_step: u64,
}

impl Clock {
    pub fn new(max_step: u64) -> Self {
        Clock {
            last: rdtsc(),
            max_step,
        }
    }

    /// Clamped ticks since the previous call (or since `new`).
    pub fn step(&mut self) -> u64 {
        let now = rdtsc();
        let delta = now.wrapping_sub(self.last) as i64;
        self.last = now;
        if delta <= 0 {
            0
        } else {
            (delta as u64).min(self.max_step)
        }
    }
}

/// Busy-waits about `ticks` TSC ticks.
pub fn spin_ticks(ticks: u64) {
    let mut clock = Clock::new(ticks.max(1));
    let mut waited = 0;
    while waited < ticks {
        pause();
        waited += clock.step();
    }
}
