//! File descriptor passing over a UNIX stream socket with `SCM_RIGHTS` (sendmsg/recvmsg).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::error::{Error, Result};

/// The kernel refuses more than this many fds in one `SCM_RIGHTS` message (SCM_MAX_FD).
const SCM_MAX_FD: usize = 253;
const FD_SIZE: usize = mem::size_of::<RawFd>();

/// A control-message buffer aligned for `cmsghdr`.
struct CmsgBuf(Vec<u64>);

impl CmsgBuf {
    fn for_fds(n: usize) -> CmsgBuf {
        // SAFETY: CMSG_SPACE only does arithmetic on its argument.
        let space = unsafe { libc::CMSG_SPACE((n * FD_SIZE) as u32) } as usize;
        CmsgBuf(vec![0u64; space.div_ceil(8)])
    }
    fn len(&self) -> usize {
        self.0.len() * 8
    }
}

/// Sends every byte of `bufs`, with `fds` attached to the first byte. Uses MSG_NOSIGNAL so a
/// vanished peer is an EPIPE error rather than a SIGPIPE.
pub fn send_with_fds(sock: &UnixStream, bufs: &[&[u8]], fds: &[BorrowedFd<'_>]) -> Result<()> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    if fds.len() > SCM_MAX_FD || (total == 0 && !fds.is_empty()) {
        return Err(Error::InvalidArgument(format!(
            "cannot send {} fds with {total} bytes",
            fds.len()
        )));
    }
    let mut sent = 0;
    while sent < total {
        let attach = if sent == 0 { fds } else { &[] };
        match sendmsg_once(sock, bufs, sent, attach) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn sendmsg_once(
    sock: &UnixStream,
    bufs: &[&[u8]],
    skip: usize,
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let iov = remaining_iovecs(bufs, skip);
    // SAFETY: msghdr is plain data; an all-zero value is valid and filled in below.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len();
    let mut cmsg = CmsgBuf::for_fds(fds.len());
    if !fds.is_empty() {
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        msg.msg_controllen = cmsg.len();
        // SAFETY: msg_control points at a buffer of CMSG_SPACE(fds) bytes, aligned for
        // cmsghdr, so the first header and its data (fds.len() ints) lie inside it.
        unsafe {
            let hdr = libc::CMSG_FIRSTHDR(&msg);
            (*hdr).cmsg_level = libc::SOL_SOCKET;
            (*hdr).cmsg_type = libc::SCM_RIGHTS;
            (*hdr).cmsg_len = libc::CMSG_LEN((fds.len() * FD_SIZE) as u32) as usize;
            let data = libc::CMSG_DATA(hdr).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: msg describes live buffers (iov borrows `bufs`, control borrows `cmsg`) for the
    // duration of the call; the kernel only reads them.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn remaining_iovecs(bufs: &[&[u8]], mut skip: usize) -> Vec<libc::iovec> {
    let mut iov = Vec::with_capacity(bufs.len());
    for b in bufs {
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let rest = &b[skip..];
        skip = 0;
        iov.push(libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        });
    }
    iov
}

/// Receives up to `buf.len()` bytes (0 means the peer closed). File descriptors that arrive are
/// appended to `fds`; if that would exceed `max_fds` in total, every fd received by this call
/// is closed and `TooManyFds` returned (the kernel closes any it could not deliver).
pub fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    max_fds: usize,
) -> Result<usize> {
    let room = max_fds.saturating_sub(fds.len()).min(SCM_MAX_FD);
    let mut cmsg = CmsgBuf::for_fds(room);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; an all-zero value is valid and filled in below.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if room > 0 {
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        msg.msg_controllen = cmsg.len();
    }
    let n = loop {
        // SAFETY: iov points at `buf` and msg_control at `cmsg`, both live and writable for
        // their stated lengths during the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    };
    let received = take_fds(&msg);
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        drop(received);
        return Err(Error::TooManyFds { max: max_fds });
    }
    fds.extend(received);
    Ok(n)
}

/// Takes ownership of every fd in the SCM_RIGHTS messages of `msg`.
fn take_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut out = Vec::new();
    if msg.msg_control.is_null() {
        return out;
    }
    // SAFETY: recvmsg filled msg_control/msg_controllen; the CMSG_* macros walk only within
    // msg_controllen, and each SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / 4 fds
    // that the kernel just installed in our fd table, owned by nobody else.
    unsafe {
        let mut hdr = libc::CMSG_FIRSTHDR(msg);
        while !hdr.is_null() {
            if (*hdr).cmsg_level == libc::SOL_SOCKET && (*hdr).cmsg_type == libc::SCM_RIGHTS {
                let data_len = (*hdr).cmsg_len - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(hdr).cast::<RawFd>();
                for i in 0..data_len / FD_SIZE {
                    out.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            hdr = libc::CMSG_NXTHDR(msg, hdr);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    fn temp_file(content: &[u8]) -> File {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("vfio-user-fdpass-{}-{n}", std::process::id());
        let path = std::env::temp_dir().join(name);
        let mut f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all(content).unwrap();
        f
    }

    #[test]
    fn fds_travel_with_data() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = temp_file(b"hello");
        send_with_fds(&a, &[b"ab", b"cd"], &[f.as_fd(), f.as_fd()]).unwrap();
        let mut buf = [0u8; 8];
        let mut fds = Vec::new();
        let n = recv_with_fds(&b, &mut buf, &mut fds, 4).unwrap();
        assert_eq!(&buf[..n], b"abcd");
        assert_eq!(fds.len(), 2);
        let mut g = File::from(fds.remove(0));
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
    }

    #[test]
    fn too_many_fds_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = temp_file(b"x");
        let many: Vec<_> = (0..5).map(|_| f.as_fd()).collect();
        send_with_fds(&a, &[b"z"], &many).unwrap();
        let mut buf = [0u8; 1];
        let mut fds = Vec::new();
        let r = recv_with_fds(&b, &mut buf, &mut fds, 2);
        assert!(matches!(r, Err(Error::TooManyFds { max: 2 })));
        assert!(fds.is_empty());
    }

    #[test]
    fn closed_peer_reads_zero() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let mut buf = [0u8; 4];
        assert_eq!(recv_with_fds(&b, &mut buf, &mut Vec::new(), 1).unwrap(), 0);
    }
}
