//! The IOAPIC at its standard address (MP table, README "Entry state"): indirect registers
//! through IOREGSEL/IOWIN, and redirection entries that route a pin to a LAPIC.
//!
//! Included with `mod ioapic;`; the IOAPIC page is identity-mapped like the LAPIC's.
#![allow(dead_code)]

const BASE: u64 = 0xfec0_0000;
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;

pub const VERSION: u32 = 0x01;
/// Low dword of pin N's redirection entry; the high dword is the next register.
const REDIRECTION: u32 = 0x10;

/// Redirection entry bits (low dword): vector in 0..8, fixed delivery (000) and physical
/// destination mode (0) by default.
pub const DELIVERY_PENDING: u32 = 1 << 12;
pub const ACTIVE_LOW: u32 = 1 << 13;
pub const REMOTE_IRR: u32 = 1 << 14;
pub const LEVEL: u32 = 1 << 15;
pub const MASKED: u32 = 1 << 16;

pub fn read(reg: u32) -> u32 {
    // SAFETY: the IOAPIC page is identity-mapped MMIO (never RAM); IOREGSEL and IOWIN are
    // 32-bit registers, and selecting and reading a register changes no memory.
    unsafe {
        core::ptr::write_volatile((BASE + IOREGSEL) as *mut u32, reg);
        core::ptr::read_volatile((BASE + IOWIN) as *const u32)
    }
}

pub fn write(reg: u32, value: u32) {
    // SAFETY: as for `read`; the write changes interrupt routing only.
    unsafe {
        core::ptr::write_volatile((BASE + IOREGSEL) as *mut u32, reg);
        core::ptr::write_volatile((BASE + IOWIN) as *mut u32, value);
    }
}

/// Number of pins (redirection entries): the version register's maximum entry index + 1.
pub fn pins() -> u32 {
    ((read(VERSION) >> 16) & 0xff) + 1
}

/// Pin `pin` → `vector` at the LAPIC with id `apic_id`: fixed delivery, physical destination,
/// level-triggered, active high, unmasked. The destination goes in first and the mask bit is
/// cleared last, so the pin never delivers half-programmed.
pub fn route_level(pin: u32, vector: u8, apic_id: u32) {
    let low = REDIRECTION + 2 * pin;
    write(low, read(low) | MASKED);
    write(low + 1, (apic_id & 0xff) << 24);
    write(low, vector as u32 | LEVEL);
}

/// The low dword of pin `pin`'s redirection entry (vector, delivery status, remote IRR, mask).
pub fn entry(pin: u32) -> u32 {
    read(REDIRECTION + 2 * pin)
}
