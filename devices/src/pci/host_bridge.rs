//! The host bridge at 00:00.0: a header with no BARs, present because guests (Linux among them)
//! look for a host bridge at device 0 before trusting the bus.
//!
//! Optionally it also tells a guest without ACPI where ECAM is, the way Linux discovers it on
//! chipsets it knows (arch/x86/pci/mmconfig-shared.c, `pci_mmcfg_intel_945`): it identifies as
//! an Intel 945G host bridge (8086:2770) whose PCIEXBAR register (0x48) holds the ECAM base
//! with the enable bit and the 256-bus size. Linux then uses ECAM provided the range is
//! reserved in the E820 map. With ACPI, an MCFG table does the same job.

use migration::state::{StateError, decode, encode};

use super::config::{BarRegion, PciConfigState, PciConfiguration, PciHeader};
use super::device::PciDevice;

pub const HOST_BRIDGE_VENDOR: u16 = 0x8086;
/// The ID other small VMMs use for a virtual PCIe host bridge; no driver binds to it.
pub const HOST_BRIDGE_DEVICE: u16 = 0x0d57;
const CLASS_BRIDGE_HOST: (u8, u8, u8) = (0x06, 0x00, 0x00);
/// Intel 82945G host bridge, one of the bridges Linux probes for an ECAM window.
pub const I945_HOST_BRIDGE_DEVICE: u16 = 0x2770;
const PCIEXBAR: usize = 0x48;
/// PCIEXBAR enable bit; size field (bits 2:1) 0 = 256 buses, base in bits 31:28.
const PCIEXBAR_ENABLE: u32 = 1;
const ECAM_256_BUSES: u64 = 256 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostBridgeError {
    #[error("ECAM base {0:#x} must be 256 MiB aligned and below 0xf000_0000 for PCIEXBAR")]
    EcamBase(u64),
}

pub struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    pub fn new() -> Self {
        Self::with_id(HOST_BRIDGE_DEVICE)
    }

    fn with_id(device_id: u16) -> Self {
        HostBridge {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: HOST_BRIDGE_VENDOR,
                device_id,
                class: CLASS_BRIDGE_HOST,
                ..Default::default()
            }),
        }
    }

    /// A bridge that advertises a 256-bus ECAM window at `base` through PCIEXBAR (see the
    /// module comment); `base` must satisfy Linux's checks (256 MiB aligned, below 0xf000_0000).
    pub fn with_ecam_hint(base: u64) -> Result<Self, HostBridgeError> {
        if !base.is_multiple_of(ECAM_256_BUSES) || base >= 0xf000_0000 {
            return Err(HostBridgeError::EcamBase(base));
        }
        let mut b = Self::with_id(I945_HOST_BRIDGE_DEVICE);
        b.config.set_u32(PCIEXBAR, base as u32 | PCIEXBAR_ENABLE);
        Ok(b)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecam_hint_in_pciexbar() {
        let mut b = HostBridge::with_ecam_hint(0xe000_0000).unwrap();
        let mut r = [0u8; 4];
        b.read_config(0, &mut r);
        assert_eq!(u32::from_le_bytes(r), 0x2770_8086);
        b.write_config(PCIEXBAR, &[0; 4]);
        b.read_config(PCIEXBAR, &mut r);
        assert_eq!(u32::from_le_bytes(r), 0xe000_0001, "read-only to the guest");
        b.read_config(0x08, &mut r);
        assert_eq!(u32::from_le_bytes(r) >> 8, 0x06_00_00);
        assert!(HostBridge::with_ecam_hint(0xe800_0000).is_err());
        assert!(HostBridge::with_ecam_hint(0xf000_0000).is_err());
    }
}
