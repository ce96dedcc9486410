//! VFIO migration v2 between two real sampledev processes, driven through two clients the way
//! a VMM does: pre-copy with DMA dirtying the state, switchover, resume on the destination.

mod common;

use std::time::{Duration, Instant};

use common::migrate::{load, migrate_plain, read_precopy, stop_copy};
use common::rig::{RAM_IOVA, Rig, WAIT, scribble, view};
use common::{rd, read_mem, wait_event, wr};
use sampledev::pattern::{MUTATIONS_PER_OP, fill_byte, mutation_index};
use sampledev::regs::*;
use sampledev::state::InternalState;
use vfio_user::vfio::*;
use vfio_user::{MigState, PrecopyInfo};

/// The internal state a device with the default seed has after `ops` DMA operations.
fn model(size: u64, ops: u64) -> InternalState {
    let mut m = InternalState::new(size, DEFAULT_STATE_SEED);
    (1..=ops).for_each(|op| m.mutate(op).unwrap());
    m
}

/// Words the DMA operations changed, read through the STATE window, must match the model.
fn check_touched_words(r: &Rig, m: &InternalState, ops: u64) {
    for op in 1..=ops {
        for k in 0..MUTATIONS_PER_OP {
            let w = mutation_index(DEFAULT_STATE_SEED, op, k, m.word_count());
            wr(&r.c, REG_STATE_WINDOW_OFFSET, w * 8);
            assert_eq!(r.rd(REG_STATE_WINDOW_DATA), m.word(w), "word {w}");
        }
    }
}

fn precopy_migration(state: &str, size: u64) {
    let t = Instant::now();
    let src = Rig::new(state, &[]);
    let dst = Rig::new(state, &[]);
    src.fill(0, 0x3000, 1);
    src.fill(0x8000, 100, 2);
    scribble(&dst);
    let all = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY;
    assert_eq!(src.c.migration_features().unwrap(), Some(all));
    let full = src.c.mig_data_size().unwrap();
    assert!(full > size);

    src.c.set_mig_state(MigState::PreCopy).unwrap();
    let info = src.c.precopy_info().unwrap();
    assert_eq!(info.dirty_bytes, 0);
    assert!(info.initial_bytes > size && info.initial_bytes < full);
    let mut stream = Vec::new();
    assert_eq!(read_precopy(&src.c, &mut stream) as u64, info.initial_bytes);
    assert_eq!(src.c.precopy_info().unwrap(), PrecopyInfo::default());

    // PRE_COPY is running: DMA still works and dirties pages already sent.
    src.fill(0x10000, 0x1000, 3);
    src.fill(0x20000, 0x1000, 4);
    let dirty = src.c.precopy_info().unwrap();
    assert_eq!(dirty.initial_bytes, 0);
    assert!(dirty.dirty_bytes > 0);
    assert_eq!(read_precopy(&src.c, &mut stream) as u64, dirty.dirty_bytes);
    // Changed after the last pre-copy read: only STOP_COPY carries it.
    src.fill(0x30000, 64, 5);
    let left = src.c.mig_data_size().unwrap();
    let before = stream.len();
    stop_copy(&src.c, &mut stream);
    assert_eq!(
        (stream.len() - before) as u64,
        left,
        "MIG_DATA_SIZE was exact"
    );
    let want = view(&src.c);

    // Odd chunking: the stream has no segmentation.
    load(&dst.c, &stream, 65537).unwrap();
    assert_eq!(view(&dst.c), want);
    dst.c.set_mig_state(MigState::Running).unwrap();
    assert_eq!(dst.rd(REG_COUNTER), 5);
    let m = model(size, 5);
    assert_eq!(dst.rd(REG_STATE_DIGEST), m.digest());
    check_touched_words(&dst, &m, 5);

    // The destination works on: DMA, counter, MSI-X through the restored table.
    dst.fill(0x40000, 256, 6);
    assert_eq!(dst.rd(REG_COUNTER), 6);
    for r in [&src, &dst] {
        assert_eq!((r.invalid_arcs(), r.failed_arcs()), (0, 0));
    }
    eprintln!(
        "{state}: {} stream bytes in {:?}",
        stream.len(),
        t.elapsed()
    );
}

#[test]
fn precopy_migration_4k() {
    precopy_migration("4K", 4096);
}

#[test]
fn precopy_migration_64m() {
    precopy_migration("64M", 64 << 20);
}

#[test]
fn stop_copy_only_device_migrates() {
    let args = ["--no-precopy", "--no-p2p"];
    let src = Rig::new("64K", &args);
    let dst = Rig::new("64K", &args);
    scribble(&dst);
    src.fill(0x100, 0x2000, 9);
    wr(&src.c, REG_SCRATCH, 77);
    let flags = src.c.migration_features().unwrap();
    assert_eq!(flags, Some(VFIO_MIGRATION_STOP_COPY));
    let stream_size = src.c.mig_data_size().unwrap();
    let mut stream = Vec::new();
    stop_copy_plain(&src, &mut stream);
    assert_eq!(stream.len() as u64, stream_size);
    let want = view(&src.c);
    load(&dst.c, &stream, 4096).unwrap();
    dst.c.set_mig_state(MigState::Running).unwrap();
    assert_eq!(view(&dst.c), want);
    dst.fill(0, 8, 1);
    // The source, released after the switchover, runs again when asked.
    src.c.set_mig_state(MigState::Running).unwrap();
    src.fill(0, 8, 1);
    for r in [&src, &dst] {
        assert_eq!((r.invalid_arcs(), r.failed_arcs()), (0, 0));
    }
}

/// Without P2P the switchover is RUNNING → STOP_COPY (the device walks through STOP).
fn stop_copy_plain(src: &Rig, stream: &mut Vec<u8>) {
    src.c.set_mig_state(MigState::StopCopy).unwrap();
    common::migrate::read_to_end(&src.c, stream);
    src.c.set_mig_state(MigState::Stop).unwrap();
}

#[test]
fn p2p_quiesce_waits_for_dma_and_defers_new_dma() {
    let src = Rig::new("64K", &[]);
    let dst = Rig::new("64K", &[]);
    // A DMA in flight when RUNNING_P2P is requested completes before the arc returns.
    src.start_fill(0, 2 << 20, 1, 0);
    src.c.set_mig_state(MigState::RunningP2p).unwrap();
    assert_eq!(src.rd(REG_STATUS), STATUS_DONE);
    assert!(
        wait_event(&src.irqs[0], Duration::ZERO),
        "interrupt came after the arc"
    );

    // A DMA started while quiesced waits: no memory written, no interrupt.
    src.start_fill(0x1000, 64, 2, 1);
    assert!(!wait_event(&src.irqs[1], Duration::from_millis(200)));
    assert_eq!(src.rd(REG_STATUS) & STATUS_BUSY, STATUS_BUSY);
    assert_eq!(src.rd(REG_COUNTER), 1);
    assert_eq!(
        read_mem(&src.ram, 0x1000, 8),
        (0..8).map(|i| fill_byte(1, 0x1000 + i)).collect::<Vec<_>>()
    );
    // Back to RUNNING (a failed migration): it runs.
    src.c.set_mig_state(MigState::Running).unwrap();
    assert!(wait_event(&src.irqs[1], WAIT));
    assert_eq!(src.rd(REG_COUNTER), 2);

    // Latched while quiesced, then migrated: it runs on the destination.
    src.c.set_mig_state(MigState::RunningP2p).unwrap();
    src.start_fill(0x3000, 128, 3, 2);
    let mut stream = Vec::new();
    stop_copy(&src.c, &mut stream);
    assert!(!wait_event(&src.irqs[2], Duration::ZERO));
    load(&dst.c, &stream, 1 << 20).unwrap();
    assert_eq!(dst.rd(REG_STATUS) & STATUS_BUSY, STATUS_BUSY);
    dst.c.set_mig_state(MigState::Running).unwrap();
    assert!(
        wait_event(&dst.irqs[2], WAIT),
        "deferred DMA did not run on the destination"
    );
    assert_eq!(dst.rd(REG_COUNTER), 3);
    let data = read_mem(&dst.ram, 0x3000, 128);
    assert!(
        data.iter()
            .enumerate()
            .all(|(i, &b)| b == fill_byte(3, i as u64))
    );
    assert_eq!(src.rd(REG_COUNTER), 2);
}

#[test]
fn data_commands_are_refused_outside_their_states() {
    let r = Rig::new("16K", &[]);
    let einval = |e: vfio_user::Error| assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    einval(r.c.precopy_info().unwrap_err());
    einval(r.c.mig_data_read(4096).unwrap_err());
    einval(r.c.mig_data_write(&[0; 8]).unwrap_err());
    r.c.set_mig_state(MigState::StopCopy).unwrap();
    einval(r.c.precopy_info().unwrap_err());
    einval(r.c.mig_data_write(&[0; 8]).unwrap_err());
    r.c.set_mig_state(MigState::Running).unwrap();
    // Leaving the session dropped it: a new one starts from the beginning.
    r.c.set_mig_state(MigState::PreCopy).unwrap();
    let mut s = Vec::new();
    assert!(read_precopy(&r.c, &mut s) > 16384);
    assert_eq!(&s[24..32], b"SDVMIGv1");
    r.c.set_mig_state(MigState::Running).unwrap();
    assert_eq!(r.invalid_arcs(), 0);
}

#[test]
fn repeated_migrations_chain() {
    let a = Rig::new("32K", &[]);
    let b = Rig::new("32K", &[]);
    let c = Rig::new("32K", &[]);
    a.fill(0, 4096, 1);
    migrate_plain(&a.c, &b.c);
    b.fill(0, 4096, 2);
    migrate_plain(&b.c, &c.c);
    c.fill(0, 4096, 3);
    assert_eq!(c.rd(REG_COUNTER), 3);
    assert_eq!(c.rd(REG_STATE_DIGEST), model(32 << 10, 3).digest());
    assert_eq!(rd(&c.c, REG_DMA_DST), RAM_IOVA);
}
