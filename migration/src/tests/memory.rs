//! Memory transfer between two guest memories through a socket pair.

use std::os::unix::net::UnixStream;
use std::thread;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::MigrationError;
use crate::dirty::RamSlot;
use crate::protocol::{Channel, Message};
use crate::ranges::{MemoryRange, PAGE_SIZE};
use crate::recv::MemoryReceiver;
use crate::send::{SendCounters, SendOptions, send_ranges};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const LAYOUT: [(u64, usize); 2] = [(0, 0x20_0000), (0x1_0000_0000, 0x10_0000)];

fn memory() -> Mem {
    let ranges: Vec<_> = LAYOUT.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    Mem::from_ranges(&ranges).unwrap()
}

/// Every third page gets data (a pattern unique to page and `seed`); the rest stay zero.
fn fill(mem: &Mem, seed: u8) {
    for &(base, len) in &LAYOUT {
        for page in (0..len as u64 / PAGE_SIZE).step_by(3) {
            let gpa = base + page * PAGE_SIZE;
            let bytes = [seed, (page & 0xff) as u8, (page >> 8) as u8, 0xa5];
            mem.write_slice(&bytes, GuestAddress(gpa + (page * 8) % PAGE_SIZE))
                .unwrap();
        }
    }
}

fn assert_same(a: &Mem, b: &Mem) {
    for (ra, rb) in a.iter().zip(b.iter()) {
        let len = ra.len() as usize;
        let (mut va, mut vb) = (vec![0u8; len], vec![0u8; len]);
        a.read_slice(&mut va, ra.start_addr()).unwrap();
        b.read_slice(&mut vb, rb.start_addr()).unwrap();
        assert!(va == vb, "region at {:#x} differs", ra.start_addr().0);
    }
}

/// Sends `ranges` of `src` in one pass and applies them to `dst` until `IterationEnd`.
fn transfer(
    src: &Mem,
    dst: &Mem,
    rx: &mut MemoryReceiver,
    ranges: Vec<MemoryRange>,
) -> SendCounters {
    let (a, b) = UnixStream::pair().unwrap();
    let src = src.clone();
    let sender = thread::spawn(move || {
        let mut ch = Channel::new(a);
        let opts = SendOptions {
            max_chunk: 64 << 10,
            detect_zero: true,
        };
        let c = send_ranges(&src, &ranges, &mut ch, &opts, None).unwrap();
        ch.send(&Message::IterationEnd {
            iteration: 0,
            pages: c.normal_pages + c.zero_pages,
        })
        .unwrap();
        c
    });
    let mut ch = Channel::new(b);
    loop {
        let msg = ch.recv().unwrap();
        match rx.handle(dst, &mut ch, msg).unwrap() {
            None => continue,
            Some(Message::IterationEnd { .. }) => break,
            Some(other) => panic!("unexpected {other:?}"),
        }
    }
    sender.join().unwrap()
}

fn all_ranges(mem: &Mem) -> Vec<MemoryRange> {
    RamSlot::of_memory(mem).iter().map(|s| s.range).collect()
}

#[test]
fn full_pass_then_dirty_pass_reproduce_the_source() {
    let (src, dst) = (memory(), memory());
    fill(&src, 1);
    let mut rx = MemoryReceiver::new(&dst, true);
    let c = transfer(&src, &dst, &mut rx, all_ranges(&src));
    assert_same(&src, &dst);
    let total_pages = 0x30_0000 / PAGE_SIZE;
    let data_pages = 0x200 / 3 + 1 + 0x100 / 3 + 1;
    assert_eq!(c.normal_pages, data_pages);
    assert_eq!(c.zero_pages, total_pages - data_pages);
    assert_eq!(
        rx.counters().zeroed_bytes,
        0,
        "fresh memory needs no zeroing"
    );
    // The destination's bitmap saw the page writes (they went through vm-memory).
    let dirty = crate::bitmap::count(
        &dst.iter()
            .next()
            .unwrap()
            .get_mmap()
            .bitmap()
            .get_and_reset(),
    );
    assert_eq!(dirty, 0x200 / 3 + 1);

    // Pass 2: a data page becomes zero, a zero page gets data, another data page changes.
    src.write_slice(&[0; 4], GuestAddress(3 * PAGE_SIZE + 24))
        .unwrap(); // page 3 held its pattern at 24
    src.write_obj(0x77u8, GuestAddress(PAGE_SIZE + 9)).unwrap(); // page 1 was zero
    src.write_obj(0x99u8, GuestAddress(0x1_0000_0000)).unwrap(); // page 0 of region 2
    let dirty = vec![
        MemoryRange::new(PAGE_SIZE, PAGE_SIZE),
        MemoryRange::new(3 * PAGE_SIZE, PAGE_SIZE),
        MemoryRange::new(0x1_0000_0000, PAGE_SIZE),
    ];
    let c = transfer(&src, &dst, &mut rx, dirty);
    assert_same(&src, &dst);
    assert_eq!((c.normal_pages, c.zero_pages), (2, 1));
    assert_eq!(
        rx.counters().zeroed_bytes,
        PAGE_SIZE,
        "the once-written page was cleared"
    );
}

#[test]
fn zero_ranges_clear_memory_that_was_not_fresh() {
    let (src, dst) = (memory(), memory());
    fill(&src, 2);
    fill(&dst, 9); // stale contents everywhere
    let mut rx = MemoryReceiver::new(&dst, false);
    transfer(&src, &dst, &mut rx, all_ranges(&src));
    assert_same(&src, &dst);
}

#[test]
fn out_of_range_gpas_are_refused_without_writing() {
    let dst = memory();
    let mut rx = MemoryReceiver::new(&dst, false);
    let bad = [
        MemoryRange::new(0x20_0000, PAGE_SIZE), // just past region 0
        MemoryRange::new(0x1F_F000, 2 * PAGE_SIZE), // straddles its end
        MemoryRange::new(0x8000_0000, PAGE_SIZE), // in the hole
        MemoryRange::new(u64::MAX - 4095, 4096), // top of the address space
    ];
    for r in bad {
        dst.write_obj(0xeeu8, GuestAddress(0x1F_F000)).unwrap();
        let err = rx.apply_zero_ranges(&dst, &[MemoryRange::new(0x1F_F000, 4096), r]);
        assert!(
            matches!(err, Err(MigrationError::OutOfRange(x)) if x == r),
            "{r:x?}"
        );
        // Nothing applied, not even the valid first range.
        assert_eq!(dst.read_obj::<u8>(GuestAddress(0x1F_F000)).unwrap(), 0xee);
    }
    // A MemoryPages frame for a range outside RAM.
    let (a, b) = UnixStream::pair().unwrap();
    let big = Mem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let mut tx = Channel::new(a);
    tx.send_memory(&big, MemoryRange::new(0x20_0000, PAGE_SIZE))
        .unwrap();
    let mut ch = Channel::new(b);
    let msg = ch.recv().unwrap();
    assert!(matches!(
        rx.handle(&dst, &mut ch, msg),
        Err(MigrationError::OutOfRange(_))
    ));
    // And the sender refuses ranges outside its own memory before sending anything.
    let src = memory();
    let err = send_ranges(
        &src,
        &[MemoryRange::new(0x8000_0000, 4096)],
        &mut tx,
        &SendOptions::default(),
        None,
    );
    assert!(matches!(err, Err(MigrationError::OutOfRange(_))));
}

#[test]
fn without_zero_detection_everything_is_data() {
    let (src, dst) = (memory(), memory());
    fill(&src, 3);
    let mut ch = Channel::new(Vec::new());
    let opts = SendOptions {
        max_chunk: 1 << 20,
        detect_zero: false,
    };
    let c = send_ranges(&src, &all_ranges(&src), &mut ch, &opts, None).unwrap();
    assert_eq!((c.normal_bytes, c.zero_pages), (0x30_0000, 0));
    assert_eq!(c.wire_bytes, 0x30_0000 + 3 * 24);
    let _ = dst;
}

#[test]
fn holes_of_a_shared_memfd_are_sent_as_zero_without_reading() {
    use std::os::fd::FromRawFd;
    use vm_memory::FileOffset;
    use vm_memory::mmap::GuestRegionMmap;
    const SIZE: usize = 8 << 20;
    // SAFETY: memfd_create returns a new fd that the File takes ownership of.
    let file = unsafe { std::fs::File::from_raw_fd(libc::memfd_create(c"ram".as_ptr(), 0)) };
    file.set_len(SIZE as u64).unwrap();
    let region =
        GuestRegionMmap::from_range(GuestAddress(0), SIZE, Some(FileOffset::new(file, 0))).unwrap();
    let src = Mem::from_regions(vec![region]).unwrap();
    src.write_obj(0xabu8, GuestAddress(0x30_0005)).unwrap();
    src.write_obj(0u8, GuestAddress(0x50_0000)).unwrap(); // data in the file, but zero
    let dst = Mem::from_ranges(&[(GuestAddress(0), SIZE)]).unwrap();
    dst.write_obj(0xeeu8, GuestAddress(0x70_0000)).unwrap(); // stale: must be cleared
    let mut rx = MemoryReceiver::new(&dst, false);
    let c = transfer(&src, &dst, &mut rx, vec![MemoryRange::new(0, SIZE as u64)]);
    assert_eq!(
        (c.normal_pages, c.zero_pages),
        (1, SIZE as u64 / PAGE_SIZE - 1)
    );
    assert_eq!(dst.read_obj::<u8>(GuestAddress(0x30_0005)).unwrap(), 0xab);
    assert_eq!(dst.read_obj::<u8>(GuestAddress(0x70_0000)).unwrap(), 0);
    // The scan did not fault the holes in: the file still has just two pages of data.
    let fo = src.iter().next().unwrap().file_offset().unwrap();
    let segs =
        crate::sparse::segments(std::os::fd::AsFd::as_fd(fo.file()), 0, SIZE as u64).unwrap();
    assert_eq!(
        segs.iter().filter(|s| s.data).map(|s| s.len).sum::<u64>(),
        2 * PAGE_SIZE
    );
}

#[test]
fn overlapping_or_repeated_zero_ranges_are_refused_without_writing() {
    let dst = memory();
    let mut rx = MemoryReceiver::new(&dst, false);
    let page = |n: u64| MemoryRange::new(n * PAGE_SIZE, PAGE_SIZE);
    let bad: [Vec<MemoryRange>; 4] = [
        vec![page(3), page(3)],                                    // repeated
        vec![MemoryRange::new(0, 4 * PAGE_SIZE), page(2)],         // contained
        vec![page(9), MemoryRange::new(PAGE_SIZE, 9 * PAGE_SIZE)], // overlap, unsorted
        vec![MemoryRange::new(0, 0x20_0000); crate::protocol::MAX_ZERO_RANGES], // the flood
    ];
    for ranges in bad {
        dst.write_obj(0xeeu8, GuestAddress(3 * PAGE_SIZE)).unwrap();
        let err = rx.apply_zero_ranges(&dst, &ranges);
        assert!(
            matches!(err, Err(MigrationError::Overlapping(_))),
            "{:x?}: {err:?}",
            &ranges[..2]
        );
        assert_eq!(
            dst.read_obj::<u8>(GuestAddress(3 * PAGE_SIZE)).unwrap(),
            0xee
        );
    }
    // Adjacent and in any order is fine, and clears what it covers.
    rx.apply_zero_ranges(
        &dst,
        &[page(4), page(3), MemoryRange::new(0x1_0000_0000, 4096)],
    )
    .unwrap();
    assert_eq!(dst.read_obj::<u8>(GuestAddress(3 * PAGE_SIZE)).unwrap(), 0);
}

#[test]
fn a_zero_range_outside_ram_is_refused_through_the_channel() {
    let dst = memory();
    let mut rx = MemoryReceiver::new(&dst, true);
    let (a, b) = UnixStream::pair().unwrap();
    let mut tx = Channel::new(a);
    tx.send(&Message::ZeroRanges(vec![MemoryRange::new(
        0x30_0000, PAGE_SIZE,
    )]))
    .unwrap();
    let mut ch = Channel::new(b);
    let msg = ch.recv().unwrap();
    assert!(matches!(
        rx.handle(&dst, &mut ch, msg),
        Err(MigrationError::OutOfRange(_))
    ));
}
