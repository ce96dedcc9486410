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
/// First of the eight 32-bit interrupt request registers, 16 bytes apart.
pub const IRR: u64 = 0x200;

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

/// Divide configuration: bus clock / 16, for every timer mode used here.
const DIVIDE_16: u32 = 0b0011;

/// Periodic timer interrupts on `vector` every `count` ticks of the bus clock divided by 16.
pub fn timer_periodic(vector: u8, count: u32) {
    write(TIMER_DIVIDE, DIVIDE_16);
    write(LVT_TIMER, (1 << 17) | vector as u32);
    write(TIMER_INITIAL, count);
}

/// One timer interrupt on `vector` after `count` ticks of the bus clock divided by 16
/// (rewriting the LVT too, so that a timer whose LVT was reset works again).
pub fn timer_oneshot(vector: u8, count: u32) {
    write(TIMER_DIVIDE, DIVIDE_16);
    write(LVT_TIMER, vector as u32);
    write(TIMER_INITIAL, count);
}

/// Whether a timer interrupt on `vector` is still to come or already waiting: the LVT is
/// unmasked and the count runs, or the count has run out and the interrupt sits in the IRR
/// (interrupts off). False when the LAPIC ignored the set-up (software-disabled, absent).
pub fn timer_armed(vector: u8) -> bool {
    let lvt = read(LVT_TIMER);
    if lvt & LVT_MASKED != 0 || lvt & 0xff != vector as u32 {
        return false;
    }
    let irr = read(IRR + 0x10 * (vector as u64 / 32));
    read(TIMER_CURRENT) != 0 || irr & (1 << (vector % 32)) != 0
}

/// Timer ticks per second at divide-by-16, measured against the TSC (`tsc_hz`) over about
/// 10 ms with the timer masked; 0 when it does not count down (no usable LAPIC). Each end is
/// a count read bracketed by TSC reads, retried while the bracket is wide (the vCPU lost the
/// host CPU in between), so the rate is within a few per cent.
pub fn timer_hz(tsc_hz: u64) -> u64 {
    let sample = || {
        let mut best = (0, 0, u64::MAX);
        for _ in 0..16 {
            let before = crate::rt::rdtsc();
            let count = read(TIMER_CURRENT);
            let width = crate::rt::rdtsc().wrapping_sub(before);
            if width < best.2 {
                best = (before.wrapping_add(width / 2), count, width);
            }
            if width <= tsc_hz / 10_000 {
                break;
            }
        }
        (best.0, best.1)
    };
    write(TIMER_DIVIDE, DIVIDE_16);
    write(LVT_TIMER, LVT_MASKED);
    write(TIMER_INITIAL, u32::MAX);
    let (t0, c0) = sample();
    crate::rt::spin_ticks(tsc_hz / 100);
    let (t1, c1) = sample();
    write(TIMER_INITIAL, 0);
    // In microseconds, so that neither product below can overflow 64 bits.
    let us = t1.wrapping_sub(t0).min(tsc_hz) * 1_000_000 / tsc_hz;
    if c1 >= c0 || us == 0 {
        return 0;
    }
    (c0 - c1) as u64 * 1_000_000 / us
}
