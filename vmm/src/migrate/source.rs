//! Source side: pre-copy RAM while the guest runs, then pause, send the last dirty pages and
//! all state, and hand over through the two-phase end. Any failure before `Go` resumes the
//! guest here as if nothing happened.

use std::io::IsTerminal;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use migration::MigrationError;
use migration::description::VmDescription;
use migration::dirty::{DirtyLog, RamSlot, VmmWrites};
use migration::policy::PolicyConfig;
use migration::precopy::DeviceHooks;
use migration::precopy::{Link, PrecopyEnd, PrecopyOptions, final_pass, run_precopy};
use migration::protocol::{Channel, Message, ProtocolError, ReturnPath, RunState, features};
use migration::ranges::MemoryRange;
use migration::send::SendOptions;
use migration::session::{EndError, abandon, source_end, source_handshake};
use migration::stats::{MigrationStats, Progress, Status, progress_line};
use migration::transport::{MigStream, TlsDir, TlsError};

use super::dirty_kvm::KvmDirtyLog;
use super::passthrough::{self, DeviceError};
use super::passthrough_source::SourceDevices;
use super::snapshot::{self, SnapshotError};
use super::{MigrateOptions, PEER_TIMEOUT, SharedInfo};
use crate::machine::{Machine, SharedMachine};
use crate::vstate::memory::GuestMemory;
use crate::vstate::runner::RunnerError;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot reach destination {0}: {1}")]
    Connect(String, std::io::Error),
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Dirty(#[from] migration::dirty::DirtyError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Runner(#[from] RunnerError),
    #[error("destination abandoned the migration: {0}")]
    Abandoned(String),
    #[error(
        "did not converge within {0:?} (downtime target too small for the dirty rate); the guest keeps running here"
    )]
    Timeout(Duration),
    #[error("cancelled by the operator (migrate-cancel); the guest keeps running here")]
    Cancelled,
    #[error(transparent)]
    End(#[from] EndError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Dials the destination: mutual TLS with `tls_dir`, else plain TCP (with a warning).
fn connect(to: &str, tls_dir: Option<&Path>) -> Result<MigStream, SourceError> {
    let tcp = connect_tcp(to)?;
    let Some(dir) = tls_dir else {
        log::warn!("migration to {to} is plaintext: no --tls-dir, so memory travels in the clear");
        return Ok(MigStream::Plain(tcp));
    };
    let cfg = TlsDir::load(dir)?.client_config()?;
    let host = to.rsplit_once(':').map_or(to, |(h, _)| h);
    let s = MigStream::connect_tls(tcp, host, cfg)?;
    log::info!("mutual TLS with {to}");
    Ok(s)
}

fn connect_tcp(to: &str) -> Result<TcpStream, SourceError> {
    let err = |e| SourceError::Connect(to.to_owned(), e);
    let addr = to
        .to_socket_addrs()
        .map_err(err)?
        .next()
        .ok_or_else(|| err(std::io::Error::other("no address")))?;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(err)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(PEER_TIMEOUT))?;
    s.set_write_timeout(Some(PEER_TIMEOUT))?;
    Ok(s)
}

/// Migrates the machine to `opts.to`. On success the guest stays paused here (the caller
/// ends this VM) and the statistics are returned; on failure the guest runs on here (or, if
/// the destination may already run it, stays paused) and the error says which.
pub fn migrate(
    shared: &SharedMachine,
    opts: &MigrateOptions,
    info: &SharedInfo,
) -> Result<MigrationStats, SourceError> {
    let start = Instant::now();
    let (mem, fd, desc, devices) = prepare(shared, opts)?;
    let stream = connect(&opts.to, opts.tls_dir.as_deref())?;
    stream.set_timeouts(Some(opts.peer_timeout))?;
    let mut ch = Channel::new(stream.try_clone()?).with_timeout(opts.peer_timeout);
    let granted = source_handshake(&mut ch, &desc, features::ALL)?;
    let rp = ReturnPath::spawn(stream.try_clone()?)?;
    let mut log = DirtyLog::new(RamSlot::of_memory(&mem));
    log.add(Box::new(VmmWrites::new(mem.clone())));
    log.add(Box::new(KvmDirtyLog::new(fd, mem.clone())));
    devices
        .dirty_sources(&desc.ram)
        .into_iter()
        .for_each(|s| log.add(s));
    let mut stats = MigrationStats::new(desc.ram_bytes());
    stats.setup_time = start.elapsed().as_millis() as u64;
    stats.status = Status::Active;
    let mut run = Run {
        opts,
        info,
        mem,
        ch,
        rp,
        log,
        stats,
        tty: std::io::stderr().is_terminal(),
        devices,
    };
    let result = run
        .start_devices(granted)
        .and_then(|()| run.precopy())
        .and_then(|pending| run.switchover(shared, &pending))
        .map_err(|e| peer_reason(&run.rp, e));
    if result.as_ref().is_err_and(|e| !after_go(e)) {
        // A failed pre-copy leaves devices in a saving session: back to RUNNING. (A failed
        // switchover recovered them before resuming the vCPUs; this then only reads states.)
        run.devices.recover();
    }
    if let Err(e) = run.log.stop() {
        log::warn!("{e}");
    }
    if let Err(e) = &result {
        if !matches!(e, SourceError::Abandoned(_)) {
            abandon(&mut run.ch, &e.to_string());
        }
        run.stats.status = if matches!(e, SourceError::Timeout(_) | SourceError::Cancelled) {
            Status::Cancelled
        } else {
            Status::Failed
        };
        run.stats.error_desc = Some(e.to_string());
    }
    // Ends the return-path reader thread.
    let _ = stream.shutdown();
    run.stats.total_time = start.elapsed().as_millis() as u64;
    run.stats.ram.set_rates(start.elapsed());
    if run.tty {
        eprintln!();
    }
    publish(info, &run.stats, String::new(), false);
    result.map(|()| run.stats)
}

/// What is settled before connecting: a passthrough device that cannot migrate refuses here,
/// before anything is sent. Returns the RAM, the VM fd, the description and the devices.
fn prepare(
    shared: &SharedMachine,
    opts: &MigrateOptions,
) -> Result<
    (
        GuestMemory,
        std::sync::Arc<kvm_ioctls::VmFd>,
        VmDescription,
        SourceDevices,
    ),
    SourceError,
> {
    let m = lock(shared);
    let ram: Vec<MemoryRange> = RamSlot::of_memory(&m.ram.mem)
        .iter()
        .map(|s| s.range)
        .collect();
    let devices = SourceDevices::prepare(passthrough::of_machine(&m), &ram, opts.force_dirty_dma)?;
    let desc = snapshot::describe(&m, devices.descriptions());
    Ok((m.ram.mem.clone(), m.vm.fd.clone(), desc, devices))
}

/// Everything one migration attempt carries between its phases.
struct Run<'a> {
    opts: &'a MigrateOptions,
    info: &'a SharedInfo,
    mem: GuestMemory,
    ch: Channel<MigStream>,
    rp: ReturnPath,
    log: DirtyLog,
    stats: MigrationStats,
    tty: bool,
    devices: SourceDevices,
}

/// The migration failed after Go without the destination's confirmation: its outcome is
/// unknown (the destination may be running the guest).
pub fn after_go(e: &SourceError) -> bool {
    matches!(e, SourceError::End(EndError::AfterGo(_)))
}

fn publish(info: &SharedInfo, stats: &MigrationStats, progress: String, running: bool) {
    let mut i = lock(info);
    i.stats = stats.clone();
    i.progress = progress;
    i.running = running;
}

impl Run<'_> {
    /// Devices with PRE_COPY enter it, if the destination takes pre-copy data.
    fn start_devices(&mut self, granted: u64) -> Result<(), SourceError> {
        let precopy = granted & features::DEVICE_PRECOPY != 0;
        let ack = granted & features::SWITCHOVER_ACK != 0;
        Ok(self.devices.enter_precopy(precopy, ack)?)
    }

    /// Sends all RAM, then dirty pages pass after pass until the rest fits the downtime
    /// target; returns the dirty ranges still to send.
    fn precopy(&mut self) -> Result<Vec<MemoryRange>, SourceError> {
        let opts = PrecopyOptions {
            policy: PolicyConfig {
                downtime_limit: self.opts.downtime,
                timeout: self.opts.timeout,
                ..Default::default()
            },
            max_bandwidth: self.opts.max_bandwidth,
            ..Default::default()
        };
        let cancel = lock(self.info).cancel.clone();
        let link = Link {
            ch: &mut self.ch,
            rp: &self.rp,
            cancel: Some(&cancel),
        };
        let (info, tty) = (self.info, self.tty);
        let progress = |p: &Progress| {
            let line = progress_line(p);
            if tty {
                eprint!("\r{line}\x1b[K");
            }
            let mut i = lock(info);
            i.progress = line;
            i.stats.status = Status::Active;
        };
        let end = run_precopy(
            &self.mem,
            &mut self.log,
            link,
            &opts,
            &mut self.devices,
            &mut self.stats,
            progress,
        )
        .map_err(abandoned)?;
        super::fault::corrupt_point("precopy", self.ch.get_mut());
        if super::fault::active("stall-precopy") {
            // Silent for a while, connection open: the destination must time out first.
            std::thread::sleep(Duration::from_secs(5));
        }
        match end {
            PrecopyEnd::SwitchOver { pending, .. } => Ok(pending),
            PrecopyEnd::GaveUp => Err(SourceError::Timeout(self.opts.timeout)),
            PrecopyEnd::Cancelled => Err(SourceError::Cancelled),
        }
    }

    /// Pauses the guest, sends the last dirty pages and all state, and hands over. Failing
    /// before `Go` resumes the guest here; failing after it leaves the guest paused, because
    /// the destination may already be running it.
    fn switchover(
        &mut self,
        shared: &SharedMachine,
        pending: &[MemoryRange],
    ) -> Result<(), SourceError> {
        let mut m = lock(shared);
        self.stats.status = Status::Device;
        // An operator's pause outlives a failed migration.
        let was_paused = m.vcpus.is_paused();
        m.vcpus.pause()?;
        let paused = Instant::now();
        let guest = if was_paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        match self.send_final(&m, pending, paused, guest) {
            Ok(()) => {
                self.stats.set_downtime(paused.elapsed());
                self.stats.status = Status::Completed;
                self.devices.release();
                Ok(())
            }
            Err(SourceError::End(EndError::AfterGo(e))) => {
                log::error!(
                    "no confirmation after go; the guest stays paused here so it never runs twice"
                );
                Err(SourceError::End(EndError::AfterGo(e)))
            }
            Err(e) => {
                self.devices.recover();
                if !was_paused {
                    m.vcpus.resume()?;
                }
                Err(e)
            }
        }
    }

    fn send_final(
        &mut self,
        m: &Machine,
        pending: &[MemoryRange],
        paused: Instant,
        guest: RunState,
    ) -> Result<(), SourceError> {
        self.devices.stop()?;
        let t_stop = paused.elapsed();
        // After the devices stopped: their last DMA report is in this pass.
        final_pass(
            &self.mem,
            &mut self.log,
            &mut self.ch,
            pending,
            &SendOptions::default(),
            &mut self.stats,
        )?;
        let t_mem = paused.elapsed();
        let device_bytes = self.devices.send_stop_copy(&mut self.ch)?;
        self.stats.vfio.transferred += device_bytes;
        let t_dev = paused.elapsed();
        let snap = snapshot::save(m)?;
        let t_save = paused.elapsed();
        for (index, data) in snap.vcpus.into_iter().enumerate() {
            self.ch.send(&Message::VcpuState {
                index: index as u32,
                data,
            })?;
        }
        self.ch.send(&Message::VmState { data: snap.vm })?;
        for (device, data) in snap.devices {
            self.ch.send(&Message::DeviceState { device, data })?;
        }
        let t_sent = paused.elapsed();
        let devices = &mut self.devices;
        let dest = source_end(&mut self.ch, &self.rp, self.opts.peer_timeout, guest, |d| {
            devices.acked(&d)
        })?;
        let b = &mut self.stats.downtime_breakdown_us;
        b.final_memory = t_mem.as_micros() as u64;
        b.state_save = (t_save - t_dev).as_micros() as u64;
        b.state_transfer = (t_sent - t_save + t_dev - t_mem).as_micros() as u64;
        log::info!(
            "switchover: devices stopped after {t_stop:?}, memory sent by {t_mem:?}, \
             {device_bytes} bytes of device stop-copy data by {t_dev:?}"
        );
        b.state_load = dest.state_load_us;
        b.resume = dest.resume_us;
        Ok(())
    }
}

/// How long a source whose writes fail because the destination hung up waits for the
/// destination's reason, which it sends before closing.
const PEER_REASON_WAIT: Duration = Duration::from_millis(500);

/// A write that failed because the destination closed the connection usually has the
/// destination's `Abandon` waiting on the return path: that reason, not "broken pipe", is
/// what the user needs.
fn peer_reason(rp: &ReturnPath, e: SourceError) -> SourceError {
    if !peer_hung_up(&e) {
        return e;
    }
    let deadline = Instant::now() + PEER_REASON_WAIT;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rp.recv_timeout(left) {
            Ok(Message::Abandon { reason }) | Err(ProtocolError::Abandoned(reason)) => {
                return SourceError::Abandoned(reason);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    e
}

fn peer_hung_up(e: &SourceError) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    if matches!(
        e,
        SourceError::Protocol(ProtocolError::Closed)
            | SourceError::Migration(MigrationError::Protocol(ProtocolError::Closed))
    ) {
        return true;
    }
    // However deep the socket error sits (memory stream, device data, state messages).
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return matches!(io.kind(), BrokenPipe | ConnectionReset | ConnectionAborted);
        }
        cause = c.source();
    }
    false
}

/// The destination's `Abandon` seen on the return path is its own error kind.
fn abandoned(e: MigrationError) -> SourceError {
    match e {
        MigrationError::Protocol(ProtocolError::Abandoned(reason)) => {
            SourceError::Abandoned(reason)
        }
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Error, ErrorKind};

    fn broken(kind: ErrorKind) -> SourceError {
        SourceError::Migration(MigrationError::Protocol(ProtocolError::Io(Error::from(
            kind,
        ))))
    }

    #[test]
    fn a_hung_up_destination_is_told_from_other_failures() {
        assert!(peer_hung_up(&broken(ErrorKind::BrokenPipe)));
        assert!(peer_hung_up(&broken(ErrorKind::ConnectionReset)));
        assert!(peer_hung_up(&SourceError::Protocol(ProtocolError::Closed)));
        let deep = SourceError::Device(DeviceError::Protocol(ProtocolError::Io(Error::from(
            ErrorKind::BrokenPipe,
        ))));
        assert!(peer_hung_up(&deep));
        assert!(!peer_hung_up(&broken(ErrorKind::TimedOut)));
        assert!(!peer_hung_up(&SourceError::Timeout(Duration::from_secs(1))));
    }

    #[test]
    fn the_destination_reason_replaces_a_broken_pipe() {
        let reason = "device vfio0: stream corrupt".to_owned();
        let msg = Message::Abandon {
            reason: reason.clone(),
        };
        let (head, tail) = migration::protocol::encode_frame(&msg).unwrap();
        let mut wire = head;
        wire.extend_from_slice(tail);
        let rp = ReturnPath::spawn(Cursor::new(wire)).unwrap();
        match peer_reason(&rp, broken(ErrorKind::BrokenPipe)) {
            SourceError::Abandoned(r) => assert_eq!(r, reason),
            other => panic!("{other}"),
        }
        // Nothing on the return path: the original error stands, after a bounded wait.
        let rp = ReturnPath::spawn(Cursor::new(Vec::new())).unwrap();
        let e = peer_reason(&rp, broken(ErrorKind::BrokenPipe));
        assert!(peer_hung_up(&e), "{e}");
        // A local failure is not the destination's: returned as it is.
        let rp = ReturnPath::spawn(Cursor::new(Vec::new())).unwrap();
        let e = peer_reason(&rp, SourceError::Timeout(Duration::from_secs(1)));
        assert!(matches!(e, SourceError::Timeout(_)));
    }
}
