//! BAR0 register map, status bits and error codes (documented in README.md). Every register
//! is a 64-bit slot; 4-byte accesses reach either half.

pub const BAR0_SIZE: u64 = 0x1000;

/// Low half: magic "SDV1"; high half: interface version.
pub const REG_ID: u64 = 0x000;
pub const REG_STATUS: u64 = 0x008;
pub const REG_DMA_SRC: u64 = 0x010;
pub const REG_DMA_DST: u64 = 0x018;
pub const REG_DMA_LEN: u64 = 0x020;
pub const REG_DMA_PATTERN: u64 = 0x028;
pub const REG_DMA_CMD: u64 = 0x030;
pub const REG_DMA_VECTOR: u64 = 0x038;
pub const REG_COUNTER: u64 = 0x040;
pub const REG_STATE_SIZE: u64 = 0x048;
pub const REG_STATE_WINDOW_OFFSET: u64 = 0x050;
pub const REG_STATE_WINDOW_DATA: u64 = 0x058;
pub const REG_STATE_SEED: u64 = 0x060;
pub const REG_ERROR_COUNT: u64 = 0x068;
pub const REG_SCRATCH: u64 = 0x070;
/// Migration state: the v2 `vfio_device_mig_state`, or the v1 `device_state` bits.
pub const REG_MIG_STATE: u64 = 0x078;
/// Migration state requests refused because the uAPI does not allow them.
pub const REG_INVALID_ARCS: u64 = 0x080;
/// Arcs that failed while executing (fault injection, a refused stream).
pub const REG_FAILED_ARCS: u64 = 0x088;
/// What the device offers: bits 0..7 mode (0 none, 1 v1, 2 v2), 8..15 the v2 migration
/// flags, bit 16 DMA logging.
pub const REG_MIG_CAPS: u64 = 0x090;
/// Digest of the whole internal state (see `pattern::state_digest`), computed on read.
pub const REG_STATE_DIGEST: u64 = 0x098;
/// End of the register block; the rest up to the MSI-X table reads as zero.
pub const REGS_END: u64 = 0x0a0;

pub const MSIX_TABLE_OFFSET: u64 = 0x800;
pub const MSIX_PBA_OFFSET: u64 = 0xc00;
pub const MSIX_VECTORS: u16 = 4;
pub const MSIX_ENTRY_SIZE: u64 = 16;

pub const ID_MAGIC: u32 = 0x5344_5631;
/// 2: the migration registers from MIG_STATE on exist.
pub const ID_VERSION: u32 = 2;

pub const STATUS_BUSY: u64 = 1 << 0;
pub const STATUS_DONE: u64 = 1 << 1;
pub const STATUS_ERROR: u64 = 1 << 2;
pub const STATUS_ERROR_SHIFT: u32 = 8;
pub const STATUS_ERROR_MASK: u64 = 0xff << STATUS_ERROR_SHIFT;

pub const MIG_CAPS_MODE_V1: u64 = 1;
pub const MIG_CAPS_MODE_V2: u64 = 2;
pub const MIG_CAPS_FLAGS_SHIFT: u32 = 8;
pub const MIG_CAPS_DIRTY_LOG: u64 = 1 << 16;

pub const CMD_FILL: u64 = 1;
pub const CMD_COPY: u64 = 2;

/// Largest DMA_LEN accepted.
pub const MAX_DMA_LEN: u64 = 1 << 32;

/// Seed of the internal state after start and after reset.
pub const DEFAULT_STATE_SEED: u64 = 0x5eed;

/// Error codes reported in STATUS bits 8..15.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorCode {
    /// DMA_CMD is neither FILL nor COPY.
    BadCommand = 1,
    /// DMA_LEN is 0 or above MAX_DMA_LEN.
    BadLength = 2,
    /// A DMA range is not inside memory mapped with the needed protection.
    DmaFault = 3,
    /// DMA_VECTOR written with a value >= the MSI-X vector count.
    BadVector = 4,
    /// STATE_WINDOW_OFFSET not 8-aligned or beyond STATE_SIZE.
    BadStateOffset = 5,
    /// A BAR0 access that is not 4 or 8 bytes, naturally aligned.
    BadAccess = 6,
    /// DMA_CMD written while a DMA operation is running.
    Busy = 7,
    /// DMA started with Bus Master Enable clear in the PCI command register.
    NoBusMaster = 8,
    /// COPY source and destination overlap.
    Overlap = 9,
    /// Write to a read-only or reserved register.
    ReadOnly = 10,
    /// The internal state could not be allocated.
    NoMemory = 11,
}
