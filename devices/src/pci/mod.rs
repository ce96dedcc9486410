//! PCI: configuration space, the root bus with its 0xCF8/0xCFC and ECAM access paths, MSI and
//! MSI-X emulation wired to KVM, and the VFIO passthrough device on a backend trait.

pub mod config;
pub mod irq;
pub mod msi;
pub mod msix;

#[cfg(test)]
mod testing;
