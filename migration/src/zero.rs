//! Zero-page detection on live guest memory, and coalescing of zero pages into ranges.
//!
//! The guest may be writing a page while it is scanned; that is fine because the page is then
//! dirty again and the next pass resends it. What matters is to read the mapping only through
//! volatile loads, never through a Rust reference (a racing write would make that UB).

use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;

use crate::protocol::MAX_ZERO_RANGES;
use crate::ranges::{MemoryRange, PAGE_SIZE, push_coalesced};

/// Whether every byte of `slice` is zero. Volatile u64 loads OR-ed over 64-byte blocks, one
/// branch per block: a data page exits on its first block, a zero page costs a streaming read.
pub fn is_zero<B: BitmapSlice>(slice: &VolatileSlice<B>) -> bool {
    let guard = slice.ptr_guard();
    let ptr = guard.as_ptr();
    let len = slice.len();
    if !(ptr as usize).is_multiple_of(8) {
        return bytes_are_zero(ptr, len);
    }
    let words = ptr as *const u64;
    let nwords = len / 8;
    let mut i = 0;
    while i + 8 <= nwords {
        let mut acc = 0;
        for k in 0..8 {
            // SAFETY: `i + k < nwords`, so the load is inside the slice that `guard` keeps
            // mapped, and the pointer is 8-byte aligned (checked above).
            acc |= unsafe { words.add(i + k).read_volatile() };
        }
        if acc != 0 {
            return false;
        }
        i += 8;
    }
    // SAFETY: `nwords * 8 <= len`, so the tail starts inside the slice.
    let tail = unsafe { ptr.add(i * 8) };
    bytes_are_zero(tail, len - i * 8)
}

fn bytes_are_zero(ptr: *const u8, len: usize) -> bool {
    // SAFETY: callers pass a pointer into a live mapping that is valid for `len` bytes.
    (0..len).all(|k| unsafe { ptr.add(k).read_volatile() } == 0)
}

/// Splits `slice`, which maps guest memory starting at `gpa`, into runs of zero pages and
/// runs of data pages (data runs at most `max_data` bytes), calling `f(range, is_zero)` for
/// each in address order.
pub fn for_each_run<B, E>(
    slice: &VolatileSlice<B>,
    gpa: u64,
    max_data: u64,
    mut f: impl FnMut(MemoryRange, bool) -> Result<(), E>,
) -> Result<(), E>
where
    B: BitmapSlice,
{
    let len = slice.len();
    let mut run: Option<(usize, bool)> = None;
    let mut off = 0;
    while off < len {
        let n = (PAGE_SIZE as usize).min(len - off);
        let zero = match slice.subslice(off, n) {
            Ok(page) => is_zero(&page),
            Err(_) => false, // cannot happen (off + n <= len); sending data is always safe
        };
        match run {
            Some((start, z))
                if z == zero && (zero || (off - start) as u64 + n as u64 <= max_data) => {}
            Some((start, z)) => {
                f(
                    MemoryRange::new(gpa + start as u64, (off - start) as u64),
                    z,
                )?;
                run = Some((off, zero));
            }
            None => run = Some((off, zero)),
        }
        off += n;
    }
    match run {
        Some((start, z)) => f(
            MemoryRange::new(gpa + start as u64, (len - start) as u64),
            z,
        ),
        None => Ok(()),
    }
}

/// Zero ranges waiting to be sent, adjacent ones merged; full at [`MAX_ZERO_RANGES`] entries.
#[derive(Debug, Default)]
pub struct ZeroBatch {
    ranges: Vec<MemoryRange>,
    pages: u64,
}

impl ZeroBatch {
    /// Adds a range; returns true when the batch is full and must be sent before the next push.
    pub fn push(&mut self, range: MemoryRange) -> bool {
        push_coalesced(&mut self.ranges, range);
        self.pages += range.len.div_ceil(PAGE_SIZE);
        self.ranges.len() >= MAX_ZERO_RANGES
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Takes the ranges and how many pages they cover.
    pub fn take(&mut self) -> (Vec<MemoryRange>, u64) {
        (
            std::mem::take(&mut self.ranges),
            std::mem::take(&mut self.pages),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    fn mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), size)]).unwrap()
    }

    #[test]
    fn detects_a_single_nonzero_byte_anywhere() {
        let m = mem(0x4000);
        let slice = m.get_slice(GuestAddress(0x10_0000), 0x4000).unwrap();
        assert!(is_zero(&slice));
        for off in [0u64, 7, 63, 64, 4095, 4096 + 100, 0x3fff] {
            m.write_obj(1u8, GuestAddress(0x10_0000 + off)).unwrap();
            assert!(!is_zero(&slice), "offset {off}");
            m.write_obj(0u8, GuestAddress(0x10_0000 + off)).unwrap();
        }
        // Unaligned and short slices take the byte path.
        let odd = m.get_slice(GuestAddress(0x10_0003), 13).unwrap();
        assert!(is_zero(&odd));
        m.write_obj(9u8, GuestAddress(0x10_000f)).unwrap();
        assert!(!is_zero(&odd));
    }

    #[test]
    fn runs_alternate_and_cap_data() {
        let m = mem(8 * 4096);
        // pages: 0 Z, 1 D, 2 D, 3 D, 4 Z, 5 Z, 6 D, 7 Z (partial slice ends mid-page 7)
        for p in [1u64, 2, 3, 6] {
            m.write_obj(0xffu8, GuestAddress(0x10_0000 + p * 4096 + 5))
                .unwrap();
        }
        let slice = m
            .get_slice(GuestAddress(0x10_0000), 7 * 4096 + 100)
            .unwrap();
        let mut runs = Vec::new();
        for_each_run::<_, ()>(&slice, 0x10_0000, 2 * 4096, |r, z| {
            runs.push((((r.gpa - 0x10_0000) / 4096), r.len, z));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            runs,
            vec![
                (0, 4096, true),
                (1, 8192, false),
                (3, 4096, false),
                (4, 8192, true),
                (6, 4096, false),
                (7, 100, true),
            ]
        );
    }

    #[test]
    fn batch_coalesces_and_reports_full() {
        let mut b = ZeroBatch::default();
        assert!(!b.push(MemoryRange::new(0, 4096)));
        assert!(!b.push(MemoryRange::new(4096, 8192)));
        let (r, pages) = b.take();
        assert_eq!((r, pages), (vec![MemoryRange::new(0, 3 * 4096)], 3));
        let mut full = false;
        for i in 0..MAX_ZERO_RANGES as u64 {
            full = b.push(MemoryRange::new(i * 8192, 4096));
        }
        assert!(full);
        assert!(!b.is_empty());
    }

    /// Compares scanning strategies; run with
    /// `cargo test -p migration --release -- --ignored zero_scan --nocapture`.
    #[test]
    #[ignore]
    fn zero_scan_throughput() {
        const SIZE: usize = 256 << 20;
        let m = mem(SIZE);
        let start = GuestAddress(0x10_0000);
        for off in (0..SIZE as u64).step_by(4096) {
            m.write_obj(0u8, GuestAddress(start.0 + off)).unwrap(); // fault every page in
        }
        let slice = m.get_slice(start, SIZE).unwrap();
        let pages = || {
            (0..SIZE)
                .step_by(4096)
                .map(|o| slice.subslice(o, 4096).unwrap())
        };
        let time = |name: &str, f: &dyn Fn() -> usize| {
            let t = std::time::Instant::now();
            let n = f();
            let s = t.elapsed().as_secs_f64();
            eprintln!(
                "{name}: {n} zero pages, {:.2} GiB/s",
                SIZE as f64 / s / (1u64 << 30) as f64
            );
        };
        time("volatile u64 x8", &|| {
            pages().filter(|p| is_zero(p)).count()
        });
        time("copy to stack + compare", &|| {
            pages()
                .filter(|p| {
                    let mut buf = [0u8; 4096];
                    p.copy_to(&mut buf[..]);
                    buf.chunks_exact(16)
                        .all(|c| u128::from_ne_bytes(c.try_into().unwrap()) == 0)
                })
                .count()
        });
        time("plain slice (UB under races)", &|| {
            pages()
                .filter(|p| {
                    let g = p.ptr_guard();
                    // SAFETY: benchmark only; no concurrent writer in this test.
                    let s = unsafe { std::slice::from_raw_parts(g.as_ptr(), 4096) };
                    s.chunks_exact(16)
                        .all(|c| u128::from_ne_bytes(c.try_into().unwrap()) == 0)
                })
                .count()
        });
    }
}
