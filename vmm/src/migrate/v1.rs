//! The deprecated v1 migration region behind the same [`MigrationDriver`] as v2, for devices
//! that still expose only it. `struct vfio_device_migration_info` sits at offset 0 of the
//! region: `device_state` bits (RUNNING 1, SAVING 2, RESUMING 4), `pending_bytes`,
//! `data_offset` (reading it while saving prepares the next chunk) and `data_size`.
//!
//! v1 has no P2P states and no separate initial/dirty counts: `pending_bytes` stands for both
//! (so "initial data sent" means pending reached 0 once, as QEMU's v1 code had it).

use devices::pci::vfio_backend::{BackendError, MigrationState, VfioBackend};

use super::driver::Result;
use super::driver::{Chunk, MAX_CHUNK, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY, MigrationDriver};

const DEVICE_STATE: u64 = 0;
const PENDING_BYTES: u64 = 8;
const DATA_OFFSET: u64 = 16;
const DATA_SIZE: u64 = 24;
/// Size of `struct vfio_device_migration_info`; the data section lies beyond it.
const INFO_SIZE: u64 = 32;

const RUNNING: u32 = 1 << 0;
const SAVING: u32 = 1 << 1;
const RESUMING: u32 = 1 << 2;
/// SAVING | RESUMING: `VFIO_DEVICE_STATE_IS_ERROR`.
const ERROR: u32 = SAVING | RESUMING;

pub struct V1Driver {
    index: u32,
    size: u64,
    /// A prepared chunk larger than the caller's buffer: (section offset, bytes left).
    partial: Option<(u64, u64)>,
}

fn bits_of(s: MigrationState) -> Result<u32> {
    match s {
        MigrationState::Running => Ok(RUNNING),
        MigrationState::PreCopy => Ok(SAVING | RUNNING),
        MigrationState::StopCopy => Ok(SAVING),
        MigrationState::Stop => Ok(0),
        MigrationState::Resuming => Ok(RESUMING),
        other => Err(BackendError::Invalid(format!(
            "{other:?} has no v1 equivalent"
        ))),
    }
}

fn state_of(bits: u32) -> Result<MigrationState> {
    match bits {
        RUNNING => Ok(MigrationState::Running),
        b if b == SAVING | RUNNING => Ok(MigrationState::PreCopy),
        SAVING => Ok(MigrationState::StopCopy),
        0 => Ok(MigrationState::Stop),
        RESUMING => Ok(MigrationState::Resuming),
        ERROR => Ok(MigrationState::Error),
        other => Err(BackendError::Invalid(format!(
            "v1 device_state {other:#05b}"
        ))),
    }
}

impl V1Driver {
    pub fn new(index: u32, size: u64) -> Result<Self> {
        if size <= INFO_SIZE {
            return Err(BackendError::Invalid(format!(
                "v1 migration region {index} of {size} bytes has no data section"
            )));
        }
        Ok(V1Driver {
            index,
            size,
            partial: None,
        })
    }

    fn read_u64(&self, b: &mut dyn VfioBackend, off: u64) -> Result<u64> {
        let mut w = [0u8; 8];
        b.region_read(self.index, off, &mut w)?;
        Ok(u64::from_le_bytes(w))
    }

    fn device_bits(&self, b: &mut dyn VfioBackend) -> Result<u32> {
        let mut w = [0u8; 4];
        b.region_read(self.index, DEVICE_STATE, &mut w)?;
        Ok(u32::from_le_bytes(w))
    }

    /// The data section `[offset, offset+len)` must lie inside the region, past the header:
    /// the device's word is checked before any access is sized from it.
    fn check_section(&self, offset: u64, len: u64) -> Result<()> {
        let inside = offset >= INFO_SIZE && offset.checked_add(len).is_some_and(|e| e <= self.size);
        if inside {
            Ok(())
        } else {
            Err(BackendError::Invalid(format!(
                "v1 data section {offset:#x}+{len:#x} outside the {:#x}-byte region",
                self.size
            )))
        }
    }

    /// Reads the rest of a prepared chunk into `buf`, as much as fits.
    fn read_partial(&mut self, b: &mut dyn VfioBackend, buf: &mut [u8]) -> Result<Chunk> {
        let Some((offset, left)) = self.partial else {
            return Ok(Chunk::NotNow);
        };
        let n = (left as usize).min(buf.len()).min(MAX_CHUNK);
        b.region_read(self.index, offset, &mut buf[..n])?;
        let left = left - n as u64;
        self.partial = (left > 0).then_some((offset + n as u64, left));
        Ok(Chunk::Data(n))
    }

    /// Has the device prepare its next chunk; `None` when it has nothing (pending 0, or an
    /// empty chunk in pre-copy).
    fn prepare_chunk(&mut self, b: &mut dyn VfioBackend) -> Result<Option<(u64, u64)>> {
        if self.read_u64(b, PENDING_BYTES)? == 0 {
            return Ok(None);
        }
        let offset = self.read_u64(b, DATA_OFFSET)?;
        let len = self.read_u64(b, DATA_SIZE)?;
        self.check_section(offset, len)?;
        Ok((len > 0).then_some((offset, len)))
    }
}

impl MigrationDriver for V1Driver {
    fn protocol(&self) -> &'static str {
        "v1"
    }

    fn flags(&self) -> u64 {
        MIGRATION_STOP_COPY | MIGRATION_PRE_COPY
    }

    fn set_state(&mut self, b: &mut dyn VfioBackend, s: MigrationState) -> Result<()> {
        let bits = bits_of(s)?;
        self.partial = None;
        b.region_write(self.index, DEVICE_STATE, &bits.to_le_bytes())
    }

    fn state(&mut self, b: &mut dyn VfioBackend) -> Result<MigrationState> {
        state_of(self.device_bits(b)?)
    }

    fn read(&mut self, b: &mut dyn VfioBackend, buf: &mut [u8]) -> Result<Chunk> {
        if self.partial.is_some() {
            return self.read_partial(b, buf);
        }
        match self.prepare_chunk(b)? {
            Some(chunk) => {
                self.partial = Some(chunk);
                self.read_partial(b, buf)
            }
            // Pre-copy keeps RUNNING set; without it, nothing pending is the end.
            None if self.device_bits(b)? & RUNNING != 0 => Ok(Chunk::NotNow),
            None => Ok(Chunk::End),
        }
    }

    fn write(&mut self, b: &mut dyn VfioBackend, data: &[u8]) -> Result<()> {
        let mut rest = data;
        while !rest.is_empty() {
            let offset = self.read_u64(b, DATA_OFFSET)?;
            let room = self.size.saturating_sub(offset).min(MAX_CHUNK as u64) as usize;
            let n = rest.len().min(room);
            self.check_section(offset, n as u64)?;
            if n == 0 {
                return Err(BackendError::Invalid("v1 data section has no room".into()));
            }
            b.region_write(self.index, offset, &rest[..n])?;
            b.region_write(self.index, DATA_SIZE, &(n as u64).to_le_bytes())?;
            rest = &rest[n..];
        }
        Ok(())
    }

    fn precopy_info(&mut self, b: &mut dyn VfioBackend) -> Result<(u64, u64)> {
        let pending = self.read_u64(b, PENDING_BYTES)?;
        Ok((pending, 0))
    }

    fn stop_copy_size(&mut self, b: &mut dyn VfioBackend) -> Result<u64> {
        self.read_u64(b, PENDING_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_map_to_bits_and_back() {
        use MigrationState::*;
        for s in [Running, PreCopy, StopCopy, Stop, Resuming] {
            assert_eq!(state_of(bits_of(s).unwrap()).unwrap(), s);
        }
        assert!(bits_of(RunningP2p).is_err());
        assert!(bits_of(Error).is_err());
        assert_eq!(state_of(ERROR).unwrap(), Error);
        assert!(state_of(RESUMING | RUNNING).is_err());
    }
}
