//! Message framing on the socket: one header, its payload, and the fds sent with it.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::fdpass::{recv_with_fds, send_with_fds};
use crate::header::{HEADER_SIZE, Header};

/// A received message.
#[derive(Debug)]
pub struct Message {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Sends `header` (whose size must already account for `payload`) with `fds` attached.
pub fn send_message(
    sock: &UnixStream,
    header: &Header,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<()> {
    if header.size as usize != HEADER_SIZE + payload.len() {
        return Err(Error::InvalidArgument(format!(
            "header size {} does not match a {}-byte payload",
            header.size,
            payload.len()
        )));
    }
    send_with_fds(sock, &[&header.encode(), payload], fds).map_err(peer_gone)
}

/// Receives one message no larger than `max_size` with at most `max_fds` fds, waiting until
/// `deadline` if one is given. Returns `None` when the peer closed the connection cleanly
/// between messages; a close inside a message is `DeviceLost`.
pub fn recv_message(
    sock: &UnixStream,
    max_size: usize,
    max_fds: usize,
    deadline: Option<Instant>,
) -> Result<Option<Message>> {
    let mut fds = Vec::new();
    let mut hdr = [0u8; HEADER_SIZE];
    if !fill(sock, &mut hdr, &mut fds, max_fds, deadline)? {
        return Ok(None);
    }
    let header = Header::decode(&hdr, max_size)?;
    // The size was bounded by `max_size` above, so this allocation is bounded too.
    let mut payload = vec![0u8; header.payload_len()];
    if !payload.is_empty() && !fill(sock, &mut payload, &mut fds, max_fds, deadline)? {
        return Err(Error::DeviceLost);
    }
    Ok(Some(Message {
        header,
        payload,
        fds,
    }))
}

/// Fills `buf` completely. Returns false if the peer closed before the first byte.
fn fill(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    max_fds: usize,
    deadline: Option<Instant>,
) -> Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::from(io::ErrorKind::TimedOut).into());
            }
            sock.set_read_timeout(Some(left))?;
        }
        let n = recv_with_fds(sock, &mut buf[got..], fds, max_fds).map_err(peer_gone)?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(Error::DeviceLost);
        }
        got += n;
    }
    Ok(true)
}

/// Socket errors that mean the other end has gone away become `DeviceLost`.
fn peer_gone(e: Error) -> Error {
    match e {
        Error::Io(ref io)
            if matches!(
                io.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::NotConnected
            ) =>
        {
            Error::DeviceLost
        }
        other => other,
    }
}

/// Whether an error is a receive timeout (SO_RCVTIMEO expiry or our own deadline).
pub(crate) fn is_timeout(e: &Error) -> bool {
    matches!(e, Error::Io(io) if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::{Command, MAX_MSG_SIZE};
    use std::io::Write;
    use std::time::Duration;

    #[test]
    fn message_round_trip_and_eof() {
        let (a, b) = UnixStream::pair().unwrap();
        let h = Header::request(7, Command::DeviceGetInfo, 3).unwrap();
        send_message(&a, &h, &[1, 2, 3], &[]).unwrap();
        let m = recv_message(&b, MAX_MSG_SIZE, 1, None).unwrap().unwrap();
        assert_eq!((m.header, m.payload.as_slice()), (h, &[1u8, 2, 3][..]));
        drop(a);
        assert!(recv_message(&b, MAX_MSG_SIZE, 1, None).unwrap().is_none());
    }

    #[test]
    fn truncated_message_is_device_lost() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let h = Header::request(7, Command::DeviceGetInfo, 16).unwrap();
        a.write_all(&h.encode()).unwrap();
        a.write_all(&[0; 4]).unwrap();
        drop(a);
        let r = recv_message(&b, MAX_MSG_SIZE, 1, None);
        assert!(matches!(r, Err(Error::DeviceLost)));
    }

    #[test]
    fn oversized_refused_before_reading_payload() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut h = Header::request(7, Command::RegionRead, 0).unwrap();
        h.size = 1 << 30;
        a.write_all(&h.encode()).unwrap();
        let r = recv_message(&b, MAX_MSG_SIZE, 1, None);
        assert!(matches!(r, Err(Error::TooLarge { .. })));
    }

    #[test]
    fn deadline_expires() {
        let (_a, b) = UnixStream::pair().unwrap();
        let t = Instant::now();
        let r = recv_message(&b, MAX_MSG_SIZE, 1, Some(t + Duration::from_millis(100)));
        assert!(r.as_ref().is_err_and(is_timeout), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
