//! Source side: pre-copy RAM while the guest runs, then pause, send the last dirty pages and
//! all state, and hand over through the two-phase end. Any failure before `Go` resumes the
//! guest here as if nothing happened.

use std::io::IsTerminal;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use migration::MigrationError;
use migration::dirty::{DirtyLog, RamSlot, VmmWrites};
use migration::policy::{Convergence, Decision, PolicyConfig};
use migration::protocol::{Channel, Message, ProtocolError, ReturnPath};
use migration::ranges::{MemoryRange, PAGE_SIZE, total_len};
use migration::send::{SendOptions, send_ranges};
use migration::session::{EndError, abandon, source_end, source_handshake};
use migration::stats::{MigrationStats, Progress, Status, progress_line};
use migration::throttle::Throttle;

use super::dirty_kvm::KvmDirtyLog;
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
    #[error(transparent)]
    End(#[from] EndError),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

fn lock(m: &SharedMachine) -> std::sync::MutexGuard<'_, Machine> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn connect(to: &str) -> Result<TcpStream, SourceError> {
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

/// Everything one migration attempt carries between its phases.
struct Run<'a> {
    opts: &'a MigrateOptions,
    info: &'a SharedInfo,
    mem: GuestMemory,
    ch: Channel<TcpStream>,
    rp: ReturnPath,
    log: DirtyLog,
    stats: MigrationStats,
    start: Instant,
    tty: bool,
    /// Dirty ranges collected but not yet sent when pre-copy decided to switch over.
    pending: Vec<MemoryRange>,
}

/// Migrates the machine to `opts.to`. On success the guest stays paused here (the caller
/// ends this VM) and the statistics are returned; on failure the guest runs on here (or, if the destination
/// may already run it, stays paused) and the error says which.
pub fn migrate(
    shared: &SharedMachine,
    opts: &MigrateOptions,
    info: &SharedInfo,
) -> Result<MigrationStats, SourceError> {
    let start = Instant::now();
    let (mem, fd, desc) = {
        let m = lock(shared);
        (m.ram.mem.clone(), m.vm.fd.clone(), snapshot::describe(&m))
    };
    set_status(info, Status::Setup, None);
    let stream = connect(&opts.to)?;
    let mut ch = Channel::new(stream.try_clone()?);
    source_handshake(&mut ch, &desc, 0)?;
    let rp = ReturnPath::spawn(stream.try_clone()?)?;
    let mut log = DirtyLog::new(RamSlot::of_memory(&mem));
    log.add(Box::new(VmmWrites::new(mem.clone())));
    log.add(Box::new(KvmDirtyLog::new(fd, mem.clone())));
    log.start()?;
    let mut stats = MigrationStats::new(desc.ram_bytes());
    stats.setup_time = start.elapsed().as_millis() as u64;
    let tty = std::io::stderr().is_terminal();
    let mut run = Run {
        opts,
        info,
        mem,
        ch,
        rp,
        log,
        stats,
        start,
        tty,
        pending: Vec::new(),
    };
    let result = run.precopy().and_then(|()| run.switchover(shared));
    if let Err(e) = run.log.stop() {
        log::warn!("{e}");
    }
    if let Err(e) = &result {
        if !matches!(e, SourceError::Abandoned(_)) {
            abandon(&mut run.ch, &e.to_string());
        }
        run.stats.status = if matches!(e, SourceError::Timeout(_)) {
            Status::Cancelled
        } else {
            Status::Failed
        };
        run.stats.error_desc = Some(e.to_string());
    }
    // Ends the return-path reader thread.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    run.stats.total_time = start.elapsed().as_millis() as u64;
    if run.tty {
        eprintln!();
    }
    publish(info, &run.stats, String::new(), false);
    result.map(|()| run.stats)
}

fn set_status(info: &SharedInfo, status: Status, progress: Option<String>) {
    let mut i = info.lock().unwrap_or_else(|e| e.into_inner());
    i.stats.status = status;
    i.running = true;
    if let Some(p) = progress {
        i.progress = p;
    }
}

fn publish(info: &SharedInfo, stats: &MigrationStats, progress: String, running: bool) {
    let mut i = info.lock().unwrap_or_else(|e| e.into_inner());
    i.stats = stats.clone();
    i.progress = progress;
    i.running = running;
}

impl Run<'_> {
    /// Fails if the destination has given up (its `Abandon` arrives on the return path).
    fn check_return_path(&self) -> Result<(), SourceError> {
        match self.rp.try_recv() {
            None => Ok(()),
            Some(Ok(Message::Abandon { reason })) => Err(SourceError::Abandoned(reason)),
            Some(Ok(Message::DeviceAck { .. })) => Ok(()),
            Some(Ok(other)) => {
                Err(ProtocolError::unexpected("nothing during pre-copy", other).into())
            }
            Some(Err(e)) => Err(e.into()),
        }
    }

    /// Sends all RAM, then dirty pages pass after pass until the rest fits the downtime target.
    fn precopy(&mut self) -> Result<(), SourceError> {
        let cfg = PolicyConfig {
            downtime_limit: self.opts.downtime,
            timeout: self.opts.timeout,
            ..Default::default()
        };
        let mut conv = Convergence::new(cfg);
        let mut throttle = self.opts.max_bandwidth.map(Throttle::new);
        let mut ranges = self.log.all_ranges();
        let mut last_collect = Instant::now();
        self.stats.status = Status::Active;
        for iteration in 0.. {
            self.check_return_path()?;
            let t = Instant::now();
            let sent = send_ranges(
                &self.mem,
                &ranges,
                &mut self.ch,
                &SendOptions::default(),
                throttle.as_mut(),
            )?;
            conv.record_pass(sent.wire_bytes, t.elapsed());
            self.stats.ram.add_pass(&sent, false);
            super::fault::corrupt_point("precopy", self.ch.get_mut());
            self.ch.send(&Message::IterationEnd {
                iteration,
                pages: sent.normal_pages + sent.zero_pages,
            })?;
            ranges = self.log.collect()?;
            let remaining = total_len(&ranges);
            conv.record_dirty(remaining / PAGE_SIZE, last_collect.elapsed());
            last_collect = Instant::now();
            self.stats.ram.dirty_sync_count = iteration + 1;
            self.stats.ram.remaining = remaining;
            self.stats.ram.dirty_pages_rate = conv.dirty_rate() as u64;
            self.report(&conv, iteration, remaining);
            match decide(&conv, self.start.elapsed(), remaining) {
                Decision::SwitchOver => {
                    self.pending = ranges;
                    return Ok(());
                }
                Decision::GiveUp => return Err(SourceError::Timeout(self.opts.timeout)),
                Decision::Continue => {}
            }
        }
        Ok(())
    }

    fn report(&self, conv: &Convergence, iteration: u64, remaining: u64) {
        let p = Progress {
            iteration,
            transferred: self.stats.ram.transferred,
            total_ram: self.stats.ram.total,
            remaining,
            bandwidth: conv.bandwidth(),
            dirty_pages_rate: conv.dirty_rate(),
            expected_downtime: conv.estimate_downtime(remaining, 0),
            elapsed: self.start.elapsed(),
        };
        let line = progress_line(&p);
        if self.tty {
            eprint!("\r{line}\x1b[K");
        }
        log::debug!("{line}");
        publish(self.info, &self.stats, line, true);
    }

    /// Pauses the guest, sends the last dirty pages and all state, and hands over. Failing
    /// before `Go` resumes the guest here; failing after it leaves the guest paused, because
    /// the destination may already be running it.
    fn switchover(&mut self, shared: &SharedMachine) -> Result<(), SourceError> {
        let mut m = lock(shared);
        self.stats.status = Status::Device;
        m.vcpus.pause()?;
        let paused = Instant::now();
        let result = self.send_final(&m, paused);
        match result {
            Ok(()) => {
                self.stats.set_downtime(paused.elapsed());
                self.stats.status = Status::Completed;
                Ok(())
            }
            Err(SourceError::End(EndError::AfterGo(e))) => {
                log::error!(
                    "no confirmation after go; the guest stays paused here so it never runs twice"
                );
                Err(SourceError::End(EndError::AfterGo(e)))
            }
            Err(e) => {
                m.vcpus.resume()?;
                Err(e)
            }
        }
    }

    fn send_final(&mut self, m: &Machine, paused: Instant) -> Result<(), SourceError> {
        let mut ranges = std::mem::take(&mut self.pending);
        ranges.extend(self.log.collect()?);
        let sent = send_ranges(
            &self.mem,
            &ranges,
            &mut self.ch,
            &SendOptions::default(),
            None,
        )?;
        self.stats.ram.add_pass(&sent, true);
        let t_mem = paused.elapsed();
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
        self.ch.send(&Message::Complete)?;
        let t_sent = paused.elapsed();
        let dest = source_end(&mut self.ch, &self.rp, PEER_TIMEOUT, |_| {})?;
        let b = &mut self.stats.downtime_breakdown_us;
        b.final_memory = t_mem.as_micros() as u64;
        b.state_save = (t_save - t_mem).as_micros() as u64;
        b.state_transfer = (t_sent - t_save).as_micros() as u64;
        b.state_load = dest.state_load_us;
        b.resume = dest.resume_us;
        let elapsed = self.start.elapsed();
        self.stats.ram.set_rates(elapsed);
        Ok(())
    }
}

/// The policy's decision, except that a pass too small to measure bandwidth (an idle guest
/// whose RAM is mostly holes) must not keep pre-copy going forever: a remainder below one
/// chunk switches over.
fn decide(conv: &Convergence, elapsed: Duration, remaining: u64) -> Decision {
    if conv.bandwidth().is_none() && remaining <= SendOptions::default().max_chunk {
        return Decision::SwitchOver;
    }
    conv.decide(elapsed, remaining, 0, true)
}
