//! The PCI root bus (bus 0): device slots, configuration dispatch, BAR placement and the
//! keeping of each decoded BAR on the VMM's MMIO or port-I/O [`Bus`].
//!
//! The root plays firmware at [`PciRoot::add_device`]: it assigns every BAR an address from
//! its windows and turns on decoding, as SeaBIOS would, so a guest without a BIOS finds devices
//! ready. Afterwards the guest owns the BARs: whenever a configuration write touches COMMAND or
//! a BAR register, the root compares what the device decodes now with what it has on the buses
//! and moves ranges to match. Locks are taken root → device and released before the buses are
//! touched, and BAR accesses take only the device lock, so a vCPU moving a BAR and a vCPU
//! accessing one cannot deadlock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use migration::state::{StateError, decode, encode};
use serde::{Deserialize, Serialize};

use super::config::{BAR0, BarKind, BarRegion, COMMAND, COMMAND_IO, COMMAND_MEMORY, NUM_BARS};
use super::device::{SharedPciDevice, lock_pci};
use super::host_bridge::HostBridge;
pub use super::windows::PciWindows;
use super::windows::Windows;
use crate::bus::{Bus, BusDevice, BusError};

pub const MAX_DEVICES: u8 = 32;

#[derive(Debug, thiserror::Error)]
pub enum PciRootError {
    #[error("all {MAX_DEVICES} device slots on bus 0 are taken")]
    NoSlot,
    #[error(
        "no room for BAR {bar} ({kind}, {size:#x} bytes) of device 00:{slot:02x}.0 in the \
         {window} window [{base:#x}, {end:#x})"
    )]
    NoBarSpace {
        slot: u8,
        bar: usize,
        kind: BarKind,
        size: u64,
        window: &'static str,
        base: u64,
        end: u64,
    },
    #[error("cannot place a BAR on the bus: {0}")]
    Bus(#[from] BusError),
}

struct Slot {
    dev: SharedPciDevice,
    /// BARs on the buses now, by index.
    mapped: BTreeMap<usize, BarRegion>,
}

struct Inner {
    slots: BTreeMap<u8, Slot>,
    windows: Windows,
}

/// Bus number, device and function of a configuration access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBdf {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

pub struct PciRoot {
    inner: Mutex<Inner>,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
}

impl PciRoot {
    /// A root with the plain host bridge at 00:00.0. BARs go on `mmio` and `pio`.
    pub fn new(mmio: Arc<Bus>, pio: Arc<Bus>, windows: PciWindows) -> Self {
        Self::with_host_bridge(mmio, pio, windows, HostBridge::new())
    }

    /// A root with `bridge` at 00:00.0 (e.g. [`HostBridge::with_ecam_hint`]).
    pub fn with_host_bridge(
        mmio: Arc<Bus>,
        pio: Arc<Bus>,
        windows: PciWindows,
        bridge: HostBridge,
    ) -> Self {
        let mut slots = BTreeMap::new();
        let bridge: SharedPciDevice = Arc::new(Mutex::new(bridge));
        slots.insert(
            0,
            Slot {
                dev: bridge,
                mapped: BTreeMap::new(),
            },
        );
        PciRoot {
            inner: Mutex::new(Inner {
                slots,
                windows: Windows::new(windows),
            }),
            mmio,
            pio,
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `dev` in the first free slot, assigns its BARs, enables decoding and places the
    /// BARs on the buses. Returns the device number.
    pub fn add_device(&self, dev: SharedPciDevice) -> Result<u8, PciRootError> {
        let mut inner = self.inner();
        let slot = (0..MAX_DEVICES)
            .find(|s| !inner.slots.contains_key(s))
            .ok_or(PciRootError::NoSlot)?;
        let mut bars = lock_pci(&dev).bars();
        // Largest first, so that natural alignment wastes the least of the windows.
        bars.sort_by_key(|b| std::cmp::Reverse(b.size));
        let mut command = 0;
        for b in &bars {
            let addr =
                inner
                    .windows
                    .allocate(b.kind, b.size)
                    .map_err(|w| PciRootError::NoBarSpace {
                        slot,
                        bar: b.index,
                        kind: b.kind,
                        size: b.size,
                        window: w.name,
                        base: w.base,
                        end: w.end,
                    })?;
            log::info!(
                "pci 00:{slot:02x}.0 BAR {}: {}, {:#x} bytes at {addr:#x}",
                b.index,
                b.kind,
                b.size
            );
            program_bar(&dev, b, addr);
            command |= if b.kind.is_io() {
                COMMAND_IO
            } else {
                COMMAND_MEMORY
            };
        }
        enable_decode(&dev, command);
        let mut s = Slot {
            dev,
            mapped: BTreeMap::new(),
        };
        self.sync_slot(slot, &mut s);
        inner.slots.insert(slot, s);
        log::info!("pci: device at 00:{slot:02x}.0 with {} BARs", bars.len());
        Ok(slot)
    }

    pub fn device(&self, slot: u8) -> Option<SharedPciDevice> {
        self.inner().slots.get(&slot).map(|s| s.dev.clone())
    }

    /// A configuration read; absent functions read as all ones.
    pub fn config_read(&self, bdf: PciBdf, offset: usize, data: &mut [u8]) {
        match self.function(bdf) {
            Some(dev) => lock_pci(&dev).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write; one that touches COMMAND or a BAR re-syncs the device's ranges.
    pub fn config_write(&self, bdf: PciBdf, offset: usize, data: &[u8]) {
        let mut inner = self.inner();
        let Some(slot) = Self::slot_of(&mut inner, bdf) else {
            return;
        };
        lock_pci(&slot.dev).write_config(offset, data);
        let end = offset + data.len();
        let touches = |start: usize, len: usize| offset < start + len && start < end;
        if touches(COMMAND, 2) || touches(BAR0, 4 * NUM_BARS) {
            // All slots, not just this one: a BAR that could not be placed because this
            // device was in the way gets its range now that the way may be clear.
            self.sync_slots(&mut inner);
        }
    }

    fn function(&self, bdf: PciBdf) -> Option<SharedPciDevice> {
        Self::slot_of(&mut self.inner(), bdf).map(|s| s.dev.clone())
    }

    // Only function 0 of bus 0 exists: every device is single-function.
    fn slot_of(inner: &mut Inner, bdf: PciBdf) -> Option<&mut Slot> {
        if bdf.bus != 0 || bdf.function != 0 {
            return None;
        }
        inner.slots.get_mut(&bdf.device)
    }

    fn sync_slots(&self, inner: &mut Inner) {
        for (&n, slot) in inner.slots.iter_mut() {
            self.sync_slot(n, slot);
        }
    }

    /// Moves the ranges of device `n` on the buses to match what it decodes now.
    fn sync_slot(&self, n: u8, slot: &mut Slot) {
        let want = decoded_bars(&slot.dev);
        let stale: Vec<BarRegion> = slot
            .mapped
            .values()
            .filter(|b| want.get(&b.index) != Some(b))
            .copied()
            .collect();
        for b in stale {
            slot.mapped.remove(&b.index);
            if let Err(e) = self.bus_for(b.kind).remove(b.addr) {
                log::warn!("pci 00:{n:02x}.0 BAR {}: {e}", b.index);
            }
            lock_pci(&slot.dev).bar_mapped(b.index, None);
        }
        for b in want.into_values() {
            if slot.mapped.contains_key(&b.index) {
                continue;
            }
            let window = Arc::new(Mutex::new(BarWindow {
                dev: slot.dev.clone(),
                bar: b.index,
            }));
            match self.bus_for(b.kind).insert(b.addr, b.size, window) {
                Ok(()) => {
                    log::debug!("pci 00:{n:02x}.0 BAR {} at {:#x}", b.index, b.addr);
                    slot.mapped.insert(b.index, b);
                    lock_pci(&slot.dev).bar_mapped(b.index, Some(b.addr));
                }
                Err(e) => log::warn!("pci 00:{n:02x}.0 BAR {} not decoded: {e}", b.index),
            }
        }
    }

    /// Where device `slot`'s BARs are on the buses now.
    pub fn mapped_bars(&self, slot: u8) -> Vec<BarRegion> {
        let inner = self.inner();
        let s = inner.slots.get(&slot);
        s.map(|s| s.mapped.values().copied().collect())
            .unwrap_or_default()
    }

    /// Every function's emulated registers, by device number.
    pub fn save_state(&self) -> Result<Vec<u8>, StateError> {
        let inner = self.inner();
        let mut devices = Vec::new();
        for (&n, s) in &inner.slots {
            devices.push((n, lock_pci(&s.dev).save_state()?));
        }
        encode(&PciRootState { devices })
    }

    /// Loads [`PciRoot::save_state`]'s blob into the same set of devices, then puts every BAR
    /// where the restored registers say.
    pub fn restore_state(&self, bytes: &[u8]) -> Result<(), StateError> {
        let state: PciRootState = decode(bytes)?;
        let mut inner = self.inner();
        let ours: Vec<u8> = inner.slots.keys().copied().collect();
        let theirs: Vec<u8> = state.devices.iter().map(|(n, _)| *n).collect();
        if ours != theirs {
            return Err(StateError::Incompatible {
                id: "pci".into(),
                reason: format!("devices at slots {theirs:?}, here at {ours:?}"),
            });
        }
        for (n, blob) in &state.devices {
            if let Some(s) = inner.slots.get(n) {
                lock_pci(&s.dev).restore_state(blob)?;
            }
        }
        self.sync_slots(&mut inner);
        Ok(())
    }

    fn bus_for(&self, kind: BarKind) -> &Bus {
        if kind.is_io() { &self.pio } else { &self.mmio }
    }
}

fn program_bar(dev: &SharedPciDevice, b: &BarRegion, addr: u64) {
    let reg = BAR0 + 4 * b.index;
    let mut d = lock_pci(dev);
    d.write_config(reg, &(addr as u32).to_le_bytes());
    if matches!(b.kind, BarKind::Mem64 { .. }) {
        d.write_config(reg + 4, &((addr >> 32) as u32).to_le_bytes());
    }
}

fn enable_decode(dev: &SharedPciDevice, bits: u16) {
    let mut d = lock_pci(dev);
    let mut c = [0u8; 2];
    d.read_config(COMMAND, &mut c);
    d.write_config(COMMAND, &(u16::from_le_bytes(c) | bits).to_le_bytes());
}

/// The BARs `dev` decodes now: declared, enabled in COMMAND, and holding an address.
fn decoded_bars(dev: &SharedPciDevice) -> BTreeMap<usize, BarRegion> {
    let mut d = lock_pci(dev);
    let mut c = [0u8; 2];
    d.read_config(COMMAND, &mut c);
    let cmd = u16::from_le_bytes(c);
    d.bars()
        .into_iter()
        .filter(|b| {
            let bit = if b.kind.is_io() {
                COMMAND_IO
            } else {
                COMMAND_MEMORY
            };
            cmd & bit != 0 && b.addr != 0 && b.addr.checked_add(b.size).is_some()
        })
        .map(|b| (b.index, b))
        .collect()
}

#[derive(Serialize, Deserialize)]
struct PciRootState {
    devices: Vec<(u8, Vec<u8>)>,
}

/// One BAR of one device as a range on a bus.
struct BarWindow {
    dev: SharedPciDevice,
    bar: usize,
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock_pci(&self.dev).read_bar(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock_pci(&self.dev).write_bar(self.bar, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::COMMAND_BUS_MASTER;
    use crate::pci::testing::TestDevice;

    const MEM32: BarKind = BarKind::Mem32 {
        prefetchable: false,
    };
    const MEM64: BarKind = BarKind::Mem64 { prefetchable: true };

    fn root() -> (Arc<Bus>, Arc<Bus>, PciRoot) {
        let mmio = Arc::new(Bus::new());
        let pio = Arc::new(Bus::new());
        let windows = PciWindows {
            mmio32: (0xc000_0000, 0x2000_0000),
            mmio64: Some((1 << 36, 1 << 36)),
            io: (0x1000, 0xf000),
        };
        let r = PciRoot::new(mmio.clone(), pio.clone(), windows);
        (mmio, pio, r)
    }

    fn bdf(device: u8) -> PciBdf {
        PciBdf {
            bus: 0,
            device,
            function: 0,
        }
    }

    fn read32(r: &PciRoot, dev: u8, reg: usize) -> u32 {
        let mut b = [0u8; 4];
        r.config_read(bdf(dev), reg, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(r: &PciRoot, dev: u8, reg: usize, v: u32) {
        r.config_write(bdf(dev), reg, &v.to_le_bytes());
    }

    #[test]
    fn firmware_assigns_bars_and_enables_decode() {
        let (mmio, pio, r) = root();
        let d = TestDevice::new(&[
            (0, 0x1000, MEM32),
            (1, 0x20, BarKind::Io),
            (2, 0x1_0000, MEM64),
            (4, 0x1_0000_0000, MEM64),
        ]);
        let slot = r.add_device(Arc::new(Mutex::new(d))).unwrap();
        assert_eq!(slot, 1, "host bridge holds slot 0");
        assert_eq!(read32(&r, 0, 0), 0x0d57_8086);
        // Prefetchable 64-bit BARs go to the 64-bit window (largest first), the others to
        // the 32-bit and I/O windows.
        let high = 1u64 << 36;
        assert_eq!(read32(&r, 1, BAR0 + 16), 0x0000_000c);
        assert_eq!(read32(&r, 1, BAR0 + 20), (high >> 32) as u32);
        assert_eq!(read32(&r, 1, BAR0 + 8), 0x0000_000c);
        assert_eq!(read32(&r, 1, BAR0 + 12), ((high + (1 << 32)) >> 32) as u32);
        assert_eq!(read32(&r, 1, BAR0), 0xc000_0000);
        assert_eq!(read32(&r, 1, BAR0 + 4), 0x1001);
        assert_eq!(read32(&r, 1, COMMAND) as u16, COMMAND_IO | COMMAND_MEMORY);
        let mut b = [0u8; 4];
        assert!(mmio.read(0xc000_0010, &mut b));
        assert_eq!(b, [0xa0; 4]);
        assert!(mmio.read(high + (1 << 32) + 0xfffc, &mut b));
        assert_eq!(b, [0xa2; 4]);
        assert!(mmio.read(high, &mut b));
        assert_eq!(b, [0xa4; 4]);
        assert!(pio.read(0x101f, &mut b[..1]));
        assert_eq!(r.mapped_bars(1).len(), 4);
    }

    #[test]
    fn guest_moves_a_bar() {
        let (mmio, _pio, r) = root();
        let dev = Arc::new(Mutex::new(TestDevice::new(&[(0, 0x1000, MEM32)])));
        r.add_device(dev.clone()).unwrap();
        assert!(mmio.resolve(0xc000_0000).is_some());
        // Linux sizes with decode off: the range leaves the bus and is not placed at the
        // all-ones probe address.
        write32(&r, 1, COMMAND, 0);
        assert!(mmio.resolve(0xc000_0000).is_none());
        write32(&r, 1, BAR0, 0xffff_ffff);
        assert_eq!(read32(&r, 1, BAR0), 0xffff_f000);
        assert!(mmio.resolve(0xffff_f000).is_none());
        write32(&r, 1, BAR0, 0xd000_0000);
        write32(
            &r,
            1,
            COMMAND,
            u32::from(COMMAND_MEMORY | COMMAND_BUS_MASTER),
        );
        assert!(mmio.resolve(0xc000_0000).is_none());
        let (off, _) = mmio.resolve(0xd000_0ffc).unwrap();
        assert_eq!(off, 0xffc);
        // With decode on, a BAR write moves the range at once.
        write32(&r, 1, BAR0, 0xd800_0000);
        assert!(mmio.resolve(0xd000_0000).is_none());
        assert!(mmio.write(0xd800_0004, &[7]));
        let d = dev.lock().unwrap();
        assert_eq!(d.bar_writes, vec![(0, 4, vec![7])]);
        assert_eq!(d.mapped.last(), Some(&(0, Some(0xd800_0000))));
    }

    #[test]
    fn conflicting_bar_waits_until_the_way_is_clear() {
        let (mmio, _pio, r) = root();
        r.add_device(Arc::new(Mutex::new(TestDevice::new(&[(0, 0x1000, MEM32)]))))
            .unwrap();
        r.add_device(Arc::new(Mutex::new(TestDevice::new(&[(0, 0x1000, MEM32)]))))
            .unwrap();
        write32(&r, 2, BAR0, 0xc000_0000);
        assert_eq!(r.mapped_bars(2), vec![]);
        write32(&r, 1, BAR0, 0xc800_0000);
        assert_eq!(r.mapped_bars(2)[0].addr, 0xc000_0000);
        assert!(mmio.resolve(0xc800_0000).is_some());
    }

    #[test]
    fn absent_functions_read_all_ones() {
        let (_m, _p, r) = root();
        assert_eq!(read32(&r, 5, 0), 0xffff_ffff);
        let mut b = [0u8; 4];
        r.config_read(
            PciBdf {
                bus: 1,
                device: 0,
                function: 0,
            },
            0,
            &mut b,
        );
        assert_eq!(b, [0xff; 4]);
        r.config_read(
            PciBdf {
                bus: 0,
                device: 0,
                function: 1,
            },
            0,
            &mut b,
        );
        assert_eq!(b, [0xff; 4]);
        write32(&r, 5, COMMAND, 7);
    }

    #[test]
    fn no_room_is_an_error() {
        let (_m, _p, r) = root();
        let d = TestDevice::new(&[(0, 1 << 31, MEM32), (1, 1 << 31, MEM32)]);
        assert!(matches!(
            r.add_device(Arc::new(Mutex::new(d))),
            Err(PciRootError::NoBarSpace { bar: 0, .. })
        ));
        let e = r
            .add_device(Arc::new(Mutex::new(TestDevice::new(&[(
                2,
                1 << 20,
                BarKind::Io,
            )]))))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "no room for BAR 2 (I/O, 0x100000 bytes) of device 00:01.0 in the I/O window \
             [0x1000, 0x10000)"
        );
    }

    #[test]
    fn io_bars_of_a_libvfio_user_sample_fit_beside_another_device() {
        // libvfio-user's sample server: BAR0 8 bytes and BAR1 16 KiB, both I/O space.
        let (_m, pio, r) = root();
        let first = TestDevice::new(&[(0, 0x100, BarKind::Io)]);
        r.add_device(Arc::new(Mutex::new(first))).unwrap();
        let sample = TestDevice::new(&[(0, 0x8, BarKind::Io), (1, 0x4000, BarKind::Io)]);
        let slot = r.add_device(Arc::new(Mutex::new(sample))).unwrap();
        let bars = r.mapped_bars(slot);
        assert_eq!(bars.len(), 2);
        for b in &bars {
            assert_eq!(b.addr % b.size, 0, "BAR {} not naturally aligned", b.index);
            assert!(b.addr >= 0x1000 && b.addr + b.size <= 0x10000);
        }
        assert_eq!(bars[1].addr, 0x4000);
        assert_eq!(
            bars[0].addr, 0x1100,
            "the gap before the 16 KiB BAR is reused"
        );
        assert!(pio.read(0x4000, &mut [0u8; 4]));
    }

    #[test]
    fn restore_puts_bars_back() {
        let (_m, _p, src) = root();
        src.add_device(Arc::new(Mutex::new(TestDevice::new(&[(0, 0x1000, MEM32)]))))
            .unwrap();
        write32(&src, 1, BAR0, 0xd000_0000);
        let blob = src.save_state().unwrap();
        let (mmio, _p, dst) = root();
        dst.add_device(Arc::new(Mutex::new(TestDevice::new(&[(0, 0x1000, MEM32)]))))
            .unwrap();
        dst.restore_state(&blob).unwrap();
        assert!(mmio.resolve(0xd000_0000).is_some());
        assert!(mmio.resolve(0xc000_0000).is_none());
        let (_m, _p, empty) = root();
        assert!(empty.restore_state(&blob).is_err());
    }
}
