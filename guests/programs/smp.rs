//! `smp`: brings up every vCPU the MP table lists, the way an OS does on real hardware.
//!
//! The BSP counts processors in the MP table and starts all others (`ap.rs`); each reports on
//! serial. Exits 0 when all have reported, 4 when some have not within `timeout_ms=` (default
//! 5000).
#![no_std]
#![no_main]

mod ap;
mod lapic;
mod mptable;
mod rt;

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const WHO: &str = "SMP";

/// CPUs that have reported, and which APIC ids they had.
static UP: AtomicU32 = AtomicU32::new(0);
static SEEN: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

fn mark_up(id: u32) {
    if id < 256 {
        SEEN[id as usize / 64].fetch_or(1 << (id % 64), Ordering::SeqCst);
    }
    rt::line().s("SMP cpu ").u(id as u64).s(" up");
    UP.fetch_add(1, Ordering::SeqCst);
}

fn seen(id: u32) -> bool {
    SEEN[id as usize / 64].load(Ordering::SeqCst) & (1 << (id % 64)) != 0
}

fn ap_main(_ticket: u32) -> ! {
    mark_up(lapic::id());
    loop {
        rt::halt();
    }
}

fn fail(code: u8, why: &str) -> ! {
    rt::line().s(WHO).s(": ").s(why);
    rt::exit(code)
}

fn guest_main(boot: rt::Boot) -> ! {
    let timeout_ms = rt::arg_u64(boot.cmdline(), WHO, "timeout_ms", 5000, 1, 3_600_000);
    let tsc_hz = rt::calibrate_tsc(WHO);
    mark_up(lapic::id());

    let cpus = mptable::processors().unwrap_or_else(|why| fail(rt::EXIT_SETUP, why));
    let n = cpus.count;
    if n as usize > ap::MAX_CPUS {
        fail(
            rt::EXIT_SETUP,
            "more CPUs in the MP table than this guest has stacks for",
        );
    }
    if n > 1 {
        ap::start_all(tsc_hz).unwrap_or_else(|why| fail(rt::EXIT_SETUP, why));
    }

    let mut clock = rt::Clock::new(tsc_hz / 10);
    let deadline = tsc_hz / 1000 * timeout_ms;
    let mut waited = 0;
    while UP.load(Ordering::SeqCst) < n && waited < deadline {
        rt::pause();
        waited += clock.step();
    }
    let up = UP.load(Ordering::SeqCst);
    if up >= n {
        rt::line().s("SMP all ").u(up as u64).s(" up");
        rt::exit(rt::EXIT_OK);
    }

    let mut l = rt::line();
    l.s(WHO)
        .s(": timeout: ")
        .u(up as u64)
        .s(" of ")
        .u(n as u64)
        .s(" CPUs up; missing APIC ids:");
    for id in (0..256u32).filter(|&id| cpus.has(id) && !seen(id)) {
        l.s(" ").u(id as u64);
    }
    drop(l);
    rt::exit(rt::EXIT_SMP_TIMEOUT)
}
