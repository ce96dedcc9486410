//! `VFIO_USER_DEVICE_GET_REGION_INFO` replies, including the capability chain.

use std::os::fd::OwnedFd;

use crate::error::{Result, malformed};
use crate::vfio::{
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_CAP_TYPE, VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP,
};
use crate::wire::{PutLe, Reader};

/// Size of `struct vfio_region_info` without capabilities.
pub const REGION_INFO_SIZE: usize = 32;
const CAP_HEADER_SIZE: usize = 8;
const SPARSE_AREA_SIZE: usize = 16;
/// A longer chain than this is a loop or garbage, not a real device.
const MAX_CAPS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseArea {
    pub offset: u64,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionCap {
    /// Only these parts of the region may be mmapped (offsets relative to the region).
    SparseMmap(Vec<SparseArea>),
    /// Device-specific region type, e.g. type 3 / subtype 1 for the v1 migration region.
    Type { region_type: u32, subtype: u32 },
    /// A capability this client does not interpret.
    Unknown { id: u16, version: u16 },
}

/// A region as the server describes it; `fd` is present when the region is mmappable and the
/// server passed a file descriptor for it.
#[derive(Debug)]
pub struct RegionInfo {
    pub index: u32,
    pub flags: u32,
    pub size: u64,
    /// mmap offset into `fd`, and the base of sparse areas.
    pub offset: u64,
    pub caps: Vec<RegionCap>,
    pub fd: Option<OwnedFd>,
}

impl RegionInfo {
    pub fn readable(&self) -> bool {
        self.flags & crate::vfio::VFIO_REGION_INFO_FLAG_READ != 0
    }
    pub fn writable(&self) -> bool {
        self.flags & crate::vfio::VFIO_REGION_INFO_FLAG_WRITE != 0
    }
    pub fn mmappable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_MMAP != 0 && self.fd.is_some()
    }

    /// Parses a reply payload that holds the whole structure (its `argsz` bytes).
    pub fn decode(p: &[u8], fds: Vec<OwnedFd>) -> Result<RegionInfo> {
        let mut r = Reader::new(p, "DEVICE_GET_REGION_INFO");
        let _argsz = r.u32()?;
        let flags = r.u32()?;
        let index = r.u32()?;
        let cap_offset = r.u32()?;
        let size = r.u64()?;
        let offset = r.u64()?;
        let caps = if flags & VFIO_REGION_INFO_FLAG_CAPS != 0 && cap_offset != 0 {
            parse_caps(p, cap_offset as usize, size)?
        } else {
            Vec::new()
        };
        // An fd for a region not marked mmappable is useless: close it.
        let fd = if flags & VFIO_REGION_INFO_FLAG_MMAP != 0 {
            fds.into_iter().next()
        } else {
            None
        };
        Ok(RegionInfo {
            index,
            flags,
            size,
            offset,
            caps,
            fd,
        })
    }

    /// Encodes the reply payload (servers); capabilities other than the two known kinds are
    /// not encodable and are skipped.
    pub fn encode(&self) -> Vec<u8> {
        let caps = encode_caps(&self.caps);
        let mut flags = self.flags & !VFIO_REGION_INFO_FLAG_CAPS;
        let cap_offset = if caps.is_empty() {
            0
        } else {
            flags |= VFIO_REGION_INFO_FLAG_CAPS;
            REGION_INFO_SIZE as u32
        };
        let mut v = Vec::with_capacity(REGION_INFO_SIZE + caps.len());
        v.put_u32((REGION_INFO_SIZE + caps.len()) as u32);
        v.put_u32(flags);
        v.put_u32(self.index);
        v.put_u32(cap_offset);
        v.put_u64(self.size);
        v.put_u64(self.offset);
        v.extend_from_slice(&caps);
        v
    }
}

fn parse_caps(p: &[u8], first: usize, region_size: u64) -> Result<Vec<RegionCap>> {
    let mut caps = Vec::new();
    let mut off = first;
    while off != 0 {
        if caps.len() == MAX_CAPS {
            return Err(malformed("region capability chain too long"));
        }
        if off < REGION_INFO_SIZE || off.saturating_add(CAP_HEADER_SIZE) > p.len() {
            return Err(malformed(format!(
                "region capability at offset {off} outside the {}-byte reply",
                p.len()
            )));
        }
        let mut r = Reader::new(&p[off..], "region capability");
        let id = r.u16()?;
        let version = r.u16()?;
        let next = r.u32()? as usize;
        caps.push(parse_cap(id, version, &mut r, region_size)?);
        // Requiring forward links makes loops impossible.
        if next != 0 && next <= off {
            return Err(malformed("region capability chain points backwards"));
        }
        off = next;
    }
    Ok(caps)
}

fn parse_cap(id: u16, version: u16, r: &mut Reader, region_size: u64) -> Result<RegionCap> {
    match id {
        VFIO_REGION_INFO_CAP_SPARSE_MMAP => {
            let nr = r.u32()? as usize;
            let _reserved = r.u32()?;
            if nr > r.remaining() / SPARSE_AREA_SIZE {
                return Err(malformed(format!(
                    "sparse mmap capability claims {nr} areas, more than the reply holds"
                )));
            }
            let mut areas = Vec::with_capacity(nr);
            for _ in 0..nr {
                let a = SparseArea {
                    offset: r.u64()?,
                    size: r.u64()?,
                };
                if a.offset.checked_add(a.size).is_none_or(|e| e > region_size) {
                    return Err(malformed("sparse mmap area outside its region"));
                }
                areas.push(a);
            }
            Ok(RegionCap::SparseMmap(areas))
        }
        VFIO_REGION_INFO_CAP_TYPE => Ok(RegionCap::Type {
            region_type: r.u32()?,
            subtype: r.u32()?,
        }),
        _ => Ok(RegionCap::Unknown { id, version }),
    }
}

fn encode_caps(caps: &[RegionCap]) -> Vec<u8> {
    let mut out = Vec::new();
    let known: Vec<&RegionCap> = caps
        .iter()
        .filter(|c| !matches!(c, RegionCap::Unknown { .. }))
        .collect();
    for (i, cap) in known.iter().enumerate() {
        let mut body = Vec::new();
        let id = match cap {
            RegionCap::SparseMmap(areas) => {
                body.put_u32(areas.len() as u32);
                body.put_u32(0);
                for a in areas {
                    body.put_u64(a.offset);
                    body.put_u64(a.size);
                }
                VFIO_REGION_INFO_CAP_SPARSE_MMAP
            }
            RegionCap::Type {
                region_type,
                subtype,
            } => {
                body.put_u32(*region_type);
                body.put_u32(*subtype);
                VFIO_REGION_INFO_CAP_TYPE
            }
            RegionCap::Unknown { .. } => continue,
        };
        let here = REGION_INFO_SIZE + out.len();
        let next = if i + 1 < known.len() {
            here + CAP_HEADER_SIZE + body.len()
        } else {
            0
        };
        out.put_u16(id);
        out.put_u16(1);
        out.put_u32(next as u32);
        out.extend_from_slice(&body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::{VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE};

    fn info(caps: Vec<RegionCap>) -> RegionInfo {
        RegionInfo {
            index: 9,
            flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
            size: 0x10000,
            offset: 0,
            caps,
            fd: None,
        }
    }

    #[test]
    fn caps_round_trip() {
        let caps = vec![
            RegionCap::Type {
                region_type: 3,
                subtype: 1,
            },
            RegionCap::SparseMmap(vec![SparseArea {
                offset: 0x1000,
                size: 0x2000,
            }]),
        ];
        let p = info(caps.clone()).encode();
        let d = RegionInfo::decode(&p, vec![]).unwrap();
        assert_eq!(d.caps, caps);
        assert_eq!((d.index, d.size), (9, 0x10000));
        assert!(d.flags & VFIO_REGION_INFO_FLAG_CAPS != 0);
    }

    #[test]
    fn bad_chains_refused() {
        let caps = vec![
            RegionCap::Type {
                region_type: 3,
                subtype: 1,
            },
            RegionCap::Type {
                region_type: 3,
                subtype: 2,
            },
        ];
        let mut p = info(caps).encode();
        // Point the second capability back at the first: a loop.
        p[32 + 16 + 4..32 + 16 + 8].copy_from_slice(&32u32.to_le_bytes());
        assert!(RegionInfo::decode(&p, vec![]).is_err());
        // First capability beyond the reply.
        let mut q = info(vec![RegionCap::Type {
            region_type: 1,
            subtype: 1,
        }])
        .encode();
        q[12..16].copy_from_slice(&4000u32.to_le_bytes());
        assert!(RegionInfo::decode(&q, vec![]).is_err());
        // Sparse area count larger than the reply.
        let mut s = info(vec![RegionCap::SparseMmap(vec![])]).encode();
        s[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(RegionInfo::decode(&s, vec![]).is_err());
        // Sparse area outside the region.
        let o = info(vec![RegionCap::SparseMmap(vec![SparseArea {
            offset: 0xf000,
            size: 0x2000,
        }])])
        .encode();
        assert!(RegionInfo::decode(&o, vec![]).is_err());
    }
}
