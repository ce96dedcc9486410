//! Destination side of the memory stream: page bytes read straight into guest memory and zero
//! ranges applied, each bounds-checked against the VM's RAM first (a bad gpa is a protocol
//! error, never a stray write).
//!
//! Zero ranges: fresh memfd RAM is already zero, so a zero range needs no write unless this
//! migration put data in the page earlier (a page can be data in pass 1 and zero in pass 3).
//! The receiver remembers which pages it wrote ("touched") and zeroes only those; RAM that
//! was not fresh starts all touched.

use std::io::Read;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, ReadVolatile};

use crate::MigrationError;
use crate::bitmap;
use crate::protocol::{Channel, Message};
use crate::ranges::{MemoryRange, PAGE_SIZE};

static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvCounters {
    pub normal_pages: u64,
    pub normal_bytes: u64,
    pub zero_pages: u64,
    /// Bytes actually cleared for zero ranges (pages this migration had written before).
    pub zeroed_bytes: u64,
}

struct Region {
    range: MemoryRange,
    touched: Vec<u64>,
}

pub struct MemoryReceiver {
    regions: Vec<Region>,
    counters: RecvCounters,
}

impl MemoryReceiver {
    /// `fresh`: the destination RAM is known to be all zero (a new memfd or anonymous map).
    pub fn new<M: GuestMemoryBackend>(mem: &M, fresh: bool) -> Self {
        let regions = mem
            .iter()
            .map(|r| {
                let pages = r.len().div_ceil(PAGE_SIZE);
                Region {
                    range: MemoryRange::new(r.start_addr().0, r.len()),
                    touched: if fresh {
                        vec![0; bitmap::words_for(pages)]
                    } else {
                        bitmap::all_set(pages)
                    },
                }
            })
            .collect();
        Self {
            regions,
            counters: RecvCounters::default(),
        }
    }

    pub fn counters(&self) -> RecvCounters {
        self.counters
    }

    /// Handles `msg` if it is a memory message (reading its page bytes from `ch`); any other
    /// message is handed back for the caller's state machine.
    pub fn handle<M, S>(
        &mut self,
        mem: &M,
        ch: &mut Channel<S>,
        msg: Message,
    ) -> Result<Option<Message>, MigrationError>
    where
        M: GuestMemoryBackend,
        S: Read + ReadVolatile,
    {
        match msg {
            Message::MemoryPages { gpa, len } => {
                self.receive_pages(mem, ch, MemoryRange::new(gpa, len))?;
                Ok(None)
            }
            Message::ZeroRanges(ranges) => {
                self.apply_zero_ranges(mem, &ranges)?;
                Ok(None)
            }
            other => Ok(Some(other)),
        }
    }

    /// Receives messages, applying memory ones, until one that is not; returns it.
    pub fn recv<M, S>(&mut self, mem: &M, ch: &mut Channel<S>) -> Result<Message, MigrationError>
    where
        M: GuestMemoryBackend,
        S: Read + ReadVolatile,
    {
        loop {
            let msg = ch.recv()?;
            if let Some(other) = self.handle(mem, ch, msg)? {
                return Ok(other);
            }
        }
    }

    fn region_of(&self, range: MemoryRange) -> Result<usize, MigrationError> {
        self.regions
            .iter()
            .position(|r| range.len > 0 && r.range.contains(&range))
            .ok_or(MigrationError::OutOfRange(range))
    }

    /// Reads the page bytes announced by the `MemoryPages` just received into guest memory.
    pub fn receive_pages<M, S>(
        &mut self,
        mem: &M,
        ch: &mut Channel<S>,
        range: MemoryRange,
    ) -> Result<(), MigrationError>
    where
        M: GuestMemoryBackend,
        S: Read + ReadVolatile,
    {
        let idx = self.region_of(range)?;
        ch.recv_memory(mem)?;
        let region = &mut self.regions[idx];
        let first = (range.gpa - region.range.gpa) / PAGE_SIZE;
        for page in first..first + range.pages() {
            region.touched[(page / 64) as usize] |= 1 << (page % 64);
        }
        self.counters.normal_pages += range.pages();
        self.counters.normal_bytes += range.len;
        Ok(())
    }

    /// Makes `ranges` read as zero, writing only pages this migration has written before.
    /// All ranges are checked before any is applied: each must lie in RAM and none may
    /// overlap or repeat another, so one frame never asks for more work than RAM holds.
    pub fn apply_zero_ranges<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        ranges: &[MemoryRange],
    ) -> Result<(), MigrationError> {
        let idx: Vec<usize> = ranges
            .iter()
            .map(|r| self.region_of(*r))
            .collect::<Result<_, _>>()?;
        check_disjoint(ranges)?;
        for (&range, i) in ranges.iter().zip(idx) {
            let region = &mut self.regions[i];
            let rel = MemoryRange::new(range.gpa - region.range.gpa, range.len);
            for dirty in touched_within(&mut region.touched, rel) {
                let abs = MemoryRange::new(dirty.gpa + region.range.gpa, dirty.len);
                zero_memory(mem, abs)?;
                self.counters.zeroed_bytes += abs.len;
            }
            self.counters.zero_pages += range.pages();
        }
        Ok(())
    }
}

/// Refuses a set of ranges in which any two share a byte (already known not to wrap).
fn check_disjoint(ranges: &[MemoryRange]) -> Result<(), MigrationError> {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable_by_key(|r| r.gpa);
    for pair in sorted.windows(2) {
        if pair[1].gpa < pair[0].gpa + pair[0].len {
            return Err(MigrationError::Overlapping(pair[1]));
        }
    }
    Ok(())
}

/// The touched parts of `rel` (region-relative), clearing the bits of pages it covers whole.
fn touched_within(touched: &mut [u64], rel: MemoryRange) -> Vec<MemoryRange> {
    let mut out = Vec::new();
    let end = rel.gpa + rel.len;
    let first = rel.gpa / PAGE_SIZE;
    let stop_page = first + rel.pages();
    let mut page = first;
    while page < stop_page {
        let (this, w, bit) = (page, (page / 64) as usize, 1u64 << (page % 64));
        page += 1;
        if touched[w] == 0 {
            // Nothing written in this word's 64 pages: skip them together.
            page = (this / 64 + 1) * 64;
            continue;
        }
        if touched[w] & bit == 0 {
            continue;
        }
        let start = (this * PAGE_SIZE).max(rel.gpa);
        let stop = ((this + 1) * PAGE_SIZE).min(end);
        if stop - start == PAGE_SIZE {
            touched[w] &= !bit;
        }
        crate::ranges::push_coalesced(&mut out, MemoryRange::new(start, stop - start));
    }
    out
}

/// Zeroes through vm-memory, so the destination's own dirty bitmap sees the write.
fn zero_memory<M: GuestMemoryBackend>(mem: &M, range: MemoryRange) -> Result<(), MigrationError> {
    for piece in range.chunks(ZEROS.len() as u64) {
        mem.write_slice(&ZEROS[..piece.len as usize], GuestAddress(piece.gpa))?;
    }
    Ok(())
}
