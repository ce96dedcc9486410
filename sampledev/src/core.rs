//! The device's state, apart from any transport: config space, BAR0 registers, MSI-X and the
//! internal state. Migration saves and restores exactly this.

use crate::bar0::Registers;
use crate::config::ConfigSpace;
use crate::engine::DmaJob;
use crate::msix::{Msix, MsixControl};
use crate::regs::{
    DEFAULT_STATE_SEED, ErrorCode, STATUS_BUSY, STATUS_DONE, STATUS_ERROR, STATUS_ERROR_MASK,
    STATUS_ERROR_SHIFT,
};
use crate::state::InternalState;

pub struct Core {
    pub config: ConfigSpace,
    pub regs: Registers,
    pub msix: Msix,
    pub state: InternalState,
    /// Bumped by reset so that a DMA started before it cannot complete after it.
    pub generation: u64,
}

impl Core {
    pub fn new(state_size: u64) -> Core {
        Core {
            config: ConfigSpace::new(),
            regs: Registers::default(),
            msix: Msix::new(),
            state: InternalState::new(state_size, DEFAULT_STATE_SEED),
            generation: 0,
        }
    }

    /// Power-on state. DMA mappings and interrupt eventfds belong to the client and stay.
    pub fn reset(&mut self) {
        self.generation += 1;
        self.config = ConfigSpace::new();
        self.regs = Registers::default();
        self.msix.reset();
        self.state = InternalState::new(self.state.size(), DEFAULT_STATE_SEED);
    }

    pub fn msix_control(&self) -> MsixControl {
        MsixControl {
            enabled: self.config.msix_enabled(),
            function_masked: self.config.msix_function_masked(),
        }
    }

    /// Reports `code` to the guest in STATUS and counts it.
    pub fn set_error(&mut self, code: ErrorCode) {
        log::debug!("device error {code:?}");
        let s = self.regs.status & !STATUS_ERROR_MASK;
        self.regs.status = s | STATUS_ERROR | ((code as u64) << STATUS_ERROR_SHIFT);
        self.regs.error_count += 1;
    }

    /// Latches DMA_CMD: the returned job goes to the engine. None if the engine is busy.
    pub fn start_dma(&mut self, cmd: u64) -> Option<DmaJob> {
        if self.regs.status & STATUS_BUSY != 0 {
            self.set_error(ErrorCode::Busy);
            return None;
        }
        let r = &mut self.regs;
        r.status = (r.status & !(STATUS_DONE | STATUS_ERROR | STATUS_ERROR_MASK)) | STATUS_BUSY;
        r.dma_cmd = cmd;
        Some(DmaJob {
            cmd,
            src: r.dma_src,
            dst: r.dma_dst,
            len: r.dma_len,
            pattern: r.dma_pattern,
            vector: r.dma_vector as usize,
            bus_master: self.config.bus_master(),
            generation: self.generation,
        })
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
        let ctl = self.msix_control();
        self.msix.signal(job.vector, ctl);
    }

    pub fn config_write(&mut self, off: usize, data: &[u8]) {
        self.config.write(off, data);
        // Enabling MSI-X or clearing the function mask releases pending vectors.
        let ctl = self.msix_control();
        self.msix.deliver_pending(ctl);
    }
}
