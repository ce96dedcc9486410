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
// spurious vector, which needs no EOI.
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
    .popsection
"#,
    unexpected = sym unexpected,
    options(att_syntax)
);

unsafe extern "C" {
    static idt_stubs: u8;
    /// Returns from the interrupt at once, without EOI.
    pub fn idt_ignore();
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
