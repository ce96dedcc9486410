//! DMA logging of the device's writes: exactly the pages DMA wrote are reported, a report
//! clears them, and devices without logging (or without migration) say so.

mod common;

use common::rig::{RAM_IOVA, RAM_SIZE, Rig};
use common::{wait_idle, wr};
use sampledev::regs::*;
use vfio_user::vfio::*;
use vfio_user::{DmaRange, V1Region};

const PAGE: u64 = 4096;

fn ram_range() -> DmaRange {
    DmaRange {
        iova: RAM_IOVA,
        length: RAM_SIZE,
    }
}

/// Page numbers (within the reported range) whose bits are set.
fn pages(bitmap: &[u64]) -> Vec<u64> {
    let mut v = Vec::new();
    for (w, &bits) in bitmap.iter().enumerate() {
        (0..64)
            .filter(|b| bits & (1 << b) != 0)
            .for_each(|b| v.push(w as u64 * 64 + b));
    }
    v
}

fn copy(r: &Rig, src_off: u64, dst_off: u64, len: u64) {
    wr(&r.c, REG_DMA_SRC, RAM_IOVA + src_off);
    wr(&r.c, REG_DMA_DST, RAM_IOVA + dst_off);
    wr(&r.c, REG_DMA_LEN, len);
    wr(&r.c, REG_DMA_CMD, CMD_COPY);
    assert_eq!(wait_idle(&r.c), STATUS_DONE);
}

#[test]
fn reports_exactly_the_written_pages_and_clears() {
    let r = Rig::new("16K", &[]);
    assert!(r.c.dma_logging_supported().unwrap());
    r.fill(0, 64, 1); // before logging: never reported
    assert_eq!(r.c.dma_logging_start(PAGE, &[ram_range()]).unwrap(), PAGE);
    let busy = r.c.dma_logging_start(PAGE, &[ram_range()]).unwrap_err();
    assert_eq!(busy.errno(), Some(libc::EBUSY));

    r.fill(3 * PAGE, 2 * PAGE + 1, 2); // pages 3, 4 and one byte of 5
    copy(&r, 3 * PAGE, 0x10 * PAGE, PAGE); // reads 3 (not logged), writes 0x10
    let bitmap = r.c.dma_logging_report(RAM_IOVA, RAM_SIZE, PAGE).unwrap();
    assert_eq!(bitmap.len() as u64, RAM_SIZE / PAGE / 64);
    assert_eq!(pages(&bitmap), [3, 4, 5, 0x10]);
    let again = r.c.dma_logging_report(RAM_IOVA, RAM_SIZE, PAGE).unwrap();
    assert_eq!(pages(&again), Vec::<u64>::new());

    // Coarser report pages OR the logged pages; a sub-range reports only its part.
    r.fill(0x40 * PAGE, 8, 3);
    r.fill(0x1ff * PAGE, 8, 4);
    let part =
        r.c.dma_logging_report(RAM_IOVA + 0x40 * PAGE, 0x40 * PAGE, 2 * PAGE);
    assert_eq!(pages(&part.unwrap()), [0]);
    let rest =
        r.c.dma_logging_report(RAM_IOVA, RAM_SIZE, 0x10 * PAGE)
            .unwrap();
    assert_eq!(pages(&rest), [0x1f]);

    r.c.dma_logging_stop().unwrap();
    let stopped =
        r.c.dma_logging_report(RAM_IOVA, RAM_SIZE, PAGE)
            .unwrap_err();
    assert_eq!(stopped.errno(), Some(libc::EINVAL));
    // Stop then start again is allowed.
    r.c.dma_logging_start(PAGE, &[]).unwrap();
    r.fill(PAGE, 8, 5);
    assert_eq!(
        pages(&r.c.dma_logging_report(RAM_IOVA, 4 * PAGE, PAGE).unwrap()),
        [1]
    );
}

#[test]
fn huge_ranges_report_in_pieces() {
    let r = Rig::new("16K", &[]);
    let span = 64u64 << 30; // 16 Mi pages: the client splits the 2 MiB bitmap
    r.c.dma_logging_start(
        PAGE,
        &[DmaRange {
            iova: 0,
            length: span,
        }],
    )
    .unwrap();
    r.fill(RAM_SIZE - PAGE, PAGE, 1);
    let bitmap = r.c.dma_logging_report(0, span, PAGE).unwrap();
    assert_eq!(bitmap.len() as u64, span / PAGE / 64);
    assert_eq!(pages(&bitmap), [(RAM_IOVA + RAM_SIZE) / PAGE - 1]);
}

#[test]
fn bad_logging_requests_are_refused() {
    let r = Rig::new("16K", &[]);
    let errno = |e: vfio_user::Error| e.errno();
    let unaligned = DmaRange {
        iova: 0x800,
        length: PAGE,
    };
    assert_eq!(
        errno(r.c.dma_logging_start(PAGE, &[unaligned]).unwrap_err()),
        Some(libc::EINVAL)
    );
    assert_eq!(
        errno(r.c.dma_logging_start(3000, &[]).unwrap_err()),
        Some(libc::EINVAL)
    );
    let overlap = [
        ram_range(),
        DmaRange {
            iova: RAM_IOVA + PAGE,
            length: PAGE,
        },
    ];
    assert_eq!(
        errno(r.c.dma_logging_start(PAGE, &overlap).unwrap_err()),
        Some(libc::EINVAL)
    );
    r.c.dma_logging_start(PAGE, &[ram_range()]).unwrap();
    let odd =
        r.c.dma_logging_report(RAM_IOVA + 8, PAGE, PAGE)
            .unwrap_err();
    assert_eq!(errno(odd), Some(libc::EINVAL));
}

#[test]
fn no_dirty_log_mode_migrates_but_cannot_log() {
    let r = Rig::new("16K", &["--no-dirty-log"]);
    assert!(r.c.migration_features().unwrap().is_some());
    assert!(!r.c.dma_logging_supported().unwrap());
    let e = r.c.dma_logging_start(PAGE, &[ram_range()]).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOTTY));
    assert_eq!(r.rd(REG_MIG_CAPS) & MIG_CAPS_DIRTY_LOG, 0);
}

#[test]
fn migration_none_mode_offers_nothing() {
    let r = Rig::new("16K", &["--migration", "none"]);
    assert_eq!(r.c.migration_features().unwrap(), None);
    assert!(!r.c.dma_logging_supported().unwrap());
    assert_eq!(V1Region::find(&r.c).unwrap(), None);
    let e = r.c.set_mig_state(vfio_user::MigState::Stop).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOTTY));
    let e = r.c.mig_data_read(4096).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOTSUP));
    assert_eq!(r.rd(REG_MIG_CAPS), 0);
    let probe = VFIO_DEVICE_FEATURE_GET;
    assert!(
        !r.c.probe_feature(VFIO_DEVICE_FEATURE_MIGRATION, probe)
            .unwrap()
    );
    r.fill(0, 64, 1);
}
