//! Starting the application processors (APs) the way an OS does on real hardware.
//!
//! Included with `mod ap;` (next to `mod rt;` and `mod lapic;`) by guests that run code on
//! more than one CPU. The guest provides `fn ap_main(ticket: u32) -> !`, which every AP
//! calls on its own stack once it is in long mode; tickets are 0, 1, 2, ... in the order
//! the APs get there, not APIC ids.
//!
//! `start_all` copies a real-mode trampoline to 0x70000 and sends INIT-SIPI-SIPI to all other
//! CPUs. Each AP goes real mode -> protected mode -> long mode on the BSP's page tables and a
//! GDT of its own, takes a stack, and calls `ap_main`. Interrupts stay off on the APs.
#![allow(dead_code)]

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, Ordering};

use crate::lapic;

/// The most CPUs a guest can run on: one stack each.
pub const MAX_CPUS: usize = 64;
const AP_STACK_SIZE: usize = 16 * 1024;
/// Where the real-mode trampoline runs: free low memory per README ("[0x70000, 0x9f000)"),
/// 4 KiB aligned as SIPI requires; the SIPI vector is its page number.
const TRAMPOLINE: u64 = 0x7_0000;
const SIPI_VECTOR: u32 = (TRAMPOLINE >> 12) as u32;

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
struct ApStacks([crate::rt::Stack<AP_STACK_SIZE>; MAX_CPUS]);
static mut AP_STACKS: ApStacks =
    ApStacks([const { crate::rt::Stack([0; AP_STACK_SIZE]) }; MAX_CPUS]);

// `ap_tramp_start..ap_tramp_end` is 16-bit code that the BSP copies to TRAMPOLINE; an AP
// starts there in real mode with CS = TRAMPOLINE >> 4, IP = 0, so it addresses its own bytes
// by offset from ap_tramp_start. It loads the GDT below and far-jumps straight into the 32-bit
// code in the image (linked below 4 GiB, so absolute 32-bit addresses work), which turns on
// PAE, the BSP's CR3, EFER.LME and paging, then far-jumps to 64-bit code that takes a stack
// and calls `ap_entry`. An AP whose ticket has no stack halts.
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
    cmpl ${max_aps}, %eax
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
    max_aps = const MAX_CPUS,
    stack_size = const AP_STACK_SIZE,
    stacks = sym AP_STACKS,
    entry = sym ap_entry,
    options(att_syntax)
);

unsafe extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
}

extern "C" fn ap_entry(ticket: u32) -> ! {
    crate::ap_main(ticket)
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

/// Puts the trampoline in place and sends INIT-SIPI-SIPI to every other CPU; they then call
/// `crate::ap_main` on their own. Takes about 10 ms (the MP spec's INIT delay).
pub fn start_all(tsc_hz: u64) -> Result<(), &'static str> {
    let (start, end) = (&raw const ap_tramp_start, &raw const ap_tramp_end);
    let len = end as usize - start as usize;
    // SAFETY: [TRAMPOLINE, +len) lies in low memory that README leaves to the guest
    // (len is a few dozen bytes) and that nothing in the image uses.
    unsafe { core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len) };

    let cr3 = read_cr3();
    if cr3 >> 32 != 0 {
        return Err("page tables above 4 GiB: APs cannot load them from 32-bit mode");
    }
    AP_CR0.store(read_cr0() as u32, Ordering::SeqCst);
    AP_CR3.store(cr3 as u32, Ordering::SeqCst);
    AP_CR4.store((read_cr4() & !CR4_PCIDE) as u32, Ordering::SeqCst);
    let efer = rdmsr(MSR_EFER) & !EFER_LMA;
    AP_EFER_LO.store(efer as u32, Ordering::SeqCst);
    AP_EFER_HI.store((efer >> 32) as u32, Ordering::SeqCst);

    // The LAPIC sends IPIs only when software-enabled. Interrupts stay off, so the spurious
    // vector is never used.
    lapic::enable(0xff);
    // INIT, 10 ms, SIPI, 200 us, SIPI: the MP spec's universal start-up sequence.
    lapic::send_ipi(
        0,
        lapic::ICR_ALL_BUT_SELF | lapic::ICR_ASSERT | lapic::ICR_INIT,
    );
    crate::rt::spin_ticks(tsc_hz / 100);
    for _ in 0..2 {
        let sipi = lapic::ICR_ALL_BUT_SELF | lapic::ICR_ASSERT | lapic::ICR_STARTUP;
        lapic::send_ipi(0, sipi | SIPI_VECTOR);
        crate::rt::spin_ticks(tsc_hz / 5000);
    }
    Ok(())
}
