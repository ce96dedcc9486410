//! What the model needs from the process: copies to and from the caller's memory (checked,
//! as copy_from_user/copy_to_user are), new file descriptors for its objects, references to
//! the caller's eventfds, and a log. `Real` does it with raw system calls, never through the
//! libc functions this library replaces (which would re-enter the model); tests use fakes.

use crate::Errno;

pub trait Sys {
    /// Copies `buf.len()` bytes from the caller's address `addr`; EFAULT if unmapped.
    fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno>;
    fn write_mem(&self, addr: u64, buf: &[u8]) -> Result<(), Errno>;
    /// A new file descriptor (a real, otherwise unused file) and its identity.
    fn new_fd(&mut self, what: &str) -> Result<(i32, FileId), Errno>;
    /// The identity of the file behind `fd`, EBADF when there is none.
    fn file_id(&self, fd: i32) -> Result<FileId, Errno>;
    /// A reference of the model's own to the eventfd `fd` (EBADF: no fd, EINVAL: no eventfd).
    fn eventfd_ref(&mut self, fd: i32) -> Result<i32, Errno>;
    /// Drops a reference taken with `eventfd_ref`.
    fn eventfd_put(&mut self, fd: i32);
    fn signal(&mut self, fd: i32);
    /// How many open descriptors of this process refer to any of `files`.
    fn open_count(&self, files: &[FileId]) -> usize;
    fn log(&mut self, line: &str);
}

/// (st_dev, st_ino) of a file: stays the same through dup() and fd passing, and two live
/// files never share it, so a reused fd number is never mistaken for an old object.
pub type FileId = (u64, u64);

pub fn c_read_string(sys: &dyn Sys, addr: u64, max: usize) -> Result<String, Errno> {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while out.len() < max {
        sys.read_mem(addr + out.len() as u64, &mut byte)?;
        if byte[0] == 0 {
            return String::from_utf8(out).map_err(|_| Errno::INVAL);
        }
        out.push(byte[0]);
    }
    Err(Errno::INVAL)
}

pub fn read_u32(sys: &dyn Sys, addr: u64) -> Result<u32, Errno> {
    let mut b = [0u8; 4];
    sys.read_mem(addr, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

pub fn read_u64(sys: &dyn Sys, addr: u64) -> Result<u64, Errno> {
    let mut b = [0u8; 8];
    sys.read_mem(addr, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

pub fn write_u32(sys: &dyn Sys, addr: u64, v: u32) -> Result<(), Errno> {
    sys.write_mem(addr, &v.to_le_bytes())
}

pub fn write_u64(sys: &dyn Sys, addr: u64, v: u64) -> Result<(), Errno> {
    sys.write_mem(addr, &v.to_le_bytes())
}

pub mod real {
    use super::{FileId, Sys};
    use crate::Errno;
    use libc::{c_long, c_ulong, c_void};

    // Variadic arguments the kernel reads as unsigned long must be passed at that width: an
    // int literal leaves the register's upper half undefined.
    const ONE: c_ulong = 1;
    const ZERO: c_ulong = 0;

    fn errno() -> Errno {
        // SAFETY: __errno_location returns this thread's errno slot, always valid.
        Errno(unsafe { *libc::__errno_location() })
    }

    fn check(r: c_long) -> Result<c_long, Errno> {
        if r < 0 { Err(errno()) } else { Ok(r) }
    }

    pub fn fstat_id(fd: i32) -> Result<FileId, Errno> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
        // SAFETY: fstat writes one struct stat into `st`, which is large enough.
        check(unsafe { libc::syscall(libc::SYS_fstat, fd, st.as_mut_ptr()) })?;
        // SAFETY: fstat succeeded, so it filled in `st`.
        let st = unsafe { st.assume_init() };
        Ok((st.st_dev, st.st_ino))
    }

    pub fn raw_close(fd: i32) {
        // SAFETY: closes a descriptor the model owns.
        unsafe { libc::syscall(libc::SYS_close, fd) };
    }

    pub fn raw_write(fd: i32, b: &[u8]) -> isize {
        // SAFETY: `b` is a valid buffer of b.len() bytes.
        unsafe { libc::syscall(libc::SYS_write, fd, b.as_ptr(), b.len()) as isize }
    }

    /// The process itself, through raw system calls.
    pub struct Real {
        pub log_fd: Option<i32>,
        /// st_dev of the memfds handed out (all memfds share it).
        pub memfd_dev: Option<u64>,
    }

    impl Real {
        pub fn open_log(path: &str) -> Option<i32> {
            let c = std::ffi::CString::new(path).ok()?;
            let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC;
            // SAFETY: `c` is a NUL-terminated path.
            let fd = unsafe {
                libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c.as_ptr(), flags, 0o644)
            };
            (fd >= 0).then_some(fd as i32)
        }
    }

    impl Sys for Real {
        fn read_mem(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
            if buf.is_empty() {
                return Ok(());
            }
            let local = libc::iovec {
                iov_base: buf.as_mut_ptr().cast::<c_void>(),
                iov_len: buf.len(),
            };
            let remote = libc::iovec {
                iov_base: addr as *mut c_void,
                iov_len: buf.len(),
            };
            // SAFETY: process_vm_readv on this process copies into `buf` (ours) from `addr`,
            // failing with EFAULT instead of faulting when the caller's address is bad.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_process_vm_readv,
                    libc::getpid(),
                    &local,
                    ONE,
                    &remote,
                    ONE,
                    ZERO,
                )
            };
            match check(n) {
                Ok(n) if n as usize == buf.len() => Ok(()),
                _ => Err(Errno::FAULT),
            }
        }

        fn write_mem(&self, addr: u64, buf: &[u8]) -> Result<(), Errno> {
            if buf.is_empty() {
                return Ok(());
            }
            let local = libc::iovec {
                iov_base: buf.as_ptr() as *mut c_void,
                iov_len: buf.len(),
            };
            let remote = libc::iovec {
                iov_base: addr as *mut c_void,
                iov_len: buf.len(),
            };
            // SAFETY: as read_mem, in the other direction; `buf` is only read.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_process_vm_writev,
                    libc::getpid(),
                    &local,
                    ONE,
                    &remote,
                    ONE,
                    ZERO,
                )
            };
            match check(n) {
                Ok(n) if n as usize == buf.len() => Ok(()),
                _ => Err(Errno::FAULT),
            }
        }

        fn new_fd(&mut self, what: &str) -> Result<(i32, FileId), Errno> {
            let name =
                std::ffi::CString::new(format!("vfio-model-{what}")).map_err(|_| Errno::INVAL)?;
            // SAFETY: `name` is NUL-terminated; memfd_create only reads it.
            let fd = check(unsafe {
                libc::syscall(libc::SYS_memfd_create, name.as_ptr(), libc::MFD_CLOEXEC)
            })? as i32;
            match fstat_id(fd) {
                Ok(id) => {
                    self.memfd_dev = Some(id.0);
                    Ok((fd, id))
                }
                Err(e) => {
                    raw_close(fd);
                    Err(e)
                }
            }
        }

        fn file_id(&self, fd: i32) -> Result<FileId, Errno> {
            fstat_id(fd)
        }

        fn eventfd_ref(&mut self, fd: i32) -> Result<i32, Errno> {
            let link =
                std::ffi::CString::new(format!("/proc/self/fd/{fd}")).map_err(|_| Errno::INVAL)?;
            let mut buf = [0u8; 64];
            // SAFETY: readlink writes at most buf.len() bytes into `buf`.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_readlinkat,
                    libc::AT_FDCWD,
                    link.as_ptr(),
                    buf.as_mut_ptr(),
                    buf.len(),
                )
            };
            let n = check(n).map_err(|_| Errno::BADF)? as usize;
            if &buf[..n.min(buf.len())] != b"anon_inode:[eventfd]" {
                return Err(Errno::INVAL);
            }
            // SAFETY: duplicates a descriptor; the copy is the model's.
            let dup =
                check(unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_DUPFD_CLOEXEC, ZERO) })?;
            Ok(dup as i32)
        }

        fn eventfd_put(&mut self, fd: i32) {
            raw_close(fd);
        }

        fn signal(&mut self, fd: i32) {
            raw_write(fd, &1u64.to_ne_bytes());
        }

        fn open_count(&self, files: &[FileId]) -> usize {
            let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
                return 0;
            };
            dir.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
                .filter(|&fd| fstat_id(fd).is_ok_and(|id| files.contains(&id)))
                .count()
        }

        fn log(&mut self, line: &str) {
            if let Some(fd) = self.log_fd {
                let mut l = format!("vfio-model[{}]: {line}\n", std::process::id());
                l.truncate(4096);
                raw_write(fd, l.as_bytes());
            }
        }
    }
}
