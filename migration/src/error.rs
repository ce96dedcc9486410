//! The error of the memory transfer and the drivers built on it.

use crate::description::DescriptionError;
use crate::dirty::DirtyError;
use crate::protocol::ProtocolError;
use crate::ranges::MemoryRange;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A range the peer sent (or a dirty source reported) that is not guest RAM: a protocol
    /// violation, never a reason to touch memory.
    #[error("range {0:x?} is outside the VM's RAM")]
    OutOfRange(MemoryRange),
    /// Ranges of one `ZeroRanges` frame must be disjoint, so the work a frame asks for is
    /// bounded by the size of RAM.
    #[error("zero range {0:x?} overlaps or repeats another in the same frame")]
    Overlapping(MemoryRange),
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    #[error(transparent)]
    Description(#[from] DescriptionError),
    /// A passthrough device failed during pre-copy (read by the VMM's device hooks).
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },
}
