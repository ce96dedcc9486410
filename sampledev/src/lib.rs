//! `sampledev`: a vfio-user server presenting a PCI function with BAR0 registers, a DMA
//! engine that writes client (guest) memory and completes by MSI-X, and internal state of
//! configurable size. See README.md for the register map.
//!
//! Layers: `server`/`session`/`handlers` speak vfio-user; `device` is the VFIO view of the
//! function; `core` holds its state (config space, registers, MSI-X, internal state), which
//! is what migration will save; `engine` and `dma` move guest memory.

pub mod bar0;
pub mod cli;
pub mod config;
pub mod core;
pub mod device;
pub mod dma;
pub mod engine;
pub mod error;
pub mod handlers;
pub mod irqs;
pub mod msix;
pub mod pattern;
pub mod regs;
pub mod server;
pub mod session;
pub mod state;
