//! Destination side: accept one migration, build the VM from its description, load memory
//! and state as they arrive, resume after `Go`, then be the VM.

use std::net::TcpListener;
use std::path::Path;
use std::time::Instant;

use migration::MigrationError;
use migration::description::VmDescription;
use migration::protocol::{Channel, DestTimings, DevicePhase, Message, ProtocolError, features};
use migration::recv::MemoryReceiver;
use migration::session::{abandon, dest_confirm, dest_handshake, dest_ready};
use migration::stats::{MigrationStats, Status};
use migration::transport::{MigStream, TlsDir, TlsError};

use super::PEER_TIMEOUT;
use super::fault;
use super::passthrough::{self, DeviceError};
use super::passthrough_dest::DestDevices;
use super::populate::Prefault;
use super::snapshot::{self, Snapshot, SnapshotError};
use crate::devices_setup::Passthrough;
use crate::machine::{Machine, MachineError};
use devices::serial::SerialOutput;

#[derive(Debug, thiserror::Error)]
pub enum DestError {
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("source abandoned the migration: {0}")]
    Abandoned(String),
    #[error("vCPU state index {0} out of range or repeated")]
    BadVcpu(u32),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Waits for one source on `listen` and returns the accepted, configured connection: mutual
/// TLS with `tls_dir` (completed before any protocol byte is read), else plain TCP.
pub fn accept(listen: &str, tls_dir: Option<&Path>) -> Result<MigStream, DestError> {
    let tls = tls_dir
        .map(|d| TlsDir::load(d).and_then(|t| t.server_config()))
        .transpose()?;
    let listener = TcpListener::bind(listen).map_err(|e| DestError::Listen(listen.into(), e))?;
    log::info!("waiting for a migration on {listen}");
    let (stream, peer) = listener.accept()?;
    log::info!("migration from {peer}");
    fault::crash_point("accept");
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(PEER_TIMEOUT))?;
    stream.set_write_timeout(Some(PEER_TIMEOUT))?;
    match tls {
        Some(cfg) => Ok(MigStream::accept_tls(stream, cfg)?),
        None => {
            log::warn!("migration from {peer} is plaintext: no --tls-dir, so nobody is verified");
            Ok(MigStream::Plain(stream))
        }
    }
}

/// Receives a VM over `stream`. Returns the running machine and the destination's statistics;
/// any error before `Go` means the VM is discarded and the source keeps the guest.
pub fn receive(
    stream: MigStream,
    serial: &SerialOutput,
    passthrough: &[Passthrough],
) -> Result<(Machine, MigrationStats), DestError> {
    let start = Instant::now();
    let mut ch = Channel::new(stream);
    let mut built = None;
    let check = |desc: &VmDescription| -> Result<(), String> {
        built = Some(build(desc, serial, passthrough)?);
        Ok(())
    };
    let (desc, _) = dest_handshake(&mut ch, features::ALL, check)?;
    fault::crash_point("description");
    let (mut m, mut devs) = built.ok_or_else(|| ProtocolError::Refused("VM not built".into()))?;
    let mut stats = MigrationStats::new(desc.ram_bytes());
    stats.setup_time = start.elapsed().as_millis() as u64;
    let result = load(&mut ch, &m, &mut devs, &mut stats)
        .and_then(|timings| resume(&mut ch, &mut m, &mut devs, timings));
    match result {
        Ok(()) => {
            stats.status = Status::Completed;
            stats.total_time = start.elapsed().as_millis() as u64;
            stats.ram.set_rates(start.elapsed());
            Ok((m, stats))
        }
        Err(e) => {
            if !matches!(e, DestError::Abandoned(_)) {
                abandon(&mut ch, &e.to_string());
            }
            devs.abort();
            // Dropping the machine joins its (parked) vCPU threads.
            drop(m);
            Err(e)
        }
    }
}

/// Builds the paused VM the description asks for, refusing what this host cannot match, and
/// takes its passthrough devices to RESUMING before any data arrives.
fn build(
    desc: &VmDescription,
    serial: &SerialOutput,
    passthrough: &[Passthrough],
) -> Result<(Machine, DestDevices), String> {
    desc.validate().map_err(|e| e.to_string())?;
    let vcpus =
        u16::try_from(desc.vcpus).map_err(|_| format!("{} vCPUs is too many", desc.vcpus))?;
    let m = Machine::for_incoming(desc.ram_bytes(), vcpus, serial, passthrough)
        .map_err(|e| e.to_string())?;
    let mut devs = DestDevices::probe(passthrough::of_machine(&m)).map_err(|e| e.to_string())?;
    desc.check_compatible(&snapshot::describe(&m, devs.descriptions()))
        .map_err(|e| e.to_string())?;
    if let Err(e) = devs.start_resuming() {
        devs.abort();
        return Err(e.to_string());
    }
    Ok((m, devs))
}

/// Takes memory and state messages until `Complete`, then restores the state.
fn load(
    ch: &mut Channel<MigStream>,
    m: &Machine,
    devs: &mut DestDevices,
    stats: &mut MigrationStats,
) -> Result<DestTimings, DestError> {
    let prefault = Prefault::start(&m.ram.mem);
    let mut rx = MemoryReceiver::new(&m.ram.mem, true);
    let mut snap = Snapshot {
        vcpus: vec![Vec::new(); m.vcpus.count()],
        ..Default::default()
    };
    let mut seen = vec![false; m.vcpus.count()];
    let mut first_memory = true;
    loop {
        let msg = ch.recv()?;
        if first_memory && matches!(msg, Message::MemoryPages { .. }) {
            first_memory = false;
            fault::crash_point("memory");
            fault::corrupt_point("memory", ch.get_mut());
        }
        match rx.handle(&m.ram.mem, ch, msg)? {
            None => {}
            Some(Message::IterationEnd { iteration, .. }) => {
                stats.ram.dirty_sync_count = iteration + 1
            }
            Some(Message::VcpuState { index, data }) => {
                let i = index as usize;
                if i >= seen.len() || seen[i] {
                    return Err(DestError::BadVcpu(index));
                }
                seen[i] = true;
                snap.vcpus[i] = data;
            }
            Some(Message::VmState { data }) => snap.vm = data,
            Some(Message::DeviceState { device, data }) => snap.devices.push((device, data)),
            Some(Message::DeviceData {
                device,
                phase,
                data,
            }) => device_data(ch, devs, device, phase, &data)?,
            Some(Message::Complete) => {
                fault::crash_point("complete");
                break;
            }
            Some(Message::Abandon { reason }) => return Err(DestError::Abandoned(reason)),
            Some(other) => return Err(ProtocolError::unexpected("memory or state", other).into()),
        }
    }
    let populated = prefault.finish();
    let c = rx.counters();
    stats.ram.normal = c.normal_pages;
    stats.ram.normal_bytes = c.normal_bytes;
    stats.ram.duplicate = c.zero_pages;
    stats.ram.transferred = ch.bytes_read();
    log::info!("prefaulted {populated} bytes during the transfer");
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(DestError::BadVcpu(i as u32));
    }
    let t = Instant::now();
    devs.finish_loading()?;
    // Config space and MSI-X go to a device that has its internal state back, and before it
    // may run.
    snapshot::restore(m, &snap)?;
    devs.ready()?;
    Ok(DestTimings {
        state_load_us: t.elapsed().as_micros() as u64,
        resume_us: 0,
    })
}

/// Ready → wait for Go → run the vCPUs → confirm. After Go the guest is ours: a failure to
/// confirm is only logged (the source stays paused rather than run it too).
fn resume(
    ch: &mut Channel<MigStream>,
    m: &mut Machine,
    devs: &mut DestDevices,
    mut timings: DestTimings,
) -> Result<(), DestError> {
    fault::corrupt_point("ready", ch.get_mut());
    dest_ready(ch)?;
    fault::crash_point("go");
    let t = Instant::now();
    devs.run();
    m.vcpus.resume().map_err(MachineError::from)?;
    timings.resume_us = t.elapsed().as_micros() as u64;
    if let Err(e) = dest_confirm(ch, timings) {
        log::warn!("could not confirm the resume to the source: {e}");
    }
    Ok(())
}

/// A chunk of a device's stream goes to the device; an empty pre-copy chunk marks the end of
/// its initial data, which is then loaded (written): the source may switch over once it
/// hears so.
fn device_data(
    ch: &mut Channel<MigStream>,
    devs: &mut DestDevices,
    device: String,
    phase: DevicePhase,
    data: &[u8],
) -> Result<(), DestError> {
    if !data.is_empty() {
        return Ok(devs.write(&device, data)?);
    }
    if phase == DevicePhase::PreCopy {
        if !devs.knows(&device) {
            return Err(DeviceError::Unknown(device).into());
        }
        ch.send(&Message::DeviceAck { device })?;
    }
    Ok(())
}
