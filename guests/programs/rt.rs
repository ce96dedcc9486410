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

// Entry from minivmm (README "Entry state"): 64-bit mode, interrupts off, RSI = zero page.
// `.bss` is cleared here rather than trusted to be zero so that a loader which copies only the
// file bytes into reused memory still gives Rust zeroed statics.
global_asm!(
    r#"
    .pushsection .text.start, "ax", @progbits
    .global _start
    .type _start, @function
_start:
    cli
    cld
    mov r12, rsi
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    xor eax, eax
    rep stosb
    lea rsp, [rip + {stack} + {stack_size}]
    xor ebp, ebp
    mov rdi, r12
    call {entry}
2:
    cli
    hlt
    jmp 2b
    .size _start, . - _start
    .popsection
"#,
    stack = sym BOOT_STACK,
    stack_size = const STACK_SIZE,
    entry = sym rt_entry,
);

extern "C" fn rt_entry(zero_page: u64) -> ! {
    crate::guest_main(Boot { zero_page })
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
// Boot data: the Linux zero page minivmm passes in RSI (README "Entry state").

const ZP_E820_ENTRIES: u64 = 0x1e8;
const ZP_CMD_LINE_PTR: u64 = 0x228;
const ZP_E820_TABLE: u64 = 0x2d0;
const E820_MAX: usize = 128;
const CMDLINE_MAX: usize = 4096;

pub const E820_RAM: u32 = 1;

#[derive(Clone, Copy)]
pub struct Boot {
    zero_page: u64,
}

#[derive(Clone, Copy)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl Boot {
    fn read<T: Copy>(&self, offset: u64) -> T {
        // SAFETY: the zero page is a 4 KiB page of identity-mapped guest memory that minivmm
        // filled before entry and nobody writes afterwards; every offset used is inside it.
        unsafe { core::ptr::read_unaligned((self.zero_page + offset) as *const T) }
    }

    /// The kernel command line, without its NUL.
    pub fn cmdline(&self) -> &'static [u8] {
        let ptr = self.read::<u32>(ZP_CMD_LINE_PTR) as usize;
        if ptr == 0 {
            return &[];
        }
        // SAFETY: minivmm puts a NUL-terminated string of at most 4 KiB there (README) in
        // identity-mapped memory that stays untouched for the guest's lifetime.
        let all = unsafe { core::slice::from_raw_parts(ptr as *const u8, CMDLINE_MAX) };
        let len = all.iter().position(|&c| c == 0).unwrap_or(CMDLINE_MAX);
        &all[..len]
    }

    pub fn e820_len(&self) -> usize {
        (self.read::<u8>(ZP_E820_ENTRIES) as usize).min(E820_MAX)
    }

    pub fn e820(&self, i: usize) -> E820Entry {
        let base = ZP_E820_TABLE + 20 * i as u64;
        E820Entry {
            addr: self.read(base),
            size: self.read(base + 8),
            kind: self.read(base + 16),
        }
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
