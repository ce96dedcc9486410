//! Emulated and passthrough devices of minivmm, each behind the [`bus::BusDevice`] trait.

pub mod bus;
pub mod legacy;
pub mod pci;
pub mod serial;
