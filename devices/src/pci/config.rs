//! A type-0 PCI configuration space: 256 bytes of registers with per-byte write masks, so that
//! read-only fields, RW1C status bits and BAR size probing all follow from one rule:
//! `new = (old & !wmask) | (value & wmask)`, then `new &= !(value & w1c)`.
//!
//! ECAM exposes 4 KiB per function; the extended part (0x100..0x1000) reads as zeros, which a
//! guest takes as "no extended capabilities", and ignores writes.

use serde::{Deserialize, Serialize};

pub const CONFIG_SPACE_SIZE: usize = 256;
pub const EXTENDED_CONFIG_SIZE: usize = 4096;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION_ID: usize = 0x08;
pub const CLASS_PROG_IF: usize = 0x09;
pub const CACHE_LINE_SIZE: usize = 0x0c;
pub const LATENCY_TIMER: usize = 0x0d;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const ROM_BAR: usize = 0x30;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;
pub const NUM_BARS: usize = 6;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_PARITY: u16 = 1 << 6;
pub const COMMAND_SERR: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Parity, abort and system-error bits: set by hardware, cleared by writing one.
const STATUS_W1C: u16 = 0xf900;
const COMMAND_WRITABLE: u16 = COMMAND_IO
    | COMMAND_MEMORY
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE;

pub const CAP_ID_MSI: u8 = 0x05;
pub const CAP_ID_MSIX: u8 = 0x11;
/// Standard capabilities start after the type-0 header.
pub const FIRST_CAP_OFFSET: usize = 0x40;
/// A well-formed list cannot hold more entries than this; it bounds walks of untrusted lists.
pub const MAX_CAPS: usize = (CONFIG_SPACE_SIZE - FIRST_CAP_OFFSET) / 4;

const BAR_IO: u32 = 0x1;
const BAR_MEM64: u32 = 0x4;
const BAR_PREFETCH: u32 = 0x8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} does not exist or is taken")]
    BarIndex(usize),
    #[error("BAR size {0:#x} is not a power of two of at least the minimum for its kind")]
    BarSize(u64),
    #[error("capability of {0} bytes does not fit in configuration space")]
    CapabilityFull(usize),
    #[error("capability is shorter than its 2-byte header")]
    CapabilityTooShort,
    #[error("configuration state is {0} bytes, expected {CONFIG_SPACE_SIZE}")]
    StateSize(usize),
}

/// What a BAR decodes. 64-bit BARs take two register slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    Io,
    Mem32 { prefetchable: bool },
    Mem64 { prefetchable: bool },
}

impl std::fmt::Display for BarKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (name, prefetchable) = match *self {
            BarKind::Io => return f.write_str("I/O"),
            BarKind::Mem32 { prefetchable } => ("32-bit memory", prefetchable),
            BarKind::Mem64 { prefetchable } => ("64-bit memory", prefetchable),
        };
        f.write_str(name)?;
        if prefetchable {
            f.write_str(", prefetchable")?;
        }
        Ok(())
    }
}

impl BarKind {
    pub fn is_io(self) -> bool {
        matches!(self, BarKind::Io)
    }

    /// Decodes the type bits of a BAR register as a device reports them.
    pub fn from_register(reg: u32) -> BarKind {
        let prefetchable = reg & BAR_PREFETCH != 0;
        if reg & BAR_IO != 0 {
            BarKind::Io
        } else if reg & 0x6 == BAR_MEM64 {
            BarKind::Mem64 { prefetchable }
        } else {
            BarKind::Mem32 { prefetchable }
        }
    }

    fn type_bits(self) -> u32 {
        match self {
            BarKind::Io => BAR_IO,
            BarKind::Mem32 { prefetchable } => u32::from(prefetchable) * BAR_PREFETCH,
            BarKind::Mem64 { prefetchable } => BAR_MEM64 | (u32::from(prefetchable) * BAR_PREFETCH),
        }
    }

    fn min_size(self) -> u64 {
        if self.is_io() { 4 } else { 16 }
    }
}

/// A BAR as currently programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRegion {
    pub index: usize,
    pub kind: BarKind,
    pub addr: u64,
    pub size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarSlot {
    Empty,
    Bar {
        kind: BarKind,
        size: u64,
    },
    /// High half of the 64-bit BAR in the slot before.
    Upper,
}

/// Identity fields of a type-0 header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    /// Base class, subclass, programming interface.
    pub class: (u8, u8, u8),
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    /// 0 = none, 1..=4 = INTA#..INTD#.
    pub interrupt_pin: u8,
}

/// The registers the VMM emulates, as plain data for migration. Masks and BAR sizes are not in
/// it: the destination builds the same device and so derives the same ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigState {
    pub bytes: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct PciConfiguration {
    bytes: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
    bars: [BarSlot; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfiguration {
    pub fn new(h: &PciHeader) -> Self {
        let mut c = PciConfiguration {
            bytes: vec![0; CONFIG_SPACE_SIZE],
            wmask: vec![0; CONFIG_SPACE_SIZE],
            w1c: vec![0; CONFIG_SPACE_SIZE],
            bars: [BarSlot::Empty; NUM_BARS],
            last_cap: None,
            next_cap: FIRST_CAP_OFFSET,
        };
        c.set_u16(VENDOR_ID, h.vendor_id);
        c.set_u16(DEVICE_ID, h.device_id);
        c.set_u8(REVISION_ID, h.revision_id);
        c.set_u8(CLASS_PROG_IF, h.class.2);
        c.set_u8(CLASS_PROG_IF + 1, h.class.1);
        c.set_u8(CLASS_PROG_IF + 2, h.class.0);
        c.set_u16(SUBSYSTEM_VENDOR_ID, h.subsystem_vendor_id);
        c.set_u16(SUBSYSTEM_ID, h.subsystem_id);
        c.set_u8(INTERRUPT_PIN, h.interrupt_pin);
        c.set_write_mask(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        c.w1c[STATUS..STATUS + 2].copy_from_slice(&STATUS_W1C.to_le_bytes());
        c.set_write_mask(CACHE_LINE_SIZE, &[0xff, 0xff]);
        c.set_write_mask(INTERRUPT_LINE, &[0xff]);
        c
    }

    /// Reads `data.len()` bytes at `offset` of the 4 KiB ECAM view; bytes past the 256-byte
    /// space read as zero.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// A guest write: only bits in the write mask change, RW1C bits clear where ones are written.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let o = offset + i;
            if o >= CONFIG_SPACE_SIZE {
                break;
            }
            let m = self.wmask[o];
            self.bytes[o] = ((self.bytes[o] & !m) | (v & m)) & !(v & self.w1c[o]);
        }
    }

    pub fn read_u8(&self, offset: usize) -> u8 {
        self.bytes.get(offset).copied().unwrap_or(0)
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Device-side stores, past the write masks (read-only fields, hardware-set status bits).
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        let end = (offset + data.len()).min(CONFIG_SPACE_SIZE);
        if offset < end {
            self.bytes[offset..end].copy_from_slice(&data[..end - offset]);
        }
    }

    pub fn set_u8(&mut self, offset: usize, v: u8) {
        self.set_bytes(offset, &[v]);
    }

    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.set_bytes(offset, &v.to_le_bytes());
    }

    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.set_bytes(offset, &v.to_le_bytes());
    }

    /// Makes the bits set in `mask` guest-writable (the rest of those bytes read-only).
    pub fn set_write_mask(&mut self, offset: usize, mask: &[u8]) {
        let end = (offset + mask.len()).min(CONFIG_SPACE_SIZE);
        if offset < end {
            self.wmask[offset..end].copy_from_slice(&mask[..end - offset]);
        }
    }

    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }
}

// BARs.
impl PciConfiguration {
    /// Declares BAR `index` of `size` bytes. Its register then sizes like hardware: writing all
    /// ones reads back the size mask with the type bits.
    pub fn add_bar(&mut self, index: usize, size: u64, kind: BarKind) -> Result<(), ConfigError> {
        let wide = matches!(kind, BarKind::Mem64 { .. });
        let last = if wide { index + 1 } else { index };
        if last >= NUM_BARS || self.bars[index..=last].iter().any(|b| *b != BarSlot::Empty) {
            return Err(ConfigError::BarIndex(index));
        }
        if !size.is_power_of_two() || size < kind.min_size() || (!wide && size > 1 << 31) {
            return Err(ConfigError::BarSize(size));
        }
        let low_flags = if kind.is_io() { 0x3 } else { 0xf };
        let mask = !(size - 1);
        let reg = BAR0 + 4 * index;
        self.set_u32(reg, kind.type_bits());
        self.set_write_mask(reg, &((mask as u32) & !low_flags).to_le_bytes());
        self.bars[index] = BarSlot::Bar { kind, size };
        if wide {
            self.set_u32(reg + 4, 0);
            self.set_write_mask(reg + 4, &((mask >> 32) as u32).to_le_bytes());
            self.bars[index + 1] = BarSlot::Upper;
        }
        Ok(())
    }

    /// The BARs declared, at the addresses their registers hold now.
    pub fn bars(&self) -> Vec<BarRegion> {
        (0..NUM_BARS).filter_map(|i| self.bar(i)).collect()
    }

    pub fn bar(&self, index: usize) -> Option<BarRegion> {
        let BarSlot::Bar { kind, size } = *self.bars.get(index)? else {
            return None;
        };
        let reg = BAR0 + 4 * index;
        let low = u64::from(self.read_u32(reg));
        let addr = match kind {
            BarKind::Io => low & !0x3,
            BarKind::Mem32 { .. } => low & !0xf,
            BarKind::Mem64 { .. } => (low & !0xf) | u64::from(self.read_u32(reg + 4)) << 32,
        };
        Some(BarRegion {
            index,
            kind,
            addr,
            size,
        })
    }
}

// Capabilities.
impl PciConfiguration {
    /// Appends a capability (`body[0]` = ID; `body[1]`, the next pointer, is filled in here) and
    /// returns its offset. `wmask`, if given, makes those bits of the body guest-writable.
    pub fn add_capability(
        &mut self,
        body: &[u8],
        wmask: Option<&[u8]>,
    ) -> Result<usize, ConfigError> {
        if body.len() < 2 {
            return Err(ConfigError::CapabilityTooShort);
        }
        let offset = self.next_cap;
        let len = body.len().next_multiple_of(4);
        if offset + len > CONFIG_SPACE_SIZE {
            return Err(ConfigError::CapabilityFull(body.len()));
        }
        self.set_bytes(offset, body);
        self.set_u8(offset + 1, 0);
        if let Some(m) = wmask {
            self.set_write_mask(offset, &m[..m.len().min(body.len())]);
        }
        match self.last_cap {
            Some(prev) => self.set_u8(prev + 1, offset as u8),
            None => self.set_u8(CAPABILITIES_POINTER, offset as u8),
        }
        self.set_u16(STATUS, self.read_u16(STATUS) | STATUS_CAP_LIST);
        self.last_cap = Some(offset);
        self.next_cap = offset + len;
        Ok(offset)
    }

    /// Offset of the first capability with this ID.
    pub fn find_capability(&self, id: u8) -> Option<usize> {
        capabilities(|o| self.read_u8(o))
            .into_iter()
            .find(|&(cid, _)| cid == id)
            .map(|(_, o)| o)
    }

    pub fn state(&self) -> PciConfigState {
        PciConfigState {
            bytes: self.bytes.clone(),
        }
    }

    pub fn restore(&mut self, state: &PciConfigState) -> Result<(), ConfigError> {
        if state.bytes.len() != CONFIG_SPACE_SIZE {
            return Err(ConfigError::StateSize(state.bytes.len()));
        }
        self.bytes.copy_from_slice(&state.bytes);
        Ok(())
    }
}

/// Walks a capability list through `read_u8` and returns `(id, offset)` pairs. The walk is
/// bounded and stops at pointers into the header, so a device's malformed or looping list
/// cannot hang the VMM.
pub fn capabilities(read_u8: impl Fn(usize) -> u8) -> Vec<(u8, usize)> {
    let mut caps = Vec::new();
    let mut ptr = usize::from(read_u8(CAPABILITIES_POINTER) & !0x3);
    while ptr >= FIRST_CAP_OFFSET && caps.len() < MAX_CAPS {
        caps.push((read_u8(ptr), ptr));
        ptr = usize::from(read_u8(ptr + 1) & !0x3);
    }
    caps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfiguration {
        PciConfiguration::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1000,
            class: (0x02, 0x00, 0x00),
            interrupt_pin: 1,
            ..Default::default()
        })
    }

    #[test]
    fn header_fields_are_read_only() {
        let mut c = cfg();
        c.write(VENDOR_ID, &[0, 0, 0, 0]);
        assert_eq!(c.read_u32(VENDOR_ID), 0x1000_1af4);
        assert_eq!(c.read_u32(0x08) >> 8, 0x02_00_00);
        c.write(INTERRUPT_PIN, &[3]);
        assert_eq!(c.read_u8(INTERRUPT_PIN), 1);
        c.write(INTERRUPT_LINE, &[11]);
        assert_eq!(c.read_u8(INTERRUPT_LINE), 11);
    }

    #[test]
    fn command_mask_and_status_w1c() {
        let mut c = cfg();
        c.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), COMMAND_WRITABLE);
        c.set_u16(STATUS, 0x2000 | STATUS_CAP_LIST);
        c.write(STATUS, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_u16(STATUS), STATUS_CAP_LIST, "RW1C cleared, RO kept");
        // A 32-bit write at COMMAND covers STATUS too.
        c.set_u16(STATUS, 0x8000);
        c.write(COMMAND, &0u32.to_le_bytes());
        assert_eq!(c.read_u16(STATUS), 0x8000);
    }

    #[test]
    fn bar_sizing_32_io_and_64() {
        let mut c = cfg();
        c.add_bar(
            0,
            0x1000,
            BarKind::Mem32 {
                prefetchable: false,
            },
        )
        .unwrap();
        c.add_bar(1, 0x20, BarKind::Io).unwrap();
        c.add_bar(2, 0x4_0000_0000, BarKind::Mem64 { prefetchable: true })
            .unwrap();
        for i in 0..6 {
            c.write(BAR0 + 4 * i, &[0xff; 4]);
        }
        assert_eq!(c.read_u32(BAR0), 0xffff_f000);
        assert_eq!(c.read_u32(BAR0 + 4), 0xffff_ffe1);
        assert_eq!(c.read_u32(BAR0 + 8), 0x0000_000c);
        assert_eq!(c.read_u32(BAR0 + 12), 0xffff_fffc);
        assert_eq!(c.read_u32(BAR0 + 16), 0, "undeclared BAR reads zero");
        // Address bits below the size are not writable: 0x1_8000_0000 lands on 0x0.
        c.write(BAR0 + 8, &0x8000_0000u32.to_le_bytes());
        c.write(BAR0 + 12, &0x1u32.to_le_bytes());
        assert_eq!(c.bar(2).unwrap().addr, 0);
        c.write(BAR0 + 12, &0x5u32.to_le_bytes());
        let b = c.bar(2).unwrap();
        assert_eq!((b.addr, b.size), (0x4_0000_0000, 0x4_0000_0000));
        assert_eq!(c.bar(3), None);
    }

    #[test]
    fn bar_partial_byte_writes() {
        let mut c = cfg();
        c.add_bar(
            0,
            0x100,
            BarKind::Mem32 {
                prefetchable: false,
            },
        )
        .unwrap();
        c.write(BAR0 + 3, &[0xc1]);
        c.write(BAR0 + 1, &[0x23]);
        c.write(BAR0, &[0xff]);
        assert_eq!(c.read_u32(BAR0), 0xc100_2300);
    }

    #[test]
    fn bad_bars_refused() {
        let mut c = cfg();
        assert_eq!(
            c.add_bar(0, 0x1800, BarKind::Io),
            Err(ConfigError::BarSize(0x1800))
        );
        assert_eq!(
            c.add_bar(6, 0x1000, BarKind::Io),
            Err(ConfigError::BarIndex(6))
        );
        let m64 = BarKind::Mem64 {
            prefetchable: false,
        };
        assert_eq!(c.add_bar(5, 0x1000, m64), Err(ConfigError::BarIndex(5)));
        c.add_bar(0, 0x1000, m64).unwrap();
        assert_eq!(
            c.add_bar(1, 0x1000, BarKind::Io),
            Err(ConfigError::BarIndex(1))
        );
    }

    #[test]
    fn capability_list_and_extended_zeros() {
        let mut c = cfg();
        let a = c
            .add_capability(&[CAP_ID_MSI, 0xaa, 0, 0, 1, 2], None)
            .unwrap();
        let b = c
            .add_capability(&[CAP_ID_MSIX, 0, 0, 0], Some(&[0, 0, 0, 0xc0]))
            .unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_eq!(c.read_u8(CAPABILITIES_POINTER), 0x40);
        assert_eq!(c.read_u8(0x41), 0x48);
        assert_eq!(c.read_u8(0x49), 0);
        assert_ne!(c.read_u16(STATUS) & STATUS_CAP_LIST, 0);
        assert_eq!(c.find_capability(CAP_ID_MSIX), Some(0x48));
        c.write(0x4b, &[0xff]);
        assert_eq!(c.read_u8(0x4b), 0xc0);
        let mut ext = [0xffu8; 4];
        c.read(0x100, &mut ext);
        assert_eq!(ext, [0; 4]);
        c.write(0xffc, &[1, 2, 3, 4]);
        assert!(c.add_capability(&[9; 200], None).is_err());
    }

    #[test]
    fn looping_capability_list_is_bounded() {
        let mut space = [0u8; 256];
        space[CAPABILITIES_POINTER] = 0x40;
        space[0x40] = 9;
        space[0x41] = 0x40;
        let caps = capabilities(|o| space[o]);
        assert_eq!(caps.len(), MAX_CAPS);
    }

    #[test]
    fn state_round_trip() {
        let mut c = cfg();
        c.add_bar(
            0,
            0x1000,
            BarKind::Mem32 {
                prefetchable: false,
            },
        )
        .unwrap();
        c.write(BAR0, &0xc000_0000u32.to_le_bytes());
        let s = c.state();
        let mut d = cfg();
        d.add_bar(
            0,
            0x1000,
            BarKind::Mem32 {
                prefetchable: false,
            },
        )
        .unwrap();
        d.restore(&s).unwrap();
        assert_eq!(d.bar(0).unwrap().addr, 0xc000_0000);
        assert!(d.restore(&PciConfigState { bytes: vec![0; 4] }).is_err());
    }
}
