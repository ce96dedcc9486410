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
/// Most pages between two looks at the clock: about 0.2-0.4 ms of page work on the project's
/// host (where rdtsc alone costs as much as a page), far below any heartbeat interval.
const CLOCK_EVERY: u64 = 64;

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

/// Multiplier of `value`: odd, so multiplying by it is a bijection on u64.
const MIX: u64 = 0x9e37_79b9_7f4a_7c15;
/// `value(i, g) - value(i, g - 1)`.
const GENERATION_STEP: u64 = MIX << 40;

/// What page `index` holds after pass `generation`: `(index + 1 + generation * 2^40) * MIX`.
///
/// Different for every (page, pass) pair while index < 2^40 - 1 and generation < 2^24 (and
/// always different from the previous pass), and never zero (a nonzero number times an odd
/// one), so that a page that was lost (reads zero), stale, or moved is caught. It is a
/// multiplicative hash rather than a stronger mix because on the project's host every guest
/// instruction is emulated (~0.7 us each): with it, the next page's value is one addition
/// away and the per-page loop stays at about ten instructions.
fn value(index: u64, generation: u64) -> u64 {
    (index + 1).wrapping_add(generation << 40).wrapping_mul(MIX)
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
        let page_ticks = tsc_hz.checked_div(rate).map_or(0, |t| t.max(1));
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

    /// How many of the next `want` pages (at least one) may be done now: looks at the clock
    /// and, when rate-limited, waits for credit for at least one page.
    fn grant(&mut self, want: u64) -> u64 {
        self.tick();
        if self.page_ticks == 0 {
            return want;
        }
        while self.credit < self.page_ticks {
            pause_a_little();
            self.tick();
        }
        let n = (self.credit / self.page_ticks).min(want);
        self.credit -= n * self.page_ticks;
        n
    }
}

/// A few pauses between clock readings while waiting: reading the TSC is emulated here too,
/// and a pause costs about the same as any other instruction.
fn pause_a_little() {
    for _ in 0..16 {
        rt::pause();
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

/// What a sweep does to each page.
#[derive(Clone, Copy, PartialEq)]
enum Sweep {
    /// Pass 1: write only (the pages hold anything before).
    Write,
    /// Later passes: check the previous pass's value, then write this pass's.
    CheckWrite,
    /// After the last pass: check only.
    Check,
}

/// The hot loop over `n` pages from `addr` whose first page should hold `v` after this sweep.
/// Returns the first word that held something else, with what it held. Generic so that each
/// (sweep, words) pair compiles to a loop of a handful of instructions.
#[inline(always)]
fn sweep_run<const SWEEP: u8, const TWO: bool>(
    addr: u64,
    n: u64,
    mut v: u64,
) -> Option<(u64, u64, u64)> {
    let mut p = addr;
    for _ in 0..n {
        let want = if SWEEP == Sweep::Check as u8 {
            v
        } else {
            v.wrapping_sub(GENERATION_STEP)
        };
        if SWEEP != Sweep::Write as u8 {
            let got = read(p);
            if got != want {
                return Some((p, want, got));
            }
            if TWO {
                let got = read(p + PAGE - 8);
                if got != want {
                    return Some((p + PAGE - 8, want, got));
                }
            }
        }
        if SWEEP != Sweep::Check as u8 {
            write(p, v);
            if TWO {
                write(p + PAGE - 8, v);
            }
        }
        v = v.wrapping_add(MIX);
        p += PAGE;
    }
    None
}

fn sweep_chunk(sweep: Sweep, two: bool, addr: u64, n: u64, v: u64) -> Option<(u64, u64, u64)> {
    const W: u8 = Sweep::Write as u8;
    const CW: u8 = Sweep::CheckWrite as u8;
    const C: u8 = Sweep::Check as u8;
    match (sweep, two) {
        (Sweep::Write, false) => sweep_run::<W, false>(addr, n, v),
        (Sweep::Write, true) => sweep_run::<W, true>(addr, n, v),
        (Sweep::CheckWrite, false) => sweep_run::<CW, false>(addr, n, v),
        (Sweep::CheckWrite, true) => sweep_run::<CW, true>(addr, n, v),
        (Sweep::Check, false) => sweep_run::<C, false>(addr, n, v),
        (Sweep::Check, true) => sweep_run::<C, true>(addr, n, v),
    }
}

/// One sweep over the plan for pass `generation`, in chunks between which time is checked.
fn sweep(plan: &Plan, sweep: Sweep, generation: u64, words: u64, pacer: &mut Pacer) {
    let mut index = 0;
    for r in 0..plan.len {
        let mut addr = plan.start[r];
        let mut left = plan.pages[r];
        while left > 0 {
            let n = if sweep == Sweep::Check {
                pacer.tick();
                left.min(CLOCK_EVERY)
            } else {
                pacer.grant(left.min(CLOCK_EVERY))
            };
            if let Some((word, want, got)) =
                sweep_chunk(sweep, words == 2, addr, n, value(index, generation))
            {
                rt::line()
                    .s("BAD page=")
                    .u(index + (word - addr) / PAGE)
                    .s(" addr=")
                    .x(word)
                    .s(" want=")
                    .x(want)
                    .s(" got=")
                    .x(got);
                rt::exit(rt::EXIT_BAD_PAGE);
            }
            index += n;
            addr += n * PAGE;
            left -= n;
        }
    }
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
        let kind = if generation == 1 {
            Sweep::Write
        } else {
            Sweep::CheckWrite
        };
        sweep(&plan, kind, generation, words, &mut pacer);
        rt::line()
            .s("PASS ")
            .u(generation)
            .s(" ok pages=")
            .u(plan.total);
        if generation == passes {
            sweep(&plan, Sweep::Check, generation, words, &mut pacer);
            rt::line().s("VERIFY ok pages=").u(plan.total);
            rt::exit(rt::EXIT_OK);
        }
        generation += 1;
    }
}
