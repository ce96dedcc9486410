//! One interface over the two VFIO device-migration protocols, so that the source and
//! destination logic is written once: v2 (`VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` and a data
//! stream) and the deprecated v1 migration region (`v1.rs`). Both work on any
//! [`VfioBackend`] (kernel VFIO or vfio-user), which is passed to every call because it lives
//! inside the PCI device, behind the lock the vCPUs also take.

use devices::pci::vfio_backend::{BackendError, MigrationState, VfioBackend};

use super::v1::V1Driver;

/// `VFIO_MIGRATION_*` flags.
pub const MIGRATION_STOP_COPY: u64 = 1 << 0;
pub const MIGRATION_P2P: u64 = 1 << 1;
pub const MIGRATION_PRE_COPY: u64 = 1 << 2;

/// Largest piece read from or written to a device at once (vfio-user's transfer size; also a
/// bound on how long one read holds the device lock).
pub const MAX_CHUNK: usize = 1 << 20;

/// What one read of a device's migration stream gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// This many bytes at the start of the buffer.
    Data(usize),
    /// PRE_COPY: nothing to read now (initial and dirty bytes both 0); more may come.
    NotNow,
    /// STOP_COPY: the stream is complete.
    End,
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// A device-migration protocol. States are named as in v2; a v1 driver maps them to its
/// `device_state` bits and refuses those v1 lacks (the P2P states).
pub trait MigrationDriver: Send {
    /// "v2" or "v1": part of the VM description, since the two streams do not mix.
    fn protocol(&self) -> &'static str;
    /// The `VFIO_MIGRATION_*` flags this device can be driven with.
    fn flags(&self) -> u64;
    /// One SET of the final state; the device walks the arcs in between.
    fn set_state(&mut self, b: &mut dyn VfioBackend, s: MigrationState) -> Result<()>;
    fn state(&mut self, b: &mut dyn VfioBackend) -> Result<MigrationState>;
    fn read(&mut self, b: &mut dyn VfioBackend, buf: &mut [u8]) -> Result<Chunk>;
    fn write(&mut self, b: &mut dyn VfioBackend, data: &[u8]) -> Result<()>;
    /// PRE_COPY estimates: (initial, dirty) bytes still to read.
    fn precopy_info(&mut self, b: &mut dyn VfioBackend) -> Result<(u64, u64)>;
    /// Bytes STOP_COPY would produce (the device's share of the downtime).
    fn stop_copy_size(&mut self, b: &mut dyn VfioBackend) -> Result<u64>;

    fn has(&self, flag: u64) -> bool {
        self.flags() & flag != 0
    }
}

/// The driver for the device behind `b`: v2 if it has the migration feature, else v1 if it
/// has the v1 region, else `None` (the device cannot migrate).
pub fn probe(b: &mut dyn VfioBackend) -> Result<Option<Box<dyn MigrationDriver>>> {
    if let Some(flags) = b.migration_features()? {
        if flags & MIGRATION_STOP_COPY == 0 {
            return Err(BackendError::Invalid(format!(
                "migration flags {flags:#x} lack the mandatory STOP_COPY"
            )));
        }
        return Ok(Some(Box::new(V2Driver::new(flags))));
    }
    match b.migration_region_v1()? {
        Some((index, size)) => Ok(Some(Box::new(V1Driver::new(index, size)?))),
        None => Ok(None),
    }
}

/// VFIO migration v2: straight through to the backend's calls.
pub struct V2Driver {
    flags: u64,
    /// The state last set or read, which decides what a 0-byte read means.
    state: Option<MigrationState>,
}

impl V2Driver {
    pub fn new(flags: u64) -> Self {
        V2Driver { flags, state: None }
    }
}

impl MigrationDriver for V2Driver {
    fn protocol(&self) -> &'static str {
        "v2"
    }

    fn flags(&self) -> u64 {
        self.flags
    }

    fn set_state(&mut self, b: &mut dyn VfioBackend, s: MigrationState) -> Result<()> {
        self.state = None;
        b.set_migration_state(s)?;
        self.state = Some(s);
        Ok(())
    }

    fn state(&mut self, b: &mut dyn VfioBackend) -> Result<MigrationState> {
        let s = b.migration_state()?;
        self.state = Some(s);
        Ok(s)
    }

    fn read(&mut self, b: &mut dyn VfioBackend, buf: &mut [u8]) -> Result<Chunk> {
        let precopy = matches!(
            self.state,
            Some(MigrationState::PreCopy | MigrationState::PreCopyP2p)
        );
        match b.read_migration_data(buf) {
            // In PRE_COPY a 0-byte read means "nothing now", as ENOMSG does (mtty, and
            // libvfio-user's servers, return 0); only STOP_COPY's 0 ends the stream.
            Ok(0) if precopy => Ok(Chunk::NotNow),
            Ok(0) => Ok(Chunk::End),
            Ok(n) => Ok(Chunk::Data(n.min(buf.len()))),
            Err(BackendError::NoMigrationDataNow) => Ok(Chunk::NotNow),
            Err(e) => Err(e),
        }
    }

    fn write(&mut self, b: &mut dyn VfioBackend, data: &[u8]) -> Result<()> {
        b.write_migration_data(data)
    }

    fn precopy_info(&mut self, b: &mut dyn VfioBackend) -> Result<(u64, u64)> {
        b.precopy_info()
    }

    fn stop_copy_size(&mut self, b: &mut dyn VfioBackend) -> Result<u64> {
        b.stop_copy_size()
    }
}
