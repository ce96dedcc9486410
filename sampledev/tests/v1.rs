//! `--migration v1`: no v2 feature, a v1 migration region instead, driven with the v1 save
//! and resume loops end to end.

mod common;

use common::rig::{Rig, scribble, view};
use sampledev::regs::*;
use vfio_user::vfio::*;
use vfio_user::{Client, RegionCap, V1_DATA_OFFSET, V1Region};

const RUNNING: u32 = VFIO_DEVICE_STATE_V1_RUNNING;
const SAVING: u32 = VFIO_DEVICE_STATE_V1_SAVING;
const RESUMING: u32 = VFIO_DEVICE_STATE_V1_RESUMING;

/// The save loop until pending_bytes is 0; returns the chunks.
fn save(reg: &V1Region, c: &Client, chunks: &mut Vec<Vec<u8>>) {
    while let Some(chunk) = reg.read_chunk(c).unwrap() {
        assert!(!chunk.is_empty(), "pending bytes but an empty chunk");
        chunks.push(chunk);
    }
}

#[test]
fn v1_region_migrates_end_to_end() {
    let args = ["--migration", "v1"];
    let src = Rig::new("64K", &args);
    let dst = Rig::new("64K", &args);
    scribble(&dst);
    assert_eq!(src.c.migration_features().unwrap(), None);
    let reg = V1Region::find(&src.c).unwrap().expect("v1 region");
    assert_eq!(reg.index, 9);
    let info = src.c.region_info(9).unwrap();
    assert!(info.caps.contains(&RegionCap::Type {
        region_type: VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
        subtype: VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED,
    }));
    assert_eq!(src.c.device_info().unwrap().num_regions, 10);
    assert_eq!(reg.device_state(&src.c).unwrap(), RUNNING);
    src.fill(0, 0x1000, 1);

    // Pre-copy (SAVING | RUNNING), DMA while it runs, then stop-and-copy (SAVING).
    let mut chunks = Vec::new();
    reg.set_device_state(&src.c, SAVING | RUNNING).unwrap();
    assert!(reg.pending_bytes(&src.c).unwrap() > 64 << 10);
    save(&reg, &src.c, &mut chunks);
    src.fill(0x2000, 0x1000, 2);
    assert!(
        reg.pending_bytes(&src.c).unwrap() > 0,
        "the DMA dirtied state"
    );
    save(&reg, &src.c, &mut chunks);
    src.fill(0x3000, 0x100, 3);
    reg.set_device_state(&src.c, SAVING).unwrap();
    assert_eq!(src.rd(REG_MIG_STATE), u64::from(SAVING));
    save(&reg, &src.c, &mut chunks);
    reg.set_device_state(&src.c, 0).unwrap();
    let want = view(&src.c);

    let dreg = V1Region::find(&dst.c).unwrap().expect("v1 region");
    dreg.set_device_state(&dst.c, RESUMING).unwrap();
    let room = dreg.max_chunk(dreg.data_offset(&dst.c).unwrap());
    for chunk in chunks.iter().flat_map(|c| c.chunks(room)) {
        dreg.write_chunk(&dst.c, chunk).unwrap();
    }
    dreg.set_device_state(&dst.c, RUNNING).unwrap();
    assert_eq!(view(&dst.c), want);
    dst.fill(0x4000, 64, 4);
    assert_eq!(dst.rd(REG_COUNTER), 4);
    for r in [&src, &dst] {
        assert_eq!((r.invalid_arcs(), r.failed_arcs()), (0, 0));
    }
}

#[test]
fn v1_invalid_states_are_refused_and_counted() {
    let r = Rig::new("16K", &["--migration", "v1"]);
    let reg = V1Region::find(&r.c).unwrap().unwrap();
    for bad in [0b101, 0b111, 0b110, 0x10] {
        let e = reg.set_device_state(&r.c, bad).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EINVAL));
        assert_eq!(reg.device_state(&r.c).unwrap(), RUNNING);
    }
    // Stop-and-copy back to pre-copy is the blocked STOP_COPY -> PRE_COPY.
    reg.set_device_state(&r.c, SAVING).unwrap();
    assert!(reg.set_device_state(&r.c, SAVING | RUNNING).is_err());
    assert_eq!(r.invalid_arcs(), 5);
    reg.set_device_state(&r.c, RUNNING).unwrap();
    r.fill(0, 64, 1);
    // Fields have fixed sizes; pending_bytes and data_offset are read-only.
    let mut b = [0u8; 4];
    assert!(r.c.region_read(9, V1_DATA_OFFSET, &mut b).is_err());
    assert!(r.c.region_write(9, V1_DATA_OFFSET, &[0; 8]).is_err());
    assert!(
        reg.set_data_size(&r.c, 8).is_err(),
        "data_size outside RESUMING"
    );
}

#[test]
fn v1_bad_stream_goes_to_error_until_reset() {
    let r = Rig::new("16K", &["--migration", "v1"]);
    let reg = V1Region::find(&r.c).unwrap().unwrap();
    reg.set_device_state(&r.c, RESUMING).unwrap();
    reg.write_chunk(&r.c, &[1; 64]).unwrap_err();
    assert!(reg.set_device_state(&r.c, RUNNING).is_err());
    assert_eq!(reg.device_state(&r.c).unwrap(), SAVING | RESUMING);
    r.c.reset().unwrap();
    assert_eq!(reg.device_state(&r.c).unwrap(), RUNNING);
    r.enable();
    r.fill(0, 64, 1);
}
