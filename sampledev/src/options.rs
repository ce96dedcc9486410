//! What kind of device to be: state size, migration protocol and features, fault injection.
//! Built from the command line; fixed for the life of the process.

use std::time::Duration;

use vfio_user::MigState;
use vfio_user::vfio::{VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY};

/// Which migration interface the device offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigMode {
    /// Not migratable: no migration feature, no v1 region, no DMA logging.
    None,
    /// The deprecated v1 migration region (index 9).
    V1,
    /// VFIO migration v2 through DEVICE_FEATURE and MIG_DATA_READ/WRITE.
    V2,
}

/// Which interrupt the function offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqMode {
    /// MSI-X with 4 vectors; no interrupt pin.
    Msix,
    /// Legacy INTx on pin INTA#, level-triggered; no MSI-X capability.
    Intx,
}

/// One arc that fails on purpose: `count` times, or every time when `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailArc {
    pub from: MigState,
    pub to: MigState,
    pub count: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub state_size: u64,
    pub irq: IrqMode,
    pub mode: MigMode,
    /// `VFIO_MIGRATION_*` flags advertised in v2 mode; the FSM walks with these.
    pub v2_flags: u64,
    pub dirty_log: bool,
    pub fail_arc: Option<FailArc>,
    /// Flip one byte of the STOP_COPY data after its checksum was computed.
    pub corrupt_stream: bool,
    /// Sleep this long before serving each MIG_DATA_READ in STOP_COPY.
    pub slow_stop_copy: Option<Duration>,
    /// Sleep this long before answering each BAR0 access (a device that is slow to answer).
    pub slow_bar: Option<Duration>,
}

impl DeviceOptions {
    /// An MSI-X, v2 device with every feature and no faults.
    pub fn new(state_size: u64) -> DeviceOptions {
        DeviceOptions {
            state_size,
            irq: IrqMode::Msix,
            mode: MigMode::V2,
            v2_flags: VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY,
            dirty_log: true,
            fail_arc: None,
            corrupt_stream: false,
            slow_stop_copy: None,
            slow_bar: None,
        }
    }

    /// The flags the FSM walks with: v1 has pre-copy (SAVING|RUNNING) but no P2P state.
    pub fn fsm_flags(&self) -> u64 {
        match self.mode {
            MigMode::V2 => self.v2_flags,
            MigMode::V1 => VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY,
            MigMode::None => 0,
        }
    }

    /// Whether DMA logging is offered (it needs a migratable device).
    pub fn dma_logging(&self) -> bool {
        self.dirty_log && self.mode != MigMode::None
    }
}
