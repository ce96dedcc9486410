//! PCI configuration space of the function (VFIO region 7): type-0 header, one 32-bit memory
//! BAR and an MSI-X capability, or, in INTx mode, interrupt pin INTA# and no capabilities.
//! Writes go through a per-byte write mask, which also gives BAR sizing its usual "write all
//! ones, read back the size mask" behaviour.

use crate::options::IrqMode;
use crate::regs::{BAR0_SIZE, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, MSIX_VECTORS};

pub const CONFIG_SIZE: usize = 256;

/// Not a registered PCI ID pair; chosen to stay clear of real and QEMU devices.
pub const VENDOR_ID: u16 = 0xfeed;
pub const DEVICE_ID: u16 = 0x0001;
pub const REVISION: u8 = 1;
/// Class 0xff: "device does not fit any defined class".
pub const CLASS_CODE: [u8; 3] = [0x00, 0x00, 0xff];

const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
const BAR0: usize = 0x10;
const SUBSYS_VENDOR: usize = 0x2c;
const CAP_PTR: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;
/// INTA#.
pub const PIN_INTA: u8 = 1;
pub const MSIX_CAP: usize = 0x40;
const MSIX_CTRL: usize = MSIX_CAP + 2;

pub const CMD_MEMORY: u16 = 1 << 1;
pub const CMD_BUS_MASTER: u16 = 1 << 2;
pub const CMD_INTX_DISABLE: u16 = 1 << 10;
/// Interrupt Status: the function's INTx is pending (computed on read, see `Core`).
pub const STATUS_INTERRUPT: u16 = 1 << 3;
const STATUS_CAP_LIST: u16 = 1 << 4;
const PCI_CAP_ID_MSIX: u8 = 0x11;
const MSIX_CTRL_ENABLE: u16 = 1 << 15;
const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;

#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    wmask: [u8; CONFIG_SIZE],
    irq: IrqMode,
}

impl Default for ConfigSpace {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigSpace {
    /// The MSI-X function.
    pub fn new() -> ConfigSpace {
        Self::with_irq(IrqMode::Msix)
    }

    pub fn with_irq(irq: IrqMode) -> ConfigSpace {
        let mut c = ConfigSpace {
            bytes: [0; CONFIG_SIZE],
            wmask: [0; CONFIG_SIZE],
            irq,
        };
        c.put16(0x00, VENDOR_ID);
        c.put16(0x02, DEVICE_ID);
        c.bytes[0x08] = REVISION;
        c.bytes[0x09..0x0c].copy_from_slice(&CLASS_CODE);
        c.put16(SUBSYS_VENDOR, VENDOR_ID);
        c.put16(SUBSYS_VENDOR + 2, DEVICE_ID);
        match irq {
            IrqMode::Msix => c.msix_capability(),
            IrqMode::Intx => c.bytes[INTERRUPT_PIN] = PIN_INTA,
        }
        // Writable: I/O, memory, bus master, parity, SERR, INTx disable.
        c.wmask[COMMAND] = 0x47;
        c.wmask[COMMAND + 1] = 0x05;
        // BAR0: 32-bit non-prefetchable memory; bits below its size read as zero.
        let bar_mask = !(BAR0_SIZE as u32 - 1);
        c.wmask[BAR0..BAR0 + 4].copy_from_slice(&bar_mask.to_le_bytes());
        c.wmask[INTERRUPT_LINE] = 0xff;
        c
    }

    fn msix_capability(&mut self) {
        self.put16(STATUS, STATUS_CAP_LIST);
        self.bytes[CAP_PTR] = MSIX_CAP as u8;
        self.bytes[MSIX_CAP] = PCI_CAP_ID_MSIX;
        self.put16(MSIX_CTRL, MSIX_VECTORS - 1);
        // BIR 0 in the low bits of both offsets.
        self.put32(MSIX_CAP + 4, MSIX_TABLE_OFFSET as u32);
        self.put32(MSIX_CAP + 8, MSIX_PBA_OFFSET as u32);
        let ctrl_mask = MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK;
        self.wmask[MSIX_CTRL..MSIX_CTRL + 2].copy_from_slice(&ctrl_mask.to_le_bytes());
    }

    pub fn irq(&self) -> IrqMode {
        self.irq
    }

    fn put16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    /// Reads `buf.len()` bytes at `off`; the caller has checked the range.
    pub fn read(&self, off: usize, buf: &mut [u8]) {
        buf.copy_from_slice(&self.bytes[off..off + buf.len()]);
    }

    /// Writes through the mask; read-only bits keep their value.
    pub fn write(&mut self, off: usize, data: &[u8]) {
        for (i, &d) in data.iter().enumerate() {
            let (b, m) = (&mut self.bytes[off + i], self.wmask[off + i]);
            *b = (*b & !m) | (d & m);
        }
    }

    pub fn bytes(&self) -> &[u8; CONFIG_SIZE] {
        &self.bytes
    }

    /// Takes the writable bits of a saved config space. Read-only bits must equal ours: a
    /// difference means the stream came from a different kind of device.
    pub fn restore(&mut self, saved: &[u8; CONFIG_SIZE]) -> Result<(), String> {
        let fresh = ConfigSpace::with_irq(self.irq);
        for (i, (&s, &f)) in saved.iter().zip(fresh.bytes.iter()).enumerate() {
            if (s ^ f) & !self.wmask[i] != 0 {
                return Err(format!(
                    "config byte {i:#x} is {s:#04x}, this device has {f:#04x} there"
                ));
            }
        }
        self.bytes = *saved;
        Ok(())
    }

    pub fn bus_master(&self) -> bool {
        self.get16(COMMAND) & CMD_BUS_MASTER != 0
    }

    pub fn intx_disabled(&self) -> bool {
        self.get16(COMMAND) & CMD_INTX_DISABLE != 0
    }

    pub fn msix_enabled(&self) -> bool {
        self.get16(MSIX_CTRL) & MSIX_CTRL_ENABLE != 0
    }

    pub fn msix_function_masked(&self) -> bool {
        self.get16(MSIX_CTRL) & MSIX_CTRL_FUNCTION_MASK != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizing_and_read_only_ids() {
        let mut c = ConfigSpace::new();
        c.write(BAR0, &[0xff; 4]);
        let mut b = [0u8; 4];
        c.read(BAR0, &mut b);
        assert_eq!(u32::from_le_bytes(b), !(BAR0_SIZE as u32 - 1));
        c.write(0, &[0; 4]);
        c.read(0, &mut b);
        assert_eq!(&b[..2], &VENDOR_ID.to_le_bytes());
    }

    #[test]
    fn command_and_msix_control() {
        let mut c = ConfigSpace::new();
        assert!(!c.bus_master() && !c.msix_enabled());
        c.write(COMMAND, &(CMD_MEMORY | CMD_BUS_MASTER).to_le_bytes());
        c.write(MSIX_CTRL, &0xffffu16.to_le_bytes());
        assert!(c.bus_master() && c.msix_enabled() && c.msix_function_masked());
        let mut b = [0u8; 2];
        c.read(MSIX_CTRL, &mut b);
        // Table size stays read-only.
        assert_eq!(u16::from_le_bytes(b) & 0x7ff, MSIX_VECTORS - 1);
    }

    #[test]
    fn restore_takes_writable_bits_only() {
        let mut src = ConfigSpace::new();
        src.write(COMMAND, &CMD_BUS_MASTER.to_le_bytes());
        let mut dst = ConfigSpace::new();
        dst.restore(src.bytes()).unwrap();
        assert!(dst.bus_master());
        let mut alien = *src.bytes();
        alien[0] ^= 1;
        assert!(dst.restore(&alien).is_err());
        // An INTx function is a different kind of device: no stream crosses over.
        let mut intx = ConfigSpace::with_irq(IrqMode::Intx);
        assert!(intx.restore(src.bytes()).is_err());
        assert!(dst.restore(intx.bytes()).is_err());
        let mut intx2 = ConfigSpace::with_irq(IrqMode::Intx);
        intx2.write(COMMAND, &CMD_INTX_DISABLE.to_le_bytes());
        intx.restore(intx2.bytes()).unwrap();
        assert!(intx.intx_disabled());
    }

    #[test]
    fn intx_function_has_a_pin_and_no_capabilities() {
        let mut c = ConfigSpace::with_irq(IrqMode::Intx);
        assert_eq!(c.bytes()[INTERRUPT_PIN], PIN_INTA);
        assert_eq!(c.bytes()[CAP_PTR], 0);
        assert_eq!(c.get16(STATUS) & STATUS_CAP_LIST, 0);
        assert!(c.bytes()[MSIX_CAP..MSIX_CAP + 12].iter().all(|&b| b == 0));
        // The pin is read-only; MSI-X cannot be enabled where there is none.
        c.write(INTERRUPT_PIN, &[0]);
        c.write(MSIX_CTRL, &0xffffu16.to_le_bytes());
        assert_eq!(c.bytes()[INTERRUPT_PIN], PIN_INTA);
        assert!(!c.msix_enabled());
        assert_eq!(ConfigSpace::new().bytes()[INTERRUPT_PIN], 0);
    }
}
