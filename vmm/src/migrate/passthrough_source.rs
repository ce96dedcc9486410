//! Source side of passthrough-device migration: the checks before anything is sent, pre-copy
//! data interleaved with memory (the engine's [`DeviceHooks`]), the switchover's state changes
//! and stop-copy stream, and putting the devices back to work when the migration fails.

use std::io::Write;

use devices::pci::vfio_backend::{BackendError, MigrationState};
use migration::MigrationError;
use migration::description::DeviceDescription;
use migration::dirty::{AlwaysDirty, DirtySource};
use migration::precopy::DeviceHooks;
use migration::protocol::{Channel, DevicePhase, Message};
use migration::ranges::MemoryRange;

use super::dma_log::DeviceDmaLog;
use super::driver::{Chunk, MAX_CHUNK, MIGRATION_P2P, MIGRATION_PRE_COPY};
use crate::devices_setup::Passthrough;
use migration::ranges::PAGE_SIZE;

use super::passthrough::{DeviceError, MigratingDevice, SharedVfio, lock};

/// Most pre-copy bytes one device sends per memory pass, so that memory keeps flowing while
/// a large device state streams.
pub const PRECOPY_BYTES_PER_PASS: usize = 32 << 20;

struct SourceDevice {
    dev: MigratingDevice,
    /// Its DMA log works; otherwise the user forced it and its RAM is always dirty.
    logs_dma: bool,
    in_precopy: bool,
    /// The end of its initial pre-copy data was marked (an empty PreCopy chunk).
    initial_sent: bool,
    acked: bool,
    /// The last MIG_DATA_SIZE the device gave, for passes where asking fails.
    stop_copy_size: u64,
    size_warned: bool,
}

pub struct SourceDevices {
    devs: Vec<SourceDevice>,
    buf: Vec<u8>,
    /// The destination acknowledges initial data (switchover-ack was negotiated).
    need_ack: bool,
}

impl SourceDevices {
    /// Checks every device before anything is sent: it must migrate (v2 or v1), and report its
    /// DMA writes to `ram` unless `force_dirty_dma`.
    pub fn prepare(
        devs: Vec<(Passthrough, SharedVfio)>,
        ram: &[MemoryRange],
        force_dirty_dma: bool,
    ) -> Result<Self, DeviceError> {
        let mut out = Vec::new();
        for (spec, dev) in devs {
            let dev = MigratingDevice::probe(&spec, dev)?;
            let logs_dma = match probe_dma_log(&dev, ram) {
                Ok(()) => true,
                Err(reason) if !force_dirty_dma => {
                    return Err(DeviceError::NoDmaLog {
                        label: dev.label.clone(),
                        reason,
                    });
                }
                Err(reason) => {
                    log::warn!(
                        "{}: no DMA log ({reason}); --force-dirty-dma: all its RAM is always dirty",
                        dev.label
                    );
                    false
                }
            };
            out.push(SourceDevice {
                dev,
                logs_dma,
                in_precopy: false,
                initial_sent: false,
                acked: false,
                stop_copy_size: 0,
                size_warned: false,
            });
        }
        Ok(SourceDevices {
            devs: out,
            buf: Vec::new(),
            need_ack: false,
        })
    }

    pub fn descriptions(&self) -> Vec<DeviceDescription> {
        self.devs.iter().map(|d| d.dev.description()).collect()
    }

    /// One dirty source per device: its DMA log, or its whole DMA window when forced.
    pub fn dirty_sources(&self, ram: &[MemoryRange]) -> Vec<Box<dyn DirtySource>> {
        self.devs
            .iter()
            .map(|d| -> Box<dyn DirtySource> {
                if d.logs_dma {
                    Box::new(DeviceDmaLog::new(
                        &d.dev.id,
                        d.dev.dev.clone(),
                        ram.to_vec(),
                    ))
                } else {
                    Box::new(AlwaysDirty::new(d.dev.id.clone(), ram.to_vec()))
                }
            })
            .collect()
    }

    /// Devices with PRE_COPY enter it (when the destination takes pre-copy data at all);
    /// `need_ack`: switchover waits for the destination's acknowledgements.
    pub fn enter_precopy(&mut self, allowed: bool, need_ack: bool) -> Result<(), DeviceError> {
        self.need_ack = need_ack;
        for d in &mut self.devs {
            if !allowed || !d.dev.has(MIGRATION_PRE_COPY) {
                continue;
            }
            d.dev.set_state(MigrationState::PreCopy)?;
            d.in_precopy = true;
        }
        Ok(())
    }

    /// Switchover, vCPUs paused: every device to a P2P state (no new DMA, no interrupts)
    /// before any stops, so no device can still be poked by a peer that runs; then each to
    /// STOP_COPY.
    pub fn stop(&mut self) -> Result<(), DeviceError> {
        for d in &mut self.devs {
            if d.dev.has(MIGRATION_P2P) {
                let quiet = if d.in_precopy {
                    MigrationState::PreCopyP2p
                } else {
                    MigrationState::RunningP2p
                };
                d.dev.set_state(quiet)?;
            }
        }
        for d in &mut self.devs {
            d.dev.set_state(MigrationState::StopCopy)?;
        }
        Ok(())
    }

    /// Sends each device's stop-copy stream, to its end, as `DeviceData` chunks. Returns the
    /// bytes sent.
    pub fn send_stop_copy<S: Write>(&mut self, ch: &mut Channel<S>) -> Result<u64, DeviceError> {
        let mut total = 0;
        self.buf.resize(MAX_CHUNK, 0);
        for d in &mut self.devs {
            loop {
                let buf = &mut self.buf;
                let chunk = d
                    .dev
                    .with(|drv, b| drv.read(b, buf))
                    .map_err(|e| d.dev.backend_error("reading stop-copy data", e))?;
                let n = match chunk {
                    Chunk::Data(n) => n,
                    Chunk::End => break,
                    Chunk::NotNow => {
                        return Err(DeviceError::Stream {
                            id: d.dev.id.clone(),
                            reason: "no data now, in STOP_COPY".into(),
                        });
                    }
                };
                total += n as u64;
                ch.send(&Message::DeviceData {
                    device: d.dev.id.clone(),
                    phase: DevicePhase::StopCopy,
                    data: self.buf[..n].to_vec(),
                })?;
            }
        }
        Ok(total)
    }

    /// After the destination runs the guest: STOP_COPY → STOP ends the devices' sessions
    /// here, outside the downtime.
    pub fn release(&mut self) {
        for d in &mut self.devs {
            if let Err(e) = d.dev.set_state(MigrationState::Stop) {
                log::warn!("{e}");
            }
        }
    }

    /// A failed migration: every device back to RUNNING (or reset), so the guest, resumed
    /// here, finds it working.
    pub fn recover(&mut self) {
        for d in &mut self.devs {
            d.in_precopy = false;
            d.dev.recover(MigrationState::Running);
        }
    }

    /// Reads what `d` has for pre-copy now, up to the per-pass budget; marks the end of its
    /// initial data once the device says none is left.
    fn precopy_of(
        d: &mut SourceDevice,
        buf: &mut [u8],
        out: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<(), DeviceError> {
        let mut budget = PRECOPY_BYTES_PER_PASS;
        let mut drained = false;
        while budget > 0 {
            let want = budget.min(buf.len());
            let chunk = d
                .dev
                .with(|drv, b| drv.read(b, &mut buf[..want]))
                .map_err(|e| d.dev.backend_error("reading pre-copy data", e))?;
            match chunk {
                Chunk::Data(n) => {
                    out.push((d.dev.id.clone(), buf[..n].to_vec()));
                    budget -= n;
                }
                Chunk::NotNow => {
                    drained = true;
                    break;
                }
                Chunk::End => {
                    return Err(DeviceError::Stream {
                        id: d.dev.id.clone(),
                        reason: "pre-copy stream ended".into(),
                    });
                }
            }
        }
        if !d.initial_sent && (drained || initial_left(d)? == 0) {
            d.initial_sent = true;
            out.push((d.dev.id.clone(), Vec::new()));
            log::info!("{}: initial pre-copy data sent", d.dev.id);
        }
        Ok(())
    }
}

/// Whether the device can log DMA writes to `ram`, asked the backend's way (a kernel
/// FEATURE_PROBE; START then STOP where there is no probe).
fn probe_dma_log(dev: &MigratingDevice, ram: &[MemoryRange]) -> Result<(), String> {
    let pairs: Vec<(u64, u64)> = ram.iter().map(|r| (r.gpa, r.len)).collect();
    lock(&dev.dev)
        .backend_mut()
        .dma_logging_probe(PAGE_SIZE, &pairs)
        .map_err(|e| e.to_string())
}

/// Initial pre-copy bytes still to read; a device without PRECOPY_INFO ends its initial
/// data by running dry instead.
fn initial_left(d: &mut SourceDevice) -> Result<u64, DeviceError> {
    match d.dev.with(|drv, b| drv.precopy_info(b)) {
        Ok((initial, _)) => Ok(initial),
        Err(BackendError::Unsupported(_)) => Ok(u64::MAX),
        Err(e) => Err(d.dev.backend_error("pre-copy info", e)),
    }
}

fn device_failure(e: DeviceError) -> MigrationError {
    let (device, reason) = match &e {
        DeviceError::Backend { id, .. }
        | DeviceError::SetState { id, .. }
        | DeviceError::Stream { id, .. } => (id.clone(), e.to_string()),
        other => (String::new(), other.to_string()),
    };
    MigrationError::Device { device, reason }
}

impl DeviceHooks for SourceDevices {
    fn precopy_data(&mut self) -> Result<Vec<(String, Vec<u8>)>, MigrationError> {
        let mut out = Vec::new();
        self.buf.resize(MAX_CHUNK, 0);
        for d in self.devs.iter_mut().filter(|d| d.in_precopy) {
            Self::precopy_of(d, &mut self.buf, &mut out).map_err(device_failure)?;
        }
        Ok(out)
    }

    fn stop_copy_bytes(&mut self) -> u64 {
        let mut total = 0u64;
        for d in &mut self.devs {
            match d.dev.with(|drv, b| drv.stop_copy_size(b)) {
                Ok(n) => d.stop_copy_size = n,
                // Asked once per pass: say it once.
                Err(e @ BackendError::Unsupported(_)) if !d.size_warned => {
                    d.size_warned = true;
                    log::info!("{}: {e}; its stop-copy size is not counted", d.dev.id);
                }
                Err(e) if !d.size_warned => {
                    d.size_warned = true;
                    log::warn!(
                        "{}: stop-copy size: {e}; using {}",
                        d.dev.id,
                        d.stop_copy_size
                    );
                }
                Err(_) => {}
            }
            total = total.saturating_add(d.stop_copy_size);
        }
        total
    }

    fn acked(&mut self, device: &str) -> Result<(), MigrationError> {
        match self.devs.iter_mut().find(|d| d.dev.id == device) {
            Some(d) if d.in_precopy && d.initial_sent && !d.acked => {
                log::info!("{device}: destination loaded its initial data");
                d.acked = true;
                Ok(())
            }
            _ => Err(migration::precopy::unknown_ack(device)),
        }
    }

    fn all_acked(&self) -> bool {
        self.devs
            .iter()
            .filter(|d| d.in_precopy)
            .all(|d| d.initial_sent && (d.acked || !self.need_ack))
    }
}
