//! Kernel VFIO region info, asked for by index and kept by index. vfio-ioctls keeps regions
//! in a list that skips the ones the kernel refuses (the VGA region of a non-VGA device), so
//! its list position stops matching the index from region 9 on: device-specific regions
//! (the v1 migration region among them) would be looked up one off.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;

use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_CAP_TYPE, VFIO_REGION_INFO_FLAG_CAPS, VFIO_TYPE, vfio_region_info,
};
use vmm_sys_util::ioctl::ioctl_with_mut_ptr;
use vmm_sys_util::ioctl_io_nr;

use super::vfio_backend::MmapArea;

ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE as u32, VFIO_BASE + 8);

const INFO_LEN: usize = std::mem::size_of::<vfio_region_info>();
/// More capability bytes than any kernel region reports; a larger argsz is refused.
const MAX_INFO_LEN: usize = 64 << 10;
/// Capabilities followed before the chain is called malformed (a loop, say).
const MAX_CAPS: usize = 64;

/// One region as the kernel describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelRegion {
    pub flags: u32,
    pub size: u64,
    /// Where the region sits in the device fd.
    pub offset: u64,
    pub caps: RegionCaps,
}

/// The capabilities minivmm uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionCaps {
    pub sparse: Option<Vec<MmapArea>>,
    /// (type, subtype) of a device-specific region.
    pub type_: Option<(u32, u32)>,
    pub msix_mappable: bool,
}

/// Every region `0..num` by index. A region the kernel refuses with EINVAL (no VGA region
/// on a non-VGA device) is absent; any other failure is an error naming the region.
pub fn region_table(
    num: u32,
    mut info: impl FnMut(u32) -> io::Result<Option<KernelRegion>>,
) -> io::Result<BTreeMap<u32, KernelRegion>> {
    let mut table = BTreeMap::new();
    for index in 0..num {
        match info(index) {
            Ok(Some(r)) => {
                table.insert(index, r);
            }
            Ok(None) => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("VFIO_DEVICE_GET_REGION_INFO of region {index}: {e}"),
                ));
            }
        }
    }
    Ok(table)
}

/// VFIO_DEVICE_GET_REGION_INFO on the device fd, asked again with room for the capability
/// chain when the kernel says it has one. `None`: the kernel has no such region (EINVAL).
pub fn query(device: &File, index: u32) -> io::Result<Option<KernelRegion>> {
    let mut len = INFO_LEN;
    loop {
        // u64 words: the buffer is aligned for vfio_region_info and the 64-bit capability fields.
        let mut buf = vec![0u64; len.div_ceil(8)];
        let info = vfio_region_info {
            argsz: len as u32,
            index,
            ..Default::default()
        };
        // SAFETY: buf holds at least INFO_LEN bytes, aligned for vfio_region_info.
        unsafe { std::ptr::write(buf.as_mut_ptr().cast::<vfio_region_info>(), info) };
        // SAFETY: the kernel writes at most `argsz` bytes, which `buf` holds.
        let ret =
            unsafe { ioctl_with_mut_ptr(device, VFIO_DEVICE_GET_REGION_INFO(), buf.as_mut_ptr()) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINVAL) => Ok(None),
                _ => Err(e),
            };
        }
        // SAFETY: buf starts with the vfio_region_info the kernel filled in.
        let got = unsafe { std::ptr::read(buf.as_ptr().cast::<vfio_region_info>()) };
        let wants = got.argsz as usize;
        if got.flags & VFIO_REGION_INFO_FLAG_CAPS != 0 && wants > len {
            if wants > MAX_INFO_LEN {
                return Err(io::Error::other(format!(
                    "region {index} asks for {wants} bytes of info"
                )));
            }
            len = wants;
            continue;
        }
        let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).take(len).collect();
        let caps = if got.flags & VFIO_REGION_INFO_FLAG_CAPS != 0 {
            parse_caps(&bytes, got.cap_offset).map_err(io::Error::other)?
        } else {
            RegionCaps::default()
        };
        return Ok(Some(KernelRegion {
            flags: got.flags,
            size: got.size,
            offset: got.offset,
            caps,
        }));
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The capability chain of a region info buffer (`first`: the first header's offset in
/// `buf`, 0 for none). Each header is id u16, version u16, next u32 (an offset in `buf`).
pub fn parse_caps(buf: &[u8], first: u32) -> Result<RegionCaps, String> {
    let mut caps = RegionCaps::default();
    let mut at = first as usize;
    for _ in 0..MAX_CAPS {
        if at == 0 {
            return Ok(caps);
        }
        let bad = || format!("capability header at {at} outside the {} bytes", buf.len());
        let id = u16_at(buf, at).ok_or_else(bad)?;
        let next = u32_at(buf, at + 4).ok_or_else(bad)?;
        match u32::from(id) {
            VFIO_REGION_INFO_CAP_SPARSE_MMAP => caps.sparse = Some(sparse(buf, at)?),
            VFIO_REGION_INFO_CAP_TYPE => {
                let t = u32_at(buf, at + 8).zip(u32_at(buf, at + 12));
                caps.type_ = Some(t.ok_or("truncated type capability")?);
            }
            VFIO_REGION_INFO_CAP_MSIX_MAPPABLE => caps.msix_mappable = true,
            _ => {}
        }
        at = next as usize;
    }
    Err(format!("more than {MAX_CAPS} capabilities (a loop?)"))
}

/// A sparse-mmap capability at `at`: nr_areas u32, reserved u32, then (offset, size) pairs.
fn sparse(buf: &[u8], at: usize) -> Result<Vec<MmapArea>, String> {
    let n = u32_at(buf, at + 8).ok_or("truncated sparse-mmap capability")? as usize;
    (0..n)
        .map(|i| {
            let a = at + 16 + 16 * i;
            match (u64_at(buf, a), u64_at(buf, a + 8)) {
                (Some(offset), Some(size)) => Ok(MmapArea { offset, size }),
                _ => Err(format!("sparse-mmap area {i} of {n} outside the buffer")),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(b: &mut Vec<u8>, id: u16, next: u32) {
        b.extend_from_slice(&id.to_ne_bytes());
        b.extend_from_slice(&1u16.to_ne_bytes());
        b.extend_from_slice(&next.to_ne_bytes());
    }

    #[test]
    fn a_refused_region_leaves_a_hole_not_a_shift() {
        // Region 8 (VGA) refused, region 9 device-specific.
        let t = region_table(10, |i| {
            Ok((i != 8).then(|| KernelRegion {
                size: u64::from(i) * 0x100,
                ..Default::default()
            }))
        })
        .unwrap();
        assert!(!t.contains_key(&8));
        assert_eq!(t[&9].size, 0x900);
        let e = region_table(3, |i| match i {
            2 => Err(io::Error::from_raw_os_error(libc::EIO)),
            _ => Ok(None),
        })
        .unwrap_err();
        assert!(e.to_string().contains("region 2"), "{e}");
    }

    #[test]
    fn capability_chains_parse_with_their_bounds_checked() {
        let mut b = vec![0u8; INFO_LEN];
        // Type cap at 32 → sparse cap at 48 → MSI-X mappable at 96.
        header(&mut b, VFIO_REGION_INFO_CAP_TYPE as u16, 48);
        b.extend_from_slice(&3u32.to_ne_bytes());
        b.extend_from_slice(&1u32.to_ne_bytes());
        header(&mut b, VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16, 96);
        b.extend_from_slice(&2u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        for v in [0u64, 0x1000, 0x3000, 0x1000] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        header(&mut b, VFIO_REGION_INFO_CAP_MSIX_MAPPABLE as u16, 0);
        let caps = parse_caps(&b, 32).unwrap();
        assert_eq!(caps.type_, Some((3, 1)));
        assert_eq!(
            caps.sparse.as_deref(),
            Some(
                &[
                    MmapArea {
                        offset: 0,
                        size: 0x1000
                    },
                    MmapArea {
                        offset: 0x3000,
                        size: 0x1000
                    }
                ][..]
            )
        );
        assert!(caps.msix_mappable);
        // A sparse cap claiming more areas than the buffer holds, a header past the end, a
        // chain that loops: errors, not panics or hangs.
        let mut short = b[..96].to_vec();
        short[56..60].copy_from_slice(&9u32.to_ne_bytes());
        assert!(parse_caps(&short, 32).is_err());
        assert!(parse_caps(&b, 4096).is_err());
        let mut looped = vec![0u8; INFO_LEN];
        header(&mut looped, 99, 32);
        assert!(parse_caps(&looped, 32).unwrap_err().contains("loop"));
    }
}
