//! Plain MSI capability emulation (for devices without MSI-X): control, address, data and the
//! optional per-vector mask, held as the capability's bytes with a write mask. Like MSI-X, every
//! change in what a vector delivers comes out as a [`VectorRoute`].

use serde::{Deserialize, Serialize};

use super::config::CAP_ID_MSI;
use super::irq::{MsiMessage, VectorRoute};

pub const MSI_CONTROL: usize = 2;
const MSI_ENABLE: u16 = 1 << 0;
const MSI_MMC_SHIFT: u16 = 1;
const MSI_MME_SHIFT: u16 = 4;
const MSI_64BIT: u16 = 1 << 7;
const MSI_PER_VECTOR_MASK: u16 = 1 << 8;
const ADDRESS_LO: usize = 4;

/// The layout a device's MSI capability has, from its read-only control bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiCapability {
    pub is_64bit: bool,
    pub per_vector_mask: bool,
    /// log2 of the vectors the device can send (0..=5).
    pub log2_capable: u8,
}

impl MsiCapability {
    pub fn from_control(control: u16) -> Self {
        MsiCapability {
            is_64bit: control & MSI_64BIT != 0,
            per_vector_mask: control & MSI_PER_VECTOR_MASK != 0,
            log2_capable: ((control >> MSI_MMC_SHIFT) & 0x7).min(5) as u8,
        }
    }

    fn read_only_control(&self) -> u16 {
        u16::from(self.log2_capable) << MSI_MMC_SHIFT
            | if self.is_64bit { MSI_64BIT } else { 0 }
            | if self.per_vector_mask {
                MSI_PER_VECTOR_MASK
            } else {
                0
            }
    }

    fn data_offset(&self) -> usize {
        if self.is_64bit { 12 } else { 8 }
    }

    fn mask_offset(&self) -> Option<usize> {
        self.per_vector_mask.then(|| self.data_offset() + 4)
    }

    /// Bytes the capability spans, from its ID byte.
    pub fn size(&self) -> usize {
        match self.mask_offset() {
            Some(m) => m + 8,
            None => self.data_offset() + 2,
        }
    }

    pub fn max_vectors(&self) -> u32 {
        1 << self.log2_capable
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiState {
    /// The capability's bytes from its ID byte on (the ID and next bytes are unused here).
    pub regs: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsiError {
    #[error("saved MSI capability is {saved} bytes, this device's is {ours}")]
    Size { saved: usize, ours: usize },
}

#[derive(Clone, Debug)]
pub struct MsiConfig {
    cap: MsiCapability,
    regs: Vec<u8>,
    wmask: Vec<u8>,
}

fn put(buf: &mut [u8], offset: usize, bytes: &[u8]) {
    buf[offset..offset + bytes.len()].copy_from_slice(bytes);
}

impl MsiConfig {
    pub fn new(cap: MsiCapability) -> Self {
        let size = cap.size();
        let mut regs = vec![0; size];
        let mut wmask = vec![0; size];
        regs[0] = CAP_ID_MSI;
        put(
            &mut regs,
            MSI_CONTROL,
            &cap.read_only_control().to_le_bytes(),
        );
        let control_w = MSI_ENABLE | (0x7 << MSI_MME_SHIFT);
        put(&mut wmask, MSI_CONTROL, &control_w.to_le_bytes());
        put(&mut wmask, ADDRESS_LO, &0xffff_fffcu32.to_le_bytes());
        if cap.is_64bit {
            put(&mut wmask, ADDRESS_LO + 4, &[0xff; 4]);
        }
        put(&mut wmask, cap.data_offset(), &[0xff; 2]);
        if let Some(m) = cap.mask_offset() {
            let bits = ((1u64 << cap.max_vectors()) - 1) as u32;
            put(&mut wmask, m, &bits.to_le_bytes());
        }
        MsiConfig { cap, regs, wmask }
    }

    pub fn capability(&self) -> &MsiCapability {
        &self.cap
    }

    fn u16_at(&self, o: usize) -> u16 {
        u16::from_le_bytes([self.regs[o], self.regs[o + 1]])
    }

    fn u32_at(&self, o: usize) -> u32 {
        u32::from_le_bytes([
            self.regs[o],
            self.regs[o + 1],
            self.regs[o + 2],
            self.regs[o + 3],
        ])
    }

    pub fn enabled(&self) -> bool {
        self.u16_at(MSI_CONTROL) & MSI_ENABLE != 0
    }

    /// Vectors the guest enabled (Multiple Message Enable, capped by what the device can do).
    pub fn vectors(&self) -> u32 {
        let mme = (self.u16_at(MSI_CONTROL) >> MSI_MME_SHIFT) & 0x7;
        (1u32 << mme.min(5)).min(self.cap.max_vectors())
    }

    fn effective(&self, i: u32) -> Option<MsiMessage> {
        let n = self.vectors();
        if !self.enabled() || i >= n {
            return None;
        }
        if let Some(m) = self.cap.mask_offset()
            && self.u32_at(m) & (1 << i) != 0
        {
            return None;
        }
        let hi = if self.cap.is_64bit {
            self.u32_at(ADDRESS_LO + 4)
        } else {
            0
        };
        let data = u32::from(self.u16_at(self.cap.data_offset()));
        Some(MsiMessage {
            address: u64::from(hi) << 32 | u64::from(self.u32_at(ADDRESS_LO)),
            // With several vectors the device puts the vector number in the low data bits.
            data: (data & !(n - 1)) | i,
        })
    }

    /// What each of the device's possible vectors delivers now.
    pub fn routes(&self) -> Vec<VectorRoute> {
        (0..self.cap.max_vectors())
            .map(|i| VectorRoute {
                vector: i as u16,
                msg: self.effective(i),
            })
            .collect()
    }

    /// Reads capability bytes at `offset` (relative to the capability's ID byte).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (k, b) in data.iter_mut().enumerate() {
            *b = self.regs.get(offset + k).copied().unwrap_or(0);
        }
    }

    /// A guest write; returns the vectors whose delivery changed.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Vec<VectorRoute> {
        let before = self.routes();
        for (k, &v) in data.iter().enumerate() {
            let o = offset + k;
            if o >= self.regs.len() {
                break;
            }
            let m = self.wmask[o];
            self.regs[o] = (self.regs[o] & !m) | (v & m);
        }
        self.routes()
            .into_iter()
            .zip(before)
            .filter(|(now, old)| now != old)
            .map(|(now, _)| now)
            .collect()
    }

    pub fn state(&self) -> MsiState {
        MsiState {
            regs: self.regs.clone(),
        }
    }

    /// Loads saved registers; the caller re-applies [`MsiConfig::routes`].
    pub fn restore(&mut self, state: &MsiState) -> Result<(), MsiError> {
        if state.regs.len() != self.regs.len() {
            return Err(MsiError::Size {
                saved: state.regs.len(),
                ours: self.regs.len(),
            });
        }
        self.regs.copy_from_slice(&state.regs);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTRL_64_MASK_4: u16 = MSI_64BIT | MSI_PER_VECTOR_MASK | (2 << MSI_MMC_SHIFT);

    #[test]
    fn layouts() {
        let sizes = [
            (0, 10),
            (MSI_64BIT, 14),
            (MSI_PER_VECTOR_MASK, 20),
            (CTRL_64_MASK_4, 24),
        ];
        for (ctrl, size) in sizes {
            assert_eq!(MsiCapability::from_control(ctrl).size(), size);
        }
        assert_eq!(MsiCapability::from_control(CTRL_64_MASK_4).max_vectors(), 4);
    }

    #[test]
    fn enable_multiple_vectors_and_mask() {
        let mut m = MsiConfig::new(MsiCapability::from_control(CTRL_64_MASK_4));
        m.write(ADDRESS_LO, &0xfee0_1003u32.to_le_bytes());
        m.write(ADDRESS_LO + 4, &0u32.to_le_bytes());
        assert!(m.write(12, &0x4123u16.to_le_bytes()).is_empty());
        let mut b = [0u8; 4];
        m.read(ADDRESS_LO, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xfee0_1000, "low two bits read-only");
        // Enable with MME = 2 (4 vectors); the read-only capability bits stay.
        let r = m.write(
            MSI_CONTROL,
            &(MSI_ENABLE | (2 << MSI_MME_SHIFT)).to_le_bytes(),
        );
        assert_eq!(r.len(), 4);
        assert_eq!(r[3].msg.unwrap().data, 0x4123);
        assert_eq!(r[1].msg.unwrap().data, 0x4121);
        let mut c = [0u8; 2];
        m.read(MSI_CONTROL, &mut c);
        assert_eq!(
            u16::from_le_bytes(c),
            CTRL_64_MASK_4 | MSI_ENABLE | (2 << MSI_MME_SHIFT)
        );
        let r = m.write(16, &0b10u32.to_le_bytes());
        assert_eq!(
            r,
            vec![VectorRoute {
                vector: 1,
                msg: None
            }]
        );
        let r = m.write(MSI_CONTROL, &0u16.to_le_bytes());
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn single_vector_32bit_and_state() {
        let mut m = MsiConfig::new(MsiCapability::from_control(0));
        m.write(ADDRESS_LO, &0xfee0_0000u32.to_le_bytes());
        m.write(8, &0x31u16.to_le_bytes());
        // MME beyond what the device can do is capped at its one vector.
        let r = m.write(
            MSI_CONTROL,
            &(MSI_ENABLE | (3 << MSI_MME_SHIFT)).to_le_bytes(),
        );
        let want = Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x31,
        });
        assert_eq!(
            r,
            vec![VectorRoute {
                vector: 0,
                msg: want
            }]
        );
        let mut d = MsiConfig::new(MsiCapability::from_control(0));
        d.restore(&m.state()).unwrap();
        assert_eq!(d.routes(), m.routes());
        let big = MsiConfig::new(MsiCapability::from_control(MSI_64BIT));
        assert!(big.clone().restore(&m.state()).is_err());
    }
}
