//! Guest RAM: one shared memfd mapped as `GuestMemoryMmap<AtomicBitmap>`.
//!
//! Shared and fd-backed so an out-of-process device (vfio-user) can DMA into it, and so
//! the VMM's own writes through vm-memory land in the AtomicBitmap for migration.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::layout;

pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create guest RAM file (memfd_create): {0}")]
    Memfd(std::io::Error),
    #[error("cannot size guest RAM to {size} bytes: {err}")]
    Truncate { size: u64, err: std::io::Error },
    #[error("cannot seal guest RAM against resizing (F_ADD_SEALS): {0}")]
    Seal(std::io::Error),
    #[error("cannot map guest RAM: {0}")]
    Map(String),
    #[error("guest RAM size {0} is not a multiple of 4 KiB or is below 1 MiB")]
    BadSize(u64),
}

/// A RAM region: where it sits in the guest and where its bytes sit in the memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    pub gpa: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// Guest RAM and the memfd behind it.
pub struct Ram {
    pub mem: GuestMemory,
    /// Shared with out-of-process devices (vfio-user DMA maps it).
    #[allow(dead_code)]
    pub file: Arc<File>,
    pub ranges: Vec<RamRange>,
    pub size: u64,
}

impl Ram {
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size < (1 << 20) || !size.is_multiple_of(4096) {
            return Err(MemoryError::BadSize(size));
        }
        let file = Arc::new(memfd("minivmm-ram")?);
        file.set_len(size)
            .map_err(|err| MemoryError::Truncate { size, err })?;
        seal_size(&file)?;
        let mut ranges = Vec::new();
        let mut off = 0;
        for (gpa, len) in layout::ram_ranges(size) {
            ranges.push(RamRange {
                gpa,
                len,
                file_offset: off,
            });
            off += len;
        }
        let with_files = ranges.iter().map(|r| {
            let fo = FileOffset::from_arc(file.clone(), r.file_offset);
            (GuestAddress(r.gpa), r.len as usize, Some(fo))
        });
        let mem = GuestMemoryMmap::from_ranges_with_files(with_files)
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(Ram {
            mem,
            file,
            ranges,
            size,
        })
    }
}

fn memfd(name: &str) -> Result<File, MemoryError> {
    let cname = std::ffi::CString::new(name).map_err(|e| MemoryError::Memfd(e.into()))?;
    // SAFETY: cname is a valid NUL-terminated string; the flags are plain constants.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Devices get this file: sealed, no device (or bug) can shrink it under our mappings, which
/// would turn every access to the lost pages into SIGBUS here.
fn seal_size(file: &File) -> Result<(), MemoryError> {
    // SAFETY: F_ADD_SEALS only changes the seal set of an fd we own.
    let r = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    if r < 0 {
        return Err(MemoryError::Seal(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn split_ram_is_one_file() {
        let ram = Ram::new(layout::PCI_HOLE_START + (1 << 20)).unwrap();
        assert_eq!(ram.ranges.len(), 2);
        assert_eq!(ram.ranges[1].file_offset, layout::PCI_HOLE_START);
        ram.mem
            .write_obj(0xabu8, GuestAddress(layout::FOUR_GIB))
            .unwrap();
        assert_eq!(ram.mem.num_regions(), 2);
        assert!(Ram::new(4095).is_err());
    }

    #[test]
    fn ram_cannot_be_resized_by_whoever_holds_the_fd() {
        let ram = Ram::new(2 << 20).unwrap();
        let shrink = ram.file.set_len(1 << 20).unwrap_err();
        assert_eq!(shrink.raw_os_error(), Some(libc::EPERM), "{shrink}");
        assert!(ram.file.set_len(4 << 20).is_err());
        assert_eq!(ram.file.metadata().unwrap().len(), 2 << 20);
    }
}
