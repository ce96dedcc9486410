//! The host bridge at 00:00.0: a header with no BARs, present because guests (Linux among them)
//! look for a host bridge at device 0 before trusting the bus.

use migration::state::{StateError, decode, encode};

use super::config::{BarRegion, PciConfigState, PciConfiguration, PciHeader};
use super::device::PciDevice;

pub const HOST_BRIDGE_VENDOR: u16 = 0x8086;
/// The ID other small VMMs use for a virtual PCIe host bridge; no driver binds to it.
pub const HOST_BRIDGE_DEVICE: u16 = 0x0d57;
const CLASS_BRIDGE_HOST: (u8, u8, u8) = (0x06, 0x00, 0x00);

pub struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    pub fn new() -> Self {
        HostBridge {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: HOST_BRIDGE_VENDOR,
                device_id: HOST_BRIDGE_DEVICE,
                class: CLASS_BRIDGE_HOST,
                ..Default::default()
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn bars(&self) -> Vec<BarRegion> {
        Vec::new()
    }

    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}

    fn save_state(&self) -> Result<Vec<u8>, StateError> {
        encode(&self.config.state())
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let s: PciConfigState = decode(bytes)?;
        self.config
            .restore(&s)
            .map_err(|e| StateError::Incompatible {
                id: "pci host bridge".into(),
                reason: e.to_string(),
            })
    }
}
