//! An interrupt descriptor table for guests that take interrupts.
//!
//! Included with `mod idt;`. `init` points every vector at a stub that reports the vector and
//! ends the guest with the panic code, so that an unexpected exception or interrupt is named
//! on serial instead of triple-faulting the vCPU; `set` then installs real handlers. Handlers
//! run on the interrupted stack (no IST), so interrupts must only be enabled inside `asm!`
//! blocks without `nostack`, where the compiler keeps nothing below the stack pointer.
#![allow(dead_code)]

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

/// 256 gates of 16 bytes.
#[repr(C, align(16))]
struct Table([AtomicU64; 512]);

static IDT: Table = Table([const { AtomicU64::new(0) }; 512]);

const STUB_SIZE: u64 = 16;
/// Present, DPL 0, 64-bit interrupt gate (IF cleared on entry).
const INTERRUPT_GATE: u64 = 0x8e;

// One 16-byte stub per vector: vector number in EDI, then the common path, which aligns the
// stack and calls `unexpected` (which never returns, so the frame layout, with or without an
// error code, does not matter). `idt_ignore` is a handler that just returns, for the LAPIC's
// spurious vector, which needs no EOI. `idt_timer_tick` counts a LAPIC timer interrupt and
// EOIs it, touching no register but RAX (saved); the EOI register is above 2 GiB, so its
// address goes through a register rather than a sign-extended 32-bit displacement.
global_asm!(
    r#"
    .pushsection .text.idt_stubs, "ax", @progbits
    .balign 16
idt_stubs:
    .set idt_vector, 0
    .rept 256
    .balign 16
    movl $idt_vector, %edi
    jmp idt_common
    .set idt_vector, idt_vector + 1
    .endr
idt_common:
    movq %rsp, %rsi
    andq $-16, %rsp
    call {unexpected}
    ud2
    .global idt_ignore
idt_ignore:
    iretq
    .global idt_timer_tick
idt_timer_tick:
    pushq %rax
    lock incq {ticks}(%rip)
    movabsq ${eoi}, %rax
    movl $0, (%rax)
    popq %rax
    iretq
    .popsection
"#,
    unexpected = sym unexpected,
    ticks = sym TIMER_TICKS,
    eoi = const crate::lapic::EOI_ADDR,
    options(att_syntax)
);

unsafe extern "C" {
    static idt_stubs: u8;
    /// Returns from the interrupt at once, without EOI.
    pub fn idt_ignore();
    /// Counts the interrupt in `TIMER_TICKS` and EOIs it: for the LAPIC timer, which only
    /// wakes `hlt`.
    pub fn idt_timer_tick();
}

/// LAPIC timer interrupts taken by `idt_timer_tick`, so that a sleeper can tell whether the
/// timer woke it.
pub static TIMER_TICKS: AtomicU64 = AtomicU64::new(0);

/// Sets up the LAPIC as this CPU's only interrupt source: masks the 8259s (the BSP's LINT0 is
/// in ExtINT mode after reset), loads the table (`init`), points `timer` at `idt_timer_tick`
/// and `spurious` at `idt_ignore`, and software-enables the LAPIC. The timer itself is not
/// started.
pub fn init_lapic(timer: u8, spurious: u8) {
    crate::rt::outb(0x21, 0xff);
    crate::rt::outb(0xa1, 0xff);
    init();
    set(timer, idt_timer_tick);
    set(spurious, idt_ignore);
    crate::lapic::enable(spurious);
}

/// Lets pending interrupts in and sleeps until the next one; interrupts are off again on
/// return. Not `nostack`: the handlers push onto this stack, so the compiler must keep nothing
/// below the stack pointer here. `sti` delays interrupts by one instruction, so one that is
/// already pending wakes the `hlt` rather than slipping in before it.
pub fn sleep_until_interrupt() {
    // SAFETY: callers have loaded the table (`init`), which has a handler or a reporting stub
    // for every vector; the handlers only change counters (hence no `nomem`).
    unsafe { asm!("sti", "hlt", "cli") }
}

extern "C" fn unexpected(vector: u32, frame: *const u64) -> ! {
    // SAFETY: `frame` is the stack pointer at the stub, below which the CPU pushed at least
    // five words (the interrupt frame) onto a mapped stack.
    let words: [u64; 5] = unsafe { core::ptr::read(frame as *const [u64; 5]) };
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    let mut l = crate::rt::line();
    l.s("PANIC: unexpected interrupt vector=").x(vector as u64);
    l.s(" frame=");
    for w in words {
        l.x(w).s(" ");
    }
    l.s("cr2=").x(cr2);
    drop(l);
    crate::rt::exit(crate::rt::EXIT_PANIC)
}

fn code_selector() -> u64 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs as u64
}

/// Points `vector` at `handler`: asm that preserves every register and ends with `iretq`.
pub fn set(vector: u8, handler: unsafe extern "C" fn()) {
    gate(vector, handler as *const () as u64);
}

fn gate(vector: u8, handler: u64) {
    let low = (handler & 0xffff)
        | code_selector() << 16
        | INTERRUPT_GATE << 40
        | ((handler >> 16) & 0xffff) << 48;
    IDT.0[vector as usize * 2].store(low, Ordering::SeqCst);
    IDT.0[vector as usize * 2 + 1].store(handler >> 32, Ordering::SeqCst);
}

/// Loads the table with every vector reporting itself as unexpected.
pub fn init() {
    let stubs = &raw const idt_stubs as u64;
    for v in 0..=255u8 {
        gate(v, stubs + v as u64 * STUB_SIZE);
    }
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let pointer = Pointer {
        limit: (core::mem::size_of::<Table>() - 1) as u16,
        base: &raw const IDT as u64,
    };
    // SAFETY: the table is a static that lives forever and holds valid gates for all 256
    // vectors; interrupts are off until a caller enables them.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) };
}
