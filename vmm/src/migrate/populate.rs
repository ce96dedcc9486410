//! Prefaulting destination RAM in the background, so the first touch of each page (slow on
//! these hosts: ~0.7 s per GiB) happens on another core while pages arrive, not in the
//! receive path. MADV_POPULATE_WRITE only allocates; it never changes page contents, so it
//! can race safely with incoming writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::vstate::memory::GuestMemory;

const MADV_POPULATE_WRITE: libc::c_int = 23;
const CHUNK: usize = 2 << 20;

pub struct Prefault {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Prefault {
    /// Starts prefaulting unless `MINIVMM_PREFAULT=0` (kept for the benchmark's comparison).
    pub fn start(mem: &GuestMemory) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        if std::env::var("MINIVMM_PREFAULT").is_ok_and(|v| v == "0") {
            return Prefault { stop, thread: None };
        }
        let areas: Vec<(usize, usize)> = mem
            .iter()
            .filter_map(|r| {
                mem.get_host_address(r.start_addr())
                    .ok()
                    .map(|p| (p as usize, r.len() as usize))
            })
            .collect();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("prefault".into())
            .spawn(move || populate(&areas, &flag))
            .ok();
        Prefault { stop, thread }
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

fn populate(areas: &[(usize, usize)], stop: &AtomicBool) -> u64 {
    let mut done = 0u64;
    for &(addr, len) in areas {
        let mut off = 0;
        while off < len && !stop.load(Ordering::Relaxed) {
            let n = CHUNK.min(len - off);
            // SAFETY: [addr+off, addr+off+n) lies inside a live guest RAM mapping, and
            // MADV_POPULATE_WRITE only faults pages in without touching their contents.
            let r =
                unsafe { libc::madvise((addr + off) as *mut libc::c_void, n, MADV_POPULATE_WRITE) };
            if r != 0 {
                log::debug!("prefault stopped: {}", std::io::Error::last_os_error());
                return done;
            }
            off += n;
            done += n as u64;
        }
    }
    done
}
