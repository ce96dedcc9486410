//! The interrupt side of a VFIO PCI device: MSI-X and MSI emulated by the VMM and delivered
//! through KVM irqfds that the device signals directly, plus INTx as a level-triggered irqfd
//! with resample. Like QEMU, only one kind is live on the device at a time: vfio-pci refuses
//! MSI while INTx is set up, so INTx is taken down while MSI or MSI-X is enabled and put back
//! afterwards.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::irq::{IrqError, MsiRouting, MsiVectors, VectorRoute};
use super::msi::{MsiCapability, MsiConfig, MsiState};
use super::msix::{MsixCapability, MsixConfig, MsixState};
use super::vfio_backend::{
    BackendError, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VfioBackend,
};

#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("device interrupt setup: {0}")]
    Backend(#[from] BackendError),
    #[error("KVM interrupt routing: {0}")]
    Irq(#[from] IrqError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("saved interrupt state does not fit this device: {0}")]
    State(String),
}

type Result<T> = std::result::Result<T, InterruptError>;

/// Vectors of one IRQ index (MSI or MSI-X), present while the guest has it enabled.
struct VectorSet {
    index: u32,
    live: Option<MsiVectors>,
}

pub struct MsixInterrupts {
    /// Offset of the capability in configuration space.
    pub cap_offset: usize,
    pub config: MsixConfig,
    set: VectorSet,
}

pub struct MsiInterrupts {
    pub cap_offset: usize,
    pub config: MsiConfig,
    set: VectorSet,
}

struct Intx {
    gsi: u32,
    trigger: EventFd,
    resample: EventFd,
    on_device: bool,
    /// The device refused `resample` as its unmask eventfd (mtty: ENOTTY), so the VMM
    /// unmasks it whenever KVM signals `resample` (QEMU's `vfio_intx_enable_kvm` fallback).
    vmm_unmasks: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterruptState {
    pub msix: Option<MsixState>,
    pub msi: Option<MsiState>,
}

pub struct VfioInterrupts {
    routing: Arc<dyn MsiRouting>,
    pub msix: Option<MsixInterrupts>,
    pub msi: Option<MsiInterrupts>,
    intx: Option<Intx>,
}

impl VectorSet {
    /// Brings the device and KVM in line with the guest's view: `enabled` with `count`
    /// vectors delivering `routes`. Returns whether the set is live afterwards.
    fn reconcile(
        &mut self,
        routing: &Arc<dyn MsiRouting>,
        backend: &mut dyn VfioBackend,
        enabled: bool,
        count: usize,
        routes: &[VectorRoute],
    ) -> Result<()> {
        if self
            .live
            .as_ref()
            .is_some_and(|v| !enabled || v.len() != count)
        {
            // Stop the device signalling before its eventfds go away.
            backend.disable_irq(self.index)?;
            self.live = None;
        }
        if enabled && self.live.is_none() {
            let v = MsiVectors::new(routing.clone(), count)?;
            backend.set_irq_eventfds(self.index, &v.eventfds())?;
            self.live = Some(v);
        }
        if let Some(v) = &mut self.live {
            let in_range: Vec<_> = routes
                .iter()
                .filter(|r| usize::from(r.vector) < count)
                .copied()
                .collect();
            v.apply(&in_range)?;
        }
        Ok(())
    }

    fn is_live(&self) -> bool {
        self.live.is_some()
    }
}

impl VfioInterrupts {
    pub fn new(
        routing: Arc<dyn MsiRouting>,
        msix: Option<(usize, MsixCapability)>,
        msi: Option<(usize, MsiCapability)>,
    ) -> Self {
        VfioInterrupts {
            routing,
            msix: msix.map(|(cap_offset, cap)| MsixInterrupts {
                cap_offset,
                config: MsixConfig::new(cap),
                set: VectorSet {
                    index: VFIO_PCI_MSIX_IRQ_INDEX,
                    live: None,
                },
            }),
            msi: msi.map(|(cap_offset, cap)| MsiInterrupts {
                cap_offset,
                config: MsiConfig::new(cap),
                set: VectorSet {
                    index: VFIO_PCI_MSI_IRQ_INDEX,
                    live: None,
                },
            }),
            intx: None,
        }
    }

    /// Wires the device's INTx to IOAPIC pin `gsi` (level-triggered, resampled on EOI).
    pub fn enable_intx(&mut self, backend: &mut dyn VfioBackend, gsi: u32) -> Result<()> {
        let trigger = EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
        let resample = EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
        self.routing
            .register_resample_irqfd(&trigger, &resample, gsi)?;
        self.intx = Some(Intx {
            gsi,
            trigger,
            resample,
            on_device: false,
            vmm_unmasks: false,
        });
        self.sync_intx(backend)
    }

    /// KVM's resample eventfd, when the VMM must watch it and call [`Self::intx_eoi`].
    pub fn intx_resample_for_vmm(&self) -> Option<&EventFd> {
        self.intx
            .as_ref()
            .filter(|i| i.vmm_unmasks)
            .map(|i| &i.resample)
    }

    /// The guest EOIed the INTx vector (KVM signalled the resample eventfd): unmask the line
    /// on the device so that it can assert again.
    pub fn intx_eoi(
        &mut self,
        backend: &mut dyn VfioBackend,
    ) -> std::result::Result<(), BackendError> {
        let Some(i) = &self.intx else {
            return Ok(());
        };
        // Non-blocking: nothing to read is not an error, just nothing to do.
        if i.resample.read().is_err() || !i.on_device || !i.vmm_unmasks {
            return Ok(());
        }
        backend.unmask_irq(VFIO_PCI_INTX_IRQ_INDEX)?;
        Ok(())
    }

    pub fn intx_gsi(&self) -> Option<u32> {
        self.intx.as_ref().map(|i| i.gsi)
    }

    fn message_irqs_live(&self) -> bool {
        self.msix.as_ref().is_some_and(|m| m.set.is_live())
            || self.msi.as_ref().is_some_and(|m| m.set.is_live())
    }

    /// INTx is on the device exactly while neither MSI nor MSI-X is.
    fn sync_intx(&mut self, backend: &mut dyn VfioBackend) -> Result<()> {
        let want = !self.message_irqs_live();
        let Some(i) = &mut self.intx else {
            return Ok(());
        };
        if want && !i.on_device {
            backend.set_irq_eventfds(VFIO_PCI_INTX_IRQ_INDEX, &[&i.trigger])?;
            match backend.set_irq_unmask_eventfd(VFIO_PCI_INTX_IRQ_INDEX, &i.resample) {
                Ok(()) => i.vmm_unmasks = false,
                Err(e) => {
                    if !i.vmm_unmasks {
                        log::info!(
                            "INTx on GSI {}: the device refuses an unmask eventfd ({e}); the \
                             VMM unmasks it after each EOI",
                            i.gsi
                        );
                    }
                    i.vmm_unmasks = true;
                }
            }
        } else if !want && i.on_device {
            backend.disable_irq(VFIO_PCI_INTX_IRQ_INDEX)?;
        }
        i.on_device = want;
        Ok(())
    }

    /// A guest write of the MSI-X control word.
    pub fn write_msix_control(
        &mut self,
        backend: &mut dyn VfioBackend,
        control: u16,
    ) -> Result<()> {
        let Some(m) = &mut self.msix else {
            return Ok(());
        };
        let changed = m.config.set_control(control);
        self.reconcile_msix(backend, &changed)
    }

    /// A guest write to the MSI-X table (offset from the table start).
    pub fn write_msix_table(
        &mut self,
        backend: &mut dyn VfioBackend,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        let Some(m) = &mut self.msix else {
            return Ok(());
        };
        let changed = m.config.write_table(offset, data);
        self.reconcile_msix(backend, &changed)
    }

    fn reconcile_msix(
        &mut self,
        backend: &mut dyn VfioBackend,
        changed: &[VectorRoute],
    ) -> Result<()> {
        let VfioInterrupts {
            routing,
            msix,
            intx,
            ..
        } = self;
        if let Some(m) = msix {
            let enabled = m.config.enabled();
            // A set coming up needs every route; one already up needs only the changes.
            let routes = if m.set.is_live() {
                changed.to_vec()
            } else {
                m.config.routes()
            };
            if enabled {
                intx_off(intx, backend)?;
            }
            let n = usize::from(m.config.capability().table_size);
            m.set.reconcile(routing, backend, enabled, n, &routes)?;
        }
        self.sync_intx(backend)
    }

    /// A guest write into the MSI capability (`offset` from its ID byte).
    pub fn write_msi(
        &mut self,
        backend: &mut dyn VfioBackend,
        offset: usize,
        data: &[u8],
    ) -> Result<()> {
        if let Some(m) = &mut self.msi {
            m.config.write(offset, data);
        }
        self.reconcile_msi(backend)
    }

    // MSI has at most 32 vectors and is rarely written, so every write re-applies all routes.
    fn reconcile_msi(&mut self, backend: &mut dyn VfioBackend) -> Result<()> {
        let VfioInterrupts {
            routing, msi, intx, ..
        } = self;
        if let Some(m) = msi {
            let enabled = m.config.enabled();
            if enabled {
                intx_off(intx, backend)?;
            }
            let n = m.config.vectors() as usize;
            let routes = m.config.routes();
            m.set.reconcile(routing, backend, enabled, n, &routes)?;
        }
        self.sync_intx(backend)
    }

    /// Before a device reset: every interrupt off on the device, so nothing signals through
    /// eventfds the reset drops (QEMU's pre-reset does the same). The guest's view is kept.
    pub fn quiesce(&mut self, backend: &mut dyn VfioBackend) -> Result<()> {
        for set in [
            self.msix.as_mut().map(|m| &mut m.set),
            self.msi.as_mut().map(|m| &mut m.set),
        ]
        .into_iter()
        .flatten()
        {
            set.reconcile(&self.routing, backend, false, 0, &[])?;
        }
        intx_off(&mut self.intx, backend)
    }

    /// After a device reset: the device wired again as the guest configured it.
    pub fn rearm(&mut self, backend: &mut dyn VfioBackend) -> Result<()> {
        self.reconcile_msix(backend, &[])?;
        self.reconcile_msi(backend)
    }

    pub fn state(&self) -> InterruptState {
        InterruptState {
            msix: self.msix.as_ref().map(|m| m.config.state()),
            msi: self.msi.as_ref().map(|m| m.config.state()),
        }
    }

    /// Loads saved MSI/MSI-X registers and sets the device and KVM up to match.
    pub fn restore(&mut self, backend: &mut dyn VfioBackend, s: &InterruptState) -> Result<()> {
        match (&mut self.msix, &s.msix) {
            (Some(m), Some(saved)) => m
                .config
                .restore(saved)
                .map_err(|e| InterruptError::State(e.to_string()))?,
            (None, None) => {}
            _ => return Err(InterruptError::State("MSI-X presence differs".into())),
        }
        match (&mut self.msi, &s.msi) {
            (Some(m), Some(saved)) => m
                .config
                .restore(saved)
                .map_err(|e| InterruptError::State(e.to_string()))?,
            (None, None) => {}
            _ => return Err(InterruptError::State("MSI presence differs".into())),
        }
        if let Some(m) = &mut self.msix {
            // Rebuild from scratch: the table may differ from what is live.
            m.set.reconcile(&self.routing, backend, false, 0, &[])?;
        }
        self.reconcile_msix(backend, &[])?;
        self.reconcile_msi(backend)
    }
}

fn intx_off(intx: &mut Option<Intx>, backend: &mut dyn VfioBackend) -> Result<()> {
    if let Some(i) = intx
        && i.on_device
    {
        backend.disable_irq(VFIO_PCI_INTX_IRQ_INDEX)?;
        i.on_device = false;
    }
    Ok(())
}

impl Drop for VfioInterrupts {
    fn drop(&mut self) {
        if let Some(i) = &self.intx
            && let Err(e) = self.routing.unregister_irqfd(&i.trigger, i.gsi)
        {
            log::warn!("detaching INTx irqfd on GSI {}: {e}", i.gsi);
        }
    }
}
