//! The migration wire protocol: framed, little-endian, versioned messages.
//!
//! Every frame is a 16-byte header followed by exactly `length` payload bytes:
//!
//! ```text
//! 0      4        5      6        8              16
//! | magic | version | flags | type u16 | length u64 | payload ...
//! ```
//!
//! The decoder checks magic, version, flags, type and the length against that type's maximum
//! before it allocates anything, so a hostile or corrupt length costs nothing. Memory pages are
//! the exception to "payload is decoded": a `MemoryPages` frame's payload is the 8-byte gpa then
//! raw page bytes, which the receiver reads straight into guest memory (see [`Channel`]).
//!
//! Sequence (source S, destination D, one full-duplex connection):
//! S→D `Hello`, D→S `HelloAck` (with the session nonce); S→D `Description` (echoing it),
//! D→S `Accept` or `Refuse`;
//! S→D { `MemoryPages` | `ZeroRanges` | `DeviceData` }* `IterationEnd`, repeated per pass, with
//! D→S `DeviceAck` once a device's initial pre-copy data is loaded (switchover-ack);
//! S→D final pass, `DeviceData`(stop-copy), `VcpuState`*, `VmState`, `DeviceState`*,
//! `Complete` (with a switchover token); D→S `Ready` (echoing it); S→D `Go` (with the guest's
//! run state); D→S `Resumed`. `Abandon` may go either way at any point before `Go`, and ends
//! the migration with the source keeping the guest.
//!
//! Two random values bind the exchange to one live session: the destination's session nonce
//! (so a recorded stream replayed into another destination is refused before a VM is built),
//! and the source's switchover token (so only a `Ready` sent after the destination read
//! `Complete` can release `Go`).

mod channel;
mod codec;
mod return_path;

pub use channel::Channel;
pub use codec::{Header, decode_frame, encode_frame, read_header};
pub use return_path::ReturnPath;

use crate::description::VmDescription;
use crate::ranges::MemoryRange;

/// "MVMM" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"MVMM");
/// The only version this build speaks; the header carries it in every frame.
/// Version 2 added the session nonce, the switchover token and the run state in `Go`.
pub const PROTOCOL_VERSION: u8 = 2;
pub const HEADER_LEN: usize = 16;
/// Length of the session nonce and of the switchover token.
pub const NONCE_LEN: usize = 32;

/// A random value that binds messages to one live session (see the module docs).
pub type Nonce = [u8; NONCE_LEN];

/// A fresh random [`Nonce`] from the kernel's CSPRNG.
pub fn fresh_nonce() -> std::io::Result<Nonce> {
    use std::io::Read;
    let mut n = [0u8; NONCE_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

/// Whether the guest's vCPUs were running on the source when it was paused for switchover;
/// the destination restores the same (an operator's pause is kept).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running = 0,
    Paused = 1,
}

/// Feature bits offered in `Hello` and granted in `HelloAck` (the intersection).
pub mod features {
    /// The destination acknowledges each device's initial pre-copy data (QEMU's switchover-ack).
    pub const SWITCHOVER_ACK: u64 = 1 << 0;
    /// Device pre-copy data may be interleaved with memory.
    pub const DEVICE_PRECOPY: u64 = 1 << 1;
    pub const ALL: u64 = SWITCHOVER_ACK | DEVICE_PRECOPY;
}

/// Largest run of raw page bytes in one `MemoryPages` frame.
pub const MAX_PAGES_BYTES: u64 = 64 << 20;
/// Most ranges in one `ZeroRanges` frame (16 bytes each on the wire: 1 MiB).
pub const MAX_ZERO_RANGES: usize = 1 << 16;
/// Longest device id, reason string, or similar text field.
pub const MAX_TEXT_LEN: usize = 4096;
/// Largest opaque device chunk (pre-copy or stop-copy) in one frame.
pub const MAX_DEVICE_CHUNK: u64 = 16 << 20;
pub const MAX_VCPU_STATE: u64 = 1 << 20;
pub const MAX_VM_STATE: u64 = 16 << 20;
pub const MAX_DEVICE_STATE: u64 = crate::state::MAX_STATE_BYTES;
pub const MAX_DESCRIPTION: u64 = 4 << 20;

/// Message type codes; they never change meaning within a protocol version.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageType {
    Hello = 1,
    HelloAck = 2,
    Description = 3,
    Accept = 4,
    Refuse = 5,
    MemoryPages = 6,
    ZeroRanges = 7,
    IterationEnd = 8,
    DeviceData = 9,
    DeviceAck = 10,
    VcpuState = 11,
    VmState = 12,
    DeviceState = 13,
    Complete = 14,
    Ready = 15,
    Go = 16,
    Resumed = 17,
    Abandon = 18,
}

impl MessageType {
    pub const ALL: [MessageType; 18] = [
        Self::Hello,
        Self::HelloAck,
        Self::Description,
        Self::Accept,
        Self::Refuse,
        Self::MemoryPages,
        Self::ZeroRanges,
        Self::IterationEnd,
        Self::DeviceData,
        Self::DeviceAck,
        Self::VcpuState,
        Self::VmState,
        Self::DeviceState,
        Self::Complete,
        Self::Ready,
        Self::Go,
        Self::Resumed,
        Self::Abandon,
    ];

    pub fn from_u16(v: u16) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| *t as u16 == v)
    }

    /// Largest payload a frame of this type may announce; checked before allocating.
    pub fn max_payload(self) -> u64 {
        let text = 2 + MAX_TEXT_LEN as u64;
        match self {
            Self::Hello => 10,
            Self::HelloAck => 10 + NONCE_LEN as u64,
            Self::Accept => 0,
            Self::Complete | Self::Ready => NONCE_LEN as u64,
            Self::Go => 1,
            Self::IterationEnd | Self::Resumed => 16,
            Self::Description => NONCE_LEN as u64 + MAX_DESCRIPTION,
            Self::Refuse | Self::Abandon | Self::DeviceAck => text,
            Self::MemoryPages => 8 + MAX_PAGES_BYTES,
            Self::ZeroRanges => 16 * MAX_ZERO_RANGES as u64,
            Self::DeviceData => text + 1 + MAX_DEVICE_CHUNK,
            Self::VcpuState => 4 + MAX_VCPU_STATE,
            Self::VmState => MAX_VM_STATE,
            Self::DeviceState => text + MAX_DEVICE_STATE,
        }
    }
}

/// Which part of a device's migration data a `DeviceData` chunk belongs to.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevicePhase {
    /// While the guest runs (VFIO PRE_COPY).
    PreCopy = 1,
    /// After the device stopped (VFIO STOP_COPY).
    StopCopy = 2,
}

/// Destination-side timings reported with `Resumed`, so the source's statistics can show the
/// whole downtime breakdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestTimings {
    /// From `Complete` received to all state loaded (devices included).
    pub state_load_us: u64,
    /// From `Go` received to vCPUs running.
    pub resume_us: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello {
        version: u16,
        features: u64,
    },
    HelloAck {
        version: u16,
        features: u64,
        /// The destination's fresh session nonce, which the `Description` must echo.
        session: Nonce,
    },
    Description {
        session: Nonce,
        desc: VmDescription,
    },
    Accept,
    Refuse {
        reason: String,
    },
    /// Header of `len` raw bytes for guest memory at `gpa`; the bytes follow on the stream and
    /// are consumed with [`Channel::recv_memory`] or [`Channel::discard_pending`].
    MemoryPages {
        gpa: u64,
        len: u64,
    },
    ZeroRanges(Vec<MemoryRange>),
    IterationEnd {
        iteration: u64,
        pages: u64,
    },
    DeviceData {
        device: String,
        phase: DevicePhase,
        data: Vec<u8>,
    },
    DeviceAck {
        device: String,
    },
    VcpuState {
        index: u32,
        data: Vec<u8>,
    },
    VmState {
        data: Vec<u8>,
    },
    DeviceState {
        device: String,
        data: Vec<u8>,
    },
    /// The end of the stream; `token` is fresh for this switchover.
    Complete {
        token: Nonce,
    },
    /// Echoes the token of the `Complete` it answers.
    Ready {
        token: Nonce,
    },
    Go {
        guest: RunState,
    },
    Resumed(DestTimings),
    Abandon {
        reason: String,
    },
}

impl Message {
    pub fn message_type(&self) -> MessageType {
        match self {
            Self::Hello { .. } => MessageType::Hello,
            Self::HelloAck { .. } => MessageType::HelloAck,
            Self::Description { .. } => MessageType::Description,
            Self::Accept => MessageType::Accept,
            Self::Refuse { .. } => MessageType::Refuse,
            Self::MemoryPages { .. } => MessageType::MemoryPages,
            Self::ZeroRanges(_) => MessageType::ZeroRanges,
            Self::IterationEnd { .. } => MessageType::IterationEnd,
            Self::DeviceData { .. } => MessageType::DeviceData,
            Self::DeviceAck { .. } => MessageType::DeviceAck,
            Self::VcpuState { .. } => MessageType::VcpuState,
            Self::VmState { .. } => MessageType::VmState,
            Self::DeviceState { .. } => MessageType::DeviceState,
            Self::Complete { .. } => MessageType::Complete,
            Self::Ready { .. } => MessageType::Ready,
            Self::Go { .. } => MessageType::Go,
            Self::Resumed(_) => MessageType::Resumed,
            Self::Abandon { .. } => MessageType::Abandon,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed by the peer")]
    Closed,
    /// Nothing arrived within the caller's read timeout; the stream is still in sync.
    #[error("timed out waiting for the peer")]
    Timeout,
    /// A read or write of the stream found the peer silent for the whole peer timeout.
    #[error("timed out after {} s", .0.as_secs_f64())]
    TimedOut(std::time::Duration),
    #[error("migration stream I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad magic {0:#010x}: not a minivmm migration stream")]
    BadMagic(u32),
    /// A TLS record arrived on a plaintext stream: the peer was given `--tls-dir`.
    #[error("the peer speaks TLS (it has --tls-dir) but this side has no --tls-dir")]
    PeerSpeaksTls,
    #[error("unsupported protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown frame flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("unknown message type {0}")]
    UnknownType(u16),
    #[error("{msg_type:?} frame of {length} bytes exceeds its limit of {max}")]
    TooLarge {
        msg_type: MessageType,
        length: u64,
        max: u64,
    },
    #[error("truncated frame: expected {expected} bytes, got {got}")]
    Truncated { expected: u64, got: u64 },
    #[error("malformed {msg_type:?}: {reason}")]
    Malformed {
        msg_type: MessageType,
        reason: String,
    },
    #[error("unexpected {got:?} while waiting for {expected}")]
    Unexpected {
        expected: &'static str,
        got: MessageType,
    },
    /// A message that is well formed but not valid in the phase it arrived in.
    #[error("{got:?} out of phase: {reason}")]
    OutOfPhase { got: MessageType, reason: String },
    /// The `Description` does not echo this destination's session nonce: a recording of
    /// another session (a replay), or a confused peer.
    #[error("the description is not bound to this session (replayed or stale stream)")]
    WrongSession,
    #[error("{0} bytes of page data from the previous frame were not consumed")]
    PendingPayload(u64),
    #[error("guest memory access while streaming pages: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("peer refused: {0}")]
    Refused(String),
    #[error("peer abandoned the migration: {0}")]
    Abandoned(String),
}

impl ProtocolError {
    pub(crate) fn out_of_phase(got: MessageType, reason: impl Into<String>) -> Self {
        Self::OutOfPhase {
            got,
            reason: reason.into(),
        }
    }

    pub(crate) fn malformed(msg_type: MessageType, reason: impl Into<String>) -> Self {
        Self::Malformed {
            msg_type,
            reason: reason.into(),
        }
    }

    /// Whether this is an expired socket timeout, however it surfaced (at a frame boundary,
    /// inside a frame, or while streaming pages).
    pub fn is_timeout(&self) -> bool {
        let kind = |e: &std::io::Error| {
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        };
        match self {
            Self::Timeout | Self::TimedOut(_) => true,
            Self::Io(e) => kind(e),
            Self::Memory(vm_memory::GuestMemoryError::IOError(e)) => kind(e),
            _ => false,
        }
    }

    /// Turns a message the caller did not expect into the right error: the peer's own
    /// Refuse/Abandon keeps its reason, anything else is a sequence violation.
    pub fn unexpected(expected: &'static str, got: Message) -> Self {
        match got {
            Message::Refuse { reason } => Self::Refused(reason),
            Message::Abandon { reason } => Self::Abandoned(reason),
            other => Self::Unexpected {
                expected,
                got: other.message_type(),
            },
        }
    }
}
