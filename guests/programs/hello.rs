//! `hello`: the smallest guest. Proves entry, zero page, serial output and the exit port.
#![no_std]
#![no_main]

mod rt;

fn guest_main(boot: rt::Boot) -> ! {
    rt::line().s("hello: minivmm guest up");
    rt::line().s("hello: cmdline=\"").b(boot.cmdline()).s("\"");
    rt::exit(rt::EXIT_OK)
}
