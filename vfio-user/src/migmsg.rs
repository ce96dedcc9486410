//! Payloads of the migration commands: `VFIO_USER_DEVICE_FEATURE` (16) with the feature data
//! of migration and DMA logging, `VFIO_USER_MIG_DATA_READ` (17) and `VFIO_USER_MIG_DATA_WRITE`
//! (18). Layouts from libvfio-user `docs/vfio-user.rst`; MIG_DATA_SIZE and PRECOPY_INFO use
//! the kernel's structures (see `vfio.rs`).

use crate::error::{Result, malformed};
use crate::header::MAX_DATA_XFER_SIZE;
use crate::vfio::{
    VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK, VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET, VFIO_DMA_LOGGING_MAX_RANGES,
};
use crate::wire::{PutLe, Reader};

/// `{u32 argsz; u32 flags; u8 data[]}`: the request and the reply of DEVICE_FEATURE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFeature {
    /// Request: the largest reply payload accepted. Reply: the reply payload size.
    pub argsz: u32,
    pub flags: u32,
    pub data: Vec<u8>,
}

impl DeviceFeature {
    pub const HEADER_SIZE: usize = 8;
    const KNOWN_FLAGS: u32 = VFIO_DEVICE_FEATURE_MASK
        | VFIO_DEVICE_FEATURE_GET
        | VFIO_DEVICE_FEATURE_SET
        | VFIO_DEVICE_FEATURE_PROBE;

    pub fn index(&self) -> u32 {
        self.flags & VFIO_DEVICE_FEATURE_MASK
    }
    pub fn get(&self) -> bool {
        self.flags & VFIO_DEVICE_FEATURE_GET != 0
    }
    pub fn set(&self) -> bool {
        self.flags & VFIO_DEVICE_FEATURE_SET != 0
    }
    pub fn probe(&self) -> bool {
        self.flags & VFIO_DEVICE_FEATURE_PROBE != 0
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::HEADER_SIZE + self.data.len());
        v.put_u32(self.argsz);
        v.put_u32(self.flags);
        v.extend_from_slice(&self.data);
        v
    }

    /// Decodes and checks the flags: no unknown bits, GET and SET together only with PROBE.
    pub fn decode(p: &[u8]) -> Result<DeviceFeature> {
        let mut r = Reader::new(p, "DEVICE_FEATURE");
        let f = DeviceFeature {
            argsz: r.u32()?,
            flags: r.u32()?,
            data: r.rest().to_vec(),
        };
        if f.flags & !Self::KNOWN_FLAGS != 0 {
            return Err(malformed(format!("DEVICE_FEATURE flags {:#x}", f.flags)));
        }
        if f.get() && f.set() && !f.probe() {
            return Err(malformed("DEVICE_FEATURE with both GET and SET"));
        }
        Ok(f)
    }
}

/// MIG_DEVICE_STATE data: `{u32 device_state; s32 data_fd}`; data_fd is unused in vfio-user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigStateData {
    pub device_state: u32,
    pub data_fd: i32,
}

impl MigStateData {
    pub const SIZE: usize = 8;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.put_u32(self.device_state);
        v.put_u32(self.data_fd as u32);
        v
    }

    pub fn decode(p: &[u8]) -> Result<MigStateData> {
        let mut r = Reader::new(p, "MIG_DEVICE_STATE");
        let d = MigStateData {
            device_state: r.u32()?,
            data_fd: r.u32()? as i32,
        };
        r.finish()?;
        Ok(d)
    }
}

/// A single u64 feature payload (MIGRATION flags, MIG_DATA_SIZE).
pub fn encode_u64(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

pub fn decode_u64(p: &[u8], what: &'static str) -> Result<u64> {
    let mut r = Reader::new(p, what);
    let v = r.u64()?;
    r.finish()?;
    Ok(v)
}

/// `struct vfio_precopy_info` without meaning for argsz/flags here (sent as 24 and 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrecopyInfo {
    /// Initial (mandatory) pre-copy bytes not read yet; leave PRE_COPY only once it is 0.
    pub initial_bytes: u64,
    /// Bytes of state that changed after it was read.
    pub dirty_bytes: u64,
}

impl PrecopyInfo {
    pub const SIZE: usize = 24;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.put_u32(Self::SIZE as u32);
        v.put_u32(0);
        v.put_u64(self.initial_bytes);
        v.put_u64(self.dirty_bytes);
        v
    }

    pub fn decode(p: &[u8]) -> Result<PrecopyInfo> {
        let mut r = Reader::new(p, "PRECOPY_INFO");
        let _argsz = r.u32()?;
        let _flags = r.u32()?;
        let i = PrecopyInfo {
            initial_bytes: r.u64()?,
            dirty_bytes: r.u64()?,
        };
        r.finish()?;
        Ok(i)
    }
}

/// One IOVA range of DMA_LOGGING_START.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaRange {
    pub iova: u64,
    pub length: u64,
}

/// DMA_LOGGING_START data: `{u64 page_size; u32 num_ranges; u32 reserved; ranges[]}` with the
/// ranges inline (vfio-user has no user pointers). No ranges means "log every write".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaLoggingStart {
    pub page_size: u64,
    pub ranges: Vec<DmaRange>,
}

impl DmaLoggingStart {
    pub const FIXED_SIZE: usize = 16;
    pub const RANGE_SIZE: usize = 16;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::FIXED_SIZE + self.ranges.len() * Self::RANGE_SIZE);
        v.put_u64(self.page_size);
        // Callers bound the count by VFIO_DMA_LOGGING_MAX_RANGES.
        v.put_u32(self.ranges.len() as u32);
        v.put_u32(0);
        for r in &self.ranges {
            v.put_u64(r.iova);
            v.put_u64(r.length);
        }
        v
    }

    pub fn decode(p: &[u8]) -> Result<DmaLoggingStart> {
        let mut r = Reader::new(p, "DMA_LOGGING_START");
        let page_size = r.u64()?;
        let n = r.u32()? as usize;
        let _reserved = r.u32()?;
        if n > VFIO_DMA_LOGGING_MAX_RANGES || n * Self::RANGE_SIZE != r.remaining() {
            return Err(malformed(format!(
                "DMA_LOGGING_START with {n} ranges in {} bytes",
                r.remaining()
            )));
        }
        let mut ranges = Vec::with_capacity(n);
        for _ in 0..n {
            ranges.push(DmaRange {
                iova: r.u64()?,
                length: r.u64()?,
            });
        }
        Ok(DmaLoggingStart { page_size, ranges })
    }
}

/// DMA_LOGGING_REPORT request data; the reply repeats it and appends the bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaLoggingReport {
    pub iova: u64,
    pub length: u64,
    pub page_size: u64,
}

impl DmaLoggingReport {
    pub const SIZE: usize = 24;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.put_u64(self.iova);
        v.put_u64(self.length);
        v.put_u64(self.page_size);
        v
    }

    /// Decodes the fixed part; returns it with whatever follows (the bitmap, in replies).
    pub fn decode(p: &[u8]) -> Result<(DmaLoggingReport, &[u8])> {
        let mut r = Reader::new(p, "DMA_LOGGING_REPORT");
        let d = DmaLoggingReport {
            iova: r.u64()?,
            length: r.u64()?,
            page_size: r.u64()?,
        };
        Ok((d, r.rest()))
    }

    /// Pages the range covers (a partial last page counts), if the fields make sense.
    pub fn pages(&self) -> Option<u64> {
        if self.page_size == 0 || !self.page_size.is_power_of_two() {
            return None;
        }
        self.iova.checked_add(self.length)?;
        Some(self.length.div_ceil(self.page_size))
    }

    /// Bytes of the bitmap for this range: whole u64 words.
    pub fn bitmap_bytes(&self) -> Option<u64> {
        Some(self.pages()?.div_ceil(64) * 8)
    }
}

/// MIG_DATA_READ request `{u32 argsz; u32 size}`; the reply is `{argsz; size; data}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigDataRead {
    pub argsz: u32,
    pub size: u32,
}

/// Size of the `{argsz, size}` part of MIG_DATA_READ/WRITE messages.
pub const MIG_DATA_HEADER_SIZE: usize = 8;

impl MigDataRead {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(MIG_DATA_HEADER_SIZE);
        v.put_u32(self.argsz);
        v.put_u32(self.size);
        v
    }

    pub fn decode(p: &[u8]) -> Result<MigDataRead> {
        let mut r = Reader::new(p, "MIG_DATA_READ");
        let d = MigDataRead {
            argsz: r.u32()?,
            size: r.u32()?,
        };
        r.finish()?;
        if d.size as usize > MAX_DATA_XFER_SIZE {
            return Err(malformed(format!("MIG_DATA_READ of {} bytes", d.size)));
        }
        Ok(d)
    }
}

/// Encodes `{argsz; size; data}`: a MIG_DATA_READ reply or a MIG_DATA_WRITE request.
pub fn encode_mig_data(data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(MIG_DATA_HEADER_SIZE + data.len());
    // Data is bounded by the message size limit, so both fit in u32.
    v.put_u32((MIG_DATA_HEADER_SIZE + data.len()) as u32);
    v.put_u32(data.len() as u32);
    v.extend_from_slice(data);
    v
}

/// Decodes `{argsz; size; data}`; `size` must match the data carried.
pub fn decode_mig_data(p: &[u8]) -> Result<&[u8]> {
    let mut r = Reader::new(p, "MIG_DATA");
    let _argsz = r.u32()?;
    let size = r.u32()? as usize;
    let data = r.rest();
    if data.len() != size {
        return Err(malformed(format!(
            "migration data message says {size} bytes, carries {}",
            data.len()
        )));
    }
    Ok(data)
}

/// Decodes a MIG_DATA_READ reply to a request for `asked` bytes. `size` is the truth: it may
/// not exceed `asked`, and the message may carry padding past it (libvfio-user pads replies
/// to the size requested) but no more than `asked` bytes of data in all.
pub fn decode_mig_data_reply(p: &[u8], asked: usize) -> Result<&[u8]> {
    let mut r = Reader::new(p, "MIG_DATA_READ reply");
    let _argsz = r.u32()?;
    let size = r.u32()? as usize;
    let data = r.rest();
    if size > asked || data.len() > asked || data.len() < size {
        return Err(malformed(format!(
            "migration data reply says {size} bytes, carries {}, for a read of {asked}",
            data.len()
        )));
    }
    Ok(&data[..size])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mig_data_reply_may_be_padded_up_to_the_request() {
        let mut padded = encode_mig_data(&[1; 16384]);
        padded[4..8].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(decode_mig_data_reply(&padded, 16384).unwrap(), &[1; 100]);
        // Exactly what was asked, unpadded, and an empty end-of-stream reply.
        let exact = encode_mig_data(&[2; 64]);
        assert_eq!(decode_mig_data_reply(&exact, 64).unwrap(), &[2; 64]);
        assert!(
            decode_mig_data_reply(&encode_mig_data(&[]), 64)
                .unwrap()
                .is_empty()
        );
        // More than asked, a size above the request, or a size past the data: refused.
        assert!(decode_mig_data_reply(&exact, 63).is_err());
        let mut big = encode_mig_data(&[3; 8]);
        big[4..8].copy_from_slice(&9u32.to_le_bytes());
        assert!(decode_mig_data_reply(&big, 64).is_err());
        let mut liar = encode_mig_data(&[4; 8]);
        liar[4..8].copy_from_slice(&65u32.to_le_bytes());
        assert!(decode_mig_data_reply(&liar, 64).is_err());
        assert!(decode_mig_data_reply(&exact[..6], 64).is_err());
    }

    #[test]
    fn feature_flags_checked() {
        let f = DeviceFeature {
            argsz: 16,
            flags: VFIO_DEVICE_FEATURE_GET | 2,
            data: vec![1, 2],
        };
        let d = DeviceFeature::decode(&f.encode()).unwrap();
        assert_eq!(d, f);
        assert_eq!((d.index(), d.get(), d.set()), (2, true, false));
        let both = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET;
        let bad = DeviceFeature {
            flags: both,
            ..f.clone()
        };
        assert!(DeviceFeature::decode(&bad.encode()).is_err());
        let probe = DeviceFeature {
            flags: both | VFIO_DEVICE_FEATURE_PROBE,
            ..f.clone()
        };
        assert!(DeviceFeature::decode(&probe.encode()).is_ok());
        let unknown = DeviceFeature {
            flags: 1 << 20,
            ..f
        };
        assert!(DeviceFeature::decode(&unknown.encode()).is_err());
        assert!(DeviceFeature::decode(&[0; 7]).is_err());
    }

    #[test]
    fn logging_and_data_round_trip() {
        let s = DmaLoggingStart {
            page_size: 4096,
            ranges: vec![DmaRange {
                iova: 0x1000,
                length: 0x2000,
            }],
        };
        assert_eq!(DmaLoggingStart::decode(&s.encode()).unwrap(), s);
        let mut short = s.encode();
        short.pop();
        assert!(DmaLoggingStart::decode(&short).is_err());
        let r = DmaLoggingReport {
            iova: 0,
            length: 65 * 4096,
            page_size: 4096,
        };
        let mut p = r.encode();
        p.extend_from_slice(&[0xff; 16]);
        let (d, bitmap) = DmaLoggingReport::decode(&p).unwrap();
        assert_eq!((d, bitmap.len()), (r, 16));
        assert_eq!(r.bitmap_bytes(), Some(16));
        let bad_page = DmaLoggingReport {
            page_size: 3000,
            ..r
        };
        assert_eq!(bad_page.pages(), None);
        let m = encode_mig_data(&[5, 6, 7]);
        assert_eq!(decode_mig_data(&m).unwrap(), &[5, 6, 7]);
        assert!(decode_mig_data(&m[..10]).is_err());
        let i = PrecopyInfo {
            initial_bytes: 7,
            dirty_bytes: 9,
        };
        assert_eq!(PrecopyInfo::decode(&i.encode()).unwrap(), i);
        let st = MigStateData {
            device_state: 3,
            data_fd: -1,
        };
        assert_eq!(MigStateData::decode(&st.encode()).unwrap(), st);
    }
}
