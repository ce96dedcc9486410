//! A test-only MODEL of the kernel side of VFIO for one mtty device, loaded into a real
//! process with `LD_PRELOAD`. It proves minivmm's side of the VFIO uAPI (vfio-ioctls and
//! minivmm's own ioctls, sizes, state machine use) on machines without /dev/vfio; it proves
//! nothing about the kernel's side, which it only imitates from reading the uAPI and mtty.
//!
//! It replaces the libc entry points that vfio-ioctls and std reach these files through:
//! `open`/`open64`/`openat`/`openat64` (`/dev/vfio/vfio` and `/dev/vfio/<group>`), `ioctl`,
//! `read`/`write` (migration data files), `pread64`/`pwrite64` (region accesses on the device
//! file; the `pread`/`pwrite` names too). Everything else goes to the kernel unchanged, by
//! raw system call: that needs no symbol lookup that could itself land here, and never
//! forwards a variadic call (open, ioctl) through a non-variadic pointer.
//!
//! The model's files are real descriptors (empty memfds, so close, dup, poll and fd reuse
//! behave as the kernel makes them), recognised by their (st_dev, st_ino): that identity
//! follows a file through dup() and F_DUPFD (the device fd minivmm duplicates), and a
//! reused fd number names a different inode, so nothing is keyed by fd number. Objects are
//! kept after their last descriptor closes (a test process makes a handful).
//!
//! KVM: `KVM_SET_DEVICE_ATTR` with `KVM_DEV_VFIO_FILE` naming a model group is answered
//! here (real KVM would refuse a memfd); a KVM without the VFIO device gets a model one.
//! Everything else KVM is real.
//!
//! Configured by `VFIO_MODEL` (see `config`), read at first use; without it every call is
//! forwarded.

mod config;
mod fsm;
mod model;
mod mtty;
mod sys;

use std::ffi::CStr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use libc::{c_char, c_int, c_long, c_uint, c_ulong, c_void, off64_t, size_t, ssize_t};

use model::Model;
use sys::real::{Real, fstat_id, raw_write};

/// An error number, as the kernel would return it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("errno {0}")]
pub struct Errno(pub i32);

impl Errno {
    pub const INVAL: Errno = Errno(libc::EINVAL);
    pub const FAULT: Errno = Errno(libc::EFAULT);
    pub const NOTTY: Errno = Errno(libc::ENOTTY);
    pub const BADF: Errno = Errno(libc::EBADF);
    pub const BUSY: Errno = Errno(libc::EBUSY);
    pub const NOENT: Errno = Errno(libc::ENOENT);
    pub const NODEV: Errno = Errno(libc::ENODEV);
    pub const EXIST: Errno = Errno(libc::EEXIST);
    pub const NOSPC: Errno = Errno(libc::ENOSPC);
    pub const NXIO: Errno = Errno(libc::ENXIO);
    pub const TOOBIG: Errno = Errno(libc::E2BIG);
    pub const OVERFLOW: Errno = Errno(libc::EOVERFLOW);
    pub const NOMEM: Errno = Errno(libc::ENOMEM);
    pub const SPIPE: Errno = Errno(libc::ESPIPE);
    pub const IO: Errno = Errno(libc::EIO);
}

static MODEL: OnceLock<Option<Mutex<Model<Real>>>> = OnceLock::new();
/// Set once the model has handed out a file: until then nothing needs an fstat.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// st_dev of the model's memfds: a file elsewhere is not the model's, without taking the lock.
static MEMFD_DEV: AtomicU64 = AtomicU64::new(u64::MAX);

fn model() -> Option<&'static Mutex<Model<Real>>> {
    MODEL
        .get_or_init(|| {
            let spec = std::env::var("VFIO_MODEL").ok()?;
            match config::parse(&spec) {
                Ok(cfg) => {
                    let log_fd = cfg.log.as_deref().and_then(Real::open_log);
                    Some(Mutex::new(Model::new(
                        cfg,
                        Real {
                            log_fd,
                            memfd_dev: None,
                        },
                    )))
                }
                Err(e) => {
                    raw_write(2, format!("vfio-model: {e}; the model is off\n").as_bytes());
                    None
                }
            }
        })
        .as_ref()
}

fn with_model<T>(f: impl FnOnce(&mut Model<Real>) -> Option<T>) -> Option<T> {
    let m = model()?;
    let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
    let r = f(&mut g);
    if let Some(dev) = g.sys.memfd_dev {
        MEMFD_DEV.store(dev, Ordering::Relaxed);
        ACTIVE.store(true, Ordering::Release);
    }
    r
}

/// Runs `f` for a model file `fd`; None when `fd` is not one.
fn on_file<T>(fd: c_int, f: impl FnOnce(&mut Model<Real>, sys::FileId) -> Option<T>) -> Option<T> {
    if !ACTIVE.load(Ordering::Acquire) {
        return None;
    }
    let id = fstat_id(fd).ok()?;
    if id.0 != MEMFD_DEV.load(Ordering::Relaxed) {
        return None;
    }
    with_model(|m| if m.is_ours(id) { f(m, id) } else { None })
}

fn set_errno(e: Errno) {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() = e.0 };
}

/// A model result as a libc return value: the value, or -1 with errno.
fn ret<T: From<i8> + TryFrom<i64>>(r: Result<i64, Errno>) -> T {
    match r.and_then(|v| T::try_from(v).map_err(|_| Errno::INVAL)) {
        Ok(v) => v,
        Err(e) => {
            set_errno(e);
            T::from(-1)
        }
    }
}

/// Panics must not unwind into C callers: a panic becomes EIO.
fn guard<T: From<i8> + TryFrom<i64>>(f: impl FnOnce() -> Result<i64, Errno>) -> T {
    ret(catch_unwind(AssertUnwindSafe(f)).unwrap_or(Err(Errno::IO)))
}

fn sysret(r: c_long) -> Result<i64, Errno> {
    if r < 0 {
        // SAFETY: as in set_errno.
        Err(Errno(unsafe { *libc::__errno_location() }))
    } else {
        Ok(r)
    }
}

/// # Safety
/// `path` is NUL-terminated or null (open's contract).
unsafe fn open_common(dirfd: c_int, path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    guard(|| {
        if !path.is_null() {
            // SAFETY: open's caller passes a NUL-terminated path.
            let p = unsafe { CStr::from_ptr(path) };
            if p.to_bytes().starts_with(b"/dev/vfio/") {
                let s = p.to_str().map_err(|_| Errno::NOENT)?;
                if let Some(r) = with_model(|m| m.open(s)) {
                    return r.map(i64::from);
                }
            }
        }
        // SAFETY: forwards open's own arguments to the system call.
        sysret(unsafe { libc::syscall(libc::SYS_openat, dirfd, path, flags, mode) })
    })
}

/// # Safety
/// As libc's open.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    // SAFETY: our caller's contract is open's.
    unsafe { open_common(libc::AT_FDCWD, path, flags, mode) }
}

/// # Safety
/// As libc's open64.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    // SAFETY: our caller's contract is open's.
    unsafe { open_common(libc::AT_FDCWD, path, flags, mode) }
}

/// # Safety
/// As libc's openat.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn openat(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: c_uint,
) -> c_int {
    // SAFETY: our caller's contract is openat's.
    unsafe { open_common(dirfd, path, flags, mode) }
}

/// # Safety
/// As libc's openat64.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn openat64(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mode: c_uint,
) -> c_int {
    // SAFETY: our caller's contract is openat's.
    unsafe { open_common(dirfd, path, flags, mode) }
}

const KVM_CREATE_DEVICE: c_ulong = 0xc00c_aee0;
const KVM_SET_DEVICE_ATTR: c_ulong = 0x4018_aee1;
const KVM_DEV_TYPE_VFIO: u32 = 4;
const KVM_CREATE_DEVICE_TEST: u32 = 1;

/// # Safety
/// As libc's ioctl: `arg` is what `req` expects.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn ioctl(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int {
    guard(|| {
        let a = arg as u64;
        if let Some(r) = on_file(fd, |m, id| m.ioctl(id, req, a)) {
            return r;
        }
        if req == KVM_SET_DEVICE_ATTR
            && ACTIVE.load(Ordering::Acquire)
            && let Some(r) = with_model(|m| m.kvm_vfio_ioctl(None, req, a))
        {
            return r;
        }
        // SAFETY: forwards ioctl's own arguments to the system call.
        let real = sysret(unsafe { libc::syscall(libc::SYS_ioctl, fd, req, arg) });
        if req == KVM_CREATE_DEVICE && real.is_err() {
            return create_kvm_vfio(a).unwrap_or(real);
        }
        real
    })
}

/// KVM_CREATE_DEVICE for the VFIO type on a KVM that has none: a model device. None: not
/// that case (the real error stands).
fn create_kvm_vfio(arg: u64) -> Option<Result<i64, Errno>> {
    with_model(|m| {
        use sys::{Sys, read_u32, write_u32};
        let ty = read_u32(&m.sys, arg).ok()?;
        let flags = read_u32(&m.sys, arg + 8).ok()?;
        if ty != KVM_DEV_TYPE_VFIO {
            return None;
        }
        if flags & KVM_CREATE_DEVICE_TEST != 0 {
            return Some(Ok(0));
        }
        Some(m.new_kvm_vfio().and_then(|fd| {
            write_u32(&m.sys, arg + 4, fd as u32)?;
            let _ = m.sys.file_id(fd);
            Ok(0)
        }))
    })
}

/// # Safety
/// As libc's read.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, count: size_t) -> ssize_t {
    guard(|| {
        if let Some(r) = on_file(fd, |m, id| m.read(id, buf as u64, count)) {
            return r.map(|n| n as i64);
        }
        // SAFETY: forwards read's own arguments.
        sysret(unsafe { libc::syscall(libc::SYS_read, fd, buf, count) })
    })
}

/// # Safety
/// As libc's write.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, count: size_t) -> ssize_t {
    guard(|| {
        if let Some(r) = on_file(fd, |m, id| m.write(id, buf as u64, count)) {
            return r.map(|n| n as i64);
        }
        // SAFETY: forwards write's own arguments.
        sysret(unsafe { libc::syscall(libc::SYS_write, fd, buf, count) })
    })
}

fn pio(fd: c_int, buf: u64, count: size_t, off: off64_t, write: bool) -> Result<i64, Errno> {
    if let Some(r) = on_file(fd, |m, id| {
        if off < 0 {
            return Some(Err(Errno::INVAL));
        }
        m.region_io(id, buf, count, off as u64, write)
    }) {
        return r.map(|n| n as i64);
    }
    let nr = if write {
        libc::SYS_pwrite64
    } else {
        libc::SYS_pread64
    };
    // SAFETY: forwards pread64/pwrite64's own arguments.
    sysret(unsafe { libc::syscall(nr, fd, buf, count, off) })
}

/// # Safety
/// As libc's pread64.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn pread64(
    fd: c_int,
    buf: *mut c_void,
    count: size_t,
    off: off64_t,
) -> ssize_t {
    guard(|| pio(fd, buf as u64, count, off, false))
}

/// # Safety
/// As libc's pread (the same function on 64-bit Linux).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn pread(
    fd: c_int,
    buf: *mut c_void,
    count: size_t,
    off: off64_t,
) -> ssize_t {
    guard(|| pio(fd, buf as u64, count, off, false))
}

/// # Safety
/// As libc's pwrite64.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn pwrite64(
    fd: c_int,
    buf: *const c_void,
    count: size_t,
    off: off64_t,
) -> ssize_t {
    guard(|| pio(fd, buf as u64, count, off, true))
}

/// # Safety
/// As libc's pwrite.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn pwrite(
    fd: c_int,
    buf: *const c_void,
    count: size_t,
    off: off64_t,
) -> ssize_t {
    guard(|| pio(fd, buf as u64, count, off, true))
}

#[cfg(test)]
mod tests;
