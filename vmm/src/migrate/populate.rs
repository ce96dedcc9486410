//! Prefaulting destination RAM in the background, so the first touch of each page (slow on
//! these hosts: ~0.7 s per GiB) happens on another core while pages arrive, not in the
//! receive path. MADV_POPULATE_WRITE only allocates; it never changes page contents, so it
//! can race safely with incoming writes. It works from the top of RAM down while pages
//! arrive bottom up: measured on the 1 GiB written-once migration, that took the median
//! total from ~950 ms to ~710 ms against bottom-up prefaulting, which kept the receiver
//! waiting on the pages the prefault thread was allocating. It stays at most [`LEAD`] bytes
//! ahead of the page data received, so a peer that describes a big VM and sends nothing
//! costs this host no more than that.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::vstate::memory::GuestMemory;

const MADV_POPULATE_WRITE: libc::c_int = 23;
const CHUNK: usize = 2 << 20;
/// How far prefaulting may run ahead of the page data received.
pub const LEAD: u64 = 256 << 20;

pub struct Prefault {
    stop: Arc<AtomicBool>,
    /// Bytes the thread may populate: LEAD plus the page data received so far.
    allowed: Arc<AtomicU64>,
    thread: Option<JoinHandle<u64>>,
}

impl Prefault {
    /// Starts prefaulting unless `MINIVMM_PREFAULT=0` (kept for the benchmark's comparison).
    pub fn start(mem: &GuestMemory) -> Self {
        Self::with_lead(mem, LEAD)
    }

    fn with_lead(mem: &GuestMemory, lead: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let allowed = Arc::new(AtomicU64::new(lead));
        if std::env::var("MINIVMM_PREFAULT").is_ok_and(|v| v == "0") {
            return Prefault {
                stop,
                allowed,
                thread: None,
            };
        }
        let areas: Vec<(usize, usize)> = mem
            .iter()
            .filter_map(|r| {
                mem.get_host_address(r.start_addr())
                    .ok()
                    .map(|p| (p as usize, r.len() as usize))
            })
            .collect();
        let (flag, budget) = (stop.clone(), allowed.clone());
        let thread = std::thread::Builder::new()
            .name("prefault".into())
            .spawn(move || populate(&areas, &flag, &budget))
            .ok();
        Prefault {
            stop,
            allowed,
            thread,
        }
    }

    /// `bytes` of page data arrived: prefaulting may go that much further.
    pub fn allow(&self, bytes: u64) {
        self.allowed.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Stops (if still running) and returns the bytes populated.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

impl Drop for Prefault {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn populate(areas: &[(usize, usize)], stop: &AtomicBool, allowed: &AtomicU64) -> u64 {
    let mut done = 0u64;
    // From the top down: pages arrive bottom up, so the two meet once instead of queueing
    // on the same pages' locks all the way.
    for &(addr, len) in areas.iter().rev() {
        let mut end = len;
        while end > 0 && !stop.load(Ordering::Relaxed) {
            let n = CHUNK.min(end);
            if done + n as u64 > allowed.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let start = addr + end - n;
            // SAFETY: [start, start+n) lies inside a live guest RAM mapping, and
            // MADV_POPULATE_WRITE only faults pages in without touching their contents.
            let r = unsafe { libc::madvise(start as *mut libc::c_void, n, MADV_POPULATE_WRITE) };
            if r != 0 {
                log::debug!("prefault stopped: {}", std::io::Error::last_os_error());
                return done;
            }
            end -= n;
            done += n as u64;
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::Ram;

    fn resident_pages(addr: usize, len: usize) -> usize {
        let mut vec = vec![0u8; len / 4096];
        // SAFETY: [addr, addr+len) is a live mapping owned by the test's Ram; vec has one
        // byte per page as mincore requires.
        let r = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    #[test]
    fn populates_every_page_and_stops_when_told() {
        let ram = Ram::new(8 << 20).unwrap();
        let addr = ram
            .mem
            .get_host_address(vm_memory::GuestAddress(0))
            .unwrap() as usize;
        let len = 8 << 20;
        let unlimited = AtomicU64::new(u64::MAX);
        assert_eq!(
            populate(&[(addr, len)], &AtomicBool::new(true), &unlimited),
            0
        );
        assert_eq!(resident_pages(addr, len), 0);
        assert_eq!(
            populate(&[(addr, len)], &AtomicBool::new(false), &unlimited),
            len as u64
        );
        assert_eq!(resident_pages(addr, len), len / 4096);
    }

    /// Ahead of the data by the lead, never more: what a silent peer can make us allocate.
    #[test]
    fn stays_within_its_lead_of_the_data_received() {
        let len = 32usize << 20;
        let ram = Ram::new(len as u64).unwrap();
        let addr = ram
            .mem
            .get_host_address(vm_memory::GuestAddress(0))
            .unwrap() as usize;
        let p = Prefault::with_lead(&ram.mem, 4 << 20);
        std::thread::sleep(Duration::from_millis(300));
        assert!(resident_pages(addr, len) * 4096 <= 4 << 20);
        p.allow(6 << 20);
        std::thread::sleep(Duration::from_millis(300));
        assert!(resident_pages(addr, len) * 4096 <= 10 << 20);
        assert!(p.finish() <= 10 << 20);
    }
}
