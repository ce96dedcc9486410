//! `mtty`: drives the kernel's mtty sample device (a PCI function with one 16550-like UART
//! per I/O BAR whose transmitter loops back into its receive FIFO; 0x4348:0x3253) the way a
//! serial driver would, and proves from inside that its config space, its INTx and its
//! internal state (FIFO contents, scratch and line-control registers) survive a migration.
//!
//! 1. Finds the function, prints what it reads of its configuration space (`MTTY ids ...`,
//!    `MTTY cfg ...` dwords 0x00..0x6f, `MTTY tag ...` the vendor bytes at 0x60).
//! 2. Routes INTx to the IOAPIC pin INTERRUPT_LINE names (level-triggered), enables the
//!    receive-data interrupt of port 0 and runs `rounds=` loopback rounds: one byte out, one
//!    interrupt in, the byte read back (`MTTY intx ok rounds=N irqs=N retries=R`). mtty masks
//!    its INTx on every interrupt until the VMM unmasks it after the EOI, and drops any that
//!    come while masked, so a round that gets none within `irq_ms=` is retried once the byte
//!    is drained (counted in `retries`).
//! 3. Leaves 12 bytes in port 0's FIFO, 5 in port 1's, values in both scratch registers and
//!    in port 1's LCR (`MTTY loaded ...`), prints heartbeats for `hold_ms=` (migrate now), then
//!    reads them all back (`MTTY state ok ...` or `MTTY BAD state ...`).
//! 4. Runs `after=` more INTx rounds (`MTTY intx after ok ...`), prints `MTTY done irqs=N`
//!    and exits 0.
//!
//! Command line: `rounds=8 after=4 hold_ms=0 hb_ms=50 irq_ms=500 gap_ms=5`.
#![no_std]
#![no_main]

mod heartbeat;
mod idt;
mod ioapic;
mod lapic;
mod pci;
mod rt;

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

const WHO: &str = "mtty";
const VENDOR: u16 = 0x4348;
const DEVICE: u16 = 0x3253;
const IRQ_VECTOR: u8 = 0x40;
const TIMER_VECTOR: u8 = 0x41;
const SPURIOUS_VECTOR: u8 = 0xff;
/// ~1 ms LAPIC timer: only wakes `hlt` so that timeouts measured with the TSC expire.
const TIMER_COUNT: u32 = 62_500;

// UART registers (offsets in the I/O BAR) and bits.
const RBR_THR: u16 = 0;
const IER: u16 = 1;
const FCR: u16 = 2;
const LCR: u16 = 3;
const LSR: u16 = 5;
const SCR: u16 = 7;
const IER_RDI: u8 = 0x01;
const FCR_ENABLE_CLEAR: u8 = 0x07;
const LCR_8N1: u8 = 0x03;
const LSR_DR: u8 = 0x01;

const FIFO0: &[u8; 12] = b"minivmm-mtty";
const FIFO1: &[u8; 5] = b"state";
const SCR0: u8 = 0x5a;
const SCR1: u8 = 0xa5;
const LCR1: u8 = 0x1b;

/// INTx interrupts taken on IRQ_VECTOR.
static IRQS: AtomicU64 = AtomicU64::new(0);

// INTx handler: count, EOI (which the IOAPIC passes on for a level-triggered pin, so the VMM
// learns of it and unmasks the device), return. Touches no register but RAX (saved).
global_asm!(
    r#"
    .pushsection .text.mtty_irq, "ax", @progbits
    .global mtty_intx
mtty_intx:
    pushq %rax
    lock incq {irqs}(%rip)
    movabsq ${eoi}, %rax
    movl $0, (%rax)
    popq %rax
    iretq
    .popsection
"#,
    irqs = sym IRQS,
    eoi = const lapic::EOI_ADDR,
    options(att_syntax)
);

unsafe extern "C" {
    fn mtty_intx();
}

fn fail(what: &str) -> ! {
    rt::line().s("MTTY BAD ").s(what);
    rt::exit(rt::EXIT_DEVICE_ERROR)
}

struct Params {
    rounds: u64,
    after: u64,
    hold_ms: u64,
    hb_ms: u64,
    irq_ms: u64,
    gap_ms: u64,
}

struct Test {
    p: Params,
    tsc_hz: u64,
    hb: heartbeat::Heartbeat,
    clock: rt::Clock,
    port0: u16,
    port1: u16,
    retries: u64,
}

impl Test {
    /// Advances the heartbeat by the time since the last call; returns the ticks.
    fn tick(&mut self) -> u64 {
        let t = self.clock.step();
        self.hb.advance(t);
        t
    }

    fn wait_irq(&mut self, want: u64) -> bool {
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

    fn pause_ms(&mut self, ms: u64) {
        let ticks = self.tsc_hz / 1000 * ms;
        let mut waited = 0;
        while waited < ticks {
            idt::sleep_until_interrupt();
            waited += self.tick();
        }
    }

    /// Loopback rounds on port 0 with its receive interrupt on: each byte written must raise
    /// exactly one interrupt and come back.
    fn intx_rounds(&mut self, rounds: u64, what: &str) {
        let base = self.port0;
        for round in 0..rounds {
            let byte = b'A' + (round % 26) as u8;
            let want = IRQS.load(Ordering::SeqCst) + 1;
            let mut tries = 0;
            loop {
                rt::outb(base + RBR_THR, byte);
                if self.wait_irq(want) {
                    break;
                }
                // Lost while masked (or never coming): drain and write again.
                let _ = rt::inb(base + RBR_THR);
                tries += 1;
                self.retries += 1;
                if tries == 3 {
                    rt::line().s("MTTY BAD no INTx ").s(what).s(" round ").u(round);
                    rt::exit(rt::EXIT_NO_IRQ);
                }
            }
            if rt::inb(base + LSR) & LSR_DR == 0 {
                rt::line().s("MTTY BAD LSR shows no data ").s(what).s(" round ").u(round);
                rt::exit(rt::EXIT_DEVICE_ERROR);
            }
            let got = rt::inb(base + RBR_THR);
            if got != byte || rt::inb(base + LSR) & LSR_DR != 0 {
                let mut l = rt::line();
                l.s("MTTY BAD loopback ").s(what).s(" round ").u(round);
                l.s(" wrote=").x(byte as u64).s(" read=").x(got as u64);
                drop(l);
                rt::exit(rt::EXIT_DEVICE_ERROR);
            }
            self.pause_ms(self.p.gap_ms);
        }
    }

    fn load_state(&mut self) {
        let (p0, p1) = (self.port0, self.port1);
        rt::outb(p0 + IER, 0);
        rt::outb(p1 + IER, 0);
        rt::outb(p1 + FCR, FCR_ENABLE_CLEAR);
        for &b in FIFO0 {
            rt::outb(p0 + RBR_THR, b);
        }
        for &b in FIFO1 {
            rt::outb(p1 + RBR_THR, b);
        }
        rt::outb(p0 + SCR, SCR0);
        rt::outb(p1 + SCR, SCR1);
        rt::outb(p1 + LCR, LCR1);
        let mut l = rt::line();
        l.s("MTTY loaded fifo0=").u(FIFO0.len() as u64);
        l.s(" fifo1=").u(FIFO1.len() as u64);
        l.s(" scr=").x(SCR0 as u64).s(",").x(SCR1 as u64);
        l.s(" lcr1=").x(LCR1 as u64);
    }

    /// Drains one port's FIFO (up to 16 bytes) into `out`; returns how many.
    fn drain(port: u16, out: &mut [u8; 16]) -> usize {
        let mut n = 0;
        while n < out.len() && rt::inb(port + LSR) & LSR_DR != 0 {
            out[n] = rt::inb(port + RBR_THR);
            n += 1;
        }
        n
    }

    fn check_state(&mut self) {
        let (p0, p1) = (self.port0, self.port1);
        let (mut b0, mut b1) = ([0u8; 16], [0u8; 16]);
        let n0 = Self::drain(p0, &mut b0);
        let n1 = Self::drain(p1, &mut b1);
        let (s0, s1, lcr1) = (rt::inb(p0 + SCR), rt::inb(p1 + SCR), rt::inb(p1 + LCR));
        let ok = &b0[..n0] == FIFO0 && &b1[..n1] == FIFO1 && (s0, s1, lcr1) == (SCR0, SCR1, LCR1);
        let mut l = rt::line();
        l.s(if ok { "MTTY state ok" } else { "MTTY BAD state" });
        l.s(" fifo0=").u(n0 as u64).s(":").b(&b0[..n0]);
        l.s(" fifo1=").u(n1 as u64).s(":").b(&b1[..n1]);
        l.s(" scr=").x(s0 as u64).s(",").x(s1 as u64);
        l.s(" lcr1=").x(lcr1 as u64);
        drop(l);
        if !ok {
            rt::exit(rt::EXIT_DEVICE_ERROR);
        }
        rt::outb(p1 + LCR, LCR_8N1);
    }
}

/// The port base of I/O BAR `index`.
fn io_bar(f: &pci::Function, index: u8) -> u16 {
    let reg = f.read32(pci::BAR0 + 4 * index);
    if reg & 1 == 0 || reg & !3 == 0 {
        fail("a BAR is not an assigned I/O BAR");
    }
    (reg & 0xfffc) as u16
}

/// Prints the configuration space as the guest reads it.
fn print_config(f: &pci::Function) {
    let (vendor, device) = f.ids();
    let class = f.read32(0x08);
    let sub = f.read32(0x2c);
    let (line, pin) = f.interrupt();
    let mut l = rt::line();
    l.s("MTTY ids vendor=").x(vendor as u64).s(" device=").x(device as u64);
    l.s(" class=").x((class >> 8) as u64).s(" rev=").x((class & 0xff) as u64);
    l.s(" subsys=").x((sub & 0xffff) as u64).s(":").x((sub >> 16) as u64);
    l.s(" pin=").u(pin as u64).s(" line=").u(line as u64);
    drop(l);
    let mut l = rt::line();
    l.s("MTTY cfg");
    for reg in (0..0x70u8).step_by(4) {
        l.s(" ").x(f.read32(reg) as u64);
    }
    drop(l);
    let mut tag = [0u8; 15];
    for (i, b) in tag.iter_mut().enumerate() {
        *b = f.read8(0x60 + i as u8);
    }
    let printable = tag.iter().all(|b| (0x20..0x7f).contains(b));
    rt::line().s("MTTY tag ").b(if printable { &tag } else { b"(unprintable)" });
}

fn guest_main(boot: rt::Boot) -> ! {
    let cmd = boot.cmdline();
    let p = Params {
        rounds: rt::arg_u64(cmd, WHO, "rounds", 8, 1, 1000),
        after: rt::arg_u64(cmd, WHO, "after", 4, 0, 1000),
        hold_ms: rt::arg_u64(cmd, WHO, "hold_ms", 0, 0, 600_000),
        hb_ms: rt::arg_u64(cmd, WHO, "hb_ms", 50, 1, 10_000),
        irq_ms: rt::arg_u64(cmd, WHO, "irq_ms", 500, 1, 60_000),
        gap_ms: rt::arg_u64(cmd, WHO, "gap_ms", 5, 0, 10_000),
    };
    let tsc_hz = rt::calibrate_tsc(WHO);
    let mut hb = heartbeat::Heartbeat::new(tsc_hz, p.hb_ms);
    hb.beat();
    idt::init_lapic(TIMER_VECTOR, SPURIOUS_VECTOR);
    idt::set(IRQ_VECTOR, mtty_intx);
    lapic::timer_periodic(TIMER_VECTOR, TIMER_COUNT);

    let Some(f) = pci::find(VENDOR, DEVICE) else {
        fail("no mtty (4348:3253) on PCI bus 0");
    };
    print_config(&f);
    let (port0, port1) = (io_bar(&f, 0), io_bar(&f, 1));
    f.set_command((f.command() | pci::COMMAND_IO) & !pci::COMMAND_INTX_DISABLE);
    let (line, pin) = f.interrupt();
    if pin == 0 || u32::from(line) >= ioapic::pins() {
        fail("no usable INTx (INTERRUPT_PIN/LINE)");
    }
    ioapic::route_level(u32::from(line), IRQ_VECTOR, lapic::id());
    let mut l = rt::line();
    l.s("MTTY ports ").x(port0 as u64).s(",").x(port1 as u64);
    l.s(" intx line=").u(line as u64).s(" entry=").x(ioapic::entry(u32::from(line)) as u64);
    drop(l);

    for port in [port0, port1] {
        rt::outb(port + LCR, LCR_8N1);
        rt::outb(port + FCR, FCR_ENABLE_CLEAR);
    }
    rt::outb(port0 + IER, IER_RDI);
    let mut t = Test {
        p,
        tsc_hz,
        hb,
        clock: rt::Clock::new(tsc_hz / 10),
        port0,
        port1,
        retries: 0,
    };
    t.intx_rounds(t.p.rounds, "before");
    let mut l = rt::line();
    l.s("MTTY intx ok rounds=").u(t.p.rounds);
    l.s(" irqs=").u(IRQS.load(Ordering::SeqCst)).s(" retries=").u(t.retries);
    drop(l);

    t.load_state();
    t.pause_ms(t.p.hold_ms);
    t.check_state();

    rt::outb(port0 + IER, IER_RDI);
    let before = IRQS.load(Ordering::SeqCst);
    t.intx_rounds(t.p.after, "after");
    let mut l = rt::line();
    l.s("MTTY intx after ok rounds=").u(t.p.after);
    l.s(" irqs=").u(IRQS.load(Ordering::SeqCst) - before).s(" retries=").u(t.retries);
    drop(l);
    rt::line().s("MTTY done irqs=").u(IRQS.load(Ordering::SeqCst));
    rt::exit(rt::EXIT_OK)
}
