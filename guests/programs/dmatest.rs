//! `dmatest`: drives sampledev (a vfio-user PCI device) the way a driver on real hardware
//! would, and proves from inside that its DMA, interrupts and internal state survive, e.g. a
//! live migration.
//!
//! It finds the device on PCI bus 0 through configuration ports 0xCF8/0xCFC, moves BAR0 to
//! another address (a VMM must follow BAR reprogramming), enables memory decoding, bus
//! mastering and MSI-X vector 0 (or, with `irq=intx`, the function's INTx: the IOAPIC pin
//! that INTERRUPT_LINE names, level-triggered), then fills buffers in RAM by DMA round after
//! round. Each FILL is awaited as an interrupt (`hlt`, bounded by a timeout), checked word by
//! word against sampledev's pattern, and checked again one round later just before it is
//! overwritten, so that data the device wrote before a migration is read after it. COUNTER,
//! the interrupt count and sampled words of the device's internal state are compared with
//! what the guest predicts. README.md documents the command line and the serial lines.
#![no_std]
#![no_main]

mod heartbeat;
mod idt;
mod ioapic;
mod lapic;
mod pci;
mod rt;
mod sdpattern;
mod sdregs;

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sdpattern::{StateModel, buffer_seed, checksum_step, fill_word, splitmix64};
use sdregs::Regs;

const WHO: &str = "dmatest";
const VENDOR: u16 = 0xfeed;
const DEVICE: u16 = 0x0001;
/// DMA completion: the MSI-X vector 0 message, or the IOAPIC entry of the INTx pin.
const IRQ_VECTOR: u8 = 0x40;
const TIMER_VECTOR: u8 = 0x41;
const SPURIOUS_VECTOR: u8 = 0xff;
/// LAPIC timer period in bus ticks / 16: 1 ms on KVM (1 GHz APIC bus). It only wakes `hlt`
/// so that the irq timeout, measured with the TSC, can expire; its rate does not matter.
const TIMER_COUNT: u32 = 62_500;
/// Everything below belongs to the image, page tables and boot data (README "Entry state").
const BUF_BASE: u64 = 16 << 20;
const PAGE: u64 = 4096;
const MAX_BUFS: usize = 256;
/// Internal-state words whose expected value the guest keeps (8 MiB of RAM at most).
const MAX_TRACKED: u64 = 1 << 20;
/// Words verified between two looks at the clock: ~10 ms on the project's host.
const WORDS_PER_TICK: u64 = 512;
/// Per state check, words changed by earlier operations and (mostly) untouched words read
/// back, besides all those that the operations since the previous check changed.
const STATE_SAMPLES: u64 = 4;
/// Most recent operations whose changed words one state check reads back (two MMIO round
/// trips to the device per word).
const MAX_CHECKED_OPS: u64 = 256;

/// Completion interrupts taken on IRQ_VECTOR, counted by the handlers below.
static IRQS: AtomicU64 = AtomicU64::new(0);
/// INTx: the address of the device's STATUS register, for the handler.
static INTX_STATUS_REG: AtomicU64 = AtomicU64::new(0);
/// INTx: the STATUS values the handler found (and acknowledged), ORed, until taken.
static INTX_SEEN: AtomicU64 = AtomicU64::new(0);
/// INTx: interrupts that found neither DONE nor ERROR in STATUS (not counted in IRQS).
static SPURIOUS: AtomicU64 = AtomicU64::new(0);

// MSI handler: count, EOI to the xAPIC, return. In asm so that it touches no register but RAX
// (saved) and needs no stack frame of Rust's. The EOI register is above 2 GiB, so its address
// goes through a register rather than a sign-extended 32-bit displacement. The LAPIC timer's
// handler is idt.rs's `idt_timer_tick`.
//
// INTx handler, as a driver of a level-triggered line does it: read STATUS (one 8-byte MMIO
// read), and if DONE or ERROR is set (the device's interrupt causes) remember it, write those
// bits back to clear them (which lowers the line) and count; otherwise count a spurious
// interrupt. Then EOI, which the IOAPIC passes on (for a level-triggered pin) to whoever
// resamples the line. RAX and RDX are saved; the flags come back with `iretq`.
global_asm!(
    r#"
    .pushsection .text.dmatest_irq, "ax", @progbits
    .global dmatest_msi
dmatest_msi:
    pushq %rax
    lock incq {irqs}(%rip)
    movabsq ${eoi}, %rax
    movl $0, (%rax)
    popq %rax
    iretq

    .global dmatest_intx
dmatest_intx:
    pushq %rax
    pushq %rdx
    movq {status_reg}(%rip), %rdx
    movq (%rdx), %rax
    testq ${causes}, %rax
    jz 2f
    lock orq %rax, {seen}(%rip)
    andq ${causes}, %rax
    movq %rax, (%rdx)
    lock incq {irqs}(%rip)
    jmp 3f
2:
    lock incq {spurious}(%rip)
3:
    movabsq ${eoi}, %rdx
    movl $0, (%rdx)
    popq %rdx
    popq %rax
    iretq
    .popsection
"#,
    irqs = sym IRQS,
    status_reg = sym INTX_STATUS_REG,
    seen = sym INTX_SEEN,
    spurious = sym SPURIOUS,
    causes = const sdregs::STATUS_DONE | sdregs::STATUS_ERROR,
    eoi = const lapic::EOI_ADDR,
    options(att_syntax)
);

unsafe extern "C" {
    fn dmatest_msi();
    fn dmatest_intx();
}

/// How DMA completions reach the guest.
#[derive(Clone, Copy)]
enum Irq {
    /// MSI-X vector 0; the PBA's address, for diagnostics.
    Msix { pba: u64 },
    /// INTx on this IOAPIC pin.
    Intx { pin: u32 },
}

struct Params {
    rounds: u64,
    buf_bytes: u64,
    bufs: u64,
    hb_ms: u64,
    irq_ms: u64,
    /// Where to move BAR0; 0 = 1 MiB above where it was found.
    bar: u64,
    state_every: u64,
    state_seed: u64,
    /// `irq=intx`: the function's INTx through the IOAPIC instead of MSI-X.
    intx: bool,
}

impl Params {
    fn parse(cmd: &[u8]) -> Params {
        Params {
            rounds: rt::arg_u64(cmd, WHO, "rounds", 0, 0, 1 << 40),
            buf_bytes: rt::arg_u64(cmd, WHO, "buf_kb", 64, 1, 4096) * 1024,
            bufs: rt::arg_u64(cmd, WHO, "bufs", 16, 1, MAX_BUFS as u64),
            hb_ms: rt::arg_u64(cmd, WHO, "hb_ms", 100, 1, 3_600_000),
            irq_ms: rt::arg_u64(cmd, WHO, "irq_ms", 2000, 1, 3_600_000),
            bar: rt::arg_u64(cmd, WHO, "bar", 0, 0, u64::MAX),
            state_every: rt::arg_u64(cmd, WHO, "state_every", 1, 0, 1 << 40),
            state_seed: rt::arg_u64(cmd, WHO, "state_seed", 0x5eed, 0, u64::MAX),
            intx: parse_irq(cmd),
        }
    }
}

fn parse_irq(cmd: &[u8]) -> bool {
    match rt::arg(cmd, "irq") {
        None | Some(b"msix") => false,
        Some(b"intx") => true,
        Some(other) => {
            rt::line()
                .s(WHO)
                .s(": bad irq=")
                .b(other)
                .s(" (want msix or intx)");
            rt::exit(rt::EXIT_SETUP)
        }
    }
}

fn fail(code: u8, why: &str) -> ! {
    rt::line().s(WHO).s(": ").s(why);
    rt::exit(code)
}

/// Whether [start, end) lies inside one e820 RAM range.
fn is_ram(boot: &rt::Boot, start: u64, end: u64) -> bool {
    (0..boot.e820_len())
        .map(|i| boot.e820(i))
        .any(|e| e.kind == rt::E820_RAM && e.addr <= start && end <= e.addr.saturating_add(e.size))
}

fn read_ram(addr: u64) -> u64 {
    // SAFETY: `addr` is an aligned word of a DMA buffer: e820 RAM at or above 16 MiB
    // (checked at start-up), identity-mapped, used by nothing but this guest and the device,
    // and read only while no DMA into it is in flight.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

fn main_loop(t: &mut Test) -> ! {
    let mut round = 1;
    loop {
        t.round(round);
        if round == t.p.rounds {
            t.final_check();
        }
        round += 1;
    }
}

fn guest_main(boot: rt::Boot) -> ! {
    let p = Params::parse(boot.cmdline());
    let tsc_hz = rt::calibrate_tsc(WHO);
    let mut hb = heartbeat::Heartbeat::new(tsc_hz, p.hb_ms);
    hb.beat();
    let bufs_end = BUF_BASE + p.bufs * p.buf_bytes;
    if !is_ram(&boot, BUF_BASE, bufs_end) {
        fail(
            rt::EXIT_SETUP,
            "not enough RAM above 16 MiB for the buffers",
        );
    }
    setup_interrupts(p.intx);
    let (regs, irq) = setup_device(&p);
    let mut t = Test::new(&boot, p, regs, irq, tsc_hz, hb, bufs_end);
    t.info();
    main_loop(&mut t)
}

/// Interrupts reach this CPU only through its LAPIC (`idt::init_lapic`): IRQ_VECTOR counts
/// DMA completions (an MSI, or INTx through the IOAPIC) and the LAPIC timer wakes `hlt` every
/// millisecond or so.
fn setup_interrupts(intx: bool) {
    idt::init_lapic(TIMER_VECTOR, SPURIOUS_VECTOR);
    let handler = if intx { dmatest_intx } else { dmatest_msi };
    idt::set(IRQ_VECTOR, handler);
    lapic::timer_periodic(TIMER_VECTOR, TIMER_COUNT);
}

/// Finds the device, moves BAR0, turns on decoding, bus mastering and MSI-X vector 0 aimed
/// at this CPU, or its INTx (`irq=intx`). Returns the registers at their new place and how
/// interrupts come.
fn setup_device(p: &Params) -> (Regs, Irq) {
    let f = pci::find(VENDOR, DEVICE)
        .unwrap_or_else(|| fail(rt::EXIT_SETUP, "no device 0xfeed:0x0001 on PCI bus 0"));
    let bar = f
        .memory_bar(0)
        .unwrap_or_else(|| fail(rt::EXIT_SETUP, "BAR0 is not a memory BAR"));
    let new = match p.bar {
        0 => (bar.base + (1 << 20).max(bar.size)).next_multiple_of(bar.size),
        at => at,
    };
    let fits = bar.is_64 || new.saturating_add(bar.size) <= 1 << 32;
    if !new.is_multiple_of(bar.size) || !fits || new == bar.base {
        let why = "bar= is where BAR0 is, not aligned to its size, or not below 4 GiB";
        fail(rt::EXIT_SETUP, why);
    }
    f.move_memory_bar(0, new, bar.is_64);
    let moved = f.memory_bar(0).map_or(0, |b| b.base);
    let on = pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER;
    // INTx is disabled while MSI-X is used, as drivers do, and enabled when it is the way.
    let command = match p.intx {
        false => f.command() | on | pci::COMMAND_INTX_DISABLE,
        true => (f.command() | on) & !pci::COMMAND_INTX_DISABLE,
    };
    f.set_command(command);
    check_bar_move(&f, bar.base, new, moved);
    let irq = match p.intx {
        false => Irq::Msix {
            pba: setup_msix(&f, new),
        },
        true => Irq::Intx {
            pin: setup_intx(&f, new),
        },
    };
    (Regs { base: new }, irq)
}

/// Routes the function's INTx: INTERRUPT_LINE names the IOAPIC pin (as the VMM wired it),
/// programmed level-triggered, active high, to IRQ_VECTOR on this CPU. STATUS is cleared
/// first, so that the handler counts only this guest's completions. Returns the pin.
fn setup_intx(f: &pci::Function, bar0: u64) -> u32 {
    let (line, pin) = f.interrupt();
    let pins = ioapic::pins();
    if pin == 0 || u32::from(line) >= pins {
        let mut l = rt::line();
        l.s(WHO).s(": no INTx: interrupt pin=").u(pin as u64);
        l.s(" line=").u(line as u64);
        l.s(" ioapic pins=").u(pins as u64);
        drop(l);
        rt::exit(rt::EXIT_SETUP);
    }
    let regs = Regs { base: bar0 };
    regs.write(sdregs::STATUS, sdregs::STATUS_DONE | sdregs::STATUS_ERROR);
    INTX_STATUS_REG.store(bar0 + sdregs::STATUS, Ordering::SeqCst);
    ioapic::route_level(u32::from(line), IRQ_VECTOR, lapic::id());
    let mut l = rt::line();
    l.s(WHO).s(": INTx pin=").u(pin as u64);
    l.s(" line=").u(line as u64);
    l.s(" ioapic pins=").u(pins as u64).s(" entry=");
    l.x(ioapic::entry(u32::from(line)) as u64);
    drop(l);
    u32::from(line)
}

/// The device must answer at the BAR's new address only: a VMM that kept the old mapping,
/// or did not follow the write, fails here rather than in some later DMA.
fn check_bar_move(f: &pci::Function, old: u64, new: u64, moved: u64) {
    let id_old = Regs { base: old }.read32(sdregs::ID);
    let id_new = Regs { base: new }.read32(sdregs::ID);
    let mut l = rt::line();
    l.s(WHO).s(": device ").u(f.device as u64);
    l.s(".").u(f.function as u64).s(" bar0=").x(old);
    l.s(" moved to ").x(moved).s(" id at old=").x(id_old as u64);
    l.s(" at new=").x(id_new as u64);
    drop(l);
    if moved != new || id_new != sdregs::ID_MAGIC || id_old == sdregs::ID_MAGIC {
        let mut l = rt::line();
        l.s("DMATEST error bar-move old=").x(old).s(" new=").x(new);
        drop(l);
        rt::exit(rt::EXIT_DEVICE_ERROR);
    }
}

/// MSI-X vector 0 -> IRQ_VECTOR on this CPU, the others left masked. Enabled with the
/// function masked first, so that no vector can fire half-programmed. Returns the PBA.
fn setup_msix(f: &pci::Function, bar0: u64) -> u64 {
    let msix = f
        .msix()
        .unwrap_or_else(|| fail(rt::EXIT_SETUP, "no MSI-X capability"));
    if msix.table_bar != 0 || msix.pba_bar != 0 {
        fail(rt::EXIT_SETUP, "MSI-X table or PBA not in BAR0");
    }
    f.msix_control(&msix, true, true);
    let table = bar0 + msix.table_offset as u64;
    let address = pci::msi_address(lapic::id());
    pci::msix_entry(table, 0, address, IRQ_VECTOR as u32, false);
    f.msix_control(&msix, true, false);
    bar0 + msix.pba_offset as u64
}

/// The test's running state.
struct Test {
    p: Params,
    regs: Regs,
    irq: Irq,
    tsc_hz: u64,
    clock: rt::Clock,
    hb: heartbeat::Heartbeat,
    /// COUNTER when the guest started, and DMA operations completed since.
    counter0: u64,
    ops: u64,
    /// Checksum of each buffer's current content, and of everything verified so far.
    sums: [u64; MAX_BUFS],
    total: u64,
    model: StateModel<'static>,
}

impl Test {
    fn new(
        boot: &rt::Boot,
        p: Params,
        regs: Regs,
        irq: Irq,
        tsc_hz: u64,
        hb: heartbeat::Heartbeat,
        bufs_end: u64,
    ) -> Test {
        regs.write(sdregs::STATE_SEED, p.state_seed);
        let model = state_model(boot, &regs, p.state_seed, bufs_end);
        Test {
            counter0: regs.read(sdregs::COUNTER),
            p,
            regs,
            irq,
            tsc_hz,
            // Steps above 100 ms (a pause, a migration) count as 100 ms for both the
            // heartbeats and the irq timeout.
            clock: rt::Clock::new(tsc_hz / 10),
            hb,
            ops: 0,
            sums: [0; MAX_BUFS],
            total: 0,
            model,
        }
    }

    fn info(&self) {
        let mut l = rt::line();
        l.s(WHO)
            .s(": rounds=")
            .u(self.p.rounds)
            .s(" bufs=")
            .u(self.p.bufs);
        l.s(" buf_kb=")
            .u(self.p.buf_bytes / 1024)
            .s(" irq_ms=")
            .u(self.p.irq_ms);
        l.s(" state_words=")
            .u(self.regs.read(sdregs::STATE_SIZE) / 8);
        l.s(" tracked=")
            .u(self.model.tracked())
            .s(" counter=")
            .u(self.counter0);
        l.s(" tsc_khz=").u(self.tsc_hz / 1000);
        l.s(" irq=").s(if self.p.intx { "intx" } else { "msix" });
    }

    fn tick(&mut self) -> u64 {
        let step = self.clock.step();
        self.hb.advance(step);
        step
    }
}

/// The expected-state model, its arrays in RAM right after the buffers: a bitmap of the
/// changed words, then their values. The seed was just written, so the device's state is
/// exactly the seeded one now.
fn state_model(boot: &rt::Boot, regs: &Regs, seed: u64, after: u64) -> StateModel<'static> {
    let words = regs.read(sdregs::STATE_SIZE) / 8;
    let tracked = words.min(MAX_TRACKED);
    let known_at = after.next_multiple_of(PAGE);
    let known_len = tracked.div_ceil(64);
    let values_at = (known_at + known_len * 8).next_multiple_of(PAGE);
    if !is_ram(boot, known_at, values_at + tracked * 8) {
        fail(
            rt::EXIT_SETUP,
            "not enough RAM above the buffers for the state model",
        );
    }
    // SAFETY: both arrays lie in e820 RAM above the buffers (checked just above), which
    // nothing else uses: not the image (below 16 MiB), not the device (it writes only the
    // buffers). They are created once and live as long as the guest.
    let (known, values) = unsafe {
        let known = core::slice::from_raw_parts_mut(known_at as *mut u64, known_len as usize);
        let values = core::slice::from_raw_parts_mut(values_at as *mut u64, tracked as usize);
        known.fill(0);
        (known, values)
    };
    StateModel::new(seed, words, known, values)
}

impl Test {
    fn buf_addr(&self, buf: u64) -> u64 {
        BUF_BASE + buf * self.p.buf_bytes
    }

    /// One round: every buffer checked against the previous round's fill, filled anew by
    /// DMA and checked word by word; then the internal state is sampled.
    fn round(&mut self, round: u64) {
        for buf in 0..self.p.bufs {
            if round > 1 {
                self.recheck(buf, buffer_seed(round - 1, buf));
            }
            let seed = buffer_seed(round, buf);
            self.dma_fill(round, buf, seed);
            let sum = self.verify(buf, seed);
            self.sums[buf as usize] = sum;
            self.total = checksum_step(self.total, sum);
        }
        if self.p.state_every != 0 && round.is_multiple_of(self.p.state_every) {
            self.check_state(round, self.p.bufs * self.p.state_every);
        }
        let mut l = rt::line();
        l.s("DMATEST round ").u(round).s(" ok bufs=").u(self.p.bufs);
        l.s(" irqs=").u(IRQS.load(Ordering::SeqCst));
        l.s(" counter=").u(self.regs.read(sdregs::COUNTER));
        l.s(" sum=").x(self.total);
        if self.p.intx {
            l.s(" spurious=").u(SPURIOUS.load(Ordering::SeqCst));
        }
    }

    /// After the last round: every buffer once more, then exit 0.
    fn final_check(&mut self) -> ! {
        for buf in 0..self.p.bufs {
            self.recheck(buf, buffer_seed(self.p.rounds, buf));
        }
        let mut l = rt::line();
        l.s("DMATEST verify ok bufs=")
            .u(self.p.bufs)
            .s(" sum=")
            .x(self.total);
        drop(l);
        rt::exit(rt::EXIT_OK)
    }
}

impl Test {
    /// Fills buffer `buf` by DMA with `seed` and waits for the completion interrupt; checks
    /// STATUS, COUNTER and the interrupt count and updates the state model.
    fn dma_fill(&mut self, round: u64, buf: u64, seed: u64) {
        let r = self.regs;
        if r.read(sdregs::STATUS) & sdregs::STATUS_BUSY != 0 {
            device_error(r.read(sdregs::STATUS));
        }
        r.write(sdregs::DMA_DST, self.buf_addr(buf));
        r.write(sdregs::DMA_LEN, self.p.buf_bytes);
        r.write(sdregs::DMA_PATTERN, seed);
        r.write(sdregs::DMA_VECTOR, 0);
        r.write(sdregs::DMA_CMD, sdregs::CMD_FILL);
        self.ops += 1;
        if !self.wait_irq(self.ops) {
            let mut l = rt::line();
            l.s("DMATEST no-irq round=").u(round).s(" buf=").u(buf);
            l.s(" status=").x(r.read(sdregs::STATUS));
            l.s(" counter=").u(r.read(sdregs::COUNTER));
            l.s(" irqs=").u(IRQS.load(Ordering::SeqCst));
            match self.irq {
                Irq::Msix { pba: at } => l.s(" pba=").x(pba(at) as u64),
                Irq::Intx { pin } => l.s(" ioapic=").x(ioapic::entry(pin) as u64),
            };
            drop(l);
            rt::exit(rt::EXIT_NO_IRQ);
        }
        // With INTx the handler has read STATUS and cleared DONE already: its view counts.
        let status = match self.irq {
            Irq::Msix { .. } => r.read(sdregs::STATUS),
            Irq::Intx { .. } => INTX_SEEN.swap(0, Ordering::SeqCst),
        };
        if status & (sdregs::STATUS_ERROR | sdregs::STATUS_BUSY) != 0
            || status & sdregs::STATUS_DONE == 0
        {
            device_error(status);
        }
        if let Irq::Msix { .. } = self.irq {
            r.write(sdregs::STATUS, sdregs::STATUS_DONE);
        }
        let counter = r.read(sdregs::COUNTER);
        expect("counter", self.counter0 + self.ops, counter);
        expect("irqs", self.ops, IRQS.load(Ordering::SeqCst));
        self.model.apply(counter);
    }

    /// Sleeps until `want` completion interrupts have come in total; false after `irq_ms`
    /// without.
    fn wait_irq(&mut self, want: u64) -> bool {
        ensure_timer();
        let deadline = self.tsc_hz / 1000 * self.p.irq_ms;
        let mut waited = 0;
        while IRQS.load(Ordering::SeqCst) < want {
            if waited >= deadline {
                return false;
            }
            idt::sleep_until_interrupt();
            waited += self.tick();
        }
        true
    }
}

/// Restarts the LAPIC timer if it stopped (a VMM that lost the LAPIC state across a
/// migration), saying so once: without it, a missing MSI would leave `hlt` asleep forever
/// instead of ending in `no-irq`.
fn ensure_timer() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if lapic::timer_running() {
        return;
    }
    if !WARNED.swap(true, Ordering::SeqCst) {
        rt::line().s(WHO).s(": LAPIC timer had stopped; restarted");
    }
    lapic::timer_periodic(TIMER_VECTOR, TIMER_COUNT);
}

fn pba(addr: u64) -> u32 {
    // SAFETY: the PBA is in BAR0 (checked in `setup_msix`), in the PCI hole, not RAM.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn device_error(status: u64) -> ! {
    rt::line().s("DMATEST error status=").x(status);
    rt::exit(rt::EXIT_DEVICE_ERROR)
}

/// Ends the guest with `DMATEST BAD <what> want=.. got=..` unless the two agree.
fn expect(what: &str, want: u64, got: u64) {
    if want != got {
        rt::line()
            .s("DMATEST BAD ")
            .s(what)
            .s(" want=")
            .u(want)
            .s(" got=")
            .u(got);
        rt::exit(rt::EXIT_BAD_PAGE);
    }
}

impl Test {
    /// Compares buffer `buf` word by word with a FILL by `seed`; returns its checksum.
    fn verify(&mut self, buf: u64, seed: u64) -> u64 {
        let addr = self.buf_addr(buf);
        let words = self.p.buf_bytes / 8;
        let mut sum = 0;
        let mut w = 0;
        while w < words {
            let end = (w + WORDS_PER_TICK).min(words);
            while w < end {
                let (want, got) = (fill_word(seed, w), read_ram(addr + w * 8));
                if got != want {
                    bad_word(buf, w, want, got);
                }
                sum = checksum_step(sum, got);
                w += 1;
            }
            self.tick();
        }
        sum
    }

    /// Checks that buffer `buf` still holds the FILL by `seed` that `verify` saw: by its
    /// checksum, which is four times cheaper than the pattern, and word by word (to name the
    /// word) only if that differs.
    fn recheck(&mut self, buf: u64, seed: u64) {
        let addr = self.buf_addr(buf);
        let words = self.p.buf_bytes / 8;
        let mut sum = 0;
        let mut w = 0;
        while w < words {
            let end = (w + WORDS_PER_TICK).min(words);
            while w < end {
                sum = checksum_step(sum, read_ram(addr + w * 8));
                w += 1;
            }
            self.tick();
        }
        let want = self.sums[buf as usize];
        if sum != want {
            self.verify(buf, seed);
            // Same words, different checksum: the buffer changed while being read.
            rt::line()
                .s("DMATEST BAD buf=")
                .u(buf)
                .s(" sum want=")
                .x(want)
                .s(" got=")
                .x(sum);
            rt::exit(rt::EXIT_BAD_PAGE);
        }
    }
}

fn bad_word(buf: u64, word: u64, want: u64, got: u64) -> ! {
    let mut l = rt::line();
    l.s("DMATEST BAD buf=").u(buf).s(" off=").x(word * 8);
    l.s(" want=").x(want).s(" got=").x(got);
    drop(l);
    rt::exit(rt::EXIT_BAD_PAGE)
}

impl Test {
    /// Reads back, through STATE_WINDOW, every word the operations of the last `ops_back`
    /// operations changed, words changed by earlier operations picked by `round`, and
    /// untouched ones; compares them with the model and prints their hash.
    fn check_state(&mut self, round: u64, ops_back: u64) {
        let tracked = self.model.tracked();
        if tracked == 0 || self.ops == 0 {
            return;
        }
        let last = self.counter0 + self.ops;
        let mut hash = 0;
        for op in last + 1 - ops_back.min(self.ops).min(MAX_CHECKED_OPS)..=last {
            for k in 0..sdpattern::MUTATIONS_PER_OP {
                hash = self.check_word(self.model.mutation(op, k), hash);
            }
        }
        for k in 0..STATE_SAMPLES {
            let r = splitmix64(round << 8 | k);
            let earlier = self.counter0 + 1 + r % self.ops;
            let changed = self.model.mutation(earlier, r >> 62);
            hash = self.check_word(changed, hash);
            hash = self.check_word(splitmix64(r) % tracked, hash);
        }
        rt::line().s("DMATEST state hash=").x(hash);
    }

    /// Compares state word `index` (if the model tracks it) and folds it into `hash`.
    fn check_word(&self, index: u64, hash: u64) -> u64 {
        let Some(want) = self.model.expected(index) else {
            return hash;
        };
        let got = self.regs.state_word(index);
        if got != want {
            let mut l = rt::line();
            l.s("DMATEST BAD state word=").u(index);
            l.s(" want=").x(want).s(" got=").x(got);
            drop(l);
            rt::exit(rt::EXIT_BAD_PAGE);
        }
        checksum_step(hash, splitmix64(index ^ got))
    }
}
