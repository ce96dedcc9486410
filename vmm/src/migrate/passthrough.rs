//! A passthrough device as the migration code drives it: the PCI device (which owns the
//! backend), the protocol driver probed for it, and the uAPI's error policy for state changes
//! (a failed SET: GET the state, try the recovery state, else reset).

use std::sync::{Arc, Mutex};

use devices::pci::VfioPciDevice;
use devices::pci::vfio_backend::{BackendError, MigrationState, VfioBackend};
use migration::description::{DeviceDescription, MigrationCaps};
use migration::protocol::ProtocolError;

use crate::devices_setup::Passthrough;

use super::driver::{self, MIGRATION_P2P, MIGRATION_PRE_COPY, MigrationDriver};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{label} cannot migrate: {reason}")]
    CannotMigrate { label: String, reason: String },
    #[error(
        "{label} cannot report its DMA writes ({reason}); --force-dirty-dma migrates it anyway, \
         treating all its DMA-mapped RAM as always dirty"
    )]
    NoDmaLog { label: String, reason: String },
    #[error("device {id}: {what}: {err}")]
    Backend {
        id: String,
        what: String,
        #[source]
        err: BackendError,
    },
    #[error("device {id}: moving to {target:?} failed ({err}); the device is now {now}")]
    SetState {
        id: String,
        target: MigrationState,
        now: String,
        #[source]
        err: BackendError,
    },
    #[error("device {id}: {reason}")]
    Stream { id: String, reason: String },
    #[error("migration data for device {0}, which this VM does not have")]
    Unknown(String),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// A passthrough device as the VM shares it between its PCI bus and the migration.
pub type SharedVfio = Arc<Mutex<VfioPciDevice>>;

/// The machine's passthrough devices, each with how it was given on the command line.
pub fn of_machine(m: &crate::machine::Machine) -> Vec<(Passthrough, SharedVfio)> {
    m.devices
        .passthrough
        .iter()
        .map(|p| (p.spec.clone(), p.dev.clone()))
        .collect()
}

pub struct MigratingDevice {
    pub id: String,
    /// `vfio0 (--vfio-user /path)`, for messages the user acts on.
    pub label: String,
    pub dev: SharedVfio,
    driver: Box<dyn MigrationDriver>,
    /// `pre-copy=off` hides the device's PRE_COPY flag from the migration.
    pre_copy_allowed: bool,
}

pub fn lock(d: &Mutex<VfioPciDevice>) -> std::sync::MutexGuard<'_, VfioPciDevice> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

impl MigratingDevice {
    /// Finds how `dev` migrates; a device with neither v2 nor the v1 region cannot.
    pub fn probe(spec: &Passthrough, dev: SharedVfio) -> Result<Self, DeviceError> {
        let (id, found) = {
            let mut d = lock(&dev);
            (d.id().to_owned(), driver::probe(d.backend_mut()))
        };
        let label = format!("{id} ({})", spec.describe());
        let cannot = |reason: String| DeviceError::CannotMigrate {
            label: label.clone(),
            reason,
        };
        let driver = match found {
            Ok(Some(d)) => d,
            Ok(None) => {
                return Err(cannot(
                    "it has neither VFIO migration v2 nor a v1 migration region".into(),
                ));
            }
            Err(e) => return Err(cannot(format!("querying its migration support: {e}"))),
        };
        log::info!(
            "{label}: migration {} flags {:#x}{}",
            driver.protocol(),
            driver.flags(),
            if spec.pre_copy { "" } else { "; pre-copy off" }
        );
        Ok(MigratingDevice {
            id,
            label,
            dev,
            driver,
            pre_copy_allowed: spec.pre_copy,
        })
    }

    /// Whether the migration may use `flag` (`VFIO_MIGRATION_*`) with this device.
    pub fn has(&self, flag: u64) -> bool {
        let allowed = self.pre_copy_allowed || flag & MIGRATION_PRE_COPY == 0;
        allowed && self.driver.has(flag)
    }

    /// What the destination must match: the protocol and the states the streams rely on.
    /// DMA logging is the source's own business and is not compared.
    pub fn description(&self) -> DeviceDescription {
        DeviceDescription {
            id: self.id.clone(),
            kind: format!("vfio-{}", self.driver.protocol()),
            caps: MigrationCaps {
                stop_copy: true,
                p2p: self.has(MIGRATION_P2P),
                pre_copy: self.has(MIGRATION_PRE_COPY),
                dirty_tracking: false,
            },
        }
    }

    /// Runs `f` with the driver and the backend, holding the device's lock (which the vCPUs'
    /// BAR accesses also take) only for that call.
    pub fn with<T>(
        &mut self,
        f: impl FnOnce(&mut dyn MigrationDriver, &mut dyn VfioBackend) -> T,
    ) -> T {
        let mut d = lock(&self.dev);
        f(&mut *self.driver, d.backend_mut())
    }

    pub fn backend_error(&self, what: impl Into<String>, err: BackendError) -> DeviceError {
        DeviceError::Backend {
            id: self.id.clone(),
            what: what.into(),
            err,
        }
    }

    pub fn state(&mut self) -> Result<MigrationState, DeviceError> {
        self.with(|d, b| d.state(b))
            .map_err(|e| self.backend_error("reading the migration state", e))
    }

    /// One SET of `target`. On failure the error says where the device stopped (GET), so the
    /// caller's recovery starts from the truth.
    pub fn set_state(&mut self, target: MigrationState) -> Result<(), DeviceError> {
        let result = self.with(|d, b| d.set_state(b, target));
        let Err(err) = result else {
            log::debug!("{}: now {target:?}", self.id);
            return Ok(());
        };
        let now = match self.state() {
            Ok(s) => format!("{s:?}"),
            Err(e) => format!("unknown ({e})"),
        };
        // The caller reports the error; a destination must fail with one line.
        log::info!("{}: SET {target:?} failed: {err}; device in {now}", self.id);
        Err(DeviceError::SetState {
            id: self.id.clone(),
            target,
            now,
            err,
        })
    }

    /// Brings the device to `target` whatever state a failure left it in: GET, then SET
    /// `target` unless it is there already or in ERROR (which only a reset leaves), else
    /// reset. Returns false if it had to be reset (the guest's driver must start over).
    pub fn recover(&mut self, target: MigrationState) -> bool {
        match self.state() {
            Ok(s) if s == target => return true,
            Ok(MigrationState::Error) => {}
            Ok(_) | Err(_) => {
                if self.set_state(target).is_ok() {
                    log::info!("{}: recovered to {target:?}", self.id);
                    return true;
                }
            }
        }
        if self.reset() {
            log::warn!(
                "{}: reset to recover from a failed migration; the guest's driver must \
                 reinitialise it",
                self.label
            );
        }
        false
    }

    /// VFIO_DEVICE_RESET with the device's interrupts off around it and the guest's view
    /// pushed back after. Returns whether the device came back usable: a failed reset, or a
    /// device still in ERROR after it, leaves the device lost (its BARs read as all ones)
    /// rather than used.
    pub fn reset(&mut self) -> bool {
        if let Err(e) = lock(&self.dev).reset() {
            log::error!("{}: reset failed: {e}; the device is unusable", self.label);
            return false;
        }
        log::info!("{}: reset", self.label);
        if let Ok(MigrationState::Error) = self.state() {
            lock(&self.dev).set_lost("still in ERROR after a reset");
            return false;
        }
        true
    }
}
