//! One end of a migration connection over any byte stream (TcpStream in the VMM, UnixStream
//! pairs and in-memory buffers in tests). Reads are unbuffered on purpose: page bytes go from
//! the socket straight into guest memory, so no user-space buffer may hold them back.

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use vm_memory::VolatileMemoryError;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::volatile_memory::VolatileSlice;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, ReadVolatile, WriteVolatile,
};

use super::codec::{decode_frame, encode_frame, read_exact_bounded, read_header};
use super::{HEADER_LEN, MAX_PAGES_BYTES, Message, MessageType, ProtocolError};
use crate::ranges::MemoryRange;

pub struct Channel<S> {
    stream: S,
    /// Page bytes announced by the last `MemoryPages` and not yet read: where they go.
    pending: Option<MemoryRange>,
    bytes_written: u64,
    bytes_read: u64,
    /// The stream's read/write timeout, so an expiry reads "timed out after N s"; it also
    /// bounds how long one frame may take once its first byte is in.
    timeout: Option<Duration>,
    /// When the first byte of the frame being read arrived.
    frame_started: Option<Instant>,
}

impl<S> Channel<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            pending: None,
            bytes_written: 0,
            bytes_read: 0,
            timeout: None,
            frame_started: None,
        }
    }

    /// Names the timeout the caller set on the stream: any expiry of it is then reported as
    /// [`ProtocolError::TimedOut`] (a retry-able `Timeout` at a frame boundary included).
    /// It becomes a deadline per frame too: a peer that trickles bytes, each read just inside
    /// the socket timeout, is cut off once a frame has taken longer than `timeout` (noticed
    /// at its next byte, so at worst after twice the timeout).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    fn timed<T>(&self, r: Result<T, ProtocolError>) -> Result<T, ProtocolError> {
        match (r, self.timeout) {
            (Err(e), Some(t)) if e.is_timeout() => Err(ProtocolError::TimedOut(t)),
            (r, _) => r,
        }
    }

    /// The stream, e.g. to set timeouts or TCP options on a TcpStream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Bytes put on the wire so far, headers included.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }
}

impl<S: Write> Channel<S> {
    /// Sends any message except `MemoryPages`, whose bytes come from guest memory
    /// ([`Channel::send_memory`]).
    pub fn send(&mut self, msg: &Message) -> Result<(), ProtocolError> {
        let r = self.send_raw(msg);
        self.timed(r)
    }

    fn send_raw(&mut self, msg: &Message) -> Result<(), ProtocolError> {
        if let Message::MemoryPages { .. } = msg {
            return Err(ProtocolError::malformed(
                MessageType::MemoryPages,
                "use send_memory to stream page data",
            ));
        }
        let (head, tail) = encode_frame(msg)?;
        self.stream.write_all(&head)?;
        if !tail.is_empty() {
            self.stream.write_all(tail)?;
        }
        self.stream.flush()?;
        self.bytes_written += (head.len() + tail.len()) as u64;
        Ok(())
    }
}

impl<S: Write + WriteVolatile> Channel<S> {
    /// Sends `range` of guest memory as one `MemoryPages` frame, streaming the bytes from the
    /// guest mapping to the socket without an intermediate buffer.
    pub fn send_memory<M>(&mut self, mem: &M, range: MemoryRange) -> Result<(), ProtocolError>
    where
        M: GuestMemoryBackend + ?Sized,
    {
        let r = self.send_memory_raw(mem, range);
        self.timed(r)
    }

    fn send_memory_raw<M>(&mut self, mem: &M, range: MemoryRange) -> Result<(), ProtocolError>
    where
        M: GuestMemoryBackend + ?Sized,
    {
        let len = usize::try_from(range.len).unwrap_or(usize::MAX);
        // Checked before the header goes out: a failure after it would desync the stream.
        if range.len > MAX_PAGES_BYTES || !mem.check_range(GuestAddress(range.gpa), len) {
            return Err(ProtocolError::malformed(
                MessageType::MemoryPages,
                format!("cannot send {range:x?}: too long or outside guest memory"),
            ));
        }
        let msg = Message::MemoryPages {
            gpa: range.gpa,
            len: range.len,
        };
        let (head, _) = encode_frame(&msg)?;
        self.stream.write_all(&head)?;
        mem.write_all_volatile_to(GuestAddress(range.gpa), &mut self.stream, len)?;
        self.bytes_written += head.len() as u64 + range.len;
        Ok(())
    }
}

impl<S: Read> Channel<S> {
    /// Receives the next message. After `MemoryPages` the page bytes must be consumed
    /// (`recv_memory` or `discard_pending`) before the next call.
    pub fn recv(&mut self) -> Result<Message, ProtocolError> {
        let r = self.recv_raw();
        self.timed(r)
    }

    fn recv_raw(&mut self) -> Result<Message, ProtocolError> {
        if let Some(p) = self.pending {
            return Err(ProtocolError::PendingPayload(p.len));
        }
        self.frame_started = None;
        let header = read_header(&mut self.frame())?;
        self.bytes_read += HEADER_LEN as u64;
        if header.msg_type == MessageType::MemoryPages {
            return self.recv_pages_header(header.length);
        }
        let payload = read_exact_bounded(&mut self.frame(), header.length)?;
        self.bytes_read += header.length;
        decode_frame(header, &payload)
    }

    /// The stream as the reader of the current frame, under its deadline.
    fn frame(&mut self) -> FrameReader<'_, S> {
        FrameReader {
            inner: &mut self.stream,
            limit: self.timeout,
            started: &mut self.frame_started,
        }
    }

    fn recv_pages_header(&mut self, length: u64) -> Result<Message, ProtocolError> {
        let t = MessageType::MemoryPages;
        let len = length
            .checked_sub(8)
            .ok_or_else(|| ProtocolError::malformed(t, "shorter than its gpa"))?;
        let raw = read_exact_bounded(&mut self.frame(), 8)?;
        let mut gpa = [0u8; 8];
        gpa.copy_from_slice(&raw);
        let range = MemoryRange::new(u64::from_le_bytes(gpa), len);
        if range.end().is_none() {
            return Err(ProtocolError::malformed(t, format!("{range:x?} wraps")));
        }
        self.bytes_read += 8;
        self.pending = Some(range);
        Ok(Message::MemoryPages {
            gpa: range.gpa,
            len,
        })
    }

    /// Reads and drops the pending page bytes (e.g. when replying with Abandon would be
    /// pointless before draining them). Memory use is one small buffer.
    pub fn discard_pending(&mut self) -> Result<(), ProtocolError> {
        let r = self.discard_raw();
        self.timed(r)
    }

    fn discard_raw(&mut self) -> Result<(), ProtocolError> {
        if let Some(p) = self.pending.take() {
            let copied = std::io::copy(&mut self.frame().take(p.len), &mut std::io::sink())?;
            self.bytes_read += copied;
            if copied != p.len {
                return Err(ProtocolError::Truncated {
                    expected: p.len,
                    got: copied,
                });
            }
        }
        Ok(())
    }

    /// The range announced by the last `MemoryPages`, while its bytes are unread.
    pub fn pending(&self) -> Option<MemoryRange> {
        self.pending
    }
}

impl<S: Read + ReadVolatile> Channel<S> {
    /// Reads the pending page bytes straight into guest memory at the announced gpa. The
    /// caller checks the range against the VM's layout first; this only refuses what vm-memory
    /// cannot map. Writes go through vm-memory so the destination's dirty bitmap sees them.
    pub fn recv_memory<M>(&mut self, mem: &M) -> Result<(), ProtocolError>
    where
        M: GuestMemoryBackend + ?Sized,
    {
        let r = self.recv_memory_raw(mem);
        self.timed(r)
    }

    fn recv_memory_raw<M>(&mut self, mem: &M) -> Result<(), ProtocolError>
    where
        M: GuestMemoryBackend + ?Sized,
    {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let len = usize::try_from(p.len).unwrap_or(usize::MAX);
        if !mem.check_range(GuestAddress(p.gpa), len) {
            return Err(ProtocolError::malformed(
                MessageType::MemoryPages,
                format!("{p:x?} is outside guest memory"),
            ));
        }
        // vm-memory's read_exact_volatile_from issues a single read per region and calls a
        // short read an error, which a socket delivers all the time: loop until done.
        let mut done = 0;
        while done < len {
            let at = GuestAddress(p.gpa + done as u64);
            match mem.read_volatile_from(at, &mut self.frame(), len - done) {
                Ok(0) => {
                    return Err(ProtocolError::Truncated {
                        expected: p.len,
                        got: done as u64,
                    });
                }
                Ok(n) => {
                    done += n;
                    self.bytes_read += n as u64;
                }
                Err(GuestMemoryError::IOError(e)) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Reads of one frame, failing with `TimedOut` once the frame has taken longer than `limit`
/// since its first byte.
struct FrameReader<'a, S> {
    inner: &'a mut S,
    limit: Option<Duration>,
    started: &'a mut Option<Instant>,
}

impl<S> FrameReader<'_, S> {
    fn check(&self) -> std::io::Result<()> {
        match (self.limit, *self.started) {
            (Some(limit), Some(t0)) if t0.elapsed() > limit => Err(ErrorKind::TimedOut.into()),
            _ => Ok(()),
        }
    }

    fn note(&mut self, n: usize) {
        if n > 0 && self.started.is_none() {
            *self.started = Some(Instant::now());
        }
    }
}

impl<S: Read> Read for FrameReader<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.check()?;
        let n = self.inner.read(buf)?;
        self.note(n);
        Ok(n)
    }
}

impl<S: ReadVolatile> ReadVolatile for FrameReader<'_, S> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        self.check().map_err(VolatileMemoryError::IOError)?;
        let n = self.inner.read_volatile(buf)?;
        self.note(n);
        Ok(n)
    }
}
