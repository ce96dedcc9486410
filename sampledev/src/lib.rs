//! `sampledev`: a vfio-user server presenting a PCI function with BAR0 registers, a DMA
//! engine that writes client (guest) memory and completes by MSI-X (or, with `--irq intx`, a
//! level-triggered INTx), and internal state of configurable size. See README.md for the
//! register map.
//!
//! Layers: `server`/`session`/`handlers` (and `features`) speak vfio-user; `device` and
//! `device_mig` are the VFIO view of the function; `core` holds its state (config space,
//! registers, MSI-X, internal state), which `mig` saves and restores; `intx` and `resample`
//! carry the INTx line and its unmask (EOI) eventfd; `engine` and `dma` move guest memory,
//! and `dirtylog` records the device's writes to it.

pub mod bar0;
pub mod bitset;
pub mod cli;
pub mod config;
pub mod core;
pub mod device;
pub mod device_mig;
pub mod dirtylog;
pub mod dma;
pub mod engine;
pub mod error;
pub mod features;
pub mod handlers;
pub mod intx;
pub mod irqs;
pub mod mig;
pub mod msix;
pub mod options;
pub mod pattern;
pub mod regs;
pub mod resample;
pub mod server;
pub mod session;
pub mod state;
