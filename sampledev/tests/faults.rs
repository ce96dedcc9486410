//! Fault injection: each fault gives its documented error, the source device recovers to
//! RUNNING (or through a reset) with DMA working, and a bad stream is refused on the
//! destination.

mod common;

use std::time::{Duration, Instant};

use common::migrate::{load, read_to_end, stop_copy};
use common::rig::{Rig, scribble};
use sampledev::regs::*;
use vfio_user::MigState;

/// The source is fine: RUNNING, DMA completes with its interrupt.
fn source_works(r: &Rig, seed: u64) {
    assert_eq!(r.c.get_mig_state().unwrap(), MigState::Running);
    r.fill(0x1000 * seed, 0x100, seed);
}

/// What a VMM does after a failed SET: read the state, try RUNNING, else reset.
fn recover(r: &Rig) {
    if r.c.set_mig_state(MigState::Running).is_err() {
        r.c.reset().unwrap();
        r.enable();
    }
}

#[test]
fn failing_arc_once_then_retry_succeeds() {
    let src = Rig::new("32K", &["--fail-arc", "STOP:STOP_COPY"]);
    let dst = Rig::new("32K", &[]);
    src.fill(0, 64, 1);
    src.c.set_mig_state(MigState::RunningP2p).unwrap();
    let e = src.c.set_mig_state(MigState::StopCopy).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EIO));
    // The walk got as far as the arc that failed.
    assert_eq!(src.c.get_mig_state().unwrap(), MigState::Stop);
    assert_eq!((src.failed_arcs(), src.invalid_arcs()), (1, 0));
    recover(&src);
    source_works(&src, 2);
    // Failed once only: the retried migration goes through.
    let mut stream = Vec::new();
    stop_copy(&src.c, &mut stream);
    load(&dst.c, &stream, 1 << 20).unwrap();
    dst.c.set_mig_state(MigState::Running).unwrap();
    assert_eq!(dst.rd(REG_COUNTER), 2);
}

#[test]
fn failing_arc_always() {
    let src = Rig::new(
        "32K",
        &[
            "--fail-arc",
            "PRE_COPY:PRE_COPY_P2P",
            "--fail-arc-count",
            "always",
        ],
    );
    for round in 1..=3 {
        src.c.set_mig_state(MigState::PreCopy).unwrap();
        let e = src.c.set_mig_state(MigState::StopCopy).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EIO));
        assert_eq!(src.c.get_mig_state().unwrap(), MigState::PreCopy);
        recover(&src);
        source_works(&src, round);
    }
    assert_eq!(src.failed_arcs(), 3);
}

#[test]
fn failing_recovery_arc_needs_reset() {
    let src = Rig::new("32K", &["--fail-arc", "RUNNING_P2P:RUNNING"]);
    src.fill(0, 64, 1);
    src.c.set_mig_state(MigState::RunningP2p).unwrap();
    let e = src.c.set_mig_state(MigState::Running).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EIO));
    assert_eq!(src.c.get_mig_state().unwrap(), MigState::RunningP2p);
    src.c.reset().unwrap();
    src.enable();
    source_works(&src, 2);
    assert_eq!(src.rd(REG_COUNTER), 1, "reset restarted the device");
}

#[test]
fn corrupt_stream_is_refused_and_the_source_resumes() {
    let src = Rig::new("32K", &["--corrupt-stream"]);
    let dst = Rig::new("32K", &[]);
    src.fill(0, 64, 1);
    scribble(&dst);
    let before = dst.rd(REG_STATE_DIGEST);
    let mut stream = Vec::new();
    src.c.set_mig_state(MigState::PreCopy).unwrap();
    common::migrate::read_precopy(&src.c, &mut stream);
    stop_copy(&src.c, &mut stream);
    dst.c.set_mig_state(MigState::Resuming).unwrap();
    let e = dst.c.mig_data_write(&stream).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL));
    let e = dst.c.set_mig_state(MigState::Stop).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL));
    assert_eq!(dst.c.get_mig_state().unwrap(), MigState::Error);
    // Nothing of the refused stream reached the device.
    assert_eq!(dst.rd(REG_STATE_DIGEST), before);
    dst.c.reset().unwrap();
    assert_eq!(dst.c.get_mig_state().unwrap(), MigState::Running);
    // The migration failed: the source goes back to RUNNING.
    src.c.set_mig_state(MigState::Running).unwrap();
    source_works(&src, 2);
    assert_eq!(src.invalid_arcs(), 0);
}

#[test]
fn truncated_or_foreign_streams_are_refused() {
    let src = Rig::new("32K", &[]);
    let mut stream = Vec::new();
    stop_copy(&src.c, &mut stream);
    let dst = Rig::new("32K", &[]);
    let e = load(&dst.c, &stream[..stream.len() - 10], 4096).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL));
    assert_eq!(dst.c.get_mig_state().unwrap(), MigState::Error);
    let other = Rig::new("64K", &[]);
    other.c.set_mig_state(MigState::Resuming).unwrap();
    assert!(
        other.c.mig_data_write(&stream).is_err(),
        "state size differs"
    );
    // The source, stopped after a switchover that did not land, resumes.
    src.c.set_mig_state(MigState::Running).unwrap();
    source_works(&src, 1);
}

#[test]
fn slow_stop_copy_is_slow_but_correct() {
    let src = Rig::new("3M", &["--slow-stop-copy", "100"]);
    let dst = Rig::new("3M", &[]);
    src.fill(0, 64, 1);
    src.c.set_mig_state(MigState::StopCopy).unwrap();
    let t = Instant::now();
    let mut stream = Vec::new();
    read_to_end(&src.c, &mut stream);
    // Four chunks of data (3 MiB and a bit) plus the empty end read.
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    src.c.set_mig_state(MigState::Running).unwrap();
    source_works(&src, 2);
    load(&dst.c, &stream, 1 << 20).unwrap();
    dst.c.set_mig_state(MigState::Running).unwrap();
    assert_eq!(dst.rd(REG_COUNTER), 1);
}
