//! `smp`: brings up every vCPU the MP table lists, the way an OS does on real hardware.
//!
//! The BSP counts processors in the MP table, copies a real-mode trampoline to 0x70000 and
//! sends INIT-SIPI-SIPI to all other CPUs. Each AP goes real mode -> protected mode -> long
//! mode on the BSP's page tables and a GDT of its own, takes a stack, and reports on serial.
//! Exits 0 when all have reported, 4 when some have not within `timeout_ms=` (default 5000).
#![no_std]
#![no_main]

mod rt;

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const WHO: &str = "SMP";
const MAX_CPUS: usize = 64;
const AP_STACK_SIZE: usize = 16 * 1024;
/// Where the real-mode trampoline runs: free low memory per README ("[0x70000, 0x9f000)"),
/// 4 KiB aligned as SIPI requires; the SIPI vector is its page number.
const TRAMPOLINE: u64 = 0x7_0000;
const SIPI_VECTOR: u32 = (TRAMPOLINE >> 12) as u32;

const LAPIC: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = 0x20;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_ICR_LO: u64 = 0x300;
const LAPIC_ICR_HI: u64 = 0x310;
const ICR_ALL_BUT_SELF: u32 = 0b11 << 18;
const ICR_ASSERT: u32 = 1 << 14;
const ICR_PENDING: u32 = 1 << 12;
const ICR_INIT: u32 = 0b101 << 8;
const ICR_STARTUP: u32 = 0b110 << 8;

const MSR_EFER: u32 = 0xc000_0080;
const EFER_LMA: u64 = 1 << 10;
const CR4_PCIDE: u64 = 1 << 17;

// What the APs load on their way to long mode, copied from the BSP before the SIPIs so that
// they run with exactly the BSP's paging and SSE setup.
static AP_CR0: AtomicU32 = AtomicU32::new(0);
static AP_CR3: AtomicU32 = AtomicU32::new(0);
static AP_CR4: AtomicU32 = AtomicU32::new(0);
static AP_EFER_LO: AtomicU32 = AtomicU32::new(0);
static AP_EFER_HI: AtomicU32 = AtomicU32::new(0);
/// Each AP takes the next ticket, which picks its stack.
static AP_TICKET: AtomicU32 = AtomicU32::new(0);

#[repr(C, align(16))]
struct ApStacks([rt::Stack<AP_STACK_SIZE>; MAX_CPUS]);
static mut AP_STACKS: ApStacks = ApStacks([const { rt::Stack([0; AP_STACK_SIZE]) }; MAX_CPUS]);

/// CPUs that have reported, and which APIC ids they had.
static UP: AtomicU32 = AtomicU32::new(0);
static SEEN: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

// The AP start path.
//
// `ap_tramp_start..ap_tramp_end` is 16-bit code that the BSP copies to TRAMPOLINE; an AP
// starts there in real mode with CS = TRAMPOLINE >> 4, IP = 0, so it addresses its own bytes
// by offset from ap_tramp_start. It loads the GDT below and far-jumps straight into the 32-bit
// code in the image (linked below 4 GiB, so absolute 32-bit addresses work), which turns on
// PAE, the BSP's CR3, EFER.LME and paging, then far-jumps to 64-bit code that takes a stack
// and calls `ap_entry`.
//
// GDT: 0x08 = 32-bit code, 0x10 = 64-bit code, 0x18 = data, all flat; accessed bits preset
// so that the CPU never writes to the descriptors.
global_asm!(
    r#"
    .pushsection .rodata.ap_gdt, "a", @progbits
    .balign 16
ap_gdt:
    .quad 0
    .quad 0x00cf9b000000ffff
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
ap_gdt_end:
    .popsection

    .pushsection .rodata.ap_trampoline, "a", @progbits
    .balign 16
    .global ap_tramp_start
    .global ap_tramp_end
    .code16
ap_tramp_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_tramp_gdtr - ap_tramp_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $ap_pm32
    .balign 8
ap_tramp_gdtr:
    .word ap_gdt_end - ap_gdt - 1
    .long ap_gdt
ap_tramp_end:
    .code64
    .popsection

    .pushsection .text.ap_start, "ax", @progbits
    .code32
ap_pm32:
    movw $0x18, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl {cr4}, %eax
    movl %eax, %cr4
    movl {cr3}, %eax
    movl %eax, %cr3
    movl ${efer_msr}, %ecx
    movl {efer_lo}, %eax
    movl {efer_hi}, %edx
    wrmsr
    movl {cr0}, %eax
    movl %eax, %cr0
    ljmpl $0x10, $ap_long64
    .code64
ap_long64:
    movw $0x18, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $1, %eax
    lock xaddl %eax, {ticket}(%rip)
    cmpl ${max_cpus}, %eax
    jae 2f
    movl %eax, %edi
    leaq 1(%rax), %rax
    imulq ${stack_size}, %rax
    leaq {stacks}(%rip), %rsp
    addq %rax, %rsp
    xorl %ebp, %ebp
    call {entry}
2:
    cli
    hlt
    jmp 2b
    .popsection
"#,
    cr0 = sym AP_CR0,
    cr3 = sym AP_CR3,
    cr4 = sym AP_CR4,
    efer_lo = sym AP_EFER_LO,
    efer_hi = sym AP_EFER_HI,
    efer_msr = const MSR_EFER,
    ticket = sym AP_TICKET,
    max_cpus = const MAX_CPUS,
    stack_size = const AP_STACK_SIZE,
    stacks = sym AP_STACKS,
    entry = sym ap_entry,
    options(att_syntax)
);

unsafe extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
}

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: the xAPIC page is identity-mapped (README) and its registers are 32-bit MMIO;
    // reading ID or ICR has no side effects.
    unsafe { core::ptr::read_volatile((LAPIC + reg) as *const u32) }
}

fn lapic_write(reg: u64, value: u32) {
    // SAFETY: as for `lapic_read`; the writes here (SVR, ICR) affect interrupt delivery and
    // CPU start-up only, never memory that Rust owns.
    unsafe { core::ptr::write_volatile((LAPIC + reg) as *mut u32, value) }
}

fn apic_id() -> u32 {
    lapic_read(LAPIC_ID) >> 24
}

fn mark_up(id: u32) {
    if id < 256 {
        SEEN[id as usize / 64].fetch_or(1 << (id % 64), Ordering::SeqCst);
    }
    rt::line().s("SMP cpu ").u(id as u64).s(" up");
    UP.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn ap_entry(_ticket: u32) -> ! {
    mark_up(apic_id());
    loop {
        rt::halt();
    }
}

fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reading a control register has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: as for `read_cr0`.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: as for `read_cr0`.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: EFER exists on every x86-64 CPU; reading it has no side effects.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    ((hi as u64) << 32) | lo as u64
}

fn low_u8(addr: u64) -> u8 {
    // SAFETY: below 1 MiB, identity-mapped; only read, and only where minivmm put BIOS data
    // (the EBDA and the BIOS area) or RAM.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn low_u16(addr: u64) -> u16 {
    low_u8(addr) as u16 | (low_u8(addr + 1) as u16) << 8
}

fn low_u32(addr: u64) -> u32 {
    low_u16(addr) as u32 | (low_u16(addr + 2) as u32) << 16
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(low_u8(addr + i))) == 0
}

fn has_signature(addr: u64, sig: &[u8; 4]) -> bool {
    (0..4).all(|i| low_u8(addr + i as u64) == sig[i])
}

/// The MP floating pointer: in the first KiB of the EBDA, where minivmm puts it (README), or
/// in the BIOS area as the MP spec also allows.
fn find_mp_floating() -> Option<u64> {
    let areas = [(0x9_fc00u64, 0xa_0000u64), (0xf_0000, 0x10_0000)];
    for (start, end) in areas {
        let mut a = start;
        while a + 16 <= end {
            if has_signature(a, b"_MP_") {
                let len = low_u8(a + 8) as u64 * 16;
                if len >= 16 && checksum_ok(a, len) {
                    return Some(a);
                }
            }
            a += 16;
        }
    }
    None
}

/// Enabled processors in the MP configuration table: (count, APIC id bitmap).
fn mp_processors() -> Result<(u32, [u64; 4]), &'static str> {
    let fp = find_mp_floating().ok_or("no MP floating pointer")?;
    let table = low_u32(fp + 4) as u64;
    if table == 0 {
        return Err("MP default configurations are not supported");
    }
    if !has_signature(table, b"PCMP") {
        return Err("MP table has no PCMP signature");
    }
    let len = low_u16(table + 4) as u64;
    if !checksum_ok(table, len) {
        return Err("MP table checksum is wrong");
    }
    let entries = low_u16(table + 0x22);
    let mut at = table + 0x2c;
    let (mut count, mut ids) = (0u32, [0u64; 4]);
    for _ in 0..entries {
        if at >= table + len {
            return Err("MP table entries overrun its length");
        }
        match low_u8(at) {
            0 => {
                let id = low_u8(at + 1);
                if low_u8(at + 3) & 1 != 0 {
                    count += 1;
                    ids[id as usize / 64] |= 1 << (id % 64);
                }
                at += 20;
            }
            1..=4 => at += 8,
            _ => return Err("MP table has an unknown entry type"),
        }
    }
    Ok((count, ids))
}

/// Sends an IPI and waits (bounded) until the LAPIC has taken it.
fn send_ipi(icr_lo: u32) {
    lapic_write(LAPIC_ICR_HI, 0);
    lapic_write(LAPIC_ICR_LO, icr_lo);
    for _ in 0..1_000_000 {
        if lapic_read(LAPIC_ICR_LO) & ICR_PENDING == 0 {
            return;
        }
        rt::pause();
    }
}

fn fail(code: u8, why: &str) -> ! {
    rt::line().s(WHO).s(": ").s(why);
    rt::exit(code)
}

fn guest_main(boot: rt::Boot) -> ! {
    let timeout_ms = rt::arg_u64(boot.cmdline(), WHO, "timeout_ms", 5000, 1, 3_600_000);
    let tsc_hz = rt::calibrate_tsc(WHO);
    mark_up(apic_id());

    let (n, ids) = mp_processors().unwrap_or_else(|why| fail(rt::EXIT_SETUP, why));
    if n as usize > MAX_CPUS {
        fail(
            rt::EXIT_SETUP,
            "more CPUs in the MP table than this guest has stacks for",
        );
    }

    if n > 1 {
        let (start, end) = (&raw const ap_tramp_start, &raw const ap_tramp_end);
        let len = end as usize - start as usize;
        // SAFETY: [TRAMPOLINE, +len) lies in low memory that README leaves to the guest
        // (len is a few dozen bytes) and that nothing in the image uses.
        unsafe { core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len) };

        let cr3 = read_cr3();
        if cr3 >> 32 != 0 {
            fail(
                rt::EXIT_SETUP,
                "page tables above 4 GiB: APs cannot load them from 32-bit mode",
            );
        }
        AP_CR0.store(read_cr0() as u32, Ordering::SeqCst);
        AP_CR3.store(cr3 as u32, Ordering::SeqCst);
        AP_CR4.store((read_cr4() & !CR4_PCIDE) as u32, Ordering::SeqCst);
        let efer = rdmsr(MSR_EFER) & !EFER_LMA;
        AP_EFER_LO.store(efer as u32, Ordering::SeqCst);
        AP_EFER_HI.store((efer >> 32) as u32, Ordering::SeqCst);

        // Software-enable the LAPIC (spurious vector 0xff) so that it sends IPIs; interrupts
        // stay off, so the vector is never used.
        lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x1ff);
        // INIT, 10 ms, SIPI, 200 us, SIPI: the MP spec's universal start-up sequence.
        send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT);
        rt::spin_ticks(tsc_hz / 100);
        for _ in 0..2 {
            send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | SIPI_VECTOR);
            rt::spin_ticks(tsc_hz / 5000);
        }
    }

    let mut clock = rt::Clock::new(tsc_hz / 10);
    let deadline = tsc_hz / 1000 * timeout_ms;
    let mut waited = 0;
    while UP.load(Ordering::SeqCst) < n && waited < deadline {
        rt::pause();
        waited += clock.step();
    }
    let up = UP.load(Ordering::SeqCst);
    if up >= n {
        rt::line().s("SMP all ").u(up as u64).s(" up");
        rt::exit(rt::EXIT_OK);
    }

    let mut l = rt::line();
    l.s(WHO)
        .s(": timeout: ")
        .u(up as u64)
        .s(" of ")
        .u(n as u64)
        .s(" CPUs up; missing APIC ids:");
    for id in 0..256u32 {
        let want = ids[id as usize / 64] & (1 << (id % 64)) != 0;
        let seen = SEEN[id as usize / 64].load(Ordering::SeqCst) & (1 << (id % 64)) != 0;
        if want && !seen {
            l.s(" ").u(id as u64);
        }
    }
    drop(l);
    rt::exit(rt::EXIT_SMP_TIMEOUT)
}
