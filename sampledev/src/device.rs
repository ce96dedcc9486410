//! The device as the transport sees it: regions, interrupts, DMA mappings and reset, in VFIO
//! terms but with no knowledge of sockets or messages.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use vfio_user::vfio::*;
use vfio_user::{DeviceInfo, DmaMap, IrqInfo, IrqSet, RegionCap, RegionInfo};

use crate::config::CONFIG_SIZE;
use crate::core::Core;
use crate::dma::DmaSpace;
use crate::engine::Engine;
use crate::error::Refusal;
use crate::irqs;
use crate::mig::Migration;
use crate::mig::v1::{V1_REGION_INDEX, V1_REGION_SIZE};
use crate::options::{DeviceOptions, IrqMode, MigMode};
use crate::regs::{
    BAR0_SIZE, MIG_CAPS_DIRTY_LOG, MIG_CAPS_FLAGS_SHIFT, MIG_CAPS_MODE_V1, MIG_CAPS_MODE_V2,
};
use crate::resample::Resampler;

/// State shared with the DMA engine. Lock order: `dma`, then `mig`, then `core`.
pub struct Shared {
    pub core: Mutex<Core>,
    pub dma: Mutex<DmaSpace>,
    pub mig: Mutex<Migration>,
    /// Signalled (with `core`) when the engine finishes a job: quiescing arcs wait on it.
    pub idle: Condvar,
}

/// A poisoned lock only means another thread panicked; the data is still consistent enough
/// to keep serving (and with panic=abort this never happens).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Device {
    pub(crate) shared: Arc<Shared>,
    pub(crate) engine: Engine,
    /// INTx mode only: waits on the unmask eventfd.
    resampler: Option<Resampler>,
    pub(crate) opts: DeviceOptions,
}

impl Device {
    pub fn new(opts: &DeviceOptions) -> io::Result<Device> {
        let mut core = Core::with_irq(opts.state_size, opts.irq);
        let mig = Migration::new(opts);
        core.mig.caps = mig_caps(opts);
        mig.publish(&mut core);
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            dma: Mutex::new(DmaSpace::default()),
            mig: Mutex::new(mig),
            idle: Condvar::new(),
        });
        let engine = Engine::start(shared.clone())?;
        let resampler = match opts.irq {
            IrqMode::Intx => Some(Resampler::start(shared.clone())?),
            IrqMode::Msix => None,
        };
        Ok(Device {
            shared,
            engine,
            resampler,
            opts: opts.clone(),
        })
    }

    fn v1(&self) -> bool {
        self.opts.mode == MigMode::V1
    }

    pub fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            argsz: DeviceInfo::SIZE,
            flags: VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI,
            num_regions: VFIO_PCI_NUM_REGIONS + u32::from(self.v1()),
            num_irqs: VFIO_PCI_NUM_IRQS,
        }
    }

    pub fn region_info(&self, index: u32) -> Result<RegionInfo, Refusal> {
        let (size, flags) = region(index, self.v1())?;
        let caps = if index == V1_REGION_INDEX {
            vec![RegionCap::Type {
                region_type: VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
                subtype: VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED,
            }]
        } else {
            Vec::new()
        };
        Ok(RegionInfo {
            index,
            flags,
            size,
            offset: 0,
            caps,
            fd: None,
        })
    }

    pub fn irq_info(&self, index: u32) -> Result<IrqInfo, Refusal> {
        irqs::irq_info(index, self.opts.irq)
    }

    /// `--slow-bar`: a device that takes its time to answer the guest.
    fn slow_down(&self, index: u32) {
        if let (VFIO_PCI_BAR0_REGION_INDEX, Some(d)) = (index, self.opts.slow_bar) {
            std::thread::sleep(d);
        }
    }

    pub fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Refusal> {
        check_access(
            index,
            offset,
            buf.len(),
            VFIO_REGION_INFO_FLAG_READ,
            self.v1(),
        )?;
        self.slow_down(index);
        if index == V1_REGION_INDEX {
            return self.v1_read(offset, buf);
        }
        let mut core = lock(&self.shared.core);
        match index {
            VFIO_PCI_BAR0_REGION_INDEX => core.bar0_read(offset, buf),
            _ => core.config_read(offset as usize, buf),
        }
        // A bad access sets ERROR, which is an interrupt cause too.
        core.sync_intx();
        Ok(())
    }

    pub fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), Refusal> {
        check_access(
            index,
            offset,
            data.len(),
            VFIO_REGION_INFO_FLAG_WRITE,
            self.v1(),
        )?;
        self.slow_down(index);
        if index == V1_REGION_INDEX {
            return self.v1_write(offset, data);
        }
        let job = {
            let mut core = lock(&self.shared.core);
            let job = match index {
                VFIO_PCI_BAR0_REGION_INDEX => core.bar0_write(offset, data),
                _ => {
                    core.config_write(offset as usize, data);
                    None
                }
            };
            core.sync_intx();
            job
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
        let r = irqs::set_irqs(&mut lock(&self.shared.core), set, fds);
        if set.index == VFIO_PCI_INTX_IRQ_INDEX {
            self.rearm_resampler();
        }
        r
    }

    fn rearm_resampler(&self) {
        if let Some(r) = &self.resampler {
            r.rearm();
        }
    }

    /// Function-level reset; waits for in-flight DMA so none lands after it. Leaves ERROR
    /// and any migration session: the device is RUNNING afterwards.
    pub fn reset(&self) {
        let _dma = lock(&self.shared.dma);
        let mut mig = lock(&self.shared.mig);
        let mut core = lock(&self.shared.core);
        core.reset();
        mig.reset(&mut core);
        log::info!("device reset");
    }

    /// What the spec asks when a client goes away: drop its memory and eventfds, keep the
    /// device state.
    pub fn client_gone(&self) {
        *lock(&self.shared.dma) = DmaSpace::default();
        let mut core = lock(&self.shared.core);
        core.msix.clear_triggers();
        core.intx.disable();
        drop(core);
        self.rearm_resampler();
    }

    /// The device state, for inspection.
    pub fn core(&self) -> MutexGuard<'_, Core> {
        lock(&self.shared.core)
    }
}

/// Size and access flags of region `index`; regions the function lacks have size 0.
fn region(index: u32, v1: bool) -> Result<(u64, u32), Refusal> {
    let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    match index {
        VFIO_PCI_BAR0_REGION_INDEX => Ok((BAR0_SIZE, rw)),
        VFIO_PCI_CONFIG_REGION_INDEX => Ok((CONFIG_SIZE as u64, rw)),
        i if i < VFIO_PCI_NUM_REGIONS => Ok((0, 0)),
        V1_REGION_INDEX if v1 => Ok((V1_REGION_SIZE, rw)),
        _ => Err(Refusal::inval(format!("no region {index}"))),
    }
}

/// The MIG_CAPS register.
fn mig_caps(o: &DeviceOptions) -> u64 {
    let mode = match o.mode {
        MigMode::None => 0,
        MigMode::V1 => MIG_CAPS_MODE_V1,
        MigMode::V2 => MIG_CAPS_MODE_V2 | (o.v2_flags << MIG_CAPS_FLAGS_SHIFT),
    };
    let log = if o.dma_logging() {
        MIG_CAPS_DIRTY_LOG
    } else {
        0
    };
    mode | log
}

fn check_access(index: u32, offset: u64, len: usize, need: u32, v1: bool) -> Result<(), Refusal> {
    let (size, flags) = region(index, v1)?;
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
