//! Destination side of passthrough-device migration: each device taken to RESUMING from
//! whatever state it is in, fed its stream as it arrives, validated (RESUMING → STOP) once
//! everything is in, held in RUNNING_P2P until the source says go, then run.

use devices::pci::vfio_backend::MigrationState;
use migration::description::DeviceDescription;

use super::driver::MIGRATION_P2P;
use crate::devices_setup::Passthrough;

use super::passthrough::{DeviceError, MigratingDevice, SharedVfio};

pub struct DestDevices {
    devs: Vec<MigratingDevice>,
}

impl DestDevices {
    /// Probes each device of this VM (the ones `--vfio-user`/`--vfio` gave, in order).
    pub fn probe(devs: Vec<(Passthrough, SharedVfio)>) -> Result<Self, DeviceError> {
        let devs = devs
            .into_iter()
            .map(|(spec, dev)| MigratingDevice::probe(&spec, dev))
            .collect::<Result<_, _>>()?;
        Ok(DestDevices { devs })
    }

    pub fn descriptions(&self) -> Vec<DeviceDescription> {
        self.devs.iter().map(MigratingDevice::description).collect()
    }

    /// Every device to RESUMING, assuming nothing about its past: one SET of the target from
    /// the state GET reports (the device walks the arcs). ERROR is left only by a reset, and a
    /// stale RESUMING session is closed first so that no old bytes mix with the new stream.
    pub fn start_resuming(&mut self) -> Result<(), DeviceError> {
        for d in &mut self.devs {
            let stuck = match d.state()? {
                MigrationState::Error => true,
                MigrationState::Resuming => d.set_state(MigrationState::Stop).is_err(),
                _ => false,
            };
            if stuck && !d.reset() {
                return Err(DeviceError::Stream {
                    id: d.id.clone(),
                    reason: "stuck in a failed state and the reset failed".into(),
                });
            }
            d.set_state(MigrationState::Resuming)?;
        }
        Ok(())
    }

    fn find(&mut self, id: &str) -> Result<&mut MigratingDevice, DeviceError> {
        self.devs
            .iter_mut()
            .find(|d| d.id == id)
            .ok_or_else(|| DeviceError::Unknown(id.to_owned()))
    }

    /// Hands `data` of device `id`'s stream to the device.
    pub fn write(&mut self, id: &str, data: &[u8]) -> Result<(), DeviceError> {
        let d = self.find(id)?;
        d.with(|drv, b| drv.write(b, data))
            .map_err(|e| d.backend_error("writing migration data", e))
    }

    /// Whether `id` is one of ours (for acknowledgements).
    pub fn knows(&self, id: &str) -> bool {
        self.devs.iter().any(|d| d.id == id)
    }

    /// All data is in: RESUMING → STOP, where each device checks and loads its stream. The
    /// PCI config space and MSI-X are restored after this, by the device walk.
    pub fn finish_loading(&mut self) -> Result<(), DeviceError> {
        for d in &mut self.devs {
            d.set_state(MigrationState::Stop)?;
        }
        Ok(())
    }

    /// STOP → RUNNING_P2P for every device that has it: ready to run, no DMA yet.
    pub fn ready(&mut self) -> Result<(), DeviceError> {
        for d in self.devs.iter_mut().filter(|d| d.has(MIGRATION_P2P)) {
            d.set_state(MigrationState::RunningP2p)?;
        }
        Ok(())
    }

    /// After `Go`, with every device loaded: RUNNING. The guest is ours now, so a device
    /// that refuses is recovered (or reset) rather than failing the VM.
    pub fn run(&mut self) {
        for d in &mut self.devs {
            if let Err(e) = d.set_state(MigrationState::Running) {
                log::error!("{e}");
                d.recover(MigrationState::Running);
            }
        }
    }

    /// The migration failed before `Go`: a RESUMING session is aborted by a reset (the uAPI
    /// offers no other way), which also leaves the device RUNNING.
    pub fn abort(&mut self) {
        for d in &mut self.devs {
            if !matches!(d.state(), Ok(MigrationState::Running)) {
                d.reset();
            }
        }
    }
}
