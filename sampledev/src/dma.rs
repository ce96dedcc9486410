//! Client memory the device may DMA to: the fds from DMA_MAP, mmapped, and every access
//! bounds- and protection-checked against them before a byte moves.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr;

use vfio_user::{DmaMap, DmaProt};

use crate::dirtylog::DirtyLog;
use crate::error::Refusal;

/// A client may not make the server hold more mappings than this.
pub const MAX_DMA_MAPS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("DMA {} of {len:#x} bytes at {iova:#x} is outside mapped memory", if *.write { "write" } else { "read" })]
pub struct DmaFault {
    pub iova: u64,
    pub len: u64,
    pub write: bool,
}

/// A shared mapping of a client file, unmapped on drop.
struct MmapRegion {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the region is plain shared memory owned by this value; all access goes through
// DmaSpace's bounds-checked copies, and DmaSpace itself sits behind a Mutex.
unsafe impl Send for MmapRegion {}

impl MmapRegion {
    fn new(file: &File, offset: u64, len: usize, prot: DmaProt) -> Result<MmapRegion, Refusal> {
        let mut p = 0;
        if prot.readable() {
            p |= libc::PROT_READ;
        }
        if prot.writable() {
            p |= libc::PROT_WRITE;
        }
        let off = libc::off_t::try_from(offset).map_err(|_| Refusal::inval("offset too large"))?;
        // SAFETY: a fresh MAP_SHARED mapping chosen by the kernel (addr NULL) cannot alias
        // any Rust object; its length and the fd were checked by the caller.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                p,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            let errno = e.raw_os_error().unwrap_or(libc::EINVAL);
            return Err(Refusal::new(
                errno,
                format!("mmap of DMA region failed: {e}"),
            ));
        }
        Ok(MmapRegion {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned, and no reference into the region
        // outlives this value.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

struct Mapping {
    iova: u64,
    size: u64,
    prot: DmaProt,
    mem: MmapRegion,
}

impl Mapping {
    fn contains(&self, iova: u64) -> bool {
        iova >= self.iova && iova - self.iova < self.size
    }
}

#[derive(Default)]
pub struct DmaSpace {
    maps: Vec<Mapping>,
    /// DMA logging, when started: every successful write is recorded.
    pub log: Option<DirtyLog>,
}

impl DmaSpace {
    pub fn map(&mut self, m: &DmaMap, fd: OwnedFd) -> Result<(), Refusal> {
        let end = m.address.checked_add(m.size);
        let len = usize::try_from(m.size)
            .ok()
            .filter(|&l| l > 0 && l <= isize::MAX as usize);
        let (Some(end), Some(len)) = (end, len) else {
            return Err(Refusal::inval(format!(
                "bad DMA range {:#x}+{:#x}",
                m.address, m.size
            )));
        };
        let page = page_size();
        if ![m.address, m.size, m.offset]
            .iter()
            .all(|v| v.is_multiple_of(page))
        {
            return Err(Refusal::inval(format!(
                "DMA range {:#x}+{:#x} (file offset {:#x}) is not page-aligned",
                m.address, m.size, m.offset
            )));
        }
        if !(m.prot.readable() || m.prot.writable()) {
            return Err(Refusal::inval("DMA mapping without access rights"));
        }
        if self.maps.len() >= MAX_DMA_MAPS {
            return Err(Refusal::new(libc::ENOSPC, "too many DMA mappings"));
        }
        if self
            .maps
            .iter()
            .any(|x| m.address < x.iova + x.size && x.iova < end)
        {
            return Err(Refusal::new(libc::EEXIST, "DMA range overlaps a mapping"));
        }
        let file = File::from(fd);
        check_backing(&file, m.offset, m.size)?;
        let mem = MmapRegion::new(&file, m.offset, len, m.prot)?;
        log::info!(
            "DMA map {:#x}..{end:#x} (file offset {:#x}, prot {:#x})",
            m.address,
            m.offset,
            m.prot.bits()
        );
        self.maps.push(Mapping {
            iova: m.address,
            size: m.size,
            prot: m.prot,
            mem,
        });
        Ok(())
    }

    /// Removes the mapping that is exactly `[iova, iova+size)`.
    pub fn unmap(&mut self, iova: u64, size: u64) -> Result<(), Refusal> {
        let i = self
            .maps
            .iter()
            .position(|m| m.iova == iova && m.size == size)
            .ok_or_else(|| {
                Refusal::new(libc::ENOENT, format!("no DMA mapping {iova:#x}+{size:#x}"))
            })?;
        self.maps.swap_remove(i);
        log::info!("DMA unmap {iova:#x}+{size:#x}");
        Ok(())
    }

    /// Checks that all of `[iova, iova+len)` is mapped with the access needed.
    pub fn check(&self, iova: u64, len: u64, write: bool) -> Result<(), DmaFault> {
        self.walk(iova, len, write, |_, _, _| {})
    }

    /// Copies `data` to client memory at `iova`; nothing is written unless all of it fits.
    pub fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), DmaFault> {
        self.check(iova, data.len() as u64, true)?;
        self.walk(iova, data.len() as u64, true, |host, pos, n| {
            // SAFETY: walk() hands out host pointers to n bytes inside a live mapping of
            // ours, and data[pos..pos+n] is in bounds. The client may write the same memory
            // concurrently; like a real device we make no promise about such races.
            unsafe { ptr::copy_nonoverlapping(data.as_ptr().add(pos), host, n) }
        })?;
        if let Some(log) = &mut self.log {
            log.mark(iova, data.len() as u64);
        }
        Ok(())
    }

    /// Copies client memory at `iova` into `out`.
    pub fn read(&self, iova: u64, out: &mut [u8]) -> Result<(), DmaFault> {
        let len = out.len() as u64;
        self.walk(iova, len, false, |host, pos, n| {
            // SAFETY: as in write(), with the copy going the other way into `out`.
            unsafe { ptr::copy_nonoverlapping(host, out.as_mut_ptr().add(pos), n) }
        })
    }

    /// Calls `f(host_ptr, offset_in_access, n)` for each piece of the access, across
    /// adjacent mappings; fails at the first byte that is unmapped or lacks the access right.
    fn walk<F>(&self, iova: u64, len: u64, write: bool, mut f: F) -> Result<(), DmaFault>
    where
        F: FnMut(*mut u8, usize, usize),
    {
        let fault = DmaFault { iova, len, write };
        let mut pos = 0u64;
        while pos < len {
            let a = iova.checked_add(pos).ok_or(fault)?;
            let m = self.maps.iter().find(|m| m.contains(a)).ok_or(fault)?;
            if !(if write {
                m.prot.writable()
            } else {
                m.prot.readable()
            }) {
                return Err(fault);
            }
            let in_map = a - m.iova;
            let n = (len - pos).min(m.size - in_map);
            // SAFETY: in_map < m.size == the mapping's length, so the pointer stays inside it.
            let host = unsafe { m.mem.ptr.add(in_map as usize) };
            f(host, pos as usize, n as usize);
            pos += n;
        }
        Ok(())
    }
}

/// The mapping must lie inside the file: touching pages beyond its end would be SIGBUS.
fn check_backing(file: &File, offset: u64, size: u64) -> Result<(), Refusal> {
    let meta = file
        .metadata()
        .map_err(|e| Refusal::new(e.raw_os_error().unwrap_or(libc::EBADF), e.to_string()))?;
    if !meta.file_type().is_file() {
        return Err(Refusal::inval("DMA fd is not a regular file or memfd"));
    }
    if offset.checked_add(size).is_none_or(|end| end > meta.len()) {
        return Err(Refusal::inval(format!(
            "DMA region {offset:#x}+{size:#x} extends past the {}-byte file",
            meta.len()
        )));
    }
    // SAFETY: F_GET_SEALS only reads the fd's seal set.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err(Refusal::new(
            libc::EPERM,
            "DMA fd is not a memfd sealed with F_SEAL_SHRINK: a client truncating it would crash the device",
        ));
    }
    Ok(())
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    pub fn memfd(size: u64) -> File {
        let name = c"sampledev-test";
        // SAFETY: memfd_create with a valid C string; the returned fd is owned by the File.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is owned by nobody else.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        // SAFETY: F_ADD_SEALS only changes the seal set of the fd just created.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(r, 0);
        f
    }

    fn space_with(iova: u64, size: u64, prot: DmaProt) -> (DmaSpace, File) {
        let f = memfd(size);
        let mut s = DmaSpace::default();
        let m = DmaMap {
            prot,
            offset: 0,
            address: iova,
            size,
        };
        s.map(&m, f.try_clone().unwrap().into()).unwrap();
        (s, f)
    }

    #[test]
    fn writes_land_in_the_file_and_bounds_hold() {
        let (mut s, f) = space_with(0x10000, 0x2000, DmaProt::READ_WRITE);
        s.write(0x10ffc, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 0xffc).unwrap();
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(s.write(0x11ffc, &[0; 8]).is_err());
        assert!(s.write(0xfff8, &[0; 16]).is_err());
        assert!(s.check(u64::MAX - 4, 16, true).is_err());
        let mut r = [0u8; 4];
        s.read(0x10ffc, &mut r).unwrap();
        assert_eq!(r, [1, 2, 3, 4]);
    }

    #[test]
    fn protection_overlap_and_unmap() {
        let (mut s, _f) = space_with(0, 0x1000, DmaProt::READ);
        assert!(s.write(0, &[1]).is_err());
        let g = memfd(0x1000);
        let over = DmaMap {
            prot: DmaProt::READ,
            offset: 0,
            address: 0,
            size: 0x1000,
        };
        assert_eq!(s.map(&over, g.into()).unwrap_err().errno, libc::EEXIST);
        assert_eq!(s.unmap(0, 0x2000).unwrap_err().errno, libc::ENOENT);
        s.unmap(0, 0x1000).unwrap();
        assert!(s.check(0, 1, false).is_err());
    }

    #[test]
    fn mapping_past_file_end_refused() {
        let f = memfd(0x1000);
        let mut s = DmaSpace::default();
        let m = DmaMap {
            prot: DmaProt::READ_WRITE,
            offset: 0,
            address: 0,
            size: 0x2000,
        };
        assert_eq!(s.map(&m, f.into()).unwrap_err().errno, libc::EINVAL);
    }

    #[test]
    fn unaligned_ranges_are_refused() {
        let mut s = DmaSpace::default();
        for (address, size) in [(0x800, 0x1000), (0, 0x800), (0x1000, 0x1001)] {
            let m = DmaMap {
                prot: DmaProt::READ_WRITE,
                offset: 0,
                address,
                size,
            };
            let e = s.map(&m, memfd(0x2000).into()).unwrap_err();
            assert_eq!(e.errno, libc::EINVAL, "{address:#x}+{size:#x}");
            assert!(e.why.contains("page-aligned"), "{}", e.why);
        }
    }

    #[test]
    fn a_file_that_can_shrink_is_refused() {
        // SAFETY: memfd_create with a valid C string; the fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is owned by nobody else.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(0x1000).unwrap();
        let m = DmaMap {
            prot: DmaProt::READ_WRITE,
            offset: 0,
            address: 0,
            size: 0x1000,
        };
        let e = DmaSpace::default().map(&m, f.into()).unwrap_err();
        assert_eq!(e.errno, libc::EPERM);
        assert!(e.why.contains("F_SEAL_SHRINK"), "{}", e.why);
    }
}
