//! Port 0x80, the POST-code port. Linux writes it as an I/O delay (`outb_p`), firmware-style
//! guests write progress codes; with no device there every write would still exit to the VMM and
//! hit the bus's "no device" path. The last code is kept because it is what a guest (or a human
//! debugging a hang) can read back.

use migration::state::{Persist, StateError};
use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;

pub const POST_BASE: u64 = 0x80;
pub const POST_LEN: u64 = 1;

const ID: &str = "post";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostCodeState {
    pub last: u8,
}

#[derive(Default)]
pub struct PostCode {
    last: u8,
}

impl PostCode {
    pub fn new() -> Self {
        Self::default()
    }

    /// The last byte the guest wrote.
    pub fn last(&self) -> u8 {
        self.last
    }
}

impl BusDevice for PostCode {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(self.last);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            if v != self.last {
                log::trace!("POST code {v:#04x}");
            }
            self.last = v;
        }
    }
}

impl Persist for PostCode {
    type State = PostCodeState;
    const ID: &'static str = ID;

    fn state(&self) -> PostCodeState {
        PostCodeState { last: self.last }
    }

    fn restore(&mut self, state: &PostCodeState) -> Result<(), StateError> {
        self.last = state.last;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration::state::Migratable;

    #[test]
    fn keeps_last_code_across_migration() {
        let mut post = PostCode::new();
        post.write(0, &[0x42]);
        let mut b = [0u8];
        post.read(0, &mut b);
        assert_eq!(b[0], 0x42);

        let mut dst = PostCode::new();
        dst.restore_state(&post.save_state().unwrap()).unwrap();
        assert_eq!(dst.last(), 0x42);
    }
}
