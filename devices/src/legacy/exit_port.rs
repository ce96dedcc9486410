//! The isa-debug-exit port (QEMU's address, 0xF4): a byte written there ends the VM and becomes
//! minivmm's exit code verbatim (QEMU instead exits with `(v << 1) | 1`), which is how test guests
//! report pass or fail.

use migration::state::{Persist, StateError};
use serde::{Deserialize, Serialize};

use super::ExitSignal;
use crate::bus::BusDevice;

pub const EXIT_PORT_BASE: u64 = 0xf4;
pub const EXIT_PORT_LEN: u64 = 1;

const ID: &str = "exit-port";

/// The port keeps no state; the struct exists so every device migrates the same way.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitPortState {}

pub struct ExitPort {
    exit: ExitSignal,
}

impl ExitPort {
    pub fn new(exit: ExitSignal) -> Self {
        ExitPort { exit }
    }
}

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// Only the low byte counts, so `out dx, ax` and `out dx, al` agree.
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&code) = data.first() else {
            return;
        };
        if self.exit.request(i32::from(code)) {
            log::info!("guest requested exit with code {code} through port 0xf4");
        }
    }
}

impl Persist for ExitPort {
    type State = ExitPortState;
    const ID: &'static str = ID;

    fn state(&self) -> ExitPortState {
        ExitPortState {}
    }

    fn restore(&mut self, _state: &ExitPortState) -> Result<(), StateError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration::state::Migratable;

    #[test]
    fn written_byte_becomes_exit_code_and_first_wins() {
        let exit = ExitSignal::new().unwrap();
        let mut port = ExitPort::new(exit.clone());
        port.write(0, &[]);
        assert_eq!(exit.code(), None);

        port.write(0, &[0xc3, 0x01]);
        assert_eq!(exit.code(), Some(0xc3));
        assert_eq!(exit.wait_fd().read().unwrap(), 1);

        port.write(0, &[3]);
        assert_eq!(exit.code(), Some(0xc3));
        assert!(exit.wait_fd().read().is_err());
    }

    #[test]
    fn shared_with_i8042_reset() {
        let exit = ExitSignal::new().unwrap();
        let mut i8042 = super::super::I8042::new(exit.clone());
        let mut port = ExitPort::new(exit.clone());
        i8042.write(4, &[0xfe]);
        port.write(0, &[3]);
        assert_eq!(exit.code(), Some(0));
    }

    #[test]
    fn state_round_trip() {
        let port = ExitPort::new(ExitSignal::new().unwrap());
        let mut dst = ExitPort::new(ExitSignal::new().unwrap());
        dst.restore_state(&port.save_state().unwrap()).unwrap();
        assert_eq!(dst.state(), port.state());
    }
}
