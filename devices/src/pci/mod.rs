//! PCI: configuration space, the root bus with its 0xCF8/0xCFC and ECAM access paths, MSI and
//! MSI-X emulation wired to KVM, and the VFIO passthrough device on a backend trait.

pub mod bar_mmap;
pub mod bus;
pub mod config;
pub mod config_access;
pub mod device;
pub mod host_bridge;
pub mod irq;
pub mod msi;
pub mod msix;
pub mod vfio;
pub mod vfio_backend;
pub mod vfio_interrupts;
pub mod vfio_kernel;
mod vfio_regions;
pub mod vfio_user;
mod windows;

#[cfg(test)]
mod testing;
#[cfg(test)]
mod vfio_tests;
#[cfg(test)]
mod vfio_user_tests;

pub use bar_mmap::{BarMemoryMapper, KvmBarMapper};
pub use bus::{PciBdf, PciRoot, PciRootError, PciWindows};
pub use config_access::{
    ECAM_SIZE, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN, PciConfigIo, PciConfigMmio,
};
pub use device::{PciDevice, SharedPciDevice};
pub use host_bridge::{HostBridge, HostBridgeError};
pub use irq::{KvmMsiRouting, MsiMessage, MsiRouting, MsiVectors, VectorRoute};
pub use vfio::{VfioPciDevice, VfioPciError};
pub use vfio_backend::{BackendError, DmaRegion, VfioBackend};
pub use vfio_kernel::{KernelVfioBackend, KernelVfioContainer};
pub use vfio_user::VfioUserBackend;
