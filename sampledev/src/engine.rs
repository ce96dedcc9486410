//! The DMA engine: a worker thread that runs one FILL or COPY at a time against client
//! memory, then completes it in the device core (status, counter, state, MSI-X).

use std::io;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::{self, JoinHandle};

use crate::device::{Shared, lock};
use crate::dma::DmaSpace;
use crate::pattern::fill_word;
use crate::regs::{CMD_COPY, CMD_FILL, ErrorCode, MAX_DMA_LEN};

/// Bounce-buffer size: big enough to stream well, small enough to not matter.
const CHUNK: usize = 64 * 1024;

/// A snapshot of the DMA registers taken when DMA_CMD was written.
#[derive(Debug, Clone)]
pub struct DmaJob {
    pub cmd: u64,
    pub src: u64,
    pub dst: u64,
    pub len: u64,
    pub pattern: u64,
    pub vector: usize,
    pub bus_master: bool,
    pub generation: u64,
}

impl DmaJob {
    /// Register-level checks, before any memory is looked at.
    fn validate(&self) -> Result<(), ErrorCode> {
        if !self.bus_master {
            return Err(ErrorCode::NoBusMaster);
        }
        if self.cmd != CMD_FILL && self.cmd != CMD_COPY {
            return Err(ErrorCode::BadCommand);
        }
        if self.len == 0 || self.len > MAX_DMA_LEN {
            return Err(ErrorCode::BadLength);
        }
        let overlap = self.src < self.dst.saturating_add(self.len)
            && self.dst < self.src.saturating_add(self.len);
        if self.cmd == CMD_COPY && overlap {
            return Err(ErrorCode::Overlap);
        }
        Ok(())
    }

    /// Moves the bytes; every range is checked in full first, so a fault writes nothing.
    fn run(&self, dma: &mut DmaSpace) -> Result<(), ErrorCode> {
        let fault = |e| {
            log::info!("{e}");
            ErrorCode::DmaFault
        };
        if self.cmd == CMD_COPY {
            dma.check(self.src, self.len, false).map_err(fault)?;
        }
        dma.check(self.dst, self.len, true).map_err(fault)?;
        let mut buf = vec![0u8; CHUNK.min(self.len as usize)];
        let mut pos = 0u64;
        while pos < self.len {
            let n = (self.len - pos).min(buf.len() as u64) as usize;
            let chunk = &mut buf[..n];
            if self.cmd == CMD_COPY {
                dma.read(self.src + pos, chunk).map_err(fault)?;
            } else {
                fill_chunk(self.pattern, pos, chunk);
            }
            dma.write(self.dst + pos, chunk).map_err(fault)?;
            pos += n as u64;
        }
        Ok(())
    }
}

/// Fill bytes for destination offsets `pos..pos+out.len()`, a word at a time.
fn fill_chunk(seed: u64, pos: u64, out: &mut [u8]) {
    let mut i = 0;
    while i < out.len() {
        let o = pos + i as u64;
        let word = fill_word(seed, o / 8).to_le_bytes();
        let start = (o % 8) as usize;
        let n = (8 - start).min(out.len() - i);
        out[i..i + n].copy_from_slice(&word[start..start + n]);
        i += n;
    }
}

pub struct Engine {
    tx: Option<Sender<DmaJob>>,
    worker: Option<JoinHandle<()>>,
}

impl Engine {
    pub fn start(shared: Arc<Shared>) -> io::Result<Engine> {
        let (tx, rx) = channel();
        let worker = thread::Builder::new()
            .name("dma-engine".into())
            .spawn(move || worker(shared, rx))?;
        Ok(Engine {
            tx: Some(tx),
            worker: Some(worker),
        })
    }

    pub fn submit(&self, job: DmaJob) {
        if let Some(tx) = &self.tx {
            // Fails only if the worker is gone, and then the device is shutting down.
            let _ = tx.send(job);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn worker(shared: Arc<Shared>, rx: Receiver<DmaJob>) {
    for job in rx {
        // Holding the DMA space through the run and completion is what makes DMA_UNMAP and
        // reset wait for in-flight DMA, completion interrupt included.
        let mut dma = lock(&shared.dma);
        let current = lock(&shared.core).generation == job.generation;
        let result = current.then(|| job.validate().and_then(|()| job.run(&mut dma)));
        let mut core = lock(&shared.core);
        match result {
            Some(r) => core.complete(&job, r),
            None => log::debug!("dropping a DMA started before reset or restore"),
        }
        // Arcs into P2P and STOP wait for this to reach zero.
        core.dma_jobs = core.dma_jobs.saturating_sub(1);
        drop(core);
        shared.idle.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::fill_byte;

    #[test]
    fn fill_chunk_matches_fill_byte() {
        let mut b = [0u8; 37];
        fill_chunk(5, 3, &mut b);
        for (i, &x) in b.iter().enumerate() {
            assert_eq!(x, fill_byte(5, 3 + i as u64));
        }
    }

    #[test]
    fn validation() {
        let ok = DmaJob {
            cmd: CMD_COPY,
            src: 0,
            dst: 0x1000,
            len: 0x1000,
            pattern: 0,
            vector: 0,
            bus_master: true,
            generation: 0,
        };
        assert_eq!(ok.validate(), Ok(()));
        let overlap = DmaJob {
            dst: 0x800,
            ..ok.clone()
        };
        assert_eq!(overlap.validate(), Err(ErrorCode::Overlap));
        let bad = DmaJob {
            cmd: 7,
            ..ok.clone()
        };
        assert_eq!(bad.validate(), Err(ErrorCode::BadCommand));
        let empty = DmaJob {
            len: 0,
            ..ok.clone()
        };
        assert_eq!(empty.validate(), Err(ErrorCode::BadLength));
        let nobm = DmaJob {
            bus_master: false,
            ..ok
        };
        assert_eq!(nobm.validate(), Err(ErrorCode::NoBusMaster));
    }
}
