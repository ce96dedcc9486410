//! Holes in file-backed guest RAM (a memfd): pages never written read as zero, and the file
//! system knows where they are without anyone touching them. Reading a hole through a shared
//! mapping would allocate a page per hole, slowly and for nothing, so the first pass asks
//! `lseek(SEEK_DATA/SEEK_HOLE)` instead (cloud-hypervisor's "sparse" range table).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// A piece of a file range: `len` bytes at file offset `offset`, data or hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
    pub data: bool,
}

fn seek(fd: BorrowedFd<'_>, pos: u64, whence: i32) -> io::Result<Option<u64>> {
    let pos = i64::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a borrowed, open fd; it touches no memory of ours. It moves the file
    // offset, which nothing that maps guest RAM relies on.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), pos, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None), // no data (or hole) at or after `pos`
        _ => Err(e),
    }
}

/// Splits `[start, start + len)` of `fd` into data and hole segments, in order. An error
/// (a file system without SEEK_DATA) means the caller should treat everything as data.
pub fn segments(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<Vec<Segment>> {
    let end = start
        .checked_add(len)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = seek(fd, pos, libc::SEEK_DATA)?.unwrap_or(end).min(end);
        if data > pos {
            out.push(Segment {
                offset: pos,
                len: data - pos,
                data: false,
            });
        }
        if data >= end {
            break;
        }
        let hole = seek(fd, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        out.push(Segment {
            offset: data,
            len: hole - data,
            data: true,
        });
        pos = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::{AsFd, FromRawFd};
    use std::os::unix::fs::FileExt;

    #[test]
    fn memfd_holes_and_data_are_found() {
        // SAFETY: memfd_create returns a new fd that the File takes ownership of.
        let f = unsafe { File::from_raw_fd(libc::memfd_create(c"t".as_ptr(), 0)) };
        f.set_len(64 << 12).unwrap();
        f.write_all_at(&[1], 5 << 12).unwrap();
        f.write_all_at(&[1; 8192], 6 << 12).unwrap();
        f.write_all_at(&[1], (40 << 12) + 7).unwrap();
        let segs = segments(f.as_fd(), 4 << 12, 40 << 12).unwrap();
        let seg = |o: u64, l: u64, data| Segment {
            offset: o << 12,
            len: l << 12,
            data,
        };
        assert_eq!(
            segs,
            vec![
                seg(4, 1, false),
                seg(5, 3, true),
                seg(8, 32, false),
                seg(40, 1, true),
                seg(41, 3, false),
            ]
        );
        assert_eq!(
            segments(f.as_fd(), 10 << 12, 4 << 12).unwrap(),
            vec![seg(10, 4, false)]
        );
    }
}
