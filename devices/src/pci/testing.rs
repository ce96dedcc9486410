//! Fakes shared by the PCI unit tests: an [`MsiRouting`] that records what KVM would be told,
//! and a plain PCI function with BARs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use migration::state::{StateError, decode, encode};
use vmm_sys_util::eventfd::EventFd;

use super::config::{BarKind, BarRegion, PciConfigState, PciConfiguration, PciHeader};
use super::device::PciDevice;
use super::irq::{IrqError, MsiMessage, MsiRouting};

#[derive(Default)]
pub struct FakeRouting {
    pub state: Mutex<FakeRoutingState>,
}

#[derive(Default)]
pub struct FakeRoutingState {
    pub next: u32,
    pub allocated: BTreeSet<u32>,
    pub routes: BTreeMap<u32, MsiMessage>,
    pub irqfds: BTreeSet<u32>,
    /// Number of route commits, to check batching.
    pub commits: usize,
}

impl FakeRouting {
    pub fn routes(&self) -> BTreeMap<u32, MsiMessage> {
        self.state.lock().unwrap().routes.clone()
    }

    pub fn irqfds(&self) -> BTreeSet<u32> {
        self.state.lock().unwrap().irqfds.clone()
    }
}

impl MsiRouting for FakeRouting {
    fn allocate_gsi(&self) -> Result<u32, IrqError> {
        let mut s = self.state.lock().unwrap();
        let g = 24 + s.next;
        s.next += 1;
        s.allocated.insert(g);
        Ok(g)
    }

    fn free_gsi(&self, gsi: u32) {
        let mut s = self.state.lock().unwrap();
        s.allocated.remove(&gsi);
        s.routes.remove(&gsi);
    }

    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), IrqError> {
        self.set_routes(&[(gsi, msg)])
    }

    fn set_routes(&self, routes: &[(u32, Option<MsiMessage>)]) -> Result<(), IrqError> {
        let mut s = self.state.lock().unwrap();
        for &(gsi, msg) in routes {
            if !s.allocated.contains(&gsi) {
                return Err(IrqError::UnknownGsi(gsi));
            }
            match msg {
                Some(m) => s.routes.insert(gsi, m),
                None => s.routes.remove(&gsi),
            };
        }
        s.commits += 1;
        Ok(())
    }

    fn register_irqfd(&self, _fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        let mut s = self.state.lock().unwrap();
        assert!(
            s.routes.contains_key(&gsi),
            "irqfd attached before its route"
        );
        assert!(s.irqfds.insert(gsi), "irqfd attached twice");
        Ok(())
    }

    fn unregister_irqfd(&self, _fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        assert!(
            self.state.lock().unwrap().irqfds.remove(&gsi),
            "irqfd not attached"
        );
        Ok(())
    }
}

/// A PCI function with declared BARs whose BAR accesses are recorded.
pub struct TestDevice {
    pub config: PciConfiguration,
    pub bar_writes: Vec<(usize, u64, Vec<u8>)>,
    pub mapped: Vec<(usize, Option<u64>)>,
}

impl TestDevice {
    pub fn new(bars: &[(usize, u64, BarKind)]) -> Self {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: 0x1234,
            device_id: 0x5678,
            class: (0xff, 0, 0),
            ..Default::default()
        });
        for &(i, size, kind) in bars {
            config.add_bar(i, size, kind).unwrap();
        }
        TestDevice {
            config,
            bar_writes: Vec::new(),
            mapped: Vec::new(),
        }
    }
}

impl PciDevice for TestDevice {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn bars(&self) -> Vec<BarRegion> {
        self.config.bars()
    }

    // Reads return the BAR index in every byte, so tests can tell BARs apart.
    fn read_bar(&mut self, bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(bar as u8 + 0xa0);
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        self.bar_writes.push((bar, offset, data.to_vec()));
    }

    fn bar_mapped(&mut self, bar: usize, addr: Option<u64>) {
        self.mapped.push((bar, addr));
    }

    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        encode(&self.config.state())
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let s: PciConfigState = decode(bytes)?;
        self.config
            .restore(&s)
            .map_err(|e| StateError::Decode(e.to_string()))
    }
}
