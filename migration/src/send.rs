//! Source side of the memory stream: a pass over dirty ranges, zero pages sent as ranges and
//! data pages streamed from guest memory straight into the socket.

use std::io::Write;
use std::ops::AddAssign;
use std::os::fd::AsFd;

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, WriteVolatile,
};

use crate::MigrationError;
use crate::protocol::{Channel, MAX_PAGES_BYTES, Message};
use crate::ranges::{MemoryRange, PAGE_SIZE};
use crate::sparse;
use crate::throttle::Throttle;
use crate::zero::{ZeroBatch, for_each_run};

#[derive(Clone, Copy, Debug)]
pub struct SendOptions {
    /// Largest `MemoryPages` frame; also the throttle's granularity.
    pub max_chunk: u64,
    /// Scan pages and send zero ones as ranges (QEMU's "duplicate" pages).
    pub detect_zero: bool,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            max_chunk: 4 << 20,
            detect_zero: true,
        }
    }
}

/// What one call put on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendCounters {
    /// Pages sent as bytes (QEMU's "normal").
    pub normal_pages: u64,
    pub normal_bytes: u64,
    /// Pages sent as zero ranges (QEMU's "duplicate").
    pub zero_pages: u64,
    /// Everything written, headers included.
    pub wire_bytes: u64,
}

impl AddAssign for SendCounters {
    fn add_assign(&mut self, o: Self) {
        self.normal_pages += o.normal_pages;
        self.normal_bytes += o.normal_bytes;
        self.zero_pages += o.zero_pages;
        self.wire_bytes += o.wire_bytes;
    }
}

/// Ranges at least this long in file-backed RAM are first split into data and holes (see
/// `sparse`); shorter ones, typical of later passes, are cheaper to just scan.
const SPARSE_MIN: u64 = 2 << 20;

/// Sends the current contents of `ranges`. Call it after collecting the dirty log, never
/// before: a page written after being read here must show up in the next collection.
pub fn send_ranges<B, S>(
    mem: &GuestMemoryMmap<B>,
    ranges: &[MemoryRange],
    ch: &mut Channel<S>,
    opts: &SendOptions,
    throttle: Option<&mut Throttle>,
) -> Result<SendCounters, MigrationError>
where
    B: Bitmap,
    S: Write + WriteVolatile,
{
    let wire_start = ch.bytes_written();
    let mut pass = Pass {
        mem,
        ch,
        throttle,
        max_chunk: opts.max_chunk.clamp(PAGE_SIZE, MAX_PAGES_BYTES),
        detect_zero: opts.detect_zero,
        zeros: ZeroBatch::default(),
        c: SendCounters::default(),
    };
    for &range in ranges {
        let len = usize::try_from(range.len).map_err(|_| MigrationError::OutOfRange(range))?;
        if !mem.check_range(GuestAddress(range.gpa), len) {
            return Err(MigrationError::OutOfRange(range));
        }
        match pass.holes_of(range) {
            Some(segments) => {
                for (piece, data) in segments {
                    if data {
                        pass.scan(piece)?;
                    } else {
                        pass.zero(piece)?;
                    }
                }
            }
            None => pass.scan(range)?,
        }
    }
    pass.flush_zeros()?;
    let mut c = pass.c;
    c.wire_bytes = ch.bytes_written() - wire_start;
    Ok(c)
}

struct Pass<'a, 'c, B: Bitmap, S> {
    mem: &'a GuestMemoryMmap<B>,
    ch: &'a mut Channel<S>,
    throttle: Option<&'c mut Throttle>,
    max_chunk: u64,
    detect_zero: bool,
    zeros: ZeroBatch,
    c: SendCounters,
}

impl<B, S> Pass<'_, '_, B, S>
where
    B: Bitmap,
    S: Write + WriteVolatile,
{
    /// `range` split into (piece, is_data) by the backing file's holes, when it is long, lies
    /// in one region that maps a file shared, and the file system can tell. (In a private
    /// mapping the guest's writes never reach the file, so its holes prove nothing.)
    fn holes_of(&self, range: MemoryRange) -> Option<Vec<(MemoryRange, bool)>> {
        if !self.detect_zero || range.len < SPARSE_MIN {
            return None;
        }
        let region = self.mem.find_region(GuestAddress(range.gpa))?;
        if region.flags() & libc::MAP_SHARED == 0 {
            return None;
        }
        let fo = region.file_offset()?;
        let base = region.start_addr().0;
        if range.end()? > base + region.len() {
            return None;
        }
        let start = fo.start() + (range.gpa - base);
        let segs = sparse::segments(fo.file().as_fd(), start, range.len)
            .inspect_err(|e| log::debug!("no hole information, scanning instead: {e}"))
            .ok()?;
        let to_gpa = |off: u64| range.gpa + (off - start);
        Some(
            segs.into_iter()
                .map(|s| (MemoryRange::new(to_gpa(s.offset), s.len), s.data))
                .collect(),
        )
    }

    /// Reads `range` from guest memory, sending zero pages as ranges and the rest as data.
    fn scan(&mut self, range: MemoryRange) -> Result<(), MigrationError> {
        let mem = self.mem;
        let mut gpa = range.gpa;
        for slice in mem.get_slices(GuestAddress(range.gpa), range.len as usize) {
            let slice = slice?;
            if self.detect_zero {
                let max = self.max_chunk;
                for_each_run(&slice, gpa, max, |r, zero| {
                    if zero { self.zero(r) } else { self.data(r) }
                })?;
            } else {
                for r in MemoryRange::new(gpa, slice.len() as u64).chunks(self.max_chunk) {
                    self.data(r)?;
                }
            }
            gpa += slice.len() as u64;
        }
        Ok(())
    }

    fn zero(&mut self, r: MemoryRange) -> Result<(), MigrationError> {
        self.c.zero_pages += r.pages();
        if self.zeros.push(r) {
            self.flush_zeros()?;
        }
        Ok(())
    }

    fn data(&mut self, r: MemoryRange) -> Result<(), MigrationError> {
        if let Some(t) = self.throttle.as_deref_mut() {
            t.consume(r.len);
        }
        self.ch.send_memory(self.mem, r)?;
        self.c.normal_pages += r.pages();
        self.c.normal_bytes += r.len;
        Ok(())
    }

    fn flush_zeros(&mut self) -> Result<(), MigrationError> {
        if !self.zeros.is_empty() {
            let (ranges, _) = self.zeros.take();
            self.ch.send(&Message::ZeroRanges(ranges))?;
        }
        Ok(())
    }
}
