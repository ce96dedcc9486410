//! `dirtier`: dirties RAM at a chosen rate and proves, from inside, that none of it was lost.
//!
//! Every pass writes a value into each of its pages that depends on the page index and the
//! pass number, after checking that the page still holds what the previous pass wrote. A page
//! that a live migration failed to copy (or copied stale, or to the wrong place) reads back
//! the wrong value, and the guest says so and exits with code 3. Heartbeats at a fixed
//! interval show that the guest keeps running (and how long it stalled) across a migration.
//! With `cpus=` above 1 the APs start too and every CPU takes its own slice of the pages, so
//! that all vCPUs are busy dirtying memory; the CPUs meet after each pass and the BSP alone
//! prints. README.md documents the command line and the serial lines.
#![no_std]
#![no_main]

mod ap;
mod heartbeat;
mod idt;
mod lapic;
mod mptable;
mod publish;
mod rt;

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

const WHO: &str = "dirtier";
const PAGE: u64 = 4096;
/// Everything below belongs to the image, page tables and boot data (README "Entry state").
const FLOOR: u64 = 16 << 20;
const MAX_RANGES: usize = 32;
/// Most pages between two looks at the clock: about 0.2-0.4 ms of page work on the project's
/// host (where rdtsc alone costs as much as a page), far below any heartbeat interval.
const CLOCK_EVERY: u64 = 64;
/// The LAPIC timer's vector, as in dmatest; it only wakes `hlt` while idle.
const TIMER_VECTOR: u8 = 0x41;
const SPURIOUS_VECTOR: u8 = 0xff;

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
    /// Only the BSP has one, so that the heartbeat sequence stays one strictly increasing
    /// series whatever the number of CPUs.
    heartbeat: Option<heartbeat::Heartbeat>,
    /// TSC ticks per page written; 0 = no limit.
    page_ticks: u64,
    credit: u64,
    credit_cap: u64,
}

impl Pacer {
    fn new(tsc_hz: u64, hb_ms: u64, rate: u64, beats: bool) -> Pacer {
        let page_ticks = tsc_hz.checked_div(rate).map_or(0, |t| t.max(1));
        Pacer {
            clock: rt::Clock::new(tsc_hz),
            heartbeat: beats.then(|| heartbeat::Heartbeat::new(tsc_hz, hb_ms)),
            page_ticks,
            // At most 10 ms (or one page) of saved-up writes: after a stall the guest resumes
            // at its rate instead of bursting to catch up.
            credit_cap: (tsc_hz / 100).max(page_ticks),
            credit: 0,
        }
    }

    fn heartbeat(&mut self) {
        if let Some(hb) = &mut self.heartbeat {
            hb.beat();
        }
    }

    /// TSC ticks until the next heartbeat is due (`u64::MAX` on a CPU without heartbeats).
    fn until_heartbeat(&self) -> u64 {
        self.heartbeat
            .as_ref()
            .map_or(u64::MAX, |hb| hb.until_next())
    }

    /// Advances time: heartbeats and rate credit.
    fn tick(&mut self) {
        let step = self.clock.step();
        if let Some(hb) = &mut self.heartbeat {
            hb.advance(step);
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

/// Waiting for the next heartbeat when there is nothing else to do (BSP, `share=0`): `sti;
/// hlt` woken by a one-shot LAPIC timer instead of spinning on the TSC, so that an idle guest
/// leaves the host CPU to others (the migration's threads, on a small host). The timer only
/// wakes the CPU; time still comes from the TSC alone (`Pacer`), so heartbeats keep their
/// sequence and clamping. A timer that does not count, or a CPU that wakes without a timer
/// interrupt for twice the longest sleep, falls back to spinning for good (one line says so),
/// so that a VMM that delivers no interrupts still gets heartbeats.
struct Idle {
    tsc_hz: u64,
    /// LAPIC timer ticks per second (divide-by-16); 0 = spin.
    timer_hz: u64,
    /// Longest single sleep in TSC ticks: short enough that `Pacer`'s 1 s clamp never eats
    /// sleeping time, whatever `hb_ms` is.
    max_sleep: u64,
    /// TSC ticks slept since the timer last fired.
    silent: u64,
    clock: rt::Clock,
}

impl Idle {
    fn new(tsc_hz: u64, hb_ms: u64) -> Idle {
        idt::init_lapic(TIMER_VECTOR, SPURIOUS_VECTOR);
        let mut idle = Idle {
            tsc_hz,
            timer_hz: lapic::timer_hz(tsc_hz),
            max_sleep: (tsc_hz / 1000 * hb_ms).clamp(1, tsc_hz / 10),
            silent: 0,
            clock: rt::Clock::new(tsc_hz),
        };
        if idle.timer_hz == 0 {
            idle.spin_from_now();
        }
        idle
    }

    /// Waits up to about `ticks` TSC ticks: one sleep (cut short by any interrupt), or a few
    /// pauses when sleeping is off or the wait is too short to be worth a timer.
    fn wait(&mut self, ticks: u64) {
        if self.timer_hz == 0 || ticks < self.tsc_hz / 5000 {
            pause_a_little();
            return;
        }
        // A little early: the timer's rate is measured to a few per cent, and a late wake
        // would delay the heartbeat, while an early one costs one more short sleep.
        let ticks = ticks.min(self.max_sleep);
        let count = (ticks - ticks / 16).saturating_mul(self.timer_hz) / self.tsc_hz;
        let fired = idt::TIMER_TICKS.load(Ordering::SeqCst);
        lapic::timer_oneshot(TIMER_VECTOR, count.clamp(1, u32::MAX as u64) as u32);
        if !lapic::timer_armed(TIMER_VECTOR) {
            // A `hlt` now might never end.
            self.spin_from_now();
            return;
        }
        self.clock.step();
        idt::sleep_until_interrupt();
        let slept = self.clock.step();
        if idt::TIMER_TICKS.load(Ordering::SeqCst) != fired {
            self.silent = 0;
            return;
        }
        self.silent += slept;
        if self.silent > 2 * self.max_sleep {
            self.spin_from_now();
        }
    }

    fn spin_from_now(&mut self) {
        self.timer_hz = 0;
        lapic::write(lapic::TIMER_INITIAL, 0);
        rt::line().s(WHO).s(": timer silent, spinning");
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

/// The first page of each plan range, in the index space of the whole plan.
fn range_first(plan: &Plan, r: usize) -> u64 {
    plan.pages[..r].iter().sum()
}

/// One sweep over the pages with indices `lo..hi` for pass `generation`, in chunks between
/// which time is checked.
fn sweep(
    plan: &Plan,
    slice: (u64, u64),
    sweep: Sweep,
    job: &Job,
    generation: u64,
    pacer: &mut Pacer,
) {
    let (lo, hi) = slice;
    for r in 0..plan.len {
        let first = range_first(plan, r);
        let mut index = first.max(lo);
        let end = (first + plan.pages[r]).min(hi);
        let mut addr = plan.start[r] + (index.saturating_sub(first)) * PAGE;
        while index < end {
            let left = end - index;
            let n = if sweep == Sweep::Check {
                pacer.tick();
                left.min(CLOCK_EVERY)
            } else {
                pacer.grant(left.min(CLOCK_EVERY))
            };
            if let Some((word, want, got)) =
                sweep_chunk(sweep, job.words == 2, addr, n, value(index, generation))
            {
                bad(index + (word - addr) / PAGE, word, want, got);
            }
            index += n;
            addr += n * PAGE;
        }
    }
}

/// Reports the first mismatch of any CPU and ends the guest; a CPU that finds one after
/// another CPU already did just stops, so that exactly one BAD line appears.
fn bad(page: u64, word: u64, want: u64, got: u64) -> ! {
    if FAILED.swap(true, Ordering::SeqCst) {
        park();
    }
    rt::line()
        .s("BAD page=")
        .u(page)
        .s(" addr=")
        .x(word)
        .s(" want=")
        .x(want)
        .s(" got=")
        .x(got);
    rt::exit(rt::EXIT_BAD_PAGE)
}

fn park() -> ! {
    loop {
        rt::halt();
    }
}

/// What every CPU works from; fixed before the APs start.
struct Job {
    plan: Plan,
    cpus: u32,
    words: u64,
    passes: u64,
    /// After the last pass, keep running read-only instead of exiting (`hold=1`).
    hold: bool,
    hb_ms: u64,
    /// Pages per second for each CPU; 0 = no limit.
    rate_per_cpu: u64,
    tsc_hz: u64,
}

static JOB: publish::Published<Job> = publish::Published::new();
/// The last pass each CPU has finished (`passes + 1` once it has checked its pages after the
/// last pass). CPU k is the BSP for k = 0 and the AP with ticket k - 1 otherwise.
static DONE: [AtomicU64; ap::MAX_CPUS] = [const { AtomicU64::new(0) }; ap::MAX_CPUS];
static APS_UP: AtomicU32 = AtomicU32::new(0);
static FAILED: AtomicBool = AtomicBool::new(false);

/// `cpus=`: 1 (the default) runs on the BSP alone and never looks at the MP table; `all` is
/// every processor the MP table lists; a number N needs at least N listed.
fn cpu_count(cmd: &[u8]) -> u32 {
    let want = match rt::arg(cmd, "cpus") {
        None => return 1,
        Some(b"all") => None,
        Some(_) => Some(rt::arg_u64(cmd, WHO, "cpus", 1, 1, ap::MAX_CPUS as u64) as u32),
    };
    if want == Some(1) {
        return 1;
    }
    let listed = match mptable::processors() {
        Ok(p) => p.count,
        Err(why) => fail(rt::EXIT_SETUP, why),
    };
    match want {
        None => listed.clamp(1, ap::MAX_CPUS as u32),
        Some(n) if n <= listed => n,
        Some(_) => fail(rt::EXIT_SETUP, "cpus= is more than the MP table lists"),
    }
}

fn fail(code: u8, why: &str) -> ! {
    rt::line().s(WHO).s(": ").s(why);
    rt::exit(code)
}

/// The page indices CPU `cpu` of `cpus` owns: a contiguous slice, so that its hot loop
/// walks memory in order like the single-CPU one.
fn slice(total: u64, cpus: u32, cpu: u32) -> (u64, u64) {
    let share = |k: u32| total * k as u64 / cpus as u64;
    (share(cpu), share(cpu + 1))
}

/// Marks pass `generation` done for `cpu` and waits until every CPU has done it, keeping the
/// clock (and on the BSP the heartbeats) going meanwhile. No CPU gets more than one pass
/// ahead, so a PASS line means that the whole plan holds that pass's values.
fn barrier(cpu: u32, cpus: u32, generation: u64, pacer: &mut Pacer) {
    DONE[cpu as usize].store(generation, Ordering::SeqCst);
    while DONE[..cpus as usize]
        .iter()
        .any(|d| d.load(Ordering::SeqCst) < generation)
    {
        pause_a_little();
        pacer.tick();
    }
}

/// The pass loop that every CPU runs on its own slice of the plan.
fn work(cpu: u32, job: &Job, pacer: &mut Pacer) -> ! {
    if job.plan.total == 0 && job.passes == 0 {
        // Nothing to write, ever (share=0): the APs halt for good, the BSP sleeps between
        // heartbeats.
        if cpu != 0 {
            park();
        }
        let mut idle = Idle::new(job.tsc_hz, job.hb_ms);
        loop {
            pacer.tick();
            idle.wait(pacer.until_heartbeat());
        }
    }
    let mine = slice(job.plan.total, job.cpus, cpu);
    let mut generation = 1;
    loop {
        let kind = if generation == 1 {
            Sweep::Write
        } else {
            Sweep::CheckWrite
        };
        sweep(&job.plan, mine, kind, job, generation, pacer);
        barrier(cpu, job.cpus, generation, pacer);
        if cpu == 0 {
            rt::line()
                .s("PASS ")
                .u(generation)
                .s(" ok pages=")
                .u(job.plan.total);
        }
        if generation == job.passes {
            verify(cpu, job, generation, pacer);
        }
        generation += 1;
    }
}

/// The read-only sweeps after the last pass `generation`: one, then exit 0; with `hold=1`
/// they repeat forever (heartbeats go on, nothing is written), each ending in a VERIFY line,
/// so that a guest whose RAM was written once can be migrated and still checked afterwards.
fn verify(cpu: u32, job: &Job, generation: u64, pacer: &mut Pacer) -> ! {
    let mut round = generation + 1;
    loop {
        sweep(
            &job.plan,
            slice(job.plan.total, job.cpus, cpu),
            Sweep::Check,
            job,
            generation,
            pacer,
        );
        barrier(cpu, job.cpus, round, pacer);
        if cpu == 0 {
            rt::line().s("VERIFY ok pages=").u(job.plan.total);
            if !job.hold {
                rt::exit(rt::EXIT_OK);
            }
        } else if !job.hold {
            park();
        }
        round += 1;
    }
}

fn ap_main(ticket: u32) -> ! {
    let job = JOB.get();
    let cpu = ticket + 1;
    if cpu >= job.cpus {
        // Started by the broadcast SIPI but not asked for (cpus=N below the MP count).
        park();
    }
    APS_UP.fetch_add(1, Ordering::SeqCst);
    let mut pacer = Pacer::new(job.tsc_hz, job.hb_ms, job.rate_per_cpu, false);
    work(cpu, job, &mut pacer)
}

/// Starts the APs and waits (heartbeating) until all that were asked for run; exits 4 if
/// some do not within 5 s.
fn start_aps(job: &Job, pacer: &mut Pacer) {
    ap::start_all(job.tsc_hz).unwrap_or_else(|why| fail(rt::EXIT_SETUP, why));
    let deadline = job.tsc_hz * 5;
    let mut clock = rt::Clock::new(job.tsc_hz / 10);
    let mut waited = 0;
    while APS_UP.load(Ordering::SeqCst) + 1 < job.cpus {
        if waited >= deadline {
            rt::line()
                .s(WHO)
                .s(": timeout: ")
                .u(APS_UP.load(Ordering::SeqCst) as u64 + 1)
                .s(" of ")
                .u(job.cpus as u64)
                .s(" CPUs up");
            rt::exit(rt::EXIT_SMP_TIMEOUT);
        }
        pause_a_little();
        pacer.tick();
        waited += clock.step();
    }
}

fn guest_main(boot: rt::Boot) -> ! {
    let cmd = boot.cmdline();
    let share = rt::arg_u64(cmd, WHO, "share", 50, 0, 100);
    let rate = rt::arg_u64(cmd, WHO, "rate", 0, 0, 1 << 32);
    let hb_ms = rt::arg_u64(cmd, WHO, "hb_ms", 100, 1, 3_600_000);
    let passes = rt::arg_u64(cmd, WHO, "passes", 0, 0, 1 << 32);
    let words = rt::arg_u64(cmd, WHO, "words", 1, 1, 2);
    let hold = rt::arg_u64(cmd, WHO, "hold", 0, 0, 1) == 1;
    let cpus = cpu_count(cmd);

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
        .s(" hold=")
        .u(hold as u64)
        .s(" cpus=")
        .u(cpus as u64)
        .s(" ram_mib=")
        .u(plan.ram >> 20)
        .s(" pages=")
        .u(plan.total)
        .s(" tsc_khz=")
        .u(tsc_hz / 1000);

    let job = JOB.publish(Job {
        plan,
        cpus,
        words,
        passes,
        hold,
        hb_ms,
        // Rounded up: together the CPUs write at least `rate` pages per second.
        rate_per_cpu: rate.div_ceil(cpus as u64),
        tsc_hz,
    });
    let mut pacer = Pacer::new(tsc_hz, hb_ms, job.rate_per_cpu, true);
    pacer.heartbeat();
    if cpus > 1 {
        start_aps(job, &mut pacer);
    }
    work(0, job, &mut pacer)
}
