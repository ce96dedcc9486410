//! `dirtier`: dirties RAM at a chosen rate and proves, from inside, that none of it was lost.
//!
//! Every pass writes a value into each of its pages that depends on the page index and the
//! pass number, after checking that the page still holds what the previous pass wrote. A page
//! that a live migration failed to copy (or copied stale, or to the wrong place) reads back
//! the wrong value, and the guest says so and exits with code 3. Heartbeats at a fixed
//! interval show that the guest keeps running (and how long it stalled) across a migration.
//! README.md documents the command line and the serial lines.
#![no_std]
#![no_main]

mod rt;

const WHO: &str = "dirtier";
const PAGE: u64 = 4096;
/// Everything below belongs to the image, page tables and boot data (README "Entry state").
const FLOOR: u64 = 16 << 20;
const MAX_RANGES: usize = 32;
/// Pages between two looks at the clock when not rate-limited: about 25-40 us of page work on
/// the nested-KVM build machine, so heartbeats stay on time without rdtsc dominating.
const CLOCK_EVERY: u64 = 8;

/// The pages this guest owns: up to `MAX_RANGES` runs of whole pages, in address order.
struct Plan {
    start: [u64; MAX_RANGES],
    pages: [u64; MAX_RANGES],
    len: usize,
    total: u64,
    ram: u64,
}

impl Plan {
    /// `share` percent of all RAM in the e820 map, taken page by page upward from 16 MiB.
    fn from_e820(boot: &rt::Boot, share: u64) -> Plan {
        let mut ram_entries = [(0u64, 0u64); MAX_RANGES];
        let mut n = 0;
        let mut ram = 0u64;
        for i in 0..boot.e820_len() {
            let e = boot.e820(i);
            if e.kind != rt::E820_RAM || e.size == 0 {
                continue;
            }
            ram += e.size;
            if n < MAX_RANGES {
                ram_entries[n] = (e.addr, e.addr.saturating_add(e.size));
                n += 1;
            }
        }
        // Insertion sort: a handful of entries, and core's sort would triple the image.
        for i in 1..n {
            let mut j = i;
            while j > 0 && ram_entries[j - 1] > ram_entries[j] {
                ram_entries.swap(j - 1, j);
                j -= 1;
            }
        }

        let mut plan = Plan {
            start: [0; MAX_RANGES],
            pages: [0; MAX_RANGES],
            len: 0,
            total: 0,
            ram,
        };
        let mut want = ram / PAGE * share / 100;
        for &(start, end) in &ram_entries[..n] {
            let start = start.max(FLOOR).next_multiple_of(PAGE);
            let end = end & !(PAGE - 1);
            if want == 0 || end <= start {
                continue;
            }
            let take = ((end - start) / PAGE).min(want);
            plan.start[plan.len] = start;
            plan.pages[plan.len] = take;
            plan.len += 1;
            plan.total += take;
            want -= take;
        }
        plan
    }
}

/// What page `index` holds after pass `generation`: distinct for every page within a pass
/// (an injective mix), different from the previous pass, and never zero, so that a page that
/// was lost (zero), stale, or moved is caught.
fn value(index: u64, generation: u64) -> u64 {
    // splitmix64's finaliser over an injective combination of the two numbers.
    let mut z = index.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ generation.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ 0x5851_f42d_4c95_7f2d;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    if z == 0 { 0x0bad_cafe_f00d_0001 } else { z }
}

/// Heartbeats and rate limiting, both driven by clamped TSC deltas (`rt::Clock`).
struct Pacer {
    clock: rt::Clock,
    hb_ticks: u64,
    hb_elapsed: u64,
    hb_seq: u64,
    /// TSC ticks per page written; 0 = no limit.
    page_ticks: u64,
    credit: u64,
    credit_cap: u64,
}

impl Pacer {
    fn new(tsc_hz: u64, hb_ms: u64, rate: u64) -> Pacer {
        let page_ticks = if rate == 0 { 0 } else { (tsc_hz / rate).max(1) };
        Pacer {
            clock: rt::Clock::new(tsc_hz),
            hb_ticks: (tsc_hz * hb_ms / 1000).max(1),
            hb_elapsed: 0,
            hb_seq: 0,
            page_ticks,
            // At most 10 ms (or one page) of saved-up writes: after a stall the guest resumes
            // at its rate instead of bursting to catch up.
            credit_cap: (tsc_hz / 100).max(page_ticks),
            credit: 0,
        }
    }

    fn heartbeat(&mut self) {
        rt::line().s("HB ").u(self.hb_seq);
        self.hb_seq += 1;
    }

    /// Advances time; prints at most one heartbeat per call so that a stall (or a TSC jump
    /// that the clamp let through) gives one late heartbeat, never a burst.
    fn tick(&mut self) {
        let step = self.clock.step();
        self.hb_elapsed += step;
        if self.hb_elapsed >= self.hb_ticks {
            self.heartbeat();
            self.hb_elapsed -= self.hb_ticks;
            if self.hb_elapsed >= self.hb_ticks {
                self.hb_elapsed = 0;
            }
        }
        if self.page_ticks != 0 {
            self.credit = (self.credit + step).min(self.credit_cap);
        }
    }

    /// Called before writing page `index`: waits for rate credit, or looks at the clock every
    /// few pages when unlimited.
    fn before_page(&mut self, index: u64) {
        if self.page_ticks == 0 {
            if index % CLOCK_EVERY == 0 {
                self.tick();
            }
            return;
        }
        self.tick();
        while self.credit < self.page_ticks {
            rt::pause();
            self.tick();
        }
        self.credit -= self.page_ticks;
    }
}

fn read(addr: u64) -> u64 {
    // SAFETY: `addr` is an aligned word in an e820 RAM range at or above 16 MiB, which is
    // identity-mapped and used by nothing else (the image and boot data end below 16 MiB).
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

fn write(addr: u64, value: u64) {
    // SAFETY: as for `read`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, value) }
}

fn check(index: u64, addr: u64, want: u64) {
    let got = read(addr);
    if got != want {
        rt::line()
            .s("BAD page=")
            .u(index)
            .s(" addr=")
            .x(addr)
            .s(" want=")
            .x(want)
            .s(" got=")
            .x(got);
        rt::exit(rt::EXIT_BAD_PAGE);
    }
}

/// Visits every page of the plan in order with its global index.
fn for_each_page(plan: &Plan, mut f: impl FnMut(u64, u64)) {
    let mut index = 0;
    for r in 0..plan.len {
        let mut addr = plan.start[r];
        for _ in 0..plan.pages[r] {
            f(index, addr);
            index += 1;
            addr += PAGE;
        }
    }
}

/// Words touched in a page: the first, and with `words=2` also the last, so that a page copied
/// only in part is caught too.
fn words_of(addr: u64, words: u64) -> [Option<u64>; 2] {
    [Some(addr), (words == 2).then_some(addr + PAGE - 8)]
}

/// Pass `generation`: verify the previous pass's value (from pass 2 on), write this pass's.
fn pass(plan: &Plan, generation: u64, words: u64, pacer: &mut Pacer) {
    for_each_page(plan, |index, addr| {
        pacer.before_page(index);
        let old = value(index, generation - 1);
        let new = value(index, generation);
        for word in words_of(addr, words).into_iter().flatten() {
            if generation > 1 {
                check(index, word, old);
            }
            write(word, new);
        }
    });
}

/// Read-only sweep after the last pass, so that writes of the last pass are checked as well.
fn verify(plan: &Plan, generation: u64, words: u64, pacer: &mut Pacer) {
    for_each_page(plan, |index, addr| {
        if index % CLOCK_EVERY == 0 {
            pacer.tick();
        }
        let want = value(index, generation);
        for word in words_of(addr, words).into_iter().flatten() {
            check(index, word, want);
        }
    });
}

fn guest_main(boot: rt::Boot) -> ! {
    let cmd = boot.cmdline();
    let share = rt::arg_u64(cmd, WHO, "share", 50, 0, 100);
    let rate = rt::arg_u64(cmd, WHO, "rate", 0, 0, 1 << 32);
    let hb_ms = rt::arg_u64(cmd, WHO, "hb_ms", 100, 1, 3_600_000);
    let passes = rt::arg_u64(cmd, WHO, "passes", 0, 0, 1 << 32);
    let words = rt::arg_u64(cmd, WHO, "words", 1, 1, 2);

    let plan = Plan::from_e820(&boot, share);
    let tsc_hz = rt::calibrate_tsc(WHO);
    rt::line()
        .s(WHO)
        .s(": share=")
        .u(share)
        .s(" rate=")
        .u(rate)
        .s(" hb_ms=")
        .u(hb_ms)
        .s(" passes=")
        .u(passes)
        .s(" words=")
        .u(words)
        .s(" ram_mib=")
        .u(plan.ram >> 20)
        .s(" pages=")
        .u(plan.total)
        .s(" tsc_khz=")
        .u(tsc_hz / 1000);

    let mut pacer = Pacer::new(tsc_hz, hb_ms, rate);
    pacer.heartbeat();

    if plan.total == 0 && passes == 0 {
        // Nothing to write (share=0): an idle guest that only heartbeats.
        loop {
            rt::pause();
            pacer.tick();
        }
    }

    let mut generation = 1;
    loop {
        pass(&plan, generation, words, &mut pacer);
        rt::line()
            .s("PASS ")
            .u(generation)
            .s(" ok pages=")
            .u(plan.total);
        if generation == passes {
            verify(&plan, generation, words, &mut pacer);
            rt::line().s("VERIFY ok pages=").u(plan.total);
            rt::exit(rt::EXIT_OK);
        }
        generation += 1;
    }
}
