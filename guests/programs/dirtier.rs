#![no_std]
#![no_main]
mod rt;
fn guest_main(_boot: rt::Boot) -> ! { rt::exit(0) }
