//! The device's state, apart from any transport: config space, BAR0 registers, MSI-X and the
//! internal state. Migration saves and restores exactly this (the INTx line is a function of
//! STATUS, and its eventfds and mask are the client's).

use crate::bar0::Registers;
use crate::config::{ConfigSpace, STATUS as PCI_STATUS, STATUS_INTERRUPT};
use crate::engine::DmaJob;
use crate::intx::Intx;
use crate::msix::{Msix, MsixControl};
use crate::options::IrqMode;
use crate::regs::{
    DEFAULT_STATE_SEED, ErrorCode, STATUS_BUSY, STATUS_DONE, STATUS_ERROR, STATUS_ERROR_MASK,
    STATUS_ERROR_SHIFT,
};
use crate::state::InternalState;

/// How far the device may act on its own; the migration state decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    Running,
    /// RUNNING_P2P, PRE_COPY_P2P: no new DMA (it waits in `queued`), no interrupts.
    Quiesced,
    /// STOP, STOP_COPY, RESUMING, ERROR: the same, and the state does not change.
    Stopped,
}

/// Migration status the BAR0 registers show; the migration layer keeps it current.
#[derive(Debug, Clone, Default)]
pub struct MigStatus {
    pub state: u64,
    pub invalid_arcs: u64,
    pub failed_arcs: u64,
    pub caps: u64,
}

pub struct Core {
    pub config: ConfigSpace,
    pub regs: Registers,
    pub msix: Msix,
    /// Used only by an INTx function (`config.irq()`).
    pub intx: Intx,
    pub state: InternalState,
    /// Bumped by reset and restore so that a DMA started before cannot complete after.
    pub generation: u64,
    pub run: RunMode,
    /// A DMA latched while the device could not start it; it runs on return to RUNNING.
    pub queued: Option<DmaJob>,
    /// Jobs handed to the engine and not finished; arcs that quiesce wait for zero.
    pub dma_jobs: u64,
    pub mig: MigStatus,
}

impl Core {
    /// An MSI-X function.
    pub fn new(state_size: u64) -> Core {
        Self::with_irq(state_size, IrqMode::Msix)
    }

    pub fn with_irq(state_size: u64, irq: IrqMode) -> Core {
        Core {
            config: ConfigSpace::with_irq(irq),
            regs: Registers::default(),
            msix: Msix::new(),
            intx: Intx::default(),
            state: InternalState::new(state_size, DEFAULT_STATE_SEED),
            generation: 0,
            run: RunMode::Running,
            queued: None,
            dma_jobs: 0,
            mig: MigStatus::default(),
        }
    }

    /// Power-on state. DMA mappings and interrupt eventfds belong to the client and stay;
    /// the migration counters are diagnostics of the process and stay too.
    pub fn reset(&mut self) {
        self.generation += 1;
        self.config = ConfigSpace::with_irq(self.config.irq());
        self.regs = Registers::default();
        self.msix.reset();
        self.state = InternalState::new(self.state.size(), DEFAULT_STATE_SEED);
        self.run = RunMode::Running;
        self.queued = None;
    }

    pub fn msix_control(&self) -> MsixControl {
        MsixControl {
            enabled: self.config.msix_enabled(),
            function_masked: self.config.msix_function_masked(),
            quiesced: self.run != RunMode::Running,
        }
    }

    pub fn irq(&self) -> IrqMode {
        self.config.irq()
    }

    /// INTx pending: the function has INTx and STATUS shows DONE or ERROR, until the guest
    /// clears them (write 1 to clear). PCI's Interrupt Status bit, which INTx Disable does
    /// not affect.
    pub fn intx_pending(&self) -> bool {
        self.irq() == IrqMode::Intx && self.regs.status & (STATUS_DONE | STATUS_ERROR) != 0
    }

    /// The INTx line as the client sees it: pending, not disabled in COMMAND, and the
    /// device allowed to interrupt (not quiesced or stopped by migration).
    pub fn intx_level(&self) -> bool {
        self.intx_pending() && !self.config.intx_disabled() && self.run == RunMode::Running
    }

    /// Signals the INTx trigger if the line is high and not masked; called after anything
    /// that can raise the line.
    pub fn sync_intx(&mut self) {
        let level = self.intx_level();
        self.intx.update(level);
    }

    /// The client unmasked INTx (its unmask eventfd, or SET_IRQS UNMASK).
    pub fn unmask_intx(&mut self) {
        let level = self.intx_level();
        self.intx.unmask(level);
    }

    /// Reads config space, with the Interrupt Status bit computed.
    pub fn config_read(&self, off: usize, buf: &mut [u8]) {
        self.config.read(off, buf);
        let bit = STATUS_INTERRUPT.to_le_bytes();
        let at = PCI_STATUS..PCI_STATUS + 2;
        for (i, b) in buf.iter_mut().enumerate() {
            if at.contains(&(off + i)) && self.intx_pending() {
                *b |= bit[off + i - PCI_STATUS];
            }
        }
    }

    /// Back to RUNNING: pending vectors fire (or the INTx line is raised again), and a DMA
    /// that waited is returned to be run.
    pub fn resume(&mut self) -> Option<DmaJob> {
        self.run = RunMode::Running;
        let ctl = self.msix_control();
        self.msix.deliver_pending(ctl);
        self.sync_intx();
        let job = self.queued.take()?;
        self.dma_jobs += 1;
        Some(job)
    }

    /// Reports `code` to the guest in STATUS and counts it.
    pub fn set_error(&mut self, code: ErrorCode) {
        log::debug!("device error {code:?}");
        let s = self.regs.status & !STATUS_ERROR_MASK;
        self.regs.status = s | STATUS_ERROR | ((code as u64) << STATUS_ERROR_SHIFT);
        self.regs.error_count += 1;
    }

    /// Latches DMA_CMD: the returned job goes to the engine. None if the engine is busy, or
    /// if the device is quiesced or stopped: then the job waits in `queued`.
    pub fn start_dma(&mut self, cmd: u64) -> Option<DmaJob> {
        if self.regs.status & STATUS_BUSY != 0 {
            self.set_error(ErrorCode::Busy);
            return None;
        }
        let r = &mut self.regs;
        r.status = (r.status & !(STATUS_DONE | STATUS_ERROR | STATUS_ERROR_MASK)) | STATUS_BUSY;
        r.dma_cmd = cmd;
        let job = DmaJob {
            cmd,
            src: r.dma_src,
            dst: r.dma_dst,
            len: r.dma_len,
            pattern: r.dma_pattern,
            vector: r.dma_vector as usize,
            bus_master: self.config.bus_master(),
            generation: self.generation,
        };
        if self.run != RunMode::Running {
            log::info!(
                "DMA latched while {:?}: it starts on return to RUNNING",
                self.run
            );
            self.queued = Some(job);
            return None;
        }
        self.dma_jobs += 1;
        Some(job)
    }

    /// Finishes `job`: status, counter, internal state, then the completion interrupt.
    pub fn complete(&mut self, job: &DmaJob, result: Result<(), ErrorCode>) {
        if job.generation != self.generation {
            log::debug!("dropping completion of a DMA started before reset");
            return;
        }
        self.regs.status &= !STATUS_BUSY;
        match result {
            Ok(()) => {
                self.regs.counter += 1;
                match self.state.mutate(self.regs.counter) {
                    Ok(()) => self.regs.status |= STATUS_DONE,
                    Err(e) => {
                        log::warn!("{e}");
                        self.set_error(ErrorCode::NoMemory);
                    }
                }
            }
            Err(code) => self.set_error(code),
        }
        if self.irq() == IrqMode::Intx {
            self.sync_intx();
        } else {
            let ctl = self.msix_control();
            self.msix.signal(job.vector, ctl);
        }
    }

    pub fn config_write(&mut self, off: usize, data: &[u8]) {
        self.config.write(off, data);
        // Enabling MSI-X or clearing the function mask releases pending vectors; clearing
        // INTx Disable, a pending INTx.
        let ctl = self.msix_control();
        self.msix.deliver_pending(ctl);
        self.sync_intx();
    }
}
