//! The two ways a guest reaches configuration space: the legacy port pair 0xCF8 (address) /
//! 0xCFC-0xCFF (data), and ECAM, a memory window with 4 KiB per function (bus << 20 |
//! device << 15 | function << 12 | register). Both split accesses into dword-contained pieces
//! for [`PciRoot`].

use std::sync::Arc;

use migration::state::{Migratable, StateError, decode, encode};
use serde::{Deserialize, Serialize};

use super::bus::{PciBdf, PciRoot};
use crate::bus::BusDevice;

pub const PCI_CONFIG_IO_BASE: u64 = 0xcf8;
pub const PCI_CONFIG_IO_LEN: u64 = 8;
/// Bus 0..=255 at 1 MiB each.
pub const ECAM_SIZE: u64 = 256 << 20;

const ENABLE: u32 = 1 << 31;
/// Enable, bus, device, function and dword register; bits 30:24 and 1:0 are reserved.
const ADDRESS_MASK: u32 = ENABLE | 0x00ff_fffc;
const DATA_PORT: u64 = 4;

/// Splits an access at `offset` into pieces that each stay within one dword.
fn dword_pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, std::ops::Range<usize>)> {
    let mut done = 0;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let at = offset + done as u64;
        let n = ((4 - at % 4) as usize).min(len - done);
        let piece = (at, done..done + n);
        done += n;
        Some(piece)
    })
}

/// Ports 0xCF8-0xCFF. Insert at [`PCI_CONFIG_IO_BASE`] with length [`PCI_CONFIG_IO_LEN`].
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

#[derive(Serialize, Deserialize)]
struct PciConfigIoState {
    address: u32,
    root: Vec<u8>,
}

impl PciConfigIo {
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// The function and register the latched address selects, if enabled.
    fn target(&self, port_offset: u64) -> Option<(PciBdf, usize)> {
        if self.address & ENABLE == 0 {
            return None;
        }
        let a = self.address;
        let bdf = PciBdf {
            bus: (a >> 16) as u8,
            device: ((a >> 11) & 0x1f) as u8,
            function: ((a >> 8) & 0x7) as u8,
        };
        Some((
            bdf,
            (a & 0xfc) as usize + (port_offset - DATA_PORT) as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
            return;
        }
        // Narrow accesses to 0xCF8-0xCFB are other chipset registers (0xCF9: reset control),
        // which this machine does not have.
        match (
            offset >= DATA_PORT && offset + data.len() as u64 <= 8,
            self.target(offset),
        ) {
            (true, Some((bdf, reg))) => self.root.config_read(bdf, reg, data),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.address = v & ADDRESS_MASK;
            return;
        }
        if offset >= DATA_PORT
            && offset + data.len() as u64 <= 8
            && let Some((bdf, reg)) = self.target(offset)
        {
            self.root.config_write(bdf, reg, data);
        }
    }
}

/// The PCI subsystem's emulated state: the 0xCF8 latch (a vCPU may pause between the OUT to
/// 0xCF8 and the access to 0xCFC) and every function's emulated registers.
impl Migratable for PciConfigIo {
    fn id(&self) -> String {
        "pci".into()
    }

    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        encode(&PciConfigIoState {
            address: self.address,
            root: self.root.save_state()?,
        })
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let s: PciConfigIoState = decode(bytes)?;
        self.root.restore_state(&s.root)?;
        self.address = s.address & ADDRESS_MASK;
        Ok(())
    }
}

/// The ECAM window. Insert at the ECAM base with length [`ECAM_SIZE`] (or less: buses beyond
/// the window simply do not exist).
pub struct PciConfigMmio {
    root: Arc<PciRoot>,
}

impl PciConfigMmio {
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigMmio { root }
    }
}

fn ecam_decode(offset: u64) -> (PciBdf, usize) {
    let bdf = PciBdf {
        bus: ((offset >> 20) & 0xff) as u8,
        device: ((offset >> 15) & 0x1f) as u8,
        function: ((offset >> 12) & 0x7) as u8,
    };
    (bdf, (offset & 0xfff) as usize)
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (at, range) in dword_pieces(offset, data.len()) {
            let (bdf, reg) = ecam_decode(at);
            self.root.config_read(bdf, reg, &mut data[range]);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (at, range) in dword_pieces(offset, data.len()) {
            let (bdf, reg) = ecam_decode(at);
            self.root.config_write(bdf, reg, &data[range]);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::bus::Bus;
    use crate::pci::bus::PciWindows;
    use crate::pci::config::{BAR0, BarKind, COMMAND};
    use crate::pci::testing::TestDevice;

    fn setup() -> (Arc<Bus>, Arc<Bus>, Arc<PciRoot>) {
        let mmio = Arc::new(Bus::new());
        let pio = Arc::new(Bus::new());
        let windows = PciWindows {
            mmio32: (0xc000_0000, 0x2000_0000),
            mmio64: None,
            io: (0xc000, 0x4000),
        };
        let root = Arc::new(PciRoot::new(mmio.clone(), pio.clone(), windows));
        let d = TestDevice::new(&[(
            0,
            0x1000,
            BarKind::Mem32 {
                prefetchable: false,
            },
        )]);
        root.add_device(Arc::new(Mutex::new(d))).unwrap();
        pio.insert(
            PCI_CONFIG_IO_BASE,
            PCI_CONFIG_IO_LEN,
            Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
        )
        .unwrap();
        mmio.insert(
            0xe000_0000,
            ECAM_SIZE,
            Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
        )
        .unwrap();
        (mmio, pio, root)
    }

    fn select(pio: &Bus, dev: u32, reg: u32) {
        pio.write(0xcf8, &(ENABLE | dev << 11 | reg).to_le_bytes());
    }

    fn inb(pio: &Bus, port: u64) -> u8 {
        let mut b = [0u8];
        pio.read(port, &mut b);
        b[0]
    }

    #[test]
    fn cf8_cfc_any_width_and_offset() {
        let (_m, pio, _r) = setup();
        select(&pio, 1, 0);
        let mut d = [0u8; 4];
        pio.read(0xcfc, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x5678_1234);
        assert_eq!(inb(&pio, 0xcfe), 0x78);
        let mut w = [0u8; 2];
        pio.read(0xcfd, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x7812);
        pio.read(0xcf8, &mut d);
        assert_eq!(u32::from_le_bytes(d), ENABLE | 1 << 11, "latch reads back");
        // Register bits 1:0 of the latch are reserved; the byte offset comes from the port.
        pio.write(0xcf8, &(ENABLE | 1 << 11 | 0x2).to_le_bytes());
        pio.read(0xcfc, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x5678_1234);
    }

    #[test]
    fn cfc_writes_reach_the_device() {
        let (mmio, pio, _r) = setup();
        select(&pio, 1, BAR0 as u32);
        pio.write(0xcff, &[0xd0]);
        pio.write(0xcfe, &[0x00]);
        assert!(
            mmio.resolve(0xd000_0000).is_some(),
            "decode was on: the BAR moved"
        );
        select(&pio, 1, COMMAND as u32);
        pio.write(0xcfc, &[0]);
        assert!(mmio.resolve(0xd000_0000).is_none());
    }

    #[test]
    fn missing_devices_and_disabled_latch_read_all_ones() {
        let (_m, pio, _r) = setup();
        select(&pio, 9, 0);
        let mut d = [0u8; 4];
        pio.read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
        pio.write(0xcf8, &(1u32 << 11).to_le_bytes());
        pio.read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4], "enable bit clear");
        assert_eq!(
            inb(&pio, 0xcf9),
            0xff,
            "narrow CF8-CFB accesses are not the latch"
        );
        pio.write(0xcf9, &[0x06]);
        select(&pio, 1, 0);
        pio.write(0xcfb, &[0]);
        pio.read(0xcf8, &mut d);
        assert_eq!(u32::from_le_bytes(d), ENABLE | 1 << 11);
    }

    #[test]
    fn ecam_reads_writes_and_splits() {
        let (mmio, _pio, _r) = setup();
        let dev1 = 0xe000_0000 + (1 << 15);
        let mut q = [0u8; 8];
        mmio.read(dev1, &mut q);
        assert_eq!(u64::from_le_bytes(q) as u32, 0x5678_1234);
        let mut w = [0u8; 2];
        mmio.read(dev1 + 3, &mut w);
        assert_eq!(
            w,
            [0x56, 0x02],
            "split across a dword: device ID high, COMMAND low"
        );
        mmio.write(dev1 + BAR0 as u64, &0xd800_0000u32.to_le_bytes());
        assert!(mmio.resolve(0xd800_0000).is_some());
        let mut d = [0u8; 4];
        mmio.read(dev1 + 0x100, &mut d);
        assert_eq!(d, [0; 4], "extended space of a present function");
        mmio.read(0xe000_0000 + (1 << 20), &mut d);
        assert_eq!(d, [0xff; 4], "bus 1");
        mmio.read(0xe000_0000 + (1 << 15) + (1 << 12), &mut d);
        assert_eq!(d, [0xff; 4], "function 1");
        mmio.read(0xe000_0000 + (3 << 15), &mut d);
        assert_eq!(d, [0xff; 4], "empty slot");
    }

    #[test]
    fn latch_and_devices_migrate() {
        let (_m, _pio, root) = setup();
        let mut io = PciConfigIo::new(root);
        io.write(0, &(ENABLE | 1 << 11 | 0x10).to_le_bytes());
        let blob = io.save_state().unwrap();
        let (_m2, _p2, root2) = setup();
        let mut io2 = PciConfigIo::new(root2);
        io2.restore_state(&blob).unwrap();
        let mut d = [0u8; 4];
        io2.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xc000_0000);
        assert_eq!(io2.id(), "pci");
    }
}
