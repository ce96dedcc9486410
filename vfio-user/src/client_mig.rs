//! The client's migration commands: DEVICE_FEATURE (migration flags, device state, data size,
//! pre-copy info, DMA logging) and the in-band data stream (MIG_DATA_READ/WRITE).
//!
//! Source:
//!
//! 1. `set_mig_state(PreCopy)`, then `mig_data_read` until `NotNow`, once per round.
//! 2. At switchover: `set_mig_state(PreCopyP2p)` (or `RunningP2p`), then `StopCopy`.
//! 3. `mig_data_read` until `End`; later `Stop`.
//!
//! Destination: `set_mig_state(Resuming)`, `mig_data_write` everything, `Stop` (validates),
//! `RunningP2p`, `Running`. Any failed SET: `get_mig_state`, try `Running`, else `reset`.
//! sampledev's README spells this out.

use crate::client::Client;
use crate::error::{CommandName, Error, Result, malformed};
use crate::fsm::MigState;
use crate::header::Command;
use crate::migmsg::{
    DeviceFeature, DmaLoggingReport, DmaLoggingStart, DmaRange, MIG_DATA_HEADER_SIZE, MigDataRead,
    MigStateData, PrecopyInfo, decode_mig_data_reply, decode_u64, encode_mig_data,
};
use crate::vfio::*;

/// What one MIG_DATA_READ gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigData {
    /// Stream bytes. Fewer than asked means the device had no more at that moment: in
    /// STOP_COPY the next read returns `End`; in PRE_COPY, `NotNow` or more data later.
    Bytes(Vec<u8>),
    /// An empty reply: in STOP_COPY, the permanent end of the stream.
    End,
    /// The device refused with ENOMSG: in PRE_COPY, nothing to read now (initial and dirty
    /// bytes are both 0); more may come as the device runs.
    NotNow,
}

/// Errnos with which a device says "no such feature" (the kernel uses ENOTTY; a server that
/// lacks DEVICE_FEATURE altogether answers ENOTSUP).
fn is_unsupported(e: &Error) -> bool {
    matches!(e.errno(), Some(libc::ENOTTY | libc::ENOTSUP | libc::ENOSYS))
}

impl Client {
    /// One VFIO_USER_DEVICE_FEATURE: `flags` is the feature index with GET, SET and/or PROBE;
    /// `max_reply_data` bounds the data of the reply. Returns the reply's data (for SET and
    /// PROBE the server echoes the request data).
    pub fn device_feature(
        &self,
        flags: u32,
        data: &[u8],
        max_reply_data: usize,
    ) -> Result<Vec<u8>> {
        let max_reply = DeviceFeature::HEADER_SIZE + max_reply_data.max(data.len());
        let argsz = u32::try_from(max_reply)
            .map_err(|_| Error::InvalidArgument(format!("reply room of {max_reply} bytes")))?;
        let req = DeviceFeature {
            argsz,
            flags,
            data: data.to_vec(),
        };
        let m = self.request(Command::DeviceFeature, &req.encode(), &[], max_reply, 0)?;
        let reply = DeviceFeature::decode(&m.payload)?;
        if reply.index() != req.index() {
            return Err(malformed(format!(
                "asked for feature {}, reply is for feature {}",
                req.index(),
                reply.index()
            )));
        }
        Ok(reply.data)
    }

    /// PROBE: whether the device supports feature `index` with the operations in `ops`
    /// (`VFIO_DEVICE_FEATURE_GET` and/or `_SET`).
    pub fn probe_feature(&self, index: u32, ops: u32) -> Result<bool> {
        let flags = index | ops | VFIO_DEVICE_FEATURE_PROBE;
        match self.device_feature(flags, &[], 0) {
            Ok(_) => Ok(true),
            // EINVAL: the feature exists but not with these operations.
            Err(e) if is_unsupported(&e) || e.errno() == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The device's migration flags (`VFIO_MIGRATION_STOP_COPY | _P2P | _PRE_COPY`), or `None`
    /// if it cannot migrate with protocol v2.
    pub fn migration_features(&self) -> Result<Option<u64>> {
        let flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION;
        let data = match self.device_feature(flags, &[], 8) {
            Ok(d) => d,
            Err(e) if is_unsupported(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mig = decode_u64(&data, "MIGRATION")?;
        if mig & VFIO_MIGRATION_STOP_COPY == 0 {
            return Err(malformed(format!(
                "device claims migration flags {mig:#x} without STOP_COPY"
            )));
        }
        Ok(Some(mig))
    }

    /// Moves the device to `state`; the device walks the intermediate arcs. On an error the
    /// device may be in the original state or any state on the way: call `get_mig_state`.
    pub fn set_mig_state(&self, state: MigState) -> Result<()> {
        let d = MigStateData {
            device_state: state as u32,
            data_fd: -1,
        };
        let flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
        self.device_feature(flags, &d.encode(), MigStateData::SIZE)?;
        Ok(())
    }

    pub fn get_mig_state(&self) -> Result<MigState> {
        let flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
        let data = self.device_feature(flags, &[], MigStateData::SIZE)?;
        let d = MigStateData::decode(&data)?;
        MigState::from_u32(d.device_state)
            .ok_or_else(|| malformed(format!("unknown migration state {}", d.device_state)))
    }

    /// Reads up to `max` bytes (at most the negotiated transfer size) of the migration stream.
    pub fn mig_data_read(&self, max: usize) -> Result<MigData> {
        let size = max.min(self.max_data_xfer_size());
        if size == 0 {
            return Err(Error::InvalidArgument("zero-byte migration read".into()));
        }
        let req = MigDataRead {
            argsz: (MIG_DATA_HEADER_SIZE + size) as u32,
            size: size as u32,
        };
        let limit = MIG_DATA_HEADER_SIZE + size;
        let m = match self.request(Command::MigDataRead, &req.encode(), &[], limit, 0) {
            Ok(m) => m,
            Err(e) if e.errno() == Some(libc::ENOMSG) => return Ok(MigData::NotNow),
            Err(e) => return Err(e),
        };
        let data = decode_mig_data_reply(&m.payload, size)?;
        Ok(if data.is_empty() {
            MigData::End
        } else {
            MigData::Bytes(data.to_vec())
        })
    }

    /// Writes `data` to the stream of a RESUMING device, in transfers the server accepts.
    pub fn mig_data_write(&self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(self.max_data_xfer_size()) {
            let m = self.request(Command::MigDataWrite, &encode_mig_data(chunk), &[], 0, 0)?;
            if !m.payload.is_empty() {
                return Err(malformed(format!(
                    "{} reply carries {} bytes",
                    CommandName(Command::MigDataWrite as u16),
                    m.payload.len()
                )));
            }
        }
        Ok(())
    }

    /// Pre-copy estimates (valid only in PRE_COPY and PRE_COPY_P2P). vfio-user has no data_fd
    /// for `VFIO_MIG_GET_PRECOPY_INFO`: this is GET on feature 12 returning
    /// `struct vfio_precopy_info` (an extension that sampledev implements).
    pub fn precopy_info(&self) -> Result<PrecopyInfo> {
        self.offered(VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOV2)?;
        let flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOV2;
        let data = self.device_feature(flags, &[], PrecopyInfo::SIZE)?;
        PrecopyInfo::decode(&data)
    }

    /// Estimated bytes the device will produce in STOP_COPY (feature 9, the kernel's layout).
    pub fn mig_data_size(&self) -> Result<u64> {
        self.offered(VFIO_DEVICE_FEATURE_MIG_DATA_SIZE)?;
        let flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DATA_SIZE;
        let data = self.device_feature(flags, &[], 8)?;
        decode_u64(&data, "MIG_DATA_SIZE")
    }

    /// Extension features are asked only of servers that offer them.
    fn offered(&self, feature: u32) -> Result<()> {
        if self.version().server.offers_feature(feature) {
            Ok(())
        } else {
            Err(Error::NotOffered(feature))
        }
    }

    /// Whether the device can log its DMA writes.
    pub fn dma_logging_supported(&self) -> Result<bool> {
        self.probe_feature(
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            VFIO_DEVICE_FEATURE_SET,
        )
    }

    /// Starts logging DMA writes to `ranges` (none: all writes) at a `page_size` hint; returns
    /// the page size the device chose.
    pub fn dma_logging_start(&self, page_size: u64, ranges: &[DmaRange]) -> Result<u64> {
        if ranges.len() > VFIO_DMA_LOGGING_MAX_RANGES {
            return Err(Error::InvalidArgument(format!(
                "{} logging ranges; at most {VFIO_DMA_LOGGING_MAX_RANGES}",
                ranges.len()
            )));
        }
        let req = DmaLoggingStart {
            page_size,
            ranges: ranges.to_vec(),
        };
        let flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START;
        let data = self.device_feature(flags, &req.encode(), 0)?;
        let reply = DmaLoggingStart::decode(&data)?;
        if reply.page_size == 0 || !reply.page_size.is_power_of_two() {
            return Err(malformed(format!(
                "device chose page size {}",
                reply.page_size
            )));
        }
        Ok(reply.page_size)
    }

    pub fn dma_logging_stop(&self) -> Result<()> {
        let flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP;
        self.device_feature(flags, &[], 0)?;
        Ok(())
    }

    /// Reads and clears the DMA write log of `[iova, iova+length)` at `page_size` granularity:
    /// bit `i % 64` of word `i / 64` is page `i` of the range (KVM's layout). Split into
    /// requests whose bitmaps fit one message.
    pub fn dma_logging_report(&self, iova: u64, length: u64, page_size: u64) -> Result<Vec<u64>> {
        let whole = DmaLoggingReport {
            iova,
            length,
            page_size,
        };
        let bad = || Error::InvalidArgument(format!("report {iova:#x}+{length:#x} / {page_size}"));
        let pages = whole.pages().ok_or_else(bad)?;
        let words = usize::try_from(pages.div_ceil(64)).map_err(|_| bad())?;
        let mut out = Vec::new();
        out.try_reserve_exact(words).map_err(|_| bad())?;
        // Whole words per request, so that the pieces concatenate.
        let room = self
            .max_data_xfer_size()
            .saturating_sub(DeviceFeature::HEADER_SIZE + DmaLoggingReport::SIZE);
        let pages_per_req = ((room / 8) as u64 * 64).max(64);
        let mut done = 0u64;
        while done < pages {
            let n = (pages - done).min(pages_per_req);
            let start = iova + done * page_size;
            let len = (n * page_size).min(length - done * page_size);
            out.extend(self.report_piece(start, len, page_size)?);
            done += n;
        }
        Ok(out)
    }

    fn report_piece(&self, iova: u64, length: u64, page_size: u64) -> Result<Vec<u64>> {
        let req = DmaLoggingReport {
            iova,
            length,
            page_size,
        };
        // pages() succeeded for the whole range, so it does for this part.
        let bytes = req.bitmap_bytes().unwrap_or(0) as usize;
        let flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT;
        let data = self.device_feature(flags, &req.encode(), DmaLoggingReport::SIZE + bytes)?;
        let (echo, bitmap) = DmaLoggingReport::decode(&data)?;
        if echo != req || bitmap.len() != bytes {
            return Err(malformed(format!(
                "DMA log report for {req:?} came back as {echo:?} with {} bitmap bytes",
                bitmap.len()
            )));
        }
        Ok(bitmap
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
            .collect())
    }
}
