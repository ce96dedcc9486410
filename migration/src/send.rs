//! Source side of the memory stream: a pass over dirty ranges, zero pages sent as ranges and
//! data pages streamed from guest memory straight into the socket.

use std::io::Write;
use std::ops::AddAssign;

use vm_memory::{GuestAddress, GuestMemoryBackend, WriteVolatile};

use crate::MigrationError;
use crate::protocol::{Channel, MAX_PAGES_BYTES, Message};
use crate::ranges::{MemoryRange, PAGE_SIZE};
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

/// Sends the current contents of `ranges`. Call it after collecting the dirty log, never
/// before: a page written after being read here must show up in the next collection.
pub fn send_ranges<M, S>(
    mem: &M,
    ranges: &[MemoryRange],
    ch: &mut Channel<S>,
    opts: &SendOptions,
    mut throttle: Option<&mut Throttle>,
) -> Result<SendCounters, MigrationError>
where
    M: GuestMemoryBackend,
    S: Write + WriteVolatile,
{
    let wire_start = ch.bytes_written();
    let max_chunk = opts.max_chunk.clamp(PAGE_SIZE, MAX_PAGES_BYTES);
    let mut c = SendCounters::default();
    let mut zeros = ZeroBatch::default();
    for &range in ranges {
        let len = usize::try_from(range.len).map_err(|_| MigrationError::OutOfRange(range))?;
        if !mem.check_range(GuestAddress(range.gpa), len) {
            return Err(MigrationError::OutOfRange(range));
        }
        let mut gpa = range.gpa;
        for slice in mem.get_slices(GuestAddress(range.gpa), len) {
            let slice = slice?;
            let mut emit = |r: MemoryRange, zero: bool| {
                if zero {
                    c.zero_pages += r.pages();
                    if zeros.push(r) {
                        flush_zeros(ch, &mut zeros)?;
                    }
                    return Ok(());
                }
                send_data(mem, r, ch, throttle.as_deref_mut())?;
                c.normal_pages += r.pages();
                c.normal_bytes += r.len;
                Ok::<(), MigrationError>(())
            };
            if opts.detect_zero {
                for_each_run(&slice, gpa, max_chunk, &mut emit)?;
            } else {
                for r in MemoryRange::new(gpa, slice.len() as u64).chunks(max_chunk) {
                    emit(r, false)?;
                }
            }
            gpa += slice.len() as u64;
        }
    }
    flush_zeros(ch, &mut zeros)?;
    c.wire_bytes = ch.bytes_written() - wire_start;
    Ok(c)
}

fn send_data<M, S>(
    mem: &M,
    r: MemoryRange,
    ch: &mut Channel<S>,
    throttle: Option<&mut Throttle>,
) -> Result<(), MigrationError>
where
    M: GuestMemoryBackend,
    S: Write + WriteVolatile,
{
    if let Some(t) = throttle {
        t.consume(r.len);
    }
    ch.send_memory(mem, r)?;
    Ok(())
}

fn flush_zeros<S: Write>(ch: &mut Channel<S>, zeros: &mut ZeroBatch) -> Result<(), MigrationError> {
    if !zeros.is_empty() {
        let (ranges, _) = zeros.take();
        ch.send(&Message::ZeroRanges(ranges))?;
    }
    Ok(())
}
