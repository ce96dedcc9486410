//! PCI configuration space through the PC's type 1 mechanism (address at port 0xCF8, data at
//! 0xCFC-0xCFF), and the standard header fields a driver uses: ids, command, BARs,
//! capabilities.
//!
//! Included with `mod pci;`. Written to the PCI Local Bus spec, not to minivmm's emulation.
#![allow(dead_code)]

use crate::rt::{inb, inl, inw, outb, outl, outw};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

pub const VENDOR_ID: u8 = 0x00;
pub const COMMAND: u8 = 0x04;
pub const STATUS: u8 = 0x06;
pub const HEADER_TYPE: u8 = 0x0e;
pub const BAR0: u8 = 0x10;
pub const CAPABILITIES: u8 = 0x34;
/// INTERRUPT_LINE (bits 0..8) and INTERRUPT_PIN (bits 8..16) of the dword at 0x3C.
pub const INTERRUPT: u8 = 0x3c;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES: u16 = 1 << 4;

pub const CAP_MSIX: u8 = 0x11;

/// One function on the bus: bus, device (0..32), function (0..8).
#[derive(Clone, Copy)]
pub struct Function {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

/// What a memory BAR decodes: base and size in bytes.
pub struct MemoryBar {
    pub base: u64,
    pub size: u64,
    pub is_64: bool,
}

impl Function {
    fn select(&self, reg: u8) {
        let address = 1 << 31
            | (self.bus as u32) << 16
            | (self.device as u32 & 0x1f) << 11
            | (self.function as u32 & 0x7) << 8
            | (reg as u32 & 0xfc);
        outl(CONFIG_ADDRESS, address);
    }

    pub fn read32(&self, reg: u8) -> u32 {
        self.select(reg);
        inl(CONFIG_DATA)
    }

    pub fn read16(&self, reg: u8) -> u16 {
        self.select(reg);
        inw(CONFIG_DATA + (reg as u16 & 2))
    }

    pub fn read8(&self, reg: u8) -> u8 {
        self.select(reg);
        inb(CONFIG_DATA + (reg as u16 & 3))
    }

    pub fn write32(&self, reg: u8, value: u32) {
        self.select(reg);
        outl(CONFIG_DATA, value);
    }

    /// A 16-bit write, so that the neighbouring register (e.g. STATUS next to COMMAND, whose
    /// bits are write-1-to-clear) is left alone.
    pub fn write16(&self, reg: u8, value: u16) {
        self.select(reg);
        outw(CONFIG_DATA + (reg as u16 & 2), value);
    }

    pub fn write8(&self, reg: u8, value: u8) {
        self.select(reg);
        outb(CONFIG_DATA + (reg as u16 & 3), value);
    }

    /// (vendor, device); vendor 0xffff means nothing answers there.
    pub fn ids(&self) -> (u16, u16) {
        let v = self.read32(VENDOR_ID);
        (v as u16, (v >> 16) as u16)
    }

    /// (INTERRUPT_LINE, INTERRUPT_PIN): what the firmware (here the VMM) wired the pin to,
    /// and the pin (0 none, 1..=4 INTA#..INTD#).
    pub fn interrupt(&self) -> (u8, u8) {
        let v = self.read32(INTERRUPT);
        (v as u8, (v >> 8) as u8)
    }

    pub fn command(&self) -> u16 {
        self.read16(COMMAND)
    }

    pub fn set_command(&self, value: u16) {
        self.write16(COMMAND, value)
    }

    /// Config-space offset of the first capability with `id`.
    pub fn capability(&self, id: u8) -> Option<u8> {
        if self.read16(STATUS) & STATUS_CAPABILITIES == 0 {
            return None;
        }
        let mut at = self.read8(CAPABILITIES) & 0xfc;
        // At most 48 capabilities fit in the 192 bytes after the header; a loop in the list
        // must not hang the guest.
        for _ in 0..48 {
            if at < 0x40 {
                return None;
            }
            if self.read8(at) == id {
                return Some(at);
            }
            at = self.read8(at + 1) & 0xfc;
        }
        None
    }

    /// The memory BAR at `index`, sized the standard way: with memory decoding off, write all
    /// ones and read back the bits that stick. None for an I/O BAR or an unimplemented one.
    pub fn memory_bar(&self, index: u8) -> Option<MemoryBar> {
        let reg = BAR0 + 4 * index;
        let low = self.read32(reg);
        if low & 1 != 0 {
            return None;
        }
        let is_64 = (low >> 1) & 3 == 2;
        let command = self.command();
        self.set_command(command & !(COMMAND_MEMORY | COMMAND_IO));
        self.write32(reg, !0);
        let mut mask = (self.read32(reg) & !0xf) as u64;
        self.write32(reg, low);
        let mut base = (low & !0xf) as u64;
        if is_64 {
            let high = self.read32(reg + 4);
            self.write32(reg + 4, !0);
            mask |= (self.read32(reg + 4) as u64) << 32;
            self.write32(reg + 4, high);
            base |= (high as u64) << 32;
        } else {
            mask |= 0xffff_ffff_0000_0000;
        }
        self.set_command(command);
        if mask == 0xffff_ffff_0000_0000 || mask == 0 {
            return None;
        }
        Some(MemoryBar {
            base,
            size: (!mask).wrapping_add(1),
            is_64,
        })
    }

    /// Moves memory BAR `index` to `base` with memory decoding off meanwhile, so that the
    /// device never decodes a half-written address; restores the command register after.
    pub fn move_memory_bar(&self, index: u8, base: u64, is_64: bool) {
        let reg = BAR0 + 4 * index;
        let command = self.command();
        self.set_command(command & !COMMAND_MEMORY);
        let flags = self.read32(reg) & 0xf;
        self.write32(reg, (base as u32 & !0xf) | flags);
        if is_64 {
            self.write32(reg + 4, (base >> 32) as u32);
        }
        self.set_command(command);
    }
}

/// Where a function's MSI-X capability puts its table and PBA.
pub struct Msix {
    cap: u8,
    pub vectors: u16,
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

const MSIX_CONTROL: u8 = 2;
const MSIX_TABLE: u8 = 4;
const MSIX_PBA: u8 = 8;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
const MSIX_ENTRY_SIZE: u64 = 16;
const MSIX_VECTOR_MASKED: u32 = 1;

impl Function {
    pub fn msix(&self) -> Option<Msix> {
        let cap = self.capability(CAP_MSIX)?;
        let table = self.read32(cap + MSIX_TABLE);
        let pba = self.read32(cap + MSIX_PBA);
        Some(Msix {
            cap,
            vectors: (self.read16(cap + MSIX_CONTROL) & 0x7ff) + 1,
            table_bar: (table & 7) as u8,
            table_offset: table & !7,
            pba_bar: (pba & 7) as u8,
            pba_offset: pba & !7,
        })
    }

    /// Sets MSI-X Enable and Function Mask in the capability's control register.
    pub fn msix_control(&self, msix: &Msix, enable: bool, mask_all: bool) {
        let mut control = self.read16(msix.cap + MSIX_CONTROL);
        control &= !(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        if enable {
            control |= MSIX_ENABLE;
        }
        if mask_all {
            control |= MSIX_FUNCTION_MASK;
        }
        self.write16(msix.cap + MSIX_CONTROL, control);
    }
}

fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: callers pass addresses inside a BAR that this guest assigned, in the PCI hole
    // (identity-mapped, never RAM), so no Rust-visible memory changes.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: as for `mmio_write32`.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Programs MSI-X table entry `entry` (the table at `table`, a CPU address): the message is
/// written while the vector is masked, then the mask is set as asked.
pub fn msix_entry(table: u64, entry: u16, address: u64, data: u32, masked: bool) {
    let at = table + entry as u64 * MSIX_ENTRY_SIZE;
    mmio_write32(at + 12, mmio_read32(at + 12) | MSIX_VECTOR_MASKED);
    mmio_write32(at, address as u32);
    mmio_write32(at + 4, (address >> 32) as u32);
    mmio_write32(at + 8, data);
    let control = mmio_read32(at + 12) & !MSIX_VECTOR_MASKED;
    mmio_write32(at + 12, control | masked as u32);
}

/// The MSI address that delivers to the LAPIC with `apic_id` (physical destination mode).
pub fn msi_address(apic_id: u32) -> u64 {
    0xfee0_0000 | ((apic_id as u64 & 0xff) << 12)
}

/// The first function on bus 0 with these ids.
pub fn find(vendor: u16, device: u16) -> Option<Function> {
    for dev in 0..32 {
        let f0 = Function {
            bus: 0,
            device: dev,
            function: 0,
        };
        if f0.ids().0 == 0xffff {
            continue;
        }
        let functions = if f0.read8(HEADER_TYPE) & 0x80 != 0 {
            8
        } else {
            1
        };
        for function in 0..functions {
            let f = Function { function, ..f0 };
            if f.ids() == (vendor, device) {
                return Some(f);
            }
        }
    }
    None
}
