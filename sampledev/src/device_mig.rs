//! The device's migration and DMA-logging operations, in VFIO terms: the locking and waiting
//! around `mig::Migration` and the DMA log, with no knowledge of messages.

use std::sync::MutexGuard;

use vfio_user::{DmaLoggingReport, DmaLoggingStart, MigState, PrecopyInfo};

use crate::core::Core;
use crate::device::{Device, lock};
use crate::dirtylog::DirtyLog;
use crate::error::Refusal;
use crate::mig::Migration;
use crate::options::MigMode;

impl Device {
    pub fn mig_mode(&self) -> MigMode {
        self.opts.mode
    }

    /// The v2 migration flags advertised (v2 mode only).
    pub fn v2_flags(&self) -> u64 {
        self.opts.v2_flags
    }

    pub fn dma_logging_offered(&self) -> bool {
        self.opts.dma_logging()
    }

    /// Migration then core, once the engine has no job: an arc into P2P or STOP must
    /// complete outstanding DMA before it returns, and while both locks are held no new
    /// job can start.
    fn quiet(&self) -> (MutexGuard<'_, Migration>, MutexGuard<'_, Core>) {
        let mig = lock(&self.shared.mig);
        let core = lock(&self.shared.core);
        let core = self
            .shared
            .idle
            .wait_while(core, |c| c.dma_jobs > 0)
            .unwrap_or_else(|p| p.into_inner());
        (mig, core)
    }

    /// MIG_DEVICE_STATE SET with a raw state number; unknown numbers count as invalid arcs.
    pub fn set_mig_state(&self, raw: u32) -> Result<(), Refusal> {
        let (mut mig, mut core) = self.quiet();
        let Some(target) = MigState::from_u32(raw) else {
            return Err(mig.invalid_raw(&mut core, raw));
        };
        let engine = &self.engine;
        mig.set_state(&mut core, target, &mut |j| engine.submit(j))
    }

    pub fn mig_state(&self) -> MigState {
        lock(&self.shared.mig).state()
    }

    /// `--slow-stop-copy`: each STOP_COPY chunk takes this long, before any lock is taken.
    fn slow_chunk(&self) {
        if let Some(d) = self.opts.slow_stop_copy
            && self.mig_state() == MigState::StopCopy
        {
            std::thread::sleep(d);
        }
    }

    pub fn mig_data_read(&self, max: usize) -> Result<Vec<u8>, Refusal> {
        self.slow_chunk();
        let mut mig = lock(&self.shared.mig);
        let mut core = lock(&self.shared.core);
        mig.read(&mut core, max)
    }

    pub fn mig_data_write(&self, data: &[u8]) -> Result<(), Refusal> {
        lock(&self.shared.mig).write(data)
    }

    pub fn mig_data_size(&self) -> u64 {
        let mig = lock(&self.shared.mig);
        let core = lock(&self.shared.core);
        mig.data_size(&core)
    }

    pub fn precopy_info(&self) -> Result<PrecopyInfo, Refusal> {
        let mig = lock(&self.shared.mig);
        let core = lock(&self.shared.core);
        mig.precopy_info(&core)
    }

    /// Returns the page size chosen (the requested one: any power of two 4 KiB..1 GiB).
    pub fn dma_logging_start(&self, req: &DmaLoggingStart) -> Result<u64, Refusal> {
        let mut dma = lock(&self.shared.dma);
        if dma.log.is_some() {
            return Err(Refusal::new(libc::EBUSY, "DMA logging already started"));
        }
        let log = DirtyLog::start(req)?;
        let ps = log.page_size();
        log::info!(
            "DMA logging started: {} ranges, page size {ps}",
            req.ranges.len()
        );
        dma.log = Some(log);
        Ok(ps)
    }

    pub fn dma_logging_stop(&self) {
        if lock(&self.shared.dma).log.take().is_some() {
            log::info!("DMA logging stopped");
        }
    }

    /// Waits for a running DMA (it holds the DMA space), so its writes are all reported.
    pub fn dma_logging_report(&self, req: &DmaLoggingReport) -> Result<Vec<u64>, Refusal> {
        match &mut lock(&self.shared.dma).log {
            Some(log) => log.report(req),
            None => Err(Refusal::inval("DMA logging is not started")),
        }
    }

    pub(crate) fn v1_read(&self, off: u64, buf: &mut [u8]) -> Result<(), Refusal> {
        if off == vfio_user::V1_DATA_OFFSET {
            self.slow_chunk();
        }
        let mut mig = lock(&self.shared.mig);
        let mut core = lock(&self.shared.core);
        mig.v1_read(&mut core, off, buf)
    }

    pub(crate) fn v1_write(&self, off: u64, data: &[u8]) -> Result<(), Refusal> {
        let (mut mig, mut core) = self.quiet();
        let engine = &self.engine;
        mig.v1_write(&mut core, off, data, &mut |j| engine.submit(j))
    }
}
