//! The deprecated v1 migration region (`struct vfio_device_migration_info` at offset 0 of a
//! region with type capability 3 / subtype 1), read and written with REGION_READ/WRITE.
//!
//! Save loop: `pending_bytes` → `data_offset` (prepares the next chunk) → `data_size` → read
//! the data; repeat while pending_bytes is non-zero. Resume loop: `data_offset` → write the
//! data there → write `data_size`. See [`V1Region::read_chunk`] and [`V1Region::write_chunk`].

use crate::client::Client;
use crate::error::{Error, Result, malformed};
use crate::header::MAX_DATA_XFER_SIZE;
use crate::region::RegionCap;
use crate::vfio::{
    VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED, VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
};

pub const V1_DEVICE_STATE: u64 = 0;
pub const V1_PENDING_BYTES: u64 = 8;
pub const V1_DATA_OFFSET: u64 = 16;
pub const V1_DATA_SIZE: u64 = 24;
/// Size of `struct vfio_device_migration_info`; the data section lies beyond it.
pub const V1_INFO_SIZE: u64 = 32;

/// A device's v1 migration region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V1Region {
    pub index: u32,
    pub size: u64,
}

impl V1Region {
    /// Looks through the device's regions for the v1 migration type capability.
    pub fn find(c: &Client) -> Result<Option<V1Region>> {
        for index in 0..c.device_info()?.num_regions {
            let info = match c.region_info(index) {
                Ok(i) => i,
                Err(Error::Remote { .. }) => continue,
                Err(e) => return Err(e),
            };
            let is_mig = info.caps.iter().any(|cap| {
                *cap == RegionCap::Type {
                    region_type: VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
                    subtype: VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED,
                }
            });
            if is_mig && info.size > V1_INFO_SIZE && info.readable() && info.writable() {
                return Ok(Some(V1Region {
                    index,
                    size: info.size,
                }));
            }
        }
        Ok(None)
    }

    fn read_u64(&self, c: &Client, off: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        c.region_read(self.index, off, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// `device_state` bits (`VFIO_DEVICE_STATE_V1_*`).
    pub fn device_state(&self, c: &Client) -> Result<u32> {
        let mut b = [0u8; 4];
        c.region_read(self.index, V1_DEVICE_STATE, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes `device_state`; a refusal leaves the device in the state `device_state` reads.
    pub fn set_device_state(&self, c: &Client, state: u32) -> Result<()> {
        c.region_write(self.index, V1_DEVICE_STATE, &state.to_le_bytes())
    }

    pub fn pending_bytes(&self, c: &Client) -> Result<u64> {
        self.read_u64(c, V1_PENDING_BYTES)
    }

    /// Reading it is what makes a saving device prepare its next chunk.
    pub fn data_offset(&self, c: &Client) -> Result<u64> {
        self.read_u64(c, V1_DATA_OFFSET)
    }

    pub fn data_size(&self, c: &Client) -> Result<u64> {
        self.read_u64(c, V1_DATA_SIZE)
    }

    pub fn set_data_size(&self, c: &Client, n: u64) -> Result<()> {
        c.region_write(self.index, V1_DATA_SIZE, &n.to_le_bytes())
    }

    /// The data section `[offset, offset+len)` must lie inside the region, past the header.
    fn check_data(&self, offset: u64, len: u64) -> Result<()> {
        let ok = offset >= V1_INFO_SIZE
            && len <= MAX_DATA_XFER_SIZE as u64
            && offset.checked_add(len).is_some_and(|end| end <= self.size);
        if ok {
            Ok(())
        } else {
            Err(malformed(format!(
                "v1 data section {offset:#x}+{len:#x} outside the {:#x}-byte region",
                self.size
            )))
        }
    }

    /// One step of the save loop: `None` once pending_bytes is 0 (in stop-and-copy the end;
    /// in pre-copy nothing for now), else the next chunk.
    pub fn read_chunk(&self, c: &Client) -> Result<Option<Vec<u8>>> {
        if self.pending_bytes(c)? == 0 {
            return Ok(None);
        }
        let offset = self.data_offset(c)?;
        let len = self.data_size(c)?;
        self.check_data(offset, len)?;
        let mut data = vec![0u8; len as usize];
        if !data.is_empty() {
            c.region_read(self.index, offset, &mut data)?;
        }
        Ok(Some(data))
    }

    /// One step of the resume loop: hands `data` (at most the data section) to the device.
    pub fn write_chunk(&self, c: &Client, data: &[u8]) -> Result<()> {
        let offset = self.data_offset(c)?;
        self.check_data(offset, data.len() as u64)?;
        c.region_write(self.index, offset, data)?;
        self.set_data_size(c, data.len() as u64)
    }

    /// Largest chunk `write_chunk` accepts for a data section at `data_offset`.
    pub fn max_chunk(&self, data_offset: u64) -> usize {
        let room = self.size.saturating_sub(data_offset);
        room.min(MAX_DATA_XFER_SIZE as u64) as usize
    }
}
