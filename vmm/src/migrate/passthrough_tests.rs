//! The device-migration drivers and the source/destination sequences at the `VfioBackend`
//! boundary, against the in-memory fake (which stands in for kernel VFIO as well).

use std::io::Cursor;

use devices::pci::vfio_backend::{MigrationState, VfioBackend};
use migration::dirty::{DirtySource, RamSlot};
use migration::precopy::DeviceHooks;
use migration::protocol::{Channel, DevicePhase, Message};
use migration::ranges::MemoryRange;

use super::dma_log::DeviceDmaLog;
use super::driver::{Chunk, MigrationDriver};
use super::fake_backend::{ALL_FLAGS, FakeDevice, Mode};
use super::passthrough::DeviceError;
use super::passthrough_dest::DestDevices;
use super::passthrough_source::SourceDevices;
use super::v1::V1Driver;
use crate::devices_setup::{Passthrough, PassthroughBackend};

const RAM: MemoryRange = MemoryRange {
    gpa: 0,
    len: 64 << 20,
};

fn spec<T>(dev: T) -> Vec<(Passthrough, T)> {
    spec_with(dev, true)
}

fn spec_with<T>(dev: T, pre_copy: bool) -> Vec<(Passthrough, T)> {
    let p = Passthrough {
        backend: PassthroughBackend::User("fake.sock".into()),
        pre_copy,
    };
    vec![(p, dev)]
}

/// Pre-copy rounds until the source may switch over: chunks go to the destination, and the
/// end-of-initial-data mark comes back as an acknowledgement.
fn precopy(src: &mut SourceDevices, dst: &mut DestDevices) -> usize {
    let mut rounds = 0;
    while !src.all_acked() {
        rounds += 1;
        assert!(rounds < 100, "never acknowledged");
        for (id, data) in src.precopy_data().unwrap() {
            if data.is_empty() {
                src.acked(&id).unwrap();
            } else {
                dst.write(&id, &data).unwrap();
            }
        }
    }
    rounds
}

/// The stop-copy stream through a real channel encoding, into the destination.
fn stop_copy(src: &mut SourceDevices, dst: &mut DestDevices) -> u64 {
    let mut ch = Channel::new(Vec::new());
    let sent = src.send_stop_copy(&mut ch).unwrap();
    let mut rx = Channel::new(Cursor::new(std::mem::take(ch.get_mut())));
    while let Ok(msg) = rx.recv() {
        let Message::DeviceData {
            device,
            phase: DevicePhase::StopCopy,
            data,
        } = msg
        else {
            panic!("unexpected {msg:?}");
        };
        dst.write(&device, &data).unwrap();
    }
    sent
}

fn migrate(mode: Mode, len: usize) {
    migrate_with(mode, len, |_| {}, true);
}

/// Migrates a fake device's `len` bytes of state; `tweak` adjusts the source device,
/// `pre_copy` is its `pre-copy=` option.
fn migrate_with(mode: Mode, len: usize, tweak: impl Fn(&mut FakeDevice), pre_copy: bool) {
    let mut source = FakeDevice::new(mode, len, 7);
    tweak(&mut source);
    let (src_dev, src_seen) = source.into_pci("vfio0");
    let (dst_dev, dst_seen) = FakeDevice::new(mode, len, 1).into_pci("vfio0");
    let mut src = SourceDevices::prepare(spec_with(src_dev, pre_copy), &[RAM], false).unwrap();
    let mut dst = DestDevices::probe(spec(dst_dev)).unwrap();
    migration::description::check_devices(&src.descriptions(), &dst.descriptions()).unwrap();
    dst.start_resuming().unwrap();
    src.enter_precopy(true, true).unwrap();
    let precopy_on = pre_copy && FakeDevice::new(mode, 0, 0).offers_precopy();
    assert_eq!(
        src.all_acked(),
        !precopy_on,
        "switchover waits for pre-copy data"
    );
    let rounds = precopy(&mut src, &mut dst);
    if precopy_on {
        assert!(
            rounds >= len.div_ceil(32 << 20),
            "pre-copy per pass is capped"
        );
    }
    src.stop().unwrap();
    assert!(stop_copy(&mut src, &mut dst) > 0);
    dst.finish_loading().unwrap();
    dst.ready().unwrap();
    dst.run();
    src.release();
    let want = FakeDevice::new(mode, len, 7);
    let (src, dst) = (src_seen.lock().unwrap(), dst_seen.lock().unwrap());
    assert_eq!(dst.loaded.as_deref().map(<[u8]>::len), Some(len));
    assert_eq!(dst.loaded, Some(want.into_state()));
    assert_eq!(src.state, Some(MigrationState::Stop));
    assert_eq!(dst.state, Some(MigrationState::Running));
    assert_eq!((src.invalid_arcs, dst.invalid_arcs), (0, 0));
}

#[test]
fn v2_with_precopy_p2p_and_ack() {
    migrate(Mode::V2(ALL_FLAGS), (40 << 20) + 5);
}

#[test]
fn v2_precopy_drained_by_a_zero_byte_read_keeps_pre_copying() {
    // mtty and libvfio-user answer a drained PRE_COPY read with 0 bytes, not ENOMSG.
    let zero = |d: &mut FakeDevice| d.precopy_drained_reads_zero = true;
    migrate_with(Mode::V2(ALL_FLAGS), (3 << 20) + 5, zero, true);
}

#[test]
fn pre_copy_off_moves_the_device_in_stop_copy_only() {
    let (dev, seen) = FakeDevice::new(Mode::V2(ALL_FLAGS), 4096, 7).into_pci("vfio0");
    let mut src = SourceDevices::prepare(spec_with(dev, false), &[RAM], false).unwrap();
    assert!(!src.descriptions()[0].caps.pre_copy);
    src.enter_precopy(true, true).unwrap();
    assert!(src.all_acked(), "no pre-copy data to wait for");
    assert!(src.precopy_data().unwrap().is_empty());
    src.stop().unwrap();
    let mut ch = Channel::new(Cursor::new(Vec::new()));
    assert!(src.send_stop_copy(&mut ch).unwrap() > 4096);
    use MigrationState::*;
    assert_eq!(
        seen.lock().unwrap().visited,
        [Running, RunningP2p, Stop, StopCopy],
        "RUNNING -> RUNNING_P2P -> (STOP) -> STOP_COPY, never PRE_COPY"
    );
    // And a destination whose device could pre-copy takes the stream.
    migrate_with(Mode::V2(ALL_FLAGS), 4096, |_| {}, false);
}

#[test]
fn v2_without_optional_states() {
    migrate(Mode::V2(super::driver::MIGRATION_STOP_COPY), 4096);
}

#[test]
fn v1_region_behind_the_same_driver() {
    migrate(Mode::V1, 10_000);
}

#[test]
fn v1_chunk_larger_than_the_buffer_is_read_in_pieces() {
    let mut fake = FakeDevice::new(Mode::V1, 3000, 3);
    let b: &mut dyn VfioBackend = &mut fake;
    let (index, size) = b.migration_region_v1().unwrap().unwrap();
    let mut drv = V1Driver::new(index, size).unwrap();
    drv.set_state(b, MigrationState::StopCopy).unwrap();
    let (mut got, mut buf) = (Vec::new(), [0u8; 1000]);
    while let Chunk::Data(n) = drv.read(b, &mut buf).unwrap() {
        assert!(n <= buf.len());
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got.len(), 3000 + 8);
    assert_eq!(drv.read(b, &mut buf).unwrap(), Chunk::End);
}

#[test]
fn failed_arc_recovers_to_running_without_reset() {
    let mut fake = FakeDevice::new(Mode::V2(ALL_FLAGS), 4096, 7);
    fake.fail_arc = Some((MigrationState::PreCopyP2p, MigrationState::StopCopy));
    let (dev, seen) = fake.into_pci("vfio0");
    let mut src = SourceDevices::prepare(spec(dev), &[RAM], false).unwrap();
    src.enter_precopy(true, true).unwrap();
    let e = src.stop().unwrap_err().to_string();
    assert!(
        e.contains("StopCopy") && e.contains("now PreCopyP2p"),
        "{e}"
    );
    src.recover();
    let s = seen.lock().unwrap();
    assert_eq!(s.state, Some(MigrationState::Running));
    assert_eq!((s.resets, s.invalid_arcs), (0, 0));
}

#[test]
fn destination_resumes_from_any_state_and_aborts_by_reset() {
    for (setup, resets) in [
        (MigrationState::Running, 0),
        (MigrationState::PreCopy, 0),
        (MigrationState::StopCopy, 0),
        (MigrationState::Resuming, 1), // a stale session fails validation: ERROR, reset
    ] {
        let mut fake = FakeDevice::new(Mode::V2(ALL_FLAGS), 4096, 1);
        fake.set_migration_state(setup).unwrap();
        let (dev, seen) = fake.into_pci("vfio0");
        let mut dst = DestDevices::probe(spec(dev)).unwrap();
        dst.start_resuming().unwrap();
        dst.write("vfio0", b"not a valid stream").unwrap();
        assert!(dst.finish_loading().is_err());
        dst.abort();
        let s = seen.lock().unwrap();
        assert_eq!(s.state, Some(MigrationState::Running), "from {setup:?}");
        assert_eq!(s.resets, resets + 1, "from {setup:?}");
        assert_eq!(s.invalid_arcs, 0, "from {setup:?}");
    }
}

#[test]
fn unmigratable_device_or_missing_dma_log_blocks_unless_forced() {
    let (dev, _) = FakeDevice::new(Mode::None, 64, 1).into_pci("vfio0");
    let e = SourceDevices::prepare(spec(dev), &[RAM], true)
        .err()
        .unwrap();
    assert!(matches!(e, DeviceError::CannotMigrate { .. }));
    assert!(
        e.to_string()
            .starts_with("vfio0 (--vfio-user fake.sock) cannot migrate"),
        "{e}"
    );

    let mut fake = FakeDevice::new(Mode::V2(ALL_FLAGS), 64, 1);
    fake.dma_log = false;
    let (dev, _) = fake.into_pci("vfio0");
    let e = SourceDevices::prepare(spec(dev.clone()), &[RAM], false)
        .err()
        .unwrap();
    assert!(e.to_string().contains("--force-dirty-dma"), "{e}");
    let forced = SourceDevices::prepare(spec(dev), &[RAM], true).unwrap();
    let slot = RamSlot {
        index: 0,
        range: RAM,
    };
    let mut sources = forced.dirty_sources(&[RAM]);
    let bm = sources[0].dirty_bitmap(&slot).unwrap();
    assert!(bm.iter().all(|w| *w == u64::MAX), "forced: always dirty");
}

#[test]
fn dma_log_reports_device_writes_in_kvm_layout() {
    let mut fake = FakeDevice::new(Mode::V2(ALL_FLAGS), 64, 1);
    fake.dirty.extend([0x3000, 0x41000]);
    let (dev, seen) = fake.into_pci("vfio0");
    let mut log = DeviceDmaLog::new("vfio0", dev, vec![RAM]);
    log.start().unwrap();
    assert!(seen.lock().unwrap().logging);
    let bm = log
        .dirty_bitmap(&RamSlot {
            index: 0,
            range: RAM,
        })
        .unwrap();
    assert_eq!(bm[0], 1 << 3);
    assert_eq!(bm[1], 1 << 1);
    let other = RamSlot {
        index: 1,
        range: MemoryRange::new(1 << 32, 4096),
    };
    assert!(log.dirty_bitmap(&other).unwrap().is_empty());
    log.stop().unwrap();
    assert!(!seen.lock().unwrap().logging);
}
