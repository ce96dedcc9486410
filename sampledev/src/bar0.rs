//! BAR0 accesses: the register block, the MSI-X table and the PBA. A bad access never fails
//! the vfio-user request; like hardware, it sets an error in STATUS for the guest to see.

use crate::core::Core;
use crate::engine::DmaJob;
use crate::msix::{PBA_SIZE, TABLE_SIZE};
use crate::regs::*;

/// Register values that are stored (the others are computed on read).
#[derive(Debug, Clone, Default)]
pub struct Registers {
    pub status: u64,
    pub dma_src: u64,
    pub dma_dst: u64,
    pub dma_len: u64,
    pub dma_pattern: u64,
    pub dma_cmd: u64,
    pub dma_vector: u64,
    pub counter: u64,
    pub window_offset: u64,
    pub error_count: u64,
    pub scratch: u64,
}

fn in_range(off: u64, base: u64, size: u64) -> bool {
    off >= base && off - base < size
}

/// A 4- or 8-byte naturally aligned access.
fn aligned(off: u64, len: usize) -> bool {
    matches!(len, 4 | 8) && off.is_multiple_of(len as u64)
}

/// `old` with the bytes at `at` (0 or 4) replaced by `data`.
fn merge(old: u64, at: usize, data: &[u8]) -> u64 {
    let mut b = old.to_le_bytes();
    b[at..at + data.len()].copy_from_slice(data);
    u64::from_le_bytes(b)
}

impl Core {
    /// Reads BAR0; the caller has checked that the access lies inside the BAR.
    pub fn bar0_read(&mut self, off: u64, buf: &mut [u8]) {
        let ok = if in_range(off, MSIX_TABLE_OFFSET, TABLE_SIZE) {
            self.msix.table_read(off - MSIX_TABLE_OFFSET, buf)
        } else if in_range(off, MSIX_PBA_OFFSET, PBA_SIZE) {
            self.msix.pba_read(off - MSIX_PBA_OFFSET, buf)
        } else if off >= REGS_END {
            buf.fill(0);
            true
        } else if aligned(off, buf.len()) {
            let v = self.reg_value(off & !7).to_le_bytes();
            let at = (off & 7) as usize;
            buf.copy_from_slice(&v[at..at + buf.len()]);
            true
        } else {
            false
        };
        if !ok {
            buf.fill(0xff);
            self.set_error(ErrorCode::BadAccess);
        }
    }

    fn reg_value(&self, slot: u64) -> u64 {
        let r = &self.regs;
        match slot {
            REG_ID => (u64::from(ID_VERSION) << 32) | u64::from(ID_MAGIC),
            REG_STATUS => r.status,
            REG_DMA_SRC => r.dma_src,
            REG_DMA_DST => r.dma_dst,
            REG_DMA_LEN => r.dma_len,
            REG_DMA_PATTERN => r.dma_pattern,
            REG_DMA_CMD => r.dma_cmd,
            REG_DMA_VECTOR => r.dma_vector,
            REG_COUNTER => r.counter,
            REG_STATE_SIZE => self.state.size(),
            REG_STATE_WINDOW_OFFSET => r.window_offset,
            REG_STATE_WINDOW_DATA => self.state.word(r.window_offset / 8),
            REG_STATE_SEED => self.state.seed(),
            REG_ERROR_COUNT => r.error_count,
            REG_SCRATCH => r.scratch,
            REG_MIG_STATE => self.mig.state,
            REG_INVALID_ARCS => self.mig.invalid_arcs,
            REG_FAILED_ARCS => self.mig.failed_arcs,
            REG_MIG_CAPS => self.mig.caps,
            REG_STATE_DIGEST => self.state.digest(),
            _ => 0,
        }
    }

    /// Writes BAR0; returns a DMA job when the write started one.
    pub fn bar0_write(&mut self, off: u64, data: &[u8]) -> Option<DmaJob> {
        if in_range(off, MSIX_TABLE_OFFSET, TABLE_SIZE) {
            let ctl = self.msix_control();
            if !self.msix.table_write(off - MSIX_TABLE_OFFSET, data, ctl) {
                self.set_error(ErrorCode::BadAccess);
            }
            return None;
        }
        if off >= REGS_END {
            self.set_error(ErrorCode::ReadOnly);
            return None;
        }
        if !aligned(off, data.len()) {
            self.set_error(ErrorCode::BadAccess);
            return None;
        }
        self.reg_write(off & !7, (off & 7) as usize, data)
    }

    fn reg_write(&mut self, slot: u64, at: usize, data: &[u8]) -> Option<DmaJob> {
        let old = self.reg_value(slot);
        let v = merge(old, at, data);
        let r = &mut self.regs;
        match slot {
            REG_STATUS => {
                // Write-1-to-clear DONE and ERROR (with its code).
                if v & STATUS_DONE != 0 {
                    r.status &= !STATUS_DONE;
                }
                if v & STATUS_ERROR != 0 {
                    r.status &= !(STATUS_ERROR | STATUS_ERROR_MASK);
                }
            }
            REG_DMA_SRC => r.dma_src = v,
            REG_DMA_DST => r.dma_dst = v,
            REG_DMA_LEN => r.dma_len = v,
            REG_DMA_PATTERN => r.dma_pattern = v,
            REG_SCRATCH => r.scratch = v,
            // Only a write reaching the low half starts a command.
            REG_DMA_CMD if at == 0 => return self.start_dma(v),
            REG_DMA_CMD => {}
            REG_DMA_VECTOR if v < u64::from(MSIX_VECTORS) => r.dma_vector = v,
            REG_DMA_VECTOR => self.set_error(ErrorCode::BadVector),
            REG_STATE_WINDOW_OFFSET if v.is_multiple_of(8) && v < self.state.size() => {
                r.window_offset = v
            }
            REG_STATE_WINDOW_OFFSET => self.set_error(ErrorCode::BadStateOffset),
            REG_STATE_WINDOW_DATA => {
                if let Err(e) = self.state.set_word(r.window_offset / 8, v) {
                    log::warn!("{e}");
                    self.set_error(ErrorCode::NoMemory);
                }
            }
            REG_STATE_SEED => self.state.reseed(v),
            _ => self.set_error(ErrorCode::ReadOnly),
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read64(c: &mut Core, off: u64) -> u64 {
        let mut b = [0u8; 8];
        c.bar0_read(off, &mut b);
        u64::from_le_bytes(b)
    }

    fn error_code(c: &mut Core) -> u64 {
        (read64(c, REG_STATUS) & STATUS_ERROR_MASK) >> STATUS_ERROR_SHIFT
    }

    #[test]
    fn id_halves_and_scratch() {
        let mut c = Core::new(4096);
        let mut lo = [0u8; 4];
        c.bar0_read(REG_ID, &mut lo);
        assert_eq!(u32::from_le_bytes(lo), ID_MAGIC);
        c.bar0_write(REG_SCRATCH + 4, &7u32.to_le_bytes());
        assert_eq!(read64(&mut c, REG_SCRATCH), 7 << 32);
    }

    #[test]
    fn bad_values_set_error_status() {
        let mut c = Core::new(4096);
        c.bar0_write(REG_DMA_VECTOR, &9u64.to_le_bytes());
        assert_eq!(error_code(&mut c), ErrorCode::BadVector as u64);
        c.bar0_write(REG_STATE_WINDOW_OFFSET, &4096u64.to_le_bytes());
        assert_eq!(error_code(&mut c), ErrorCode::BadStateOffset as u64);
        c.bar0_write(REG_COUNTER, &1u64.to_le_bytes());
        assert_eq!(error_code(&mut c), ErrorCode::ReadOnly as u64);
        c.bar0_write(REG_SCRATCH + 1, &[0; 2]);
        assert_eq!(error_code(&mut c), ErrorCode::BadAccess as u64);
        assert_eq!(read64(&mut c, REG_ERROR_COUNT), 4);
        c.bar0_write(REG_STATUS, &STATUS_ERROR.to_le_bytes());
        assert_eq!(read64(&mut c, REG_STATUS), 0);
    }

    #[test]
    fn state_window_reads_and_writes_words() {
        let mut c = Core::new(4096);
        c.bar0_write(REG_STATE_WINDOW_OFFSET, &16u64.to_le_bytes());
        let seeded = crate::pattern::state_word(DEFAULT_STATE_SEED, 2);
        assert_eq!(read64(&mut c, REG_STATE_WINDOW_DATA), seeded);
        c.bar0_write(REG_STATE_WINDOW_DATA, &99u64.to_le_bytes());
        assert_eq!(read64(&mut c, REG_STATE_WINDOW_DATA), 99);
    }

    #[test]
    fn dma_cmd_while_busy_is_refused() {
        let mut c = Core::new(4096);
        assert!(c.bar0_write(REG_DMA_CMD, &CMD_FILL.to_le_bytes()).is_some());
        assert!(c.bar0_write(REG_DMA_CMD, &CMD_FILL.to_le_bytes()).is_none());
        assert_eq!(error_code(&mut c), ErrorCode::Busy as u64);
    }
}
