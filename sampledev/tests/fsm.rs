//! The strict v2 state machine: from every reachable state, every request the uAPI allows
//! works (the device walks the arcs) and every other is refused with EINVAL and counted in
//! INVALID_ARCS, for each feature set the device can advertise.

mod common;

use common::migrate::read_to_end;
use common::rig::Rig;
use sampledev::regs::*;
use vfio_user::vfio::*;
use vfio_user::{MigState, MigStateData, next_state};

/// A valid stream of a device like `r`, for requests that leave RESUMING through STOP.
fn good_stream(r: &Rig) -> Vec<u8> {
    let mut s = Vec::new();
    r.c.set_mig_state(MigState::StopCopy).unwrap();
    read_to_end(&r.c, &mut s);
    r.c.set_mig_state(MigState::Running).unwrap();
    s
}

/// From RUNNING (after a reset) to `cur`; in RESUMING with a whole stream loaded.
fn reach(r: &Rig, cur: MigState, stream: &[u8]) {
    r.c.reset().unwrap();
    r.c.set_mig_state(cur).unwrap();
    if cur == MigState::Resuming {
        r.c.mig_data_write(stream).unwrap();
    }
    assert_eq!(r.c.get_mig_state().unwrap(), cur);
}

fn matrix(args: &[&str], flags: u64) {
    let r = Rig::new("16K", args);
    assert_eq!(r.c.migration_features().unwrap(), Some(flags));
    let stream = good_stream(&r);
    let mut invalid = 0;
    for cur in MigState::ALL.into_iter().filter(|s| s.supported(flags)) {
        if cur == MigState::Error {
            continue;
        }
        for target in MigState::ALL {
            reach(&r, cur, &stream);
            let allowed = next_state(cur, target, flags).is_some();
            let res = r.c.set_mig_state(target);
            let now = r.c.get_mig_state().unwrap();
            if allowed {
                res.unwrap_or_else(|e| panic!("{cur} -> {target}: {e}"));
                assert_eq!(now, target);
            } else {
                let e = res.expect_err("refused");
                assert_eq!(e.errno(), Some(libc::EINVAL), "{cur} -> {target}");
                assert_eq!(now, cur, "a refused request moved the device");
                invalid += 1;
            }
            assert_eq!(r.invalid_arcs(), invalid, "{cur} -> {target}");
        }
    }
    assert_eq!(r.failed_arcs(), 0);
    unknown_states_are_invalid(&r, invalid);
}

/// State numbers that are no state at all are invalid requests too.
fn unknown_states_are_invalid(r: &Rig, before: u64) {
    for raw in [8u32, 99, u32::MAX] {
        let d = MigStateData {
            device_state: raw,
            data_fd: -1,
        };
        let flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
        let e = r.c.device_feature(flags, &d.encode(), 8).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EINVAL));
    }
    assert_eq!(r.invalid_arcs(), before + 3);
}

#[test]
fn all_features() {
    let all = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY;
    matrix(&[], all);
}

#[test]
fn without_p2p() {
    matrix(
        &["--no-p2p"],
        VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY,
    );
}

#[test]
fn without_precopy() {
    matrix(
        &["--no-precopy"],
        VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P,
    );
}

#[test]
fn stop_copy_only() {
    matrix(&["--no-precopy", "--no-p2p"], VFIO_MIGRATION_STOP_COPY);
}

#[test]
fn error_state_needs_reset() {
    let r = Rig::new("16K", &[]);
    r.c.set_mig_state(MigState::Resuming).unwrap();
    r.c.mig_data_write(&[0; 48]).unwrap_err();
    let e = r.c.set_mig_state(MigState::Stop).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL));
    assert_eq!(r.c.get_mig_state().unwrap(), MigState::Error);
    assert_eq!(r.rd(REG_MIG_STATE), MigState::Error as u64);
    assert_eq!(r.failed_arcs(), 1);
    for target in [MigState::Running, MigState::Stop, MigState::Resuming] {
        assert!(r.c.set_mig_state(target).is_err());
    }
    assert_eq!(r.invalid_arcs(), 3);
    r.c.reset().unwrap();
    assert_eq!(r.c.get_mig_state().unwrap(), MigState::Running);
    r.enable();
    r.fill(0, 4096, 1);
    // The counters are diagnostics of the process: reset keeps them.
    assert_eq!((r.invalid_arcs(), r.failed_arcs()), (3, 1));
}

#[test]
fn registers_and_probes_describe_the_device() {
    let r = Rig::new("16K", &["--no-p2p"]);
    let caps = r.rd(REG_MIG_CAPS);
    let flags = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY;
    assert_eq!(
        caps,
        MIG_CAPS_MODE_V2 | (flags << MIG_CAPS_FLAGS_SHIFT) | MIG_CAPS_DIRTY_LOG
    );
    assert_eq!(r.rd(REG_MIG_STATE), MigState::Running as u64);
    assert_eq!(r.rd(REG_ID) >> 32, u64::from(ID_VERSION));
    let c = &r.c;
    let get = VFIO_DEVICE_FEATURE_GET;
    let set = VFIO_DEVICE_FEATURE_SET;
    assert!(c.probe_feature(VFIO_DEVICE_FEATURE_MIGRATION, get).unwrap());
    assert!(!c.probe_feature(VFIO_DEVICE_FEATURE_MIGRATION, set).unwrap());
    assert!(
        c.probe_feature(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, get | set)
            .unwrap()
    );
    assert!(
        c.probe_feature(VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOV2, get)
            .unwrap()
    );
    assert!(
        c.probe_feature(VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, get)
            .unwrap()
    );
    assert!(!c.probe_feature(3, set).unwrap());
    assert!(c.dma_logging_supported().unwrap());
    // The kernel's PRECOPY_INFOv2 opt-in is accepted.
    let optin = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOV2;
    c.device_feature(optin, &[], 0).unwrap();
    // A reply that would not fit argsz is refused before anything happens.
    let e = c
        .request(
            vfio_user::Command::DeviceFeature,
            &[8, 0, 0, 0, 1, 0, 1, 0],
            &[],
            64,
            0,
        )
        .unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL));
}
