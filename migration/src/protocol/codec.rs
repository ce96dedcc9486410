//! Frame header and payload encoding. Payload fields are fixed-width little-endian integers,
//! u16-length-prefixed UTF-8 text, and an opaque tail for state blobs; only the VM description
//! goes through bincode, being the one nested structure.

use std::io::{self, Read};

use super::{
    DestTimings, DevicePhase, HEADER_LEN, MAGIC, MAX_TEXT_LEN, MAX_ZERO_RANGES, Message,
    MessageType, PROTOCOL_VERSION, ProtocolError, RunState,
};
use crate::description::VmDescription;
use crate::ranges::MemoryRange;

/// A validated frame header: a known type whose length is within that type's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub msg_type: MessageType,
    pub length: u64,
}

impl Header {
    pub fn new(msg_type: MessageType, length: u64) -> Self {
        Self { msg_type, length }
    }

    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = PROTOCOL_VERSION;
        b[5] = 0; // flags: none defined yet
        b[6..8].copy_from_slice(&(self.msg_type as u16).to_le_bytes());
        b[8..16].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    /// Validates everything a header claims before any payload is read or allocated.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        if b[4] != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion(b[4]));
        }
        if b[5] != 0 {
            return Err(ProtocolError::UnknownFlags(b[5]));
        }
        let raw_type = u16::from_le_bytes([b[6], b[7]]);
        let msg_type =
            MessageType::from_u16(raw_type).ok_or(ProtocolError::UnknownType(raw_type))?;
        let mut len = [0u8; 8];
        len.copy_from_slice(&b[8..16]);
        let length = u64::from_le_bytes(len);
        let max = msg_type.max_payload();
        if length > max {
            return Err(ProtocolError::TooLarge {
                msg_type,
                length,
                max,
            });
        }
        Ok(Self { msg_type, length })
    }
}

/// Reads until `buf` is full, EOF, or an error; returns how far it got so the caller can tell
/// a clean end between frames from a frame cut short.
fn fill<R: Read>(r: &mut R, buf: &mut [u8]) -> (usize, Option<io::Error>) {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (n, Some(e)),
        }
    }
    (n, None)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads and validates one header. At a frame boundary, EOF is `Closed` and an expired read
/// timeout is `Timeout` (the stream is still in sync, so the caller may simply retry).
pub fn read_header<R: Read>(r: &mut R) -> Result<Header, ProtocolError> {
    let mut b = [0u8; HEADER_LEN];
    let (n, err) = fill(r, &mut b);
    if looks_like_tls(&b[..n]) {
        return Err(ProtocolError::PeerSpeaksTls);
    }
    match (n, err) {
        (0, None) => Err(ProtocolError::Closed),
        (0, Some(e)) if is_timeout(&e) => Err(ProtocolError::Timeout),
        (_, Some(e)) => Err(e.into()),
        (n, None) if n < HEADER_LEN => Err(ProtocolError::Truncated {
            expected: HEADER_LEN as u64,
            got: n as u64,
        }),
        _ => Header::parse(&b),
    }
}

/// A TLS record header (handshake or alert, version 3.x): what a TLS peer sends first, a
/// ClientHello, or answers a plaintext frame with, an alert.
fn looks_like_tls(b: &[u8]) -> bool {
    matches!(b, [0x15 | 0x16, 0x03, 0x01..=0x04, ..])
}

/// Reads exactly `len` bytes (already bounded by the header check). The buffer grows with
/// the bytes that actually arrive, so a peer announcing a large frame and sending nothing
/// costs no memory.
pub(super) fn read_exact_bounded<R: Read>(r: &mut R, len: u64) -> Result<Vec<u8>, ProtocolError> {
    let mut buf = Vec::with_capacity(len.min(64 << 10) as usize);
    r.take(len).read_to_end(&mut buf)?;
    if buf.len() as u64 != len {
        return Err(ProtocolError::Truncated {
            expected: len,
            got: buf.len() as u64,
        });
    }
    Ok(buf)
}

/// Encodes `msg` as a frame: the header plus fixed fields, and the opaque tail (state bytes)
/// borrowed from the message so big blobs are written without another copy. For
/// `MemoryPages` the head ends with the gpa and the caller streams the `len` raw bytes.
pub fn encode_frame(msg: &Message) -> Result<(Vec<u8>, &[u8]), ProtocolError> {
    let msg_type = msg.message_type();
    let mut w = Writer(Vec::with_capacity(64));
    let tail: &[u8] = match msg {
        Message::Hello { version, features } => {
            w.u16(*version);
            w.u64(*features);
            &[]
        }
        Message::HelloAck {
            version,
            features,
            session,
        } => {
            w.u16(*version);
            w.u64(*features);
            w.0.extend_from_slice(session);
            &[]
        }
        Message::Description { session, desc: d } => {
            w.0.extend_from_slice(session);
            let bytes = crate::state::encode(d)
                .map_err(|e| ProtocolError::malformed(msg_type, e.to_string()))?;
            w.0.extend_from_slice(&bytes);
            &[]
        }
        Message::Refuse { reason } | Message::Abandon { reason } => {
            w.text(msg_type, reason)?;
            &[]
        }
        Message::MemoryPages { gpa, .. } => {
            w.u64(*gpa);
            &[]
        }
        Message::ZeroRanges(ranges) => {
            encode_ranges(&mut w, ranges)?;
            &[]
        }
        Message::IterationEnd { iteration, pages } => {
            w.u64(*iteration);
            w.u64(*pages);
            &[]
        }
        Message::DeviceData {
            device,
            phase,
            data,
        } => {
            w.text(msg_type, device)?;
            w.0.push(*phase as u8);
            data
        }
        Message::DeviceAck { device } => {
            w.text(msg_type, device)?;
            &[]
        }
        Message::VcpuState { index, data } => {
            w.u32(*index);
            data
        }
        Message::VmState { data } => data,
        Message::DeviceState { device, data } => {
            w.text(msg_type, device)?;
            data
        }
        Message::Resumed(t) => {
            w.u64(t.state_load_us);
            w.u64(t.resume_us);
            &[]
        }
        Message::Complete { token } | Message::Ready { token } => {
            w.0.extend_from_slice(token);
            &[]
        }
        Message::Go { guest } => {
            w.0.push(*guest as u8);
            &[]
        }
        Message::Accept => &[],
    };
    let extra = match msg {
        Message::MemoryPages { len, .. } => *len,
        _ => tail.len() as u64,
    };
    let length = w.0.len() as u64 + extra;
    if length > msg_type.max_payload() {
        return Err(ProtocolError::TooLarge {
            msg_type,
            length,
            max: msg_type.max_payload(),
        });
    }
    let mut head = Header::new(msg_type, length).to_bytes().to_vec();
    head.extend_from_slice(&w.0);
    Ok((head, tail))
}

fn encode_ranges(w: &mut Writer, ranges: &[MemoryRange]) -> Result<(), ProtocolError> {
    if ranges.len() > MAX_ZERO_RANGES {
        return Err(ProtocolError::TooLarge {
            msg_type: MessageType::ZeroRanges,
            length: 16 * ranges.len() as u64,
            max: MessageType::ZeroRanges.max_payload(),
        });
    }
    for r in ranges {
        w.u64(r.gpa);
        w.u64(r.len);
    }
    Ok(())
}

/// Decodes the payload of a frame whose header was validated. `MemoryPages` is not decoded
/// here: its payload is streamed (see `Channel`).
pub fn decode_frame(header: Header, payload: &[u8]) -> Result<Message, ProtocolError> {
    let t = header.msg_type;
    let mut r = Reader { t, buf: payload };
    let msg = match t {
        MessageType::Hello => Message::Hello {
            version: r.u16()?,
            features: r.u64()?,
        },
        MessageType::HelloAck => Message::HelloAck {
            version: r.u16()?,
            features: r.u64()?,
            session: r.array()?,
        },
        MessageType::Description => Message::Description {
            session: r.array()?,
            desc: decode_description(r.rest())?,
        },
        MessageType::Accept => Message::Accept,
        MessageType::Refuse => Message::Refuse { reason: r.text()? },
        MessageType::MemoryPages => {
            return Err(ProtocolError::malformed(
                t,
                "page data is streamed, not decoded",
            ));
        }
        MessageType::ZeroRanges => Message::ZeroRanges(decode_ranges(&mut r)?),
        MessageType::IterationEnd => Message::IterationEnd {
            iteration: r.u64()?,
            pages: r.u64()?,
        },
        MessageType::DeviceData => Message::DeviceData {
            device: r.text()?,
            phase: r.phase()?,
            data: r.rest().to_vec(),
        },
        MessageType::DeviceAck => Message::DeviceAck { device: r.text()? },
        MessageType::VcpuState => Message::VcpuState {
            index: r.u32()?,
            data: r.rest().to_vec(),
        },
        MessageType::VmState => Message::VmState {
            data: r.rest().to_vec(),
        },
        MessageType::DeviceState => Message::DeviceState {
            device: r.text()?,
            data: r.rest().to_vec(),
        },
        MessageType::Complete => Message::Complete { token: r.array()? },
        MessageType::Ready => Message::Ready { token: r.array()? },
        MessageType::Go => Message::Go {
            guest: r.run_state()?,
        },
        MessageType::Resumed => Message::Resumed(DestTimings {
            state_load_us: r.u64()?,
            resume_us: r.u64()?,
        }),
        MessageType::Abandon => Message::Abandon { reason: r.text()? },
    };
    r.finish()?;
    Ok(msg)
}

fn decode_description(bytes: &[u8]) -> Result<VmDescription, ProtocolError> {
    let t = MessageType::Description;
    let d: VmDescription =
        crate::state::decode(bytes).map_err(|e| ProtocolError::malformed(t, e.to_string()))?;
    d.validate()
        .map_err(|e| ProtocolError::malformed(t, e.to_string()))?;
    Ok(d)
}

fn decode_ranges(r: &mut Reader) -> Result<Vec<MemoryRange>, ProtocolError> {
    if !r.buf.len().is_multiple_of(16) {
        return Err(ProtocolError::malformed(
            r.t,
            "length is not a multiple of 16",
        ));
    }
    let mut ranges = Vec::with_capacity(r.buf.len() / 16);
    while !r.buf.is_empty() {
        let range = MemoryRange::new(r.u64()?, r.u64()?);
        if range.len == 0 || range.end().is_none() {
            return Err(ProtocolError::malformed(
                r.t,
                format!("bad range {range:x?}"),
            ));
        }
        ranges.push(range);
    }
    Ok(ranges)
}

struct Writer(Vec<u8>);

impl Writer {
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn text(&mut self, t: MessageType, s: &str) -> Result<(), ProtocolError> {
        if s.len() > MAX_TEXT_LEN {
            return Err(ProtocolError::malformed(t, "text field too long"));
        }
        self.u16(s.len() as u16);
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Cursor over a payload; every read is bounds-checked and reports which message was short.
struct Reader<'a> {
    t: MessageType,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::malformed(self.t, "payload too short"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.array().map(u64::from_le_bytes)
    }
    fn text(&mut self) -> Result<String, ProtocolError> {
        let len = self.u16()? as usize;
        if len > MAX_TEXT_LEN {
            return Err(ProtocolError::malformed(self.t, "text field too long"));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| ProtocolError::malformed(self.t, "text is not UTF-8"))
    }
    fn phase(&mut self) -> Result<DevicePhase, ProtocolError> {
        match self.array::<1>()?[0] {
            1 => Ok(DevicePhase::PreCopy),
            2 => Ok(DevicePhase::StopCopy),
            p => Err(ProtocolError::malformed(
                self.t,
                format!("unknown phase {p}"),
            )),
        }
    }
    fn run_state(&mut self) -> Result<RunState, ProtocolError> {
        match self.array::<1>()?[0] {
            0 => Ok(RunState::Running),
            1 => Ok(RunState::Paused),
            s => Err(ProtocolError::malformed(
                self.t,
                format!("unknown run state {s}"),
            )),
        }
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn finish(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::malformed(self.t, "trailing bytes"))
        }
    }
}
