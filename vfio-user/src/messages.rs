//! Payload layouts of the commands (offsets from the end of the header), encoded and decoded
//! field by field so that no peer-controlled size is trusted before it is checked.

use crate::caps::Capabilities;
use crate::error::{Result, malformed};
use crate::header::MAX_DATA_XFER_SIZE;
use crate::vfio::{VFIO_USER_F_DMA_REGION_READ, VFIO_USER_F_DMA_REGION_WRITE};
use crate::wire::{PutLe, Reader};

/// `VFIO_USER_VERSION` request and reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
    pub caps: Capabilities,
}

impl Version {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u16(self.major);
        v.put_u16(self.minor);
        v.extend_from_slice(&self.caps.to_version_data());
        v
    }

    pub fn decode(p: &[u8]) -> Result<Version> {
        let mut r = Reader::new(p, "VERSION");
        let major = r.u16()?;
        let minor = r.u16()?;
        let caps = Capabilities::from_version_data(r.rest())?;
        Ok(Version { major, minor, caps })
    }
}

/// DMA region protection (`VFIO_USER_DMA_MAP` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaProt(u32);

impl DmaProt {
    pub const READ: DmaProt = DmaProt(VFIO_USER_F_DMA_REGION_READ);
    pub const WRITE: DmaProt = DmaProt(VFIO_USER_F_DMA_REGION_WRITE);
    pub const READ_WRITE: DmaProt =
        DmaProt(VFIO_USER_F_DMA_REGION_READ | VFIO_USER_F_DMA_REGION_WRITE);

    pub fn bits(self) -> u32 {
        self.0
    }
    pub fn readable(self) -> bool {
        self.0 & VFIO_USER_F_DMA_REGION_READ != 0
    }
    pub fn writable(self) -> bool {
        self.0 & VFIO_USER_F_DMA_REGION_WRITE != 0
    }
}

/// `VFIO_USER_DMA_MAP` request (32 bytes); the mappable fd travels as ancillary data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaMap {
    pub prot: DmaProt,
    /// Offset of the region in the passed file.
    pub offset: u64,
    /// Base DMA address (IOVA; guest physical for minivmm).
    pub address: u64,
    pub size: u64,
}

impl DmaMap {
    pub const SIZE: u32 = 32;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE as usize);
        v.put_u32(Self::SIZE);
        v.put_u32(self.prot.bits());
        v.put_u64(self.offset);
        v.put_u64(self.address);
        v.put_u64(self.size);
        v
    }

    pub fn decode(p: &[u8]) -> Result<DmaMap> {
        let mut r = Reader::new(p, "DMA_MAP");
        let argsz = r.u32()?;
        let flags = r.u32()?;
        let m = DmaMap {
            prot: DmaProt(flags),
            offset: r.u64()?,
            address: r.u64()?,
            size: r.u64()?,
        };
        r.finish()?;
        if argsz != Self::SIZE {
            return Err(malformed(format!("DMA_MAP argsz {argsz}, expected 32")));
        }
        if flags & !DmaProt::READ_WRITE.0 != 0 {
            return Err(malformed(format!("DMA_MAP has unknown flags {flags:#x}")));
        }
        Ok(m)
    }
}

/// `VFIO_USER_DMA_UNMAP` request (24 bytes); the reply echoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub address: u64,
    pub size: u64,
}

impl DmaUnmap {
    pub const SIZE: u32 = 24;

    pub fn new(address: u64, size: u64) -> DmaUnmap {
        DmaUnmap {
            argsz: Self::SIZE,
            flags: 0,
            address,
            size,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE as usize);
        v.put_u32(self.argsz);
        v.put_u32(self.flags);
        v.put_u64(self.address);
        v.put_u64(self.size);
        v
    }

    pub fn decode(p: &[u8]) -> Result<DmaUnmap> {
        let mut r = Reader::new(p, "DMA_UNMAP");
        let u = DmaUnmap {
            argsz: r.u32()?,
            flags: r.u32()?,
            address: r.u64()?,
            size: r.u64()?,
        };
        r.finish()?;
        if u.argsz < Self::SIZE {
            return Err(malformed(format!("DMA_UNMAP argsz {} below 24", u.argsz)));
        }
        Ok(u)
    }
}

/// `VFIO_USER_DEVICE_GET_INFO` reply (the request is the same layout, zeroed but for argsz).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

impl DeviceInfo {
    pub const SIZE: u32 = 16;

    pub fn request() -> DeviceInfo {
        DeviceInfo {
            argsz: Self::SIZE,
            flags: 0,
            num_regions: 0,
            num_irqs: 0,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE as usize);
        v.put_u32(self.argsz);
        v.put_u32(self.flags);
        v.put_u32(self.num_regions);
        v.put_u32(self.num_irqs);
        v
    }

    /// Bytes past the 16 known ones are ignored: the kernel struct has grown before.
    pub fn decode(p: &[u8]) -> Result<DeviceInfo> {
        let mut r = Reader::new(p, "DEVICE_GET_INFO");
        Ok(DeviceInfo {
            argsz: r.u32()?,
            flags: r.u32()?,
            num_regions: r.u32()?,
            num_irqs: r.u32()?,
        })
    }
}

/// `VFIO_USER_DEVICE_GET_REGION_INFO` request; the reply is parsed by [`crate::RegionInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfoRequest {
    /// Largest reply payload the client accepts (region info plus capabilities).
    pub argsz: u32,
    pub index: u32,
}

impl RegionInfoRequest {
    pub const SIZE: u32 = 32;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE as usize);
        v.put_u32(self.argsz);
        v.put_u32(0);
        v.put_u32(self.index);
        v.put_u32(0);
        v.put_u64(0);
        v.put_u64(0);
        v
    }

    pub fn decode(p: &[u8]) -> Result<RegionInfoRequest> {
        let mut r = Reader::new(p, "DEVICE_GET_REGION_INFO");
        let argsz = r.u32()?;
        let _flags = r.u32()?;
        let index = r.u32()?;
        r.bytes(20)?;
        r.finish()?;
        if argsz < Self::SIZE {
            return Err(malformed(format!("REGION_INFO argsz {argsz} below 32")));
        }
        Ok(RegionInfoRequest { argsz, index })
    }
}

/// `VFIO_USER_DEVICE_GET_IRQ_INFO` request and reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

impl IrqInfo {
    pub const SIZE: u32 = 16;

    pub fn request(index: u32) -> IrqInfo {
        IrqInfo {
            argsz: Self::SIZE,
            flags: 0,
            index,
            count: 0,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE as usize);
        v.put_u32(self.argsz);
        v.put_u32(self.flags);
        v.put_u32(self.index);
        v.put_u32(self.count);
        v
    }

    pub fn decode(p: &[u8]) -> Result<IrqInfo> {
        let mut r = Reader::new(p, "DEVICE_GET_IRQ_INFO");
        let i = IrqInfo {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            count: r.u32()?,
        };
        r.finish()?;
        if i.argsz < Self::SIZE {
            return Err(malformed(format!("IRQ_INFO argsz {} below 16", i.argsz)));
        }
        Ok(i)
    }
}

/// `VFIO_USER_DEVICE_SET_IRQS` request: 20 fixed bytes plus a bool array for `DATA_BOOL`;
/// eventfds travel as ancillary data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IrqSet {
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
    pub data: Vec<u8>,
}

impl IrqSet {
    pub const FIXED_SIZE: usize = 20;

    pub fn encode(&self) -> Vec<u8> {
        let argsz = Self::FIXED_SIZE + self.data.len();
        let mut v = Vec::with_capacity(argsz);
        // Callers build `data` from a count bounded by the message limit, so it fits in u32.
        v.put_u32(argsz as u32);
        v.put_u32(self.flags);
        v.put_u32(self.index);
        v.put_u32(self.start);
        v.put_u32(self.count);
        v.extend_from_slice(&self.data);
        v
    }

    pub fn decode(p: &[u8]) -> Result<IrqSet> {
        let mut r = Reader::new(p, "DEVICE_SET_IRQS");
        let argsz = r.u32()?;
        let s = IrqSet {
            flags: r.u32()?,
            index: r.u32()?,
            start: r.u32()?,
            count: r.u32()?,
            data: r.rest().to_vec(),
        };
        if argsz as usize != p.len() {
            return Err(malformed(format!(
                "SET_IRQS argsz {argsz} differs from the payload size {}",
                p.len()
            )));
        }
        Ok(s)
    }
}

/// Size of the fixed part of `VFIO_USER_REGION_READ/WRITE` messages.
pub const REGION_ACCESS_HEADER_SIZE: usize = 16;

/// The fixed part of `VFIO_USER_REGION_READ/WRITE` requests and replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionAccess {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
}

impl RegionAccess {
    /// Encodes the fixed part followed by `data` (empty for read requests and write replies).
    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(REGION_ACCESS_HEADER_SIZE + data.len());
        v.put_u64(self.offset);
        v.put_u32(self.region);
        v.put_u32(self.count);
        v.extend_from_slice(data);
        v
    }

    /// Decodes the fixed part; `with_data` says whether exactly `count` data bytes must follow
    /// (write requests, read replies) or none (read requests, write replies).
    pub fn decode(p: &[u8], with_data: bool) -> Result<(RegionAccess, &[u8])> {
        let mut r = Reader::new(p, "REGION_READ/WRITE");
        let a = RegionAccess {
            offset: r.u64()?,
            region: r.u32()?,
            count: r.u32()?,
        };
        if a.count as usize > MAX_DATA_XFER_SIZE {
            return Err(malformed(format!(
                "region access count {} exceeds {MAX_DATA_XFER_SIZE}",
                a.count
            )));
        }
        let data = r.rest();
        let want = if with_data { a.count as usize } else { 0 };
        if data.len() != want {
            return Err(malformed(format!(
                "region access carries {} data bytes, expected {want}",
                data.len()
            )));
        }
        Ok((a, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_messages_round_trip() {
        let m = DmaMap {
            prot: DmaProt::READ_WRITE,
            offset: 0x1000,
            address: 0x8000_0000,
            size: 1 << 30,
        };
        assert_eq!(m.encode().len(), 32);
        assert_eq!(DmaMap::decode(&m.encode()).unwrap(), m);
        let u = DmaUnmap::new(0x8000_0000, 1 << 30);
        assert_eq!(DmaUnmap::decode(&u.encode()).unwrap(), u);
        let d = DeviceInfo {
            argsz: 16,
            flags: 3,
            num_regions: 9,
            num_irqs: 5,
        };
        assert_eq!(DeviceInfo::decode(&d.encode()).unwrap(), d);
        let q = RegionInfoRequest {
            argsz: 512,
            index: 7,
        };
        assert_eq!(RegionInfoRequest::decode(&q.encode()).unwrap(), q);
        let i = IrqInfo {
            argsz: 16,
            flags: 9,
            index: 2,
            count: 4,
        };
        assert_eq!(IrqInfo::decode(&i.encode()).unwrap(), i);
        let s = IrqSet {
            flags: 0x22,
            index: 2,
            start: 1,
            count: 2,
            data: vec![1, 0],
        };
        assert_eq!(IrqSet::decode(&s.encode()).unwrap(), s);
        let v = Version {
            major: 0,
            minor: 1,
            caps: Capabilities {
                max_msg_fds: Some(8),
                ..Default::default()
            },
        };
        assert_eq!(Version::decode(&v.encode()).unwrap(), v);
    }

    #[test]
    fn region_access_checks_data_length() {
        let a = RegionAccess {
            offset: 8,
            region: 0,
            count: 4,
        };
        let p = a.encode(&[1, 2, 3, 4]);
        let (d, data) = RegionAccess::decode(&p, true).unwrap();
        assert_eq!((d, data), (a, &[1u8, 2, 3, 4][..]));
        assert!(RegionAccess::decode(&p, false).is_err());
        assert!(RegionAccess::decode(&a.encode(&[1, 2]), true).is_err());
        let huge = RegionAccess {
            offset: 0,
            region: 0,
            count: u32::MAX,
        };
        assert!(RegionAccess::decode(&huge.encode(&[]), false).is_err());
    }

    #[test]
    fn truncated_and_padded_payloads_refused() {
        let m = DmaMap {
            prot: DmaProt::READ,
            offset: 0,
            address: 0,
            size: 4096,
        }
        .encode();
        assert!(DmaMap::decode(&m[..31]).is_err());
        let mut long = m.clone();
        long.push(0);
        assert!(DmaMap::decode(&long).is_err());
        let mut bad_flags = m;
        bad_flags[4] = 0x80;
        assert!(DmaMap::decode(&bad_flags).is_err());
        assert!(IrqInfo::decode(&[0; 15]).is_err());
        let mut s = IrqSet {
            flags: 0,
            index: 0,
            start: 0,
            count: 0,
            data: vec![],
        }
        .encode();
        s[0] = 99;
        assert!(IrqSet::decode(&s).is_err());
    }
}
