//! The local APIC in xAPIC mode at its reset address: ids, IPIs, EOI and the timer.
//!
//! Included with `mod lapic;`; the LAPIC page is identity-mapped (README "Entry state").
#![allow(dead_code)]

const BASE: u64 = 0xfee0_0000;
pub const ID: u64 = 0x20;
pub const TPR: u64 = 0x80;
pub const EOI: u64 = 0xb0;
pub const SVR: u64 = 0xf0;
pub const ICR_LO: u64 = 0x300;
pub const ICR_HI: u64 = 0x310;
pub const LVT_TIMER: u64 = 0x320;
pub const TIMER_INITIAL: u64 = 0x380;
pub const TIMER_CURRENT: u64 = 0x390;
pub const TIMER_DIVIDE: u64 = 0x3e0;

pub const ICR_ALL_BUT_SELF: u32 = 0b11 << 18;
pub const ICR_ASSERT: u32 = 1 << 14;
pub const ICR_PENDING: u32 = 1 << 12;
pub const ICR_INIT: u32 = 0b101 << 8;
pub const ICR_STARTUP: u32 = 0b110 << 8;

/// Physical address of the EOI register, for interrupt handlers written in asm.
pub const EOI_ADDR: u64 = BASE + EOI;

pub fn read(reg: u64) -> u32 {
    // SAFETY: the xAPIC page is identity-mapped and its registers are 32-bit MMIO; the
    // registers read here (ID, ICR, SVR) have no read side effects.
    unsafe { core::ptr::read_volatile((BASE + reg) as *const u32) }
}

pub fn write(reg: u64, value: u32) {
    // SAFETY: as for `read`; the writes affect interrupt delivery and CPU start-up only,
    // never memory that Rust owns.
    unsafe { core::ptr::write_volatile((BASE + reg) as *mut u32, value) }
}

pub fn id() -> u32 {
    read(ID) >> 24
}

/// Software-enables the LAPIC with `spurious` as its spurious vector and accepts every
/// priority: without this it neither sends IPIs nor delivers interrupts.
pub fn enable(spurious: u8) {
    write(SVR, (read(SVR) & !0xff) | 0x100 | spurious as u32);
    write(TPR, 0);
}

/// Sends an IPI and waits (bounded) until the LAPIC has taken it.
pub fn send_ipi(icr_hi: u32, icr_lo: u32) {
    write(ICR_HI, icr_hi);
    write(ICR_LO, icr_lo);
    for _ in 0..1_000_000 {
        if read(ICR_LO) & ICR_PENDING == 0 {
            return;
        }
        crate::rt::pause();
    }
}

pub fn eoi() {
    write(EOI, 0);
}

/// Whether the timer counts and may interrupt: unmasked, with a count running.
pub fn timer_running() -> bool {
    read(LVT_TIMER) & LVT_MASKED == 0 && read(TIMER_CURRENT) != 0
}

const LVT_MASKED: u32 = 1 << 16;

/// Periodic timer interrupts on `vector` every `count` ticks of the bus clock divided by 16.
pub fn timer_periodic(vector: u8, count: u32) {
    write(TIMER_DIVIDE, 0b0011);
    write(LVT_TIMER, (1 << 17) | vector as u32);
    write(TIMER_INITIAL, count);
}
