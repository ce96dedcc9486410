//! MSI-X emulation: the capability's control word, the vector table and the PBA, kept by the
//! VMM even for passthrough devices (the guest must not program the host's interrupt
//! addresses). Every change that alters what a vector delivers comes out as a
//! [`VectorRoute`], which the device applies to its [`super::irq::MsiVectors`].
//!
//! Pending bits: while a vector is masked its eventfd keeps counting and KVM delivers on unmask
//! (see `irq.rs`), so the PBA here reads as zeros.

use serde::{Deserialize, Serialize};

use super::config::CAP_ID_MSIX;
use super::irq::{MsiMessage, VectorRoute};

pub const MSIX_CAP_SIZE: usize = 12;
/// Offset of the message-control word inside the capability.
pub const MSIX_CONTROL: usize = 2;
pub const MSIX_ENABLE: u16 = 1 << 15;
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
const MSIX_TABLE_SIZE_MASK: u16 = 0x7ff;
pub const MSIX_ENTRY_SIZE: u64 = 16;
const ENTRY_MASKED: u32 = 1;
/// The spec's maximum: 2048 vectors.
pub const MSIX_MAX_VECTORS: u16 = 2048;

/// Where the table and PBA live, as the capability's read-only words say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixCapability {
    pub table_size: u16,
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

impl MsixCapability {
    /// Decodes a capability as a device reports it (12 bytes from its ID byte on).
    pub fn parse(b: &[u8; MSIX_CAP_SIZE]) -> Self {
        let control = u16::from_le_bytes([b[2], b[3]]);
        let table = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let pba = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        MsixCapability {
            table_size: (control & MSIX_TABLE_SIZE_MASK) + 1,
            table_bar: (table & 0x7) as u8,
            table_offset: table & !0x7,
            pba_bar: (pba & 0x7) as u8,
            pba_offset: pba & !0x7,
        }
    }

    /// The capability bytes for an emulated device, with the next pointer left zero.
    pub fn bytes(&self) -> [u8; MSIX_CAP_SIZE] {
        let mut b = [0u8; MSIX_CAP_SIZE];
        b[0] = CAP_ID_MSIX;
        let control = self.table_size.saturating_sub(1) & MSIX_TABLE_SIZE_MASK;
        b[2..4].copy_from_slice(&control.to_le_bytes());
        let table = (self.table_offset & !0x7) | u32::from(self.table_bar & 0x7);
        b[4..8].copy_from_slice(&table.to_le_bytes());
        let pba = (self.pba_offset & !0x7) | u32::from(self.pba_bar & 0x7);
        b[8..12].copy_from_slice(&pba.to_le_bytes());
        b
    }

    /// Write mask for [`MsixCapability::bytes`]: only enable and function mask are writable.
    pub fn write_mask() -> [u8; MSIX_CAP_SIZE] {
        let mut m = [0u8; MSIX_CAP_SIZE];
        m[2..4].copy_from_slice(&(MSIX_ENABLE | MSIX_FUNCTION_MASK).to_le_bytes());
        m
    }

    pub fn table_len(&self) -> u64 {
        u64::from(self.table_size) * MSIX_ENTRY_SIZE
    }

    pub fn pba_len(&self) -> u64 {
        u64::from(self.table_size).div_ceil(64) * 8
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    pub control: u32,
}

impl Default for MsixEntry {
    // Vectors come out of reset masked.
    fn default() -> Self {
        MsixEntry {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            control: ENTRY_MASKED,
        }
    }
}

impl MsixEntry {
    fn word(&self, i: usize) -> u32 {
        [self.addr_lo, self.addr_hi, self.data, self.control][i]
    }

    fn set_word(&mut self, i: usize, v: u32) {
        match i {
            0 => self.addr_lo = v,
            1 => self.addr_hi = v,
            2 => self.data = v,
            // Only the mask bit of vector control is defined; the rest is reserved (zero).
            _ => self.control = v & ENTRY_MASKED,
        }
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

/// Table, control bits and (all-zero) PBA, as plain data for migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub table: Vec<MsixEntry>,
    pub enabled: bool,
    pub function_masked: bool,
}

#[derive(Clone, Debug)]
pub struct MsixConfig {
    cap: MsixCapability,
    state: MsixState,
}

impl MsixConfig {
    pub fn new(cap: MsixCapability) -> Self {
        let n = cap.table_size.clamp(1, MSIX_MAX_VECTORS);
        MsixConfig {
            cap: MsixCapability {
                table_size: n,
                ..cap
            },
            state: MsixState {
                table: vec![MsixEntry::default(); usize::from(n)],
                enabled: false,
                function_masked: false,
            },
        }
    }

    pub fn capability(&self) -> &MsixCapability {
        &self.cap
    }

    pub fn enabled(&self) -> bool {
        self.state.enabled
    }

    /// The control word as the guest reads it.
    pub fn control(&self) -> u16 {
        let mut c = (self.cap.table_size - 1) & MSIX_TABLE_SIZE_MASK;
        if self.state.enabled {
            c |= MSIX_ENABLE;
        }
        if self.state.function_masked {
            c |= MSIX_FUNCTION_MASK;
        }
        c
    }

    /// A guest write of the control word; returns the vectors whose delivery changed.
    pub fn set_control(&mut self, control: u16) -> Vec<VectorRoute> {
        let before = self.effective_all();
        self.state.enabled = control & MSIX_ENABLE != 0;
        self.state.function_masked = control & MSIX_FUNCTION_MASK != 0;
        self.diff(&before, 0..self.state.table.len())
    }

    /// What vector `i` delivers now: nothing unless MSI-X is on and neither the function nor
    /// the vector is masked.
    fn effective(&self, i: usize) -> Option<MsiMessage> {
        let e = self.state.table.get(i)?;
        let live =
            self.state.enabled && !self.state.function_masked && e.control & ENTRY_MASKED == 0;
        live.then(|| e.message())
    }

    fn effective_all(&self) -> Vec<Option<MsiMessage>> {
        (0..self.state.table.len())
            .map(|i| self.effective(i))
            .collect()
    }

    fn diff(
        &self,
        before: &[Option<MsiMessage>],
        range: std::ops::Range<usize>,
    ) -> Vec<VectorRoute> {
        range
            .filter_map(|i| {
                let now = self.effective(i);
                (now != before[i]).then_some(VectorRoute {
                    vector: i as u16,
                    msg: now,
                })
            })
            .collect()
    }

    /// Every vector's current delivery, e.g. to re-wire after a restore or a re-enable.
    pub fn routes(&self) -> Vec<VectorRoute> {
        (0..self.state.table.len())
            .map(|i| VectorRoute {
                vector: i as u16,
                msg: self.effective(i),
            })
            .collect()
    }

    /// Reads the table at `offset` (relative to the table start); any width, bytes outside
    /// the table read as zero.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (k, b) in data.iter_mut().enumerate() {
            *b = self.table_byte(offset + k as u64).unwrap_or(0);
        }
    }

    fn table_byte(&self, off: u64) -> Option<u8> {
        let e = self
            .state
            .table
            .get(usize::try_from(off / MSIX_ENTRY_SIZE).ok()?)?;
        let word = e.word((off % MSIX_ENTRY_SIZE / 4) as usize);
        Some(word.to_le_bytes()[(off % 4) as usize])
    }

    /// A guest write to the table; returns the vectors whose delivery changed.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Vec<VectorRoute> {
        let before = self.effective_all();
        let n = self.state.table.len() as u64;
        let (first, mut last) = (offset / MSIX_ENTRY_SIZE, offset / MSIX_ENTRY_SIZE);
        for (k, &v) in data.iter().enumerate() {
            let off = offset + k as u64;
            let idx = off / MSIX_ENTRY_SIZE;
            if idx >= n {
                break;
            }
            last = idx;
            let e = &mut self.state.table[idx as usize];
            let w = (off % MSIX_ENTRY_SIZE / 4) as usize;
            let mut bytes = e.word(w).to_le_bytes();
            bytes[(off % 4) as usize] = v;
            e.set_word(w, u32::from_le_bytes(bytes));
        }
        if first >= n {
            return Vec::new();
        }
        self.diff(&before, first as usize..last as usize + 1)
    }

    /// Reads the pending-bit array (`offset` relative to its start).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }

    pub fn state(&self) -> MsixState {
        self.state.clone()
    }

    /// Loads a saved table; the caller re-applies [`MsixConfig::routes`].
    pub fn restore(&mut self, state: &MsixState) -> Result<(), MsixError> {
        if state.table.len() != self.state.table.len() {
            return Err(MsixError::TableSize {
                saved: state.table.len(),
                ours: self.state.table.len(),
            });
        }
        self.state = state.clone();
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsixError {
    #[error("saved MSI-X table has {saved} vectors, this device has {ours}")]
    TableSize { saved: usize, ours: usize },
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pci::irq::MsiVectors;
    use crate::pci::testing::FakeRouting;

    fn cap(n: u16) -> MsixCapability {
        MsixCapability {
            table_size: n,
            table_bar: 2,
            table_offset: 0x1000,
            pba_bar: 2,
            pba_offset: 0x3800,
        }
    }

    fn program(m: &mut MsixConfig, v: u64, addr: u64, data: u32) -> Vec<VectorRoute> {
        let base = v * MSIX_ENTRY_SIZE;
        let mut r = m.write_table(base, &addr.to_le_bytes());
        r.extend(m.write_table(base + 8, &data.to_le_bytes()));
        r
    }

    fn msg(address: u64, data: u32) -> Option<MsiMessage> {
        Some(MsiMessage { address, data })
    }

    #[test]
    fn capability_round_trip() {
        let c = cap(5);
        let b = c.bytes();
        assert_eq!(b[0], CAP_ID_MSIX);
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 4);
        assert_eq!(MsixCapability::parse(&b), c);
        assert_eq!(c.table_len(), 80);
        assert_eq!(cap(65).pba_len(), 16);
    }

    #[test]
    fn nothing_routes_until_enabled_and_unmasked() {
        let mut m = MsixConfig::new(cap(4));
        assert!(
            program(&mut m, 1, 0xfee0_1000, 0x41).is_empty(),
            "masked at reset"
        );
        assert!(
            m.set_control(MSIX_ENABLE).is_empty(),
            "entries still masked"
        );
        let r = m.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(
            r,
            vec![VectorRoute {
                vector: 1,
                msg: msg(0xfee0_1000, 0x41)
            }]
        );
        let r = m.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        assert_eq!(
            r,
            vec![VectorRoute {
                vector: 1,
                msg: None
            }]
        );
        let r = m.set_control(MSIX_ENABLE);
        assert_eq!(r.len(), 1);
        assert_eq!(m.control(), MSIX_ENABLE | 3);
        let r = m.write_table(16 + 12, &1u32.to_le_bytes());
        assert_eq!(
            r,
            vec![VectorRoute {
                vector: 1,
                msg: None
            }]
        );
    }

    #[test]
    fn table_reads_back_and_ignores_reserved_bits() {
        let mut m = MsixConfig::new(cap(2));
        program(&mut m, 1, 0x1_fee0_0000, 0x55);
        m.write_table(16 + 12, &0xffff_fffeu32.to_le_bytes());
        let mut b = [0u8; 16];
        m.read_table(16, &mut b);
        assert_eq!(
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            0x1_fee0_0000
        );
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 0x55);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 0);
        let mut w = [0u8; 2];
        m.read_table(8 + 16, &mut w);
        assert_eq!(w, [0x55, 0]);
        m.read_table(32, &mut b);
        assert_eq!(b, [0; 16], "past the table");
        assert!(m.write_table(64, &[1; 4]).is_empty());
    }

    #[test]
    fn reprogramming_a_live_vector_reroutes_it() {
        let mut m = MsixConfig::new(cap(2));
        m.set_control(MSIX_ENABLE);
        m.write_table(12, &0u32.to_le_bytes());
        let r = m.write_table(8, &0x99u32.to_le_bytes());
        assert_eq!(
            r,
            vec![VectorRoute {
                vector: 0,
                msg: msg(0, 0x99)
            }]
        );
    }

    #[test]
    fn routes_reach_the_routing_table() {
        let fake = Arc::new(FakeRouting::default());
        let mut m = MsixConfig::new(cap(3));
        let mut v = MsiVectors::new(fake.clone(), 3).unwrap();
        for i in 0..3 {
            program(&mut m, i, 0xfee0_0000 + (i << 12), 0x30 + i as u32);
            m.write_table(i * 16 + 12, &0u32.to_le_bytes());
        }
        v.apply(&m.set_control(MSIX_ENABLE)).unwrap();
        let routes = fake.routes();
        assert_eq!(routes.len(), 3);
        assert_eq!(routes[&v.gsi(2).unwrap()].data, 0x32);
        assert_eq!(fake.irqfds().len(), 3);
        v.apply(&m.write_table(16 + 12, &1u32.to_le_bytes()))
            .unwrap();
        assert!(!fake.irqfds().contains(&v.gsi(1).unwrap()));
        v.apply(&m.set_control(0)).unwrap();
        assert!(fake.routes().is_empty() && fake.irqfds().is_empty());
    }

    #[test]
    fn state_restores_routes() {
        let mut m = MsixConfig::new(cap(2));
        program(&mut m, 0, 0xfee0_0000, 7);
        m.write_table(12, &0u32.to_le_bytes());
        m.set_control(MSIX_ENABLE);
        let mut d = MsixConfig::new(cap(2));
        d.restore(&m.state()).unwrap();
        assert_eq!(d.routes(), m.routes());
        assert_eq!(d.routes()[0].msg, msg(0xfee0_0000, 7));
        assert!(MsixConfig::new(cap(3)).restore(&m.state()).is_err());
    }
}
