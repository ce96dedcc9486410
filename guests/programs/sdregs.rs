//! sampledev's BAR0 registers (sampledev/README.md "BAR0 registers"), reached through the
//! address the guest gave the BAR.
//!
//! Included with `mod sdregs;` by the dmatest guest.
#![allow(dead_code)]

pub const ID: u64 = 0x000;
pub const STATUS: u64 = 0x008;
pub const DMA_SRC: u64 = 0x010;
pub const DMA_DST: u64 = 0x018;
pub const DMA_LEN: u64 = 0x020;
pub const DMA_PATTERN: u64 = 0x028;
pub const DMA_CMD: u64 = 0x030;
pub const DMA_VECTOR: u64 = 0x038;
pub const COUNTER: u64 = 0x040;
pub const STATE_SIZE: u64 = 0x048;
pub const STATE_WINDOW_OFFSET: u64 = 0x050;
pub const STATE_WINDOW_DATA: u64 = 0x058;
pub const STATE_SEED: u64 = 0x060;
pub const ERROR_COUNT: u64 = 0x068;

/// Low half of ID: "SDV1".
pub const ID_MAGIC: u32 = 0x5344_5631;
pub const STATUS_BUSY: u64 = 1 << 0;
pub const STATUS_DONE: u64 = 1 << 1;
pub const STATUS_ERROR: u64 = 1 << 2;
pub const CMD_FILL: u64 = 1;

/// BAR0 of one sampledev function at `base`.
#[derive(Clone, Copy)]
pub struct Regs {
    pub base: u64,
}

impl Regs {
    /// A 64-bit register, read in one naturally aligned 8-byte access as the device allows.
    pub fn read(&self, reg: u64) -> u64 {
        // SAFETY: `base` is the device's BAR0 as this guest programmed it, in the PCI hole
        // (identity-mapped MMIO, never RAM); reading a register changes no memory.
        unsafe { core::ptr::read_volatile((self.base + reg) as *const u64) }
    }

    /// A 64-bit register write. Starting a DMA (DMA_CMD) makes the device write guest RAM
    /// later, which the guest only reads back with volatile reads after the completion
    /// interrupt.
    pub fn write(&self, reg: u64, value: u64) {
        // SAFETY: as for `read`.
        unsafe { core::ptr::write_volatile((self.base + reg) as *mut u64, value) }
    }

    /// The low 32 bits of a register, with a 4-byte access.
    pub fn read32(&self, reg: u64) -> u32 {
        // SAFETY: as for `read`.
        unsafe { core::ptr::read_volatile((self.base + reg) as *const u32) }
    }

    /// Word `index` of the internal state, through the window.
    pub fn state_word(&self, index: u64) -> u64 {
        self.write(STATE_WINDOW_OFFSET, index * 8);
        self.read(STATE_WINDOW_DATA)
    }
}
