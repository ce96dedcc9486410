//! The device as the transport sees it: regions, interrupts, DMA mappings and reset, in VFIO
//! terms but with no knowledge of sockets or messages.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_user::vfio::*;
use vfio_user::{DeviceInfo, DmaMap, IrqInfo, IrqSet, RegionInfo};

use crate::config::CONFIG_SIZE;
use crate::core::Core;
use crate::dma::DmaSpace;
use crate::engine::Engine;
use crate::error::Refusal;
use crate::irqs;
use crate::regs::BAR0_SIZE;

/// State shared with the DMA engine. Lock order: `dma` before `core`.
pub struct Shared {
    pub core: Mutex<Core>,
    pub dma: Mutex<DmaSpace>,
}

/// A poisoned lock only means another thread panicked; the data is still consistent enough
/// to keep serving (and with panic=abort this never happens).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Device {
    shared: Arc<Shared>,
    engine: Engine,
}

impl Device {
    pub fn new(state_size: u64) -> io::Result<Device> {
        let shared = Arc::new(Shared {
            core: Mutex::new(Core::new(state_size)),
            dma: Mutex::new(DmaSpace::default()),
        });
        let engine = Engine::start(shared.clone())?;
        Ok(Device { shared, engine })
    }

    pub fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            argsz: DeviceInfo::SIZE,
            flags: VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI,
            num_regions: VFIO_PCI_NUM_REGIONS,
            num_irqs: VFIO_PCI_NUM_IRQS,
        }
    }

    pub fn region_info(&self, index: u32) -> Result<RegionInfo, Refusal> {
        let (size, flags) = region(index)?;
        Ok(RegionInfo {
            index,
            flags,
            size,
            offset: 0,
            caps: Vec::new(),
            fd: None,
        })
    }

    pub fn irq_info(&self, index: u32) -> Result<IrqInfo, Refusal> {
        irqs::irq_info(index)
    }

    pub fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Refusal> {
        check_access(index, offset, buf.len(), VFIO_REGION_INFO_FLAG_READ)?;
        let mut core = lock(&self.shared.core);
        match index {
            VFIO_PCI_BAR0_REGION_INDEX => core.bar0_read(offset, buf),
            _ => core.config.read(offset as usize, buf),
        }
        Ok(())
    }

    pub fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), Refusal> {
        check_access(index, offset, data.len(), VFIO_REGION_INFO_FLAG_WRITE)?;
        let job = {
            let mut core = lock(&self.shared.core);
            match index {
                VFIO_PCI_BAR0_REGION_INDEX => core.bar0_write(offset, data),
                _ => {
                    core.config_write(offset as usize, data);
                    None
                }
            }
        };
        if let Some(job) = job {
            self.engine.submit(job);
        }
        Ok(())
    }

    pub fn dma_map(&self, map: &DmaMap, fd: OwnedFd) -> Result<(), Refusal> {
        lock(&self.shared.dma).map(map, fd)
    }

    /// Waits for in-flight DMA (the engine holds the DMA space while it runs).
    pub fn dma_unmap(&self, iova: u64, size: u64) -> Result<(), Refusal> {
        lock(&self.shared.dma).unmap(iova, size)
    }

    pub fn set_irqs(&self, set: &IrqSet, fds: Vec<OwnedFd>) -> Result<(), Refusal> {
        irqs::set_irqs(&mut lock(&self.shared.core), set, fds)
    }

    /// Function-level reset; waits for in-flight DMA so none lands after it.
    pub fn reset(&self) {
        let _dma = lock(&self.shared.dma);
        lock(&self.shared.core).reset();
        log::info!("device reset");
    }

    /// What the spec asks when a client goes away: drop its memory and eventfds, keep the
    /// device state.
    pub fn client_gone(&self) {
        *lock(&self.shared.dma) = DmaSpace::default();
        lock(&self.shared.core).msix.clear_triggers();
    }

    /// The device state, for inspection (and later for migration).
    pub fn core(&self) -> MutexGuard<'_, Core> {
        lock(&self.shared.core)
    }
}

/// Size and access flags of region `index`; regions the function lacks have size 0.
fn region(index: u32) -> Result<(u64, u32), Refusal> {
    let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    match index {
        VFIO_PCI_BAR0_REGION_INDEX => Ok((BAR0_SIZE, rw)),
        VFIO_PCI_CONFIG_REGION_INDEX => Ok((CONFIG_SIZE as u64, rw)),
        i if i < VFIO_PCI_NUM_REGIONS => Ok((0, 0)),
        _ => Err(Refusal::inval(format!("no region {index}"))),
    }
}

fn check_access(index: u32, offset: u64, len: usize, need: u32) -> Result<(), Refusal> {
    let (size, flags) = region(index)?;
    if flags & need == 0 {
        return Err(Refusal::inval(format!(
            "region {index} does not allow this access"
        )));
    }
    if len == 0 || offset.checked_add(len as u64).is_none_or(|end| end > size) {
        return Err(Refusal::inval(format!(
            "access {offset:#x}+{len:#x} outside region {index} of {size:#x} bytes"
        )));
    }
    Ok(())
}
