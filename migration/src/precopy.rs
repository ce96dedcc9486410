//! The source's pre-copy loop: send everything, then what got dirty, until the policy says
//! switch over or give up; and the final pass once the VMM has paused the vCPUs.
//!
//! The VMM keeps what needs KVM or devices: pausing, reading state, device state machines.
//! Devices take part through [`DeviceHooks`] (pre-copy chunks, stop-copy size, acks).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryMmap, WriteVolatile};

use crate::MigrationError;
use crate::dirty::DirtyLog;
use crate::policy::{Convergence, Decision, PolicyConfig};
use crate::protocol::{Channel, DevicePhase, Message, ProtocolError, ReturnPath};
use crate::ranges::{MemoryRange, total_len, union};
use crate::send::{SendCounters, SendOptions, send_ranges};
use crate::stats::{MigrationStats, Progress};
use crate::throttle::Throttle;

/// How passthrough devices join pre-copy. Every method has a no-device default.
pub trait DeviceHooks {
    /// Pre-copy chunks ready now, as (device id, bytes); asked once per pass.
    fn precopy_data(&mut self) -> Result<Vec<(String, Vec<u8>)>, MigrationError> {
        Ok(Vec::new())
    }

    /// Stop-copy bytes the devices would still have to send (part of the downtime).
    fn stop_copy_bytes(&mut self) -> u64 {
        0
    }

    /// The destination has loaded `device`'s initial pre-copy data (switchover-ack). An ack
    /// for a device that is not migrating, or a second one, is a protocol error: the default
    /// (no devices) refuses every ack.
    fn acked(&mut self, device: &str) -> Result<(), MigrationError> {
        Err(unknown_ack(device))
    }

    /// Whether every device that must be acknowledged before switchover has been.
    fn all_acked(&self) -> bool {
        true
    }
}

/// The error for a `DeviceAck` naming a device that is not migrating (peer text, shortened).
pub fn unknown_ack(device: &str) -> MigrationError {
    let name: String = device.chars().take(64).collect();
    ProtocolError::OutOfPhase {
        got: crate::protocol::MessageType::DeviceAck,
        reason: format!("no device {name:?} is waiting for an acknowledgement"),
    }
    .into()
}

/// Bytes of RAM sent between two looks at the cancel flag.
const CANCEL_BATCH: u64 = 16 << 20;

/// `ranges` cut into runs of at most `max` bytes each (ranges split at the cuts), in order.
fn batches(ranges: &[MemoryRange], max: u64) -> Vec<Vec<MemoryRange>> {
    let mut out = vec![Vec::new()];
    let mut room = max;
    for r in ranges {
        let mut r = *r;
        while r.len > 0 {
            if room == 0 {
                out.push(Vec::new());
                room = max;
            }
            let take = r.len.min(room);
            if let Some(b) = out.last_mut() {
                b.push(MemoryRange::new(r.gpa, take));
            }
            r = MemoryRange::new(r.gpa + take, r.len - take);
            room -= take;
        }
    }
    out
}

/// For a VM without migratable devices.
pub struct NoDevices;

impl DeviceHooks for NoDevices {}

#[derive(Clone, Copy, Debug, Default)]
pub struct PrecopyOptions {
    pub policy: PolicyConfig,
    pub send: SendOptions,
    /// `--max-bandwidth` in bytes per second.
    pub max_bandwidth: Option<u64>,
}

/// The forward connection and the return path of a source, and the operator's cancel.
pub struct Link<'a, S> {
    pub ch: &'a mut Channel<S>,
    pub rp: &'a ReturnPath,
    /// Set (by `migrate-cancel`) to end pre-copy after the pass in progress.
    pub cancel: Option<&'a AtomicBool>,
}

#[derive(Debug)]
pub enum PrecopyEnd {
    /// The operator cancelled: the guest runs on, nothing more is sent.
    Cancelled,
    /// Pause the vCPUs and call [`final_pass`] with `pending`, the dirty ranges collected
    /// last and not sent yet.
    SwitchOver {
        pending: Vec<MemoryRange>,
        expected_downtime: Duration,
    },
    /// Timed out without converging: stop dirty logging, send Abandon, keep running.
    GaveUp,
}

/// Runs pre-copy. Dirty logging must not be started yet: this starts it before the first
/// pass (so nothing written during that pass is missed); the caller stops it at the end.
pub fn run_precopy<B, S, H>(
    mem: &GuestMemoryMmap<B>,
    dirty: &mut DirtyLog,
    link: Link<'_, S>,
    opts: &PrecopyOptions,
    hooks: &mut H,
    stats: &mut MigrationStats,
    progress: impl FnMut(&Progress),
) -> Result<PrecopyEnd, MigrationError>
where
    B: Bitmap,
    S: Write + WriteVolatile,
    H: DeviceHooks,
{
    dirty.start()?;
    let mut run = Run {
        mem,
        dirty,
        link,
        opts,
        hooks,
        stats,
        progress,
        conv: Convergence::new(opts.policy),
        throttle: opts.max_bandwidth.map(Throttle::new),
        start: Instant::now(),
        collected_at: Instant::now(),
    };
    let mut ranges = run.dirty.all_ranges();
    let mut iteration = 0;
    loop {
        if !run.pass(&ranges, iteration)? || run.cancelled() {
            return Ok(PrecopyEnd::Cancelled);
        }
        ranges = run.dirty.collect()?;
        match run.assess(&ranges, iteration) {
            (Decision::Continue, _) => {
                run.await_acks_if_only_they_are_missing(&ranges)?;
                iteration += 1;
            }
            (Decision::SwitchOver, expected) => {
                return Ok(PrecopyEnd::SwitchOver {
                    pending: ranges,
                    expected_downtime: expected.unwrap_or_default(),
                });
            }
            (Decision::GiveUp, _) => return Ok(PrecopyEnd::GaveUp),
        }
    }
}

struct Run<'a, 'l, B: Bitmap, S, H, P> {
    mem: &'a GuestMemoryMmap<B>,
    dirty: &'a mut DirtyLog,
    link: Link<'l, S>,
    opts: &'a PrecopyOptions,
    hooks: &'a mut H,
    stats: &'a mut MigrationStats,
    progress: P,
    conv: Convergence,
    throttle: Option<Throttle>,
    start: Instant,
    collected_at: Instant,
}

impl<B, S, H, P> Run<'_, '_, B, S, H, P>
where
    B: Bitmap,
    S: Write + WriteVolatile,
    H: DeviceHooks,
    P: FnMut(&Progress),
{
    /// Sends `ranges` and the devices' pre-copy data, then reads the return path.
    fn cancelled(&self) -> bool {
        self.link.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// Sends one pass; false if the operator cancelled it part-way (between batches).
    fn pass(&mut self, ranges: &[MemoryRange], iteration: u64) -> Result<bool, MigrationError> {
        let sent = Instant::now();
        let mut c = SendCounters::default();
        for batch in batches(ranges, CANCEL_BATCH) {
            if self.cancelled() {
                return Ok(false);
            }
            c += send_ranges(
                self.mem,
                &batch,
                self.link.ch,
                &self.opts.send,
                self.throttle.as_mut(),
            )?;
        }
        let ch = &mut *self.link.ch;
        let device_bytes = send_device_data(ch, self.hooks)?;
        ch.send(&Message::IterationEnd {
            iteration,
            pages: c.normal_pages + c.zero_pages,
        })?;
        self.conv
            .record_pass(c.wire_bytes + device_bytes, sent.elapsed());
        self.stats.ram.add_pass(&c, false);
        self.stats.vfio.transferred += device_bytes;
        drain_return_path(self.link.rp, self.hooks)?;
        Ok(true)
    }

    /// Measures the dirty set just collected and asks the policy what to do.
    fn assess(&mut self, ranges: &[MemoryRange], iteration: u64) -> (Decision, Option<Duration>) {
        let pages: u64 = ranges.iter().map(MemoryRange::pages).sum();
        self.conv.record_dirty(pages, self.collected_at.elapsed());
        self.collected_at = Instant::now();
        self.stats.ram.dirty_sync_count += 1;
        let remaining = total_len(ranges);
        let stop_copy = self.hooks.stop_copy_bytes();
        let expected = self.conv.estimate_downtime(remaining, stop_copy);
        let elapsed = self.start.elapsed();
        update_stats(self.stats, &self.conv, remaining, expected, elapsed);
        (self.progress)(&Progress {
            iteration,
            transferred: self.stats.ram.transferred + self.stats.vfio.transferred,
            total_ram: self.stats.ram.total,
            remaining,
            bandwidth: self.conv.bandwidth(),
            dirty_pages_rate: self.conv.dirty_rate(),
            expected_downtime: expected,
            elapsed,
        });
        let acked = self.hooks.all_acked();
        let decision = self.conv.decide(elapsed, remaining, stop_copy, acked);
        (decision, expected)
    }

    /// When memory already fits the downtime target and only switchover-acks are missing,
    /// waits briefly for one instead of spinning through near-empty passes.
    fn await_acks_if_only_they_are_missing(
        &mut self,
        ranges: &[MemoryRange],
    ) -> Result<(), MigrationError> {
        if self.hooks.all_acked() {
            return Ok(());
        }
        let elapsed = self.start.elapsed();
        let stop_copy = self.hooks.stop_copy_bytes();
        if self
            .conv
            .decide(elapsed, total_len(ranges), stop_copy, true)
            != Decision::SwitchOver
        {
            return Ok(());
        }
        match self.link.rp.recv_timeout(ACK_WAIT) {
            Ok(Message::DeviceAck { device }) => self.hooks.acked(&device)?,
            Ok(other) => return Err(ProtocolError::unexpected("DeviceAck", other).into()),
            Err(ProtocolError::Timeout) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}

/// How long a pass waits for a switchover-ack before looking at memory again.
const ACK_WAIT: Duration = Duration::from_millis(5);

fn update_stats(
    stats: &mut MigrationStats,
    conv: &Convergence,
    remaining: u64,
    expected: Option<Duration>,
    elapsed: Duration,
) {
    stats.ram.remaining = remaining;
    stats.ram.dirty_pages_rate = conv.dirty_rate() as u64;
    stats.ram.set_rates(elapsed);
    stats.expected_downtime = expected.map_or(0, |d| d.as_millis() as u64);
}

fn send_device_data<S: Write, H: DeviceHooks>(
    ch: &mut Channel<S>,
    hooks: &mut H,
) -> Result<u64, MigrationError> {
    let mut bytes = 0;
    for (device, data) in hooks.precopy_data()? {
        bytes += data.len() as u64;
        ch.send(&Message::DeviceData {
            device,
            phase: DevicePhase::PreCopy,
            data,
        })?;
    }
    Ok(bytes)
}

/// Handles what the destination said since the last look: acks go to the hooks, Abandon or
/// a broken return path end the migration.
fn drain_return_path<H: DeviceHooks>(rp: &ReturnPath, hooks: &mut H) -> Result<(), MigrationError> {
    while let Some(msg) = rp.try_recv() {
        match msg? {
            Message::DeviceAck { device } => hooks.acked(&device)?,
            other => return Err(ProtocolError::unexpected("DeviceAck", other).into()),
        }
    }
    Ok(())
}

/// With the vCPUs paused: sends `pending` plus everything dirtied since, ending the pass
/// with `IterationEnd`. Device stop-copy data and state follow, sent by the VMM.
pub fn final_pass<B, S>(
    mem: &GuestMemoryMmap<B>,
    dirty: &mut DirtyLog,
    ch: &mut Channel<S>,
    pending: &[MemoryRange],
    send: &SendOptions,
    stats: &mut MigrationStats,
) -> Result<SendCounters, MigrationError>
where
    B: Bitmap,
    S: Write + WriteVolatile,
{
    let ranges = union(pending, &dirty.collect()?);
    let c = send_ranges(mem, &ranges, ch, send, None)?;
    ch.send(&Message::IterationEnd {
        iteration: stats.ram.dirty_sync_count,
        pages: c.normal_pages + c.zero_pages,
    })?;
    stats.ram.dirty_sync_count += 1;
    stats.ram.add_pass(&c, true);
    stats.ram.remaining = 0;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cut_ranges_at_the_limit_and_keep_their_order() {
        let r = |gpa, len| MemoryRange::new(gpa, len);
        let got = batches(&[r(0, 0x3000), r(0x10000, 0x1000)], 0x2000);
        assert_eq!(
            got,
            vec![
                vec![r(0, 0x2000)],
                vec![r(0x2000, 0x1000), r(0x10000, 0x1000)],
            ]
        );
        assert_eq!(batches(&[], 0x2000), vec![Vec::<MemoryRange>::new()]);
    }
}
