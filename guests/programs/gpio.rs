//! `gpio`: drives an ACCES PCI-IDIO-16 GPIO card (0x494f:0x0dc8, as libvfio-user's
//! `gpio-pci-idio-16` sample serves it) through its I/O BAR 2, the way Linux's
//! `gpio-pci-idio-16` driver reaches the registers: each round pulses all 16 output lines
//! (writes to 0x0 and 0x4) and reads the 16 input lines (0x1 and 0x5), which the sample
//! derives from how often each output was pulsed (line high every third pulse). A wrong
//! input means the device's pulse counters were lost or doubled, for example by a migration
//! that did not move them.
//!
//! Command line: `rounds=N` (0: forever), `ms=M` between rounds.
#![no_std]
#![no_main]

mod pci;
mod rt;

const VENDOR: u16 = 0x494f;
const DEVICE: u16 = 0x0dc8;
const OUT_LOW: u16 = 0x0;
const IN_LOW: u16 = 0x1;
const OUT_HIGH: u16 = 0x4;
const IN_HIGH: u16 = 0x5;

fn fail(what: &str) -> ! {
    rt::line().s("GPIO BAD ").s(what);
    rt::exit(rt::EXIT_DEVICE_ERROR)
}

/// The port base of I/O BAR `index`, after checking it is an I/O BAR.
fn io_bar(f: &pci::Function, index: u8) -> u16 {
    let reg = f.read32(pci::BAR0 + 4 * index);
    if reg & 1 == 0 || reg & !3 == 0 {
        fail("BAR 2 is not an assigned I/O BAR");
    }
    (reg & 0xfffc) as u16
}

fn guest_main(boot: rt::Boot) -> ! {
    let cmdline = boot.cmdline();
    let rounds = rt::arg_u64(cmdline, "gpio", "rounds", 3, 0, u64::MAX);
    let ms = rt::arg_u64(cmdline, "gpio", "ms", 20, 0, 10_000);
    let Some(f) = pci::find(VENDOR, DEVICE) else {
        fail("no PCI-IDIO-16 on bus 0");
    };
    let base = io_bar(&f, 2);
    f.set_command(f.command() | pci::COMMAND_IO);
    rt::line()
        .s("GPIO found at device ")
        .u(f.device as u64)
        .s(", BAR 2 at port ")
        .x(base as u64);
    let tsc_hz = rt::calibrate_tsc("gpio");
    // The sample starts with every counter at 0, so every input reads high.
    let mut pulses: u64 = 0;
    let mut round: u64 = 1;
    while rounds == 0 || round <= rounds {
        let want: u8 = if pulses.is_multiple_of(3) { 0xff } else { 0x00 };
        let got = (rt::inb(base + IN_LOW), rt::inb(base + IN_HIGH));
        if got != (want, want) {
            rt::line()
                .s("GPIO BAD round ")
                .u(round)
                .s(" pulses=")
                .u(pulses)
                .s(" inputs=")
                .x(got.0 as u64)
                .s(",")
                .x(got.1 as u64);
            rt::exit(rt::EXIT_DEVICE_ERROR);
        }
        rt::outb(base + OUT_LOW, 0xff);
        rt::outb(base + OUT_HIGH, 0xff);
        pulses += 1;
        rt::line()
            .s("GPIO round ")
            .u(round)
            .s(" ok pulses=")
            .u(pulses);
        rt::spin_ticks(tsc_hz * ms / 1000);
        round += 1;
    }
    rt::exit(rt::EXIT_OK)
}
