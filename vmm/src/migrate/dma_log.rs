//! A passthrough device's DMA-write log (VFIO `DMA_LOGGING_START/REPORT/STOP`) as a
//! migration `DirtySource`: KVM never sees the device's writes to guest RAM, so without this
//! a page the device wrote after it was sent would arrive stale.
//!
//! `MINIVMM_FAULT=skip-dma-log` reads the reports but drops them, for the test that proves
//! the guest's own check catches pages lost this way.

use std::sync::{Arc, Mutex};

use devices::pci::VfioPciDevice;
use migration::dirty::{DirtyError, DirtySource, RamSlot};
use migration::ranges::{MemoryRange, PAGE_SIZE};

pub struct DeviceDmaLog {
    id: String,
    dev: Arc<Mutex<VfioPciDevice>>,
    ranges: Vec<MemoryRange>,
    on: bool,
    skip: bool,
}

impl DeviceDmaLog {
    /// Logs the device's writes to `ranges` (guest RAM, = IOVA without a vIOMMU).
    pub fn new(id: &str, dev: Arc<Mutex<VfioPciDevice>>, ranges: Vec<MemoryRange>) -> Self {
        let skip = super::fault::active("skip-dma-log");
        if skip {
            log::warn!("fault injected: {id}'s DMA log is read but ignored");
        }
        DeviceDmaLog {
            id: id.to_owned(),
            dev,
            ranges,
            on: false,
            skip,
        }
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> DirtyError {
        DirtyError::new(format!("device {}", self.id), format!("{what}: {e}"))
    }
}

fn lock(d: &Mutex<VfioPciDevice>) -> std::sync::MutexGuard<'_, VfioPciDevice> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts DMA logging of `ranges` at the page size the dirty bitmaps use. A device that
/// settles on another granularity is refused: its bits would not line up with KVM's.
pub fn start_logging(dev: &mut VfioPciDevice, ranges: &[MemoryRange]) -> Result<(), String> {
    let pairs: Vec<(u64, u64)> = ranges.iter().map(|r| (r.gpa, r.len)).collect();
    let b = dev.backend_mut();
    let page = b
        .dma_logging_start(PAGE_SIZE, &pairs)
        .map_err(|e| e.to_string())?;
    if page != PAGE_SIZE {
        if let Err(e) = b.dma_logging_stop() {
            log::warn!("stopping DMA logging: {e}");
        }
        return Err(format!("device logs {page}-byte pages, not {PAGE_SIZE}"));
    }
    Ok(())
}

impl DirtySource for DeviceDmaLog {
    fn name(&self) -> &str {
        &self.id
    }

    fn start(&mut self) -> Result<(), DirtyError> {
        start_logging(&mut lock(&self.dev), &self.ranges).map_err(|e| self.err("start", e))?;
        self.on = true;
        Ok(())
    }

    fn dirty_bitmap(&mut self, slot: &RamSlot) -> Result<Vec<u64>, DirtyError> {
        // Slots the device may not DMA into have nothing to report.
        if !self.ranges.iter().any(|r| r.contains(&slot.range)) {
            return Ok(Vec::new());
        }
        let (gpa, len) = (slot.range.gpa, slot.range.len);
        let bitmap = lock(&self.dev)
            .backend_mut()
            .dma_logging_report(gpa, len, PAGE_SIZE)
            .map_err(|e| self.err(&format!("report {gpa:#x}+{len:#x}"), e))?;
        Ok(if self.skip { Vec::new() } else { bitmap })
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if !self.on {
            return Ok(());
        }
        self.on = false;
        lock(&self.dev)
            .backend_mut()
            .dma_logging_stop()
            .map_err(|e| self.err("stop", e))
    }
}

impl Drop for DeviceDmaLog {
    fn drop(&mut self) {
        // The device would keep logging (and refuse the next START) otherwise.
        if let Err(e) = self.stop() {
            log::warn!("{e}");
        }
    }
}
