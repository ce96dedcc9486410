//! MSI-X table and PBA (in BAR0) and the eventfds that deliver each vector. A vector fires
//! only when MSI-X is enabled, the function is not masked and its own mask bit is clear;
//! otherwise it becomes pending and fires when that changes, as PCI requires.

use std::fs::File;
use std::io::Write;

use crate::regs::{MSIX_ENTRY_SIZE, MSIX_VECTORS};

const VECTORS: usize = MSIX_VECTORS as usize;
const WORDS_PER_ENTRY: usize = (MSIX_ENTRY_SIZE / 4) as usize;
const VECTOR_CTRL_WORD: usize = 3;
const VECTOR_MASKED: u32 = 1;
pub const TABLE_SIZE: u64 = VECTORS as u64 * MSIX_ENTRY_SIZE;
pub const PBA_SIZE: u64 = 8;
/// Table words: address low/high, data and vector control of each vector.
pub const TABLE_WORDS: usize = VECTORS * WORDS_PER_ENTRY;
pub type MsixTable = [u32; TABLE_WORDS];

/// The MSI-X delivery gates: two in config space, one from the migration state.
#[derive(Debug, Clone, Copy)]
pub struct MsixControl {
    pub enabled: bool,
    pub function_masked: bool,
    /// Stopped or P2P-quiesced: the device must not interrupt; vectors stay pending.
    pub quiesced: bool,
}

pub struct Msix {
    table: MsixTable,
    pending: u64,
    triggers: Vec<Option<File>>,
}

impl Default for Msix {
    fn default() -> Self {
        Self::new()
    }
}

impl Msix {
    pub fn new() -> Msix {
        let mut m = Msix {
            table: [0; VECTORS * WORDS_PER_ENTRY],
            pending: 0,
            triggers: (0..VECTORS).map(|_| None).collect(),
        };
        m.reset();
        m
    }

    /// Power-on table: every vector masked, nothing pending. Eventfds stay attached: they
    /// belong to the client's interrupt setup, not to device state.
    pub fn reset(&mut self) {
        self.table = [0; VECTORS * WORDS_PER_ENTRY];
        for v in 0..VECTORS {
            self.table[v * WORDS_PER_ENTRY + VECTOR_CTRL_WORD] = VECTOR_MASKED;
        }
        self.pending = 0;
    }

    /// Reads the table at `off` (relative to its start); false for a bad size or alignment.
    pub fn table_read(&self, off: u64, buf: &mut [u8]) -> bool {
        let Some(first) = word_index(off, buf.len(), TABLE_SIZE) else {
            return false;
        };
        for (i, chunk) in buf.chunks_mut(4).enumerate() {
            chunk.copy_from_slice(&self.table[first + i].to_le_bytes());
        }
        true
    }

    pub fn table_write(&mut self, off: u64, data: &[u8], ctl: MsixControl) -> bool {
        let Some(first) = word_index(off, data.len(), TABLE_SIZE) else {
            return false;
        };
        for (i, chunk) in data.chunks(4).enumerate() {
            let mut w = [0u8; 4];
            w.copy_from_slice(chunk);
            self.table[first + i] = u32::from_le_bytes(w);
        }
        // Unmasking a vector releases its pending interrupt.
        self.deliver_pending(ctl);
        true
    }

    pub fn pba_read(&self, off: u64, buf: &mut [u8]) -> bool {
        if word_index(off, buf.len(), PBA_SIZE).is_none() {
            return false;
        }
        let bytes = self.pending.to_le_bytes();
        buf.copy_from_slice(&bytes[off as usize..off as usize + buf.len()]);
        true
    }

    pub fn set_trigger(&mut self, vector: usize, fd: Option<File>) {
        if let Some(slot) = self.triggers.get_mut(vector) {
            *slot = fd;
        }
    }

    pub fn clear_triggers(&mut self) {
        self.triggers.iter_mut().for_each(|t| *t = None);
    }

    /// The device raises `vector`: deliver it now or leave it pending.
    pub fn signal(&mut self, vector: usize, ctl: MsixControl) {
        if vector >= VECTORS {
            return;
        }
        if self.deliverable(vector, ctl) {
            self.fire(vector);
        } else {
            self.pending |= 1 << vector;
        }
    }

    /// Fires `vector`'s eventfd regardless of masking (SET_IRQS software trigger).
    pub fn fire(&mut self, vector: usize) {
        let Some(Some(f)) = self.triggers.get_mut(vector) else {
            log::debug!("MSI-X vector {vector} raised with no eventfd attached");
            return;
        };
        if let Err(e) = f.write_all(&1u64.to_ne_bytes()) {
            log::warn!("MSI-X vector {vector}: eventfd write failed: {e}");
        }
    }

    pub fn deliver_pending(&mut self, ctl: MsixControl) {
        for v in 0..VECTORS {
            if self.pending & (1 << v) != 0 && self.deliverable(v, ctl) {
                self.pending &= !(1 << v);
                self.fire(v);
            }
        }
    }

    fn deliverable(&self, vector: usize, ctl: MsixControl) -> bool {
        let masked = self.table[vector * WORDS_PER_ENTRY + VECTOR_CTRL_WORD] & VECTOR_MASKED != 0;
        ctl.enabled && !ctl.function_masked && !ctl.quiesced && !masked
    }

    /// The table and pending bits, for a migration snapshot.
    pub fn snapshot(&self) -> (MsixTable, u64) {
        (self.table, self.pending)
    }

    /// Restores what `snapshot` returned; eventfds stay (they are the client's).
    pub fn restore(&mut self, table: MsixTable, pending: u64) {
        self.table = table;
        self.pending = pending & ((1 << VECTORS) - 1);
    }
}

/// First 32-bit word of a 4- or 8-byte naturally aligned access inside `limit` bytes.
fn word_index(off: u64, len: usize, limit: u64) -> Option<usize> {
    let ok = matches!(len, 4 | 8)
        && off.is_multiple_of(len as u64)
        && off.checked_add(len as u64).is_some_and(|end| end <= limit);
    ok.then_some((off / 4) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ON: MsixControl = MsixControl {
        enabled: true,
        function_masked: false,
        quiesced: false,
    };

    #[test]
    fn masked_vector_goes_pending_until_unmasked() {
        let mut m = Msix::new();
        m.signal(1, ON);
        let mut pba = [0u8; 8];
        assert!(m.pba_read(0, &mut pba));
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        // Clear the mask bit of vector 1.
        assert!(m.table_write(MSIX_ENTRY_SIZE + 12, &0u32.to_le_bytes(), ON));
        assert!(m.pba_read(0, &mut pba));
        assert_eq!(u64::from_le_bytes(pba), 0);
    }

    #[test]
    fn quiesced_device_keeps_vectors_pending() {
        let mut m = Msix::new();
        let q = MsixControl {
            quiesced: true,
            ..ON
        };
        assert!(m.table_write(12, &0u32.to_le_bytes(), q));
        m.signal(0, q);
        assert_eq!(m.snapshot().1, 1);
        m.deliver_pending(ON);
        assert_eq!(m.snapshot().1, 0);
    }

    #[test]
    fn bad_table_accesses_refused() {
        let mut m = Msix::new();
        let mut b = [0u8; 2];
        assert!(!m.table_read(0, &mut b));
        assert!(!m.table_write(2, &[0; 4], ON));
        assert!(!m.table_write(TABLE_SIZE, &[0; 4], ON));
        let mut q = [0u8; 8];
        assert!(m.table_read(8, &mut q));
    }
}
