//! The i8042 keyboard controller, reduced to what x86 guests use it for: pulsing the CPU reset
//! line (command 0xFE on port 0x64). Linux's reboot path and our test guests use it to end the
//! VM cleanly. No keyboard is attached: status reads show an empty, idle controller, so a guest
//! waiting for the input buffer to drain never blocks.

use std::convert::Infallible;

use migration::state::{Persist, StateError};
use serde::{Deserialize, Serialize};
use vm_superio::{I8042Device, Trigger};

use super::ExitSignal;
use crate::bus::BusDevice;

/// Ports 0x60 (data) to 0x64 (command/status); vm-superio counts offsets from 0x60.
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

/// A guest-requested reset ends the VM successfully.
pub const RESET_EXIT_CODE: i32 = 0;

const ID: &str = "i8042";

struct ResetTrigger(ExitSignal);

impl Trigger for ResetTrigger {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        if self.0.request(RESET_EXIT_CODE) {
            log::info!("guest requested a reset through the i8042");
        }
        Ok(())
    }
}

/// The controller keeps no state; the struct exists so every device migrates the same way.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

pub struct I8042 {
    inner: I8042Device<ResetTrigger>,
}

impl I8042 {
    pub fn new(exit: ExitSignal) -> Self {
        I8042 {
            inner: I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in (0u64..).zip(data.iter_mut()) {
            *b = match u8::try_from(offset.saturating_add(i)) {
                Ok(reg) if u64::from(reg) < I8042_LEN => self.inner.read(reg),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &v) in (0u64..).zip(data.iter()) {
            if let Ok(reg) = u8::try_from(offset.saturating_add(i)) {
                let Ok(()) = self.inner.write(reg, v);
            }
        }
    }
}

impl Persist for I8042 {
    type State = I8042State;
    const ID: &'static str = ID;

    fn state(&self) -> I8042State {
        I8042State {}
    }

    fn restore(&mut self, _state: &I8042State) -> Result<(), StateError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration::state::Migratable;

    const DATA: u64 = 0;
    const CMD_STATUS: u64 = 4;

    #[test]
    fn reset_command_requests_exit_with_code_zero() {
        let exit = ExitSignal::new().unwrap();
        let mut dev = I8042::new(exit.clone());

        // Other commands and the reset byte on the data port do nothing.
        dev.write(CMD_STATUS, &[0xad]);
        dev.write(DATA, &[0xfe]);
        assert_eq!(exit.code(), None);

        dev.write(CMD_STATUS, &[0xfe]);
        assert_eq!(exit.code(), Some(RESET_EXIT_CODE));
        assert_eq!(exit.wait_fd().read().unwrap(), 1);
    }

    #[test]
    fn status_shows_no_data_and_data_reads_zero() {
        let mut dev = I8042::new(ExitSignal::new().unwrap());
        let mut b = [0xaau8];
        dev.read(CMD_STATUS, &mut b);
        // Output buffer full (bit 0) and input buffer full (bit 1) both clear.
        assert_eq!(b[0] & 0x03, 0);
        dev.read(DATA, &mut b);
        assert_eq!(b[0], 0);
    }

    #[test]
    fn state_round_trip() {
        let dev = I8042::new(ExitSignal::new().unwrap());
        let bytes = dev.save_state().unwrap();
        let mut dst = I8042::new(ExitSignal::new().unwrap());
        dst.restore_state(&bytes).unwrap();
        assert_eq!(dst.state(), dev.state());
        assert!(dst.restore_state(&[0]).is_err());
    }
}
