//! The whole memory side of a migration between two threads: pre-copy with a guest that
//! keeps dirtying pages, a device with pre-copy data and a switchover-ack, the final pass,
//! and the two-phase end.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::MigrationError;
use crate::bitmap;
use crate::dirty::{DirtyError, DirtyLog, DirtySource, RamSlot};
use crate::policy::PolicyConfig;
use crate::precopy::{DeviceHooks, Link, PrecopyEnd, PrecopyOptions, final_pass, run_precopy};
use crate::protocol::{Channel, DestTimings, Message, ReturnPath};
use crate::recv::MemoryReceiver;
use crate::session::{dest_confirm, dest_ready, source_end};
use crate::stats::MigrationStats;

type Mem = GuestMemoryMmap<AtomicBitmap>;

fn memory() -> Mem {
    Mem::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(0x100_0000), 0x1_0000),
    ])
    .unwrap()
}

/// Plays the guest: on each collection it writes the next scripted pages of slot 0 (then
/// whatever the test queued in `late`) and reports them dirty, as KVM would.
struct Guest {
    mem: Mem,
    script: Vec<Vec<u64>>,
    calls: usize,
    late: Arc<Mutex<Vec<u64>>>,
}

impl Guest {
    fn new(mem: &Mem, script: Vec<Vec<u64>>) -> (Self, Arc<Mutex<Vec<u64>>>) {
        let late = Arc::new(Mutex::new(Vec::new()));
        let g = Self {
            mem: mem.clone(),
            script,
            calls: 0,
            late: late.clone(),
        };
        (g, late)
    }
}

impl DirtySource for Guest {
    fn name(&self) -> &str {
        "guest"
    }
    fn dirty_bitmap(&mut self, slot: &RamSlot) -> Result<Vec<u64>, DirtyError> {
        let mut bm = vec![0; bitmap::words_for(slot.pages())];
        if slot.index != 0 {
            return Ok(bm);
        }
        let pages = match self.script.get(self.calls) {
            Some(p) => p.clone(),
            None => std::mem::take(&mut *self.late.lock().unwrap()),
        };
        self.calls += 1;
        for p in pages {
            self.mem
                .write_obj(self.calls as u64 * 1000 + p, GuestAddress(p * 4096 + 8))
                .unwrap();
            bm[(p / 64) as usize] |= 1 << (p % 64);
        }
        Ok(bm)
    }
}

#[derive(Default)]
struct OneDevice {
    sent: bool,
    acked: bool,
}

impl DeviceHooks for OneDevice {
    fn precopy_data(&mut self) -> Result<Vec<(String, Vec<u8>)>, MigrationError> {
        if std::mem::replace(&mut self.sent, true) {
            return Ok(vec![]);
        }
        Ok(vec![("dev0".into(), vec![7; 1000])])
    }
    fn stop_copy_bytes(&mut self) -> u64 {
        0 // with the zero downtime limit below, anything else would never converge
    }
    fn acked(&mut self, device: &str) -> Result<(), MigrationError> {
        if device != "dev0" || std::mem::replace(&mut self.acked, true) {
            return Err(crate::precopy::unknown_ack(device));
        }
        Ok(())
    }
    fn all_acked(&self) -> bool {
        self.acked
    }
}

fn destination(ch: UnixStream) -> (Mem, u64) {
    let dst = memory();
    let mut rx = MemoryReceiver::new(&dst, true);
    let mut ch = Channel::new(ch);
    let mut passes = 0;
    let token = loop {
        match rx.recv(&dst, &mut ch).unwrap() {
            Message::IterationEnd { .. } => passes += 1,
            Message::DeviceData { device, .. } => ch.send(&Message::DeviceAck { device }).unwrap(),
            Message::Complete { token } => break token,
            other => panic!("unexpected {other:?}"),
        }
    };
    dest_ready(&mut ch, token).unwrap();
    dest_confirm(&mut ch, DestTimings::default()).unwrap();
    (dst, passes)
}

fn options(timeout: Duration) -> PrecopyOptions {
    PrecopyOptions {
        policy: PolicyConfig {
            downtime_limit: Duration::ZERO, // converge only on an empty dirty set
            state_allowance: Duration::ZERO,
            min_sample_bytes: 0,
            timeout,
            ..PolicyConfig::default()
        },
        ..PrecopyOptions::default()
    }
}

#[test]
fn precopy_converges_and_final_pass_completes_the_copy() {
    let src = memory();
    src.write_slice(b"boot data", GuestAddress(0x5000)).unwrap();
    let mut log = DirtyLog::new(RamSlot::of_memory(&src));
    let script = vec![vec![1, 2, 3, 200], vec![2, 9], vec![9]];
    let (guest, late) = Guest::new(&src, script);
    log.add(Box::new(guest));
    let (a, b) = UnixStream::pair().unwrap();
    let dest = thread::spawn(move || destination(b));

    let mut ch = Channel::new(a);
    let rp = ReturnPath::spawn(ch.get_ref().try_clone().unwrap()).unwrap();
    let mut stats = MigrationStats::new(0x11_0000);
    let mut hooks = OneDevice::default();
    let mut lines = Vec::new();
    let link = Link {
        ch: &mut ch,
        rp: &rp,
        cancel: None,
    };
    let opts = options(Duration::from_secs(10));
    let end = run_precopy(&src, &mut log, link, &opts, &mut hooks, &mut stats, |p| {
        lines.push(crate::stats::progress_line(p))
    })
    .unwrap();
    let PrecopyEnd::SwitchOver { pending, .. } = end else {
        panic!("{end:?}")
    };
    // "Paused" from here: the guest's last writes (pages 4, 5) arrive in the final pass.
    late.lock().unwrap().extend([4, 5]);
    final_pass(&src, &mut log, &mut ch, &pending, &opts.send, &mut stats).unwrap();
    source_end(
        &mut ch,
        &rp,
        Duration::from_secs(5),
        crate::protocol::RunState::Running,
        |_| Ok(()),
    )
    .unwrap();
    log.stop().unwrap();

    let (dst, passes) = dest.join().unwrap();
    for (rs, rd) in src.iter().zip(dst.iter()) {
        let (mut a, mut b) = (vec![0u8; rs.len() as usize], vec![0u8; rd.len() as usize]);
        src.read_slice(&mut a, rs.start_addr()).unwrap();
        dst.read_slice(&mut b, rd.start_addr()).unwrap();
        assert!(a == b);
    }
    assert_eq!(
        dst.read_obj::<u64>(GuestAddress(5 * 4096 + 8)).unwrap() % 1000,
        5
    );
    assert!(hooks.acked);
    assert_eq!(passes, stats.ram.dirty_sync_count);
    assert!(stats.ram.dirty_sync_count >= 5);
    assert_eq!(stats.ram.downtime_bytes, 2 * 4096 + 24); // pages 4-5 in one frame
    assert!(stats.ram.downtime_bytes > 0 && stats.vfio.transferred == 1000);
    assert_eq!(lines.len() as u64, stats.ram.dirty_sync_count - 1);
}

#[test]
fn precopy_gives_up_after_the_timeout() {
    let src = memory();
    let mut log = DirtyLog::new(RamSlot::of_memory(&src));
    let (guest, late) = Guest::new(&src, vec![]);
    late.lock().unwrap().extend([1, 2, 3]);
    log.add(Box::new(guest));
    let (a, b) = UnixStream::pair().unwrap();
    let mut ch = Channel::new(a);
    let rp = ReturnPath::spawn(b.try_clone().unwrap()).unwrap();
    let mut stats = MigrationStats::new(0x11_0000);
    let link = Link {
        ch: &mut ch,
        rp: &rp,
        cancel: None,
    };
    let opts = options(Duration::ZERO);
    let end = run_precopy(
        &src,
        &mut log,
        link,
        &opts,
        &mut crate::precopy::NoDevices,
        &mut stats,
        |_| {},
    );
    assert!(matches!(end, Ok(PrecopyEnd::GaveUp)));
    drop(b);
}

#[test]
fn precopy_ends_after_the_pass_in_progress_when_cancelled() {
    let src = memory();
    let mut log = DirtyLog::new(RamSlot::of_memory(&src));
    let (guest, late) = Guest::new(&src, vec![]);
    late.lock().unwrap().extend([1, 2, 3]);
    log.add(Box::new(guest));
    let (a, b) = UnixStream::pair().unwrap();
    let mut ch = Channel::new(a);
    let rp = ReturnPath::spawn(b.try_clone().unwrap()).unwrap();
    let mut stats = MigrationStats::new(0x11_0000);
    let cancel = std::sync::atomic::AtomicBool::new(true);
    let link = Link {
        ch: &mut ch,
        rp: &rp,
        cancel: Some(&cancel),
    };
    let opts = options(Duration::from_secs(10));
    let end = run_precopy(
        &src,
        &mut log,
        link,
        &opts,
        &mut crate::precopy::NoDevices,
        &mut stats,
        |_| {},
    );
    assert!(matches!(end, Ok(PrecopyEnd::Cancelled)), "{end:?}");
    assert_eq!(stats.ram.dirty_sync_count, 0, "no pass after the cancel");
    assert_eq!(stats.ram.transferred, 0, "cancelled before the first batch");
    drop(b);
}
