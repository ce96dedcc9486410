//! The DEVICE record: everything of the device except the internal state's words — the BAR0
//! registers, config space, MSI-X table and pending bits, the state seed and a DMA that
//! waits for RUNNING. Decoding validates every value, so applying cannot fail.

use crate::bar0::Registers;
use crate::config::{CONFIG_SIZE, ConfigSpace};
use crate::core::Core;
use crate::engine::DmaJob;
use crate::msix::{MsixTable, TABLE_WORDS};
use crate::options::IrqMode;
use crate::regs::MSIX_VECTORS;
use crate::state::InternalState;

const REG_WORDS: usize = 11;
const CONFIG_WORDS: usize = CONFIG_SIZE / 8;
const MSIX_WORDS: usize = TABLE_WORDS / 2;
const JOB_WORDS: usize = 8;
/// Payload words of a DEVICE record.
pub const SNAPSHOT_WORDS: usize = REG_WORDS + 1 + CONFIG_WORDS + MSIX_WORDS + 1 + JOB_WORDS;

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub regs: Registers,
    pub seed: u64,
    pub config: ConfigSpace,
    pub msix_table: MsixTable,
    pub msix_pending: u64,
    pub queued: Option<DmaJob>,
}

fn reg_words(r: &Registers) -> [u64; REG_WORDS] {
    [
        r.status,
        r.dma_src,
        r.dma_dst,
        r.dma_len,
        r.dma_pattern,
        r.dma_cmd,
        r.dma_vector,
        r.counter,
        r.window_offset,
        r.error_count,
        r.scratch,
    ]
}

fn regs_from(w: &[u64]) -> Registers {
    Registers {
        status: w[0],
        dma_src: w[1],
        dma_dst: w[2],
        dma_len: w[3],
        dma_pattern: w[4],
        dma_cmd: w[5],
        dma_vector: w[6],
        counter: w[7],
        window_offset: w[8],
        error_count: w[9],
        scratch: w[10],
    }
}

fn job_words(j: &Option<DmaJob>) -> [u64; JOB_WORDS] {
    match j {
        None => [0; JOB_WORDS],
        Some(j) => [
            1,
            j.cmd,
            j.src,
            j.dst,
            j.len,
            j.pattern,
            j.vector as u64,
            u64::from(j.bus_master),
        ],
    }
}

fn job_from(w: &[u64]) -> Result<Option<DmaJob>, String> {
    match w[0] {
        0 => Ok(None),
        1 if w[6] < u64::from(MSIX_VECTORS) && w[7] <= 1 => Ok(Some(DmaJob {
            cmd: w[1],
            src: w[2],
            dst: w[3],
            len: w[4],
            pattern: w[5],
            vector: w[6] as usize,
            bus_master: w[7] == 1,
            // Set by apply() to the restoring device's generation.
            generation: 0,
        })),
        _ => Err(format!("bad waiting DMA in snapshot: {w:?}")),
    }
}

impl Snapshot {
    pub fn capture(core: &Core) -> Snapshot {
        let (msix_table, msix_pending) = core.msix.snapshot();
        Snapshot {
            regs: core.regs.clone(),
            seed: core.state.seed(),
            config: core.config.clone(),
            msix_table,
            msix_pending,
            queued: core.queued.clone(),
        }
    }

    pub fn to_words(&self) -> Vec<u64> {
        let mut v = Vec::with_capacity(SNAPSHOT_WORDS);
        v.extend(reg_words(&self.regs));
        v.push(self.seed);
        v.extend(crate::mig::stream::words(self.config.bytes()));
        v.extend(
            self.msix_table
                .chunks_exact(2)
                .map(|p| u64::from(p[0]) | (u64::from(p[1]) << 32)),
        );
        v.push(self.msix_pending);
        v.extend(job_words(&self.queued));
        v
    }

    /// Decodes and validates against a device whose state has `state_size` bytes and whose
    /// interrupt is `irq`.
    pub fn from_words(w: &[u64], state_size: u64, irq: IrqMode) -> Result<Snapshot, String> {
        if w.len() != SNAPSHOT_WORDS {
            return Err(format!("device record of {} words", w.len()));
        }
        let (regs_w, rest) = w.split_at(REG_WORDS);
        let regs = regs_from(regs_w);
        if regs.dma_vector >= u64::from(MSIX_VECTORS) {
            return Err(format!("DMA_VECTOR {} in snapshot", regs.dma_vector));
        }
        if !regs.window_offset.is_multiple_of(8) || regs.window_offset >= state_size {
            return Err(format!("STATE_WINDOW_OFFSET {:#x}", regs.window_offset));
        }
        let seed = rest[0];
        let (cfg_w, rest) = rest[1..].split_at(CONFIG_WORDS);
        let mut bytes = [0u8; CONFIG_SIZE];
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(cfg_w) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        let mut config = ConfigSpace::with_irq(irq);
        config.restore(&bytes)?;
        let (msix_w, rest) = rest.split_at(MSIX_WORDS);
        let mut msix_table = [0u32; TABLE_WORDS];
        for (pair, word) in msix_table.chunks_exact_mut(2).zip(msix_w) {
            pair[0] = *word as u32;
            pair[1] = (word >> 32) as u32;
        }
        Ok(Snapshot {
            regs,
            seed,
            config,
            msix_table,
            msix_pending: rest[0],
            queued: job_from(&rest[1..])?,
        })
    }

    /// Replaces the device's state with this snapshot and `state`. Whatever the device did
    /// before is overwritten: RESUMING may not assume a reset preceded it.
    pub fn apply(self, core: &mut Core, state: InternalState) {
        core.generation += 1;
        core.regs = self.regs;
        core.config = self.config;
        core.msix.restore(self.msix_table, self.msix_pending);
        core.state = state;
        let generation = core.generation;
        core.queued = self.queued.map(|j| DmaJob { generation, ..j });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_validation() {
        let mut core = Core::new(4096);
        core.regs.counter = 5;
        core.regs.dma_vector = 3;
        core.regs.window_offset = 8;
        core.state.reseed(99);
        core.queued = core.start_dma(1);
        let s = Snapshot::capture(&core);
        let w = s.to_words();
        assert_eq!(w.len(), SNAPSHOT_WORDS);
        let d = Snapshot::from_words(&w, 4096, IrqMode::Msix).unwrap();
        assert_eq!(d.to_words(), w);
        let mut other = Core::new(4096);
        d.apply(&mut other, InternalState::new(4096, 99));
        assert_eq!(other.regs.counter, 5);
        assert!(other.queued.as_ref().is_some_and(|j| j.generation == 1));
        let mut bad = w.clone();
        bad[6] = 4;
        assert!(Snapshot::from_words(&bad, 4096, IrqMode::Msix).is_err());
        assert!(Snapshot::from_words(&w, 8, IrqMode::Msix).is_err());
        // An INTx device takes no MSI-X device's record.
        assert!(Snapshot::from_words(&w, 4096, IrqMode::Intx).is_err());
        let mut alien = w;
        alien[REG_WORDS + 1] ^= 1;
        assert!(Snapshot::from_words(&alien, 4096, IrqMode::Msix).is_err());
    }
}
